"""The one module that knows which Keras backend runs: TensorFlow (default) or JAX.

Everything else in the service is backend-neutral Keras. What differs between backends lives
here: which devices there are and their real names, GPU memory settings (TensorFlow grows its
memory, JAX preallocates a fraction), the precision `auto` resolves to, the compiled forward
pass used for serving (`tf.function` or `jax.jit`), and JAX's persistent compilation cache.

The backend is chosen the Keras way, with `KERAS_BACKEND=tensorflow|jax` in the environment
before Keras is imported. Nothing here imports Keras, TensorFlow or JAX at module level.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

BACKENDS = ("tensorflow", "jax")


class BackendError(RuntimeError):
    """The requested Keras backend is unknown or not installed; the message says what to do."""


def name() -> str:
    """The Keras backend in use ('tensorflow' or 'jax'), read without importing Keras when the
    environment names it (Keras itself falls back to ~/.keras/keras.json, then tensorflow)."""
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        if chosen not in BACKENDS:
            raise BackendError(
                f"KERAS_BACKEND must be one of {', '.join(BACKENDS)}. Received: {chosen!r}"
            )
        return chosen
    import keras

    backend = str(keras.backend.backend())
    if backend not in BACKENDS:
        raise BackendError(f"the Keras backend {backend!r} is not supported; use tensorflow or jax")
    return backend


def is_jax() -> bool:
    return name() == "jax"


# ---------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class Device:
    kind: str  # "GPU" or "CPU"
    index: int
    name: str  # the hardware's own name, e.g. "NVIDIA H100 80GB HBM3"
    compute_capability: tuple[int, int] | None = None

    def label(self) -> str:
        """What a job records: 'GPU:0 NVIDIA H100 80GB HBM3' or 'CPU'."""
        if self.kind == "CPU":
            return "CPU"
        return f"{self.kind}:{self.index} {self.name}"


def configure_memory(role: str = "worker") -> None:
    """GPU memory before the backend starts: one worker owns its GPU; the API shares it.

    TensorFlow grows its memory instead of grabbing it all. JAX preallocates 75% of the card
    for a worker (its fastest setting; set XLA_PYTHON_CLIENT_MEM_FRACTION to change it) and
    allocates on demand in the API process (role="api"), so both fit on one card. Variables
    already set in the environment win. Call before the first Keras/JAX import to take effect.
    """
    if os.environ.get("KERAS_BACKEND") == "jax":
        if role != "worker":
            os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        return
    if name() != "tensorflow":
        return
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # already initialised: growth can only be set before first use


@lru_cache(maxsize=1)
def gpus() -> tuple[Device, ...]:
    """The visible accelerators with their real names (empty on a CPU-only host)."""
    if name() == "jax":
        import jax

        found = []
        for i, dev in enumerate(d for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")):
            cc = getattr(dev, "compute_capability", None)
            found.append(Device("GPU", i, str(getattr(dev, "device_kind", "GPU")), _capability(cc)))
        return tuple(found)
    import tensorflow as tf

    found = []
    for i, gpu in enumerate(tf.config.list_physical_devices("GPU")):
        details = tf.config.experimental.get_device_details(gpu)
        found.append(
            Device(
                "GPU",
                i,
                str(details.get("device_name", "GPU")),
                _capability(details.get("compute_capability")),
            )
        )
    return tuple(found)


def _capability(value: Any) -> tuple[int, int] | None:
    """(major, minor) from TensorFlow's tuple or JAX's '9.0' string."""
    if value is None:
        return None
    if isinstance(value, str):
        parts = value.split(".")
        try:
            return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
        except ValueError:
            return None
    try:
        return int(value[0]), int(value[1])
    except (TypeError, ValueError, IndexError):
        return None


def device() -> Device:
    """The device training runs on: the first visible GPU, else the CPU."""
    found = gpus()
    return found[0] if found else Device("CPU", 0, "CPU")


def describe_device() -> str:
    return device().label()


def on_gpu() -> bool:
    return device().kind == "GPU"


# ---------------------------------------------------------------------------- precision
def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str) -> str:
    """The Keras dtype policy for `requested`; `auto` = bfloat16 where the device computes it
    natively (Ampere and later, CPUs with AVX512-BF16/AMX), float16 on Volta/Turing, else
    float32."""
    if requested != "auto":
        return requested
    dev = device()
    if dev.kind == "GPU":
        cc = dev.compute_capability
        if cc is None or cc >= (8, 0):
            return "mixed_bfloat16"
        return "mixed_float16" if cc >= (7, 0) else "float32"
    return "mixed_bfloat16" if _cpu_has_bf16() else "float32"


# ---------------------------------------------------------------------------- compilation
def enable_compilation_cache(cache_dir: Path | str | None) -> None:
    """JAX only: keep compiled programs on disk, so a later job (or worker) skips compiling.

    A no-op on TensorFlow, whose graphs are traced per process.
    """
    if cache_dir is None or os.environ.get("KERAS_BACKEND") != "jax":
        return
    import jax

    path = Path(cache_dir)
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _bucket(n: int) -> int:
    """The padded batch size a JAX program is compiled for: powers of two, so a server
    compiles at most ~10 programs instead of one per batch size seen."""
    return 1 << max(0, (n - 1).bit_length())


def compile_forward(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """One compiled inference call: float32 (N, ...) pixels in [0, 1] -> float32 probabilities.

    TensorFlow: a `tf.function` with a (None, ...) signature traced once for every batch size.
    JAX: `jax.jit` of the model's stateless call, batches padded to a power of two so that a
    handful of programs serve every size. Rows are cast to float32 and renormalised, so a
    model trained under mixed_bfloat16 still answers rows that sum to 1. The returned
    function's `traces()` counts the programs compiled so far.
    """
    in_shape = tuple(model.input_shape[1:])
    if name() == "jax":
        import jax
        import jax.numpy as jnp

        @jax.jit
        def forward_jax(tv: Any, ntv: Any, x: Any) -> Any:
            y, _ = model.stateless_call(tv, ntv, x, training=False)
            p = y.astype(jnp.float32)
            return p / jnp.sum(p, axis=-1, keepdims=True)

        buckets: set[int] = set()

        def call_jax(x: np.ndarray) -> np.ndarray:
            x = np.asarray(x, dtype=np.float32)
            n = x.shape[0]
            size = _bucket(n)
            buckets.add(size)
            if size != n:
                x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), np.float32)])
            # The variables' current arrays, read per call: Keras may replace (and delete) the
            # buffers behind a variable, e.g. in model.predict on JAX.
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            return np.asarray(forward_jax(trainable, non_trainable, x))[:n]

        call_jax.traces = lambda: len(buckets)  # type: ignore[attr-defined]
        return call_jax

    import tensorflow as tf

    @tf.function(
        input_signature=[tf.TensorSpec((None, *in_shape), tf.float32)], reduce_retracing=True
    )
    def forward_tf(x: Any) -> Any:
        p = tf.cast(model(x, training=False), tf.float32)
        return p / tf.reduce_sum(p, axis=-1, keepdims=True)

    def call_tf(x: np.ndarray) -> np.ndarray:
        return np.asarray(forward_tf(np.asarray(x, dtype=np.float32)))

    call_tf.traces = forward_tf.experimental_get_tracing_count  # type: ignore[attr-defined]
    return call_tf
