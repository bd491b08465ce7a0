"""CIFAR-10 as uint8 arrays, from a Keras download or a local copy, decoded once and cached.

Three sources, chosen by one string (the CIFAR10_SOURCE setting):

* ``"keras"``: the official python-format archive, downloaded and cached by
  ``keras.utils.get_file``; parsed by our own parser, because
  ``keras.datasets.cifar10.load_data`` hard-codes 50,000 training images.
* a path to the official ``cifar-10-python.tar.gz`` or its extracted ``cifar-10-batches-py/``.
* a path to an image-folder tree (``train/<class>/*``, ``test/<class>/*``, JPEG or PNG),
  or a ``.tar``/``.tar.gz`` of one.

Labels follow ``app.ml.nets.CLASS_NAMES`` (the Keras order). Every bad input raises
DataError with the offending file or folder in the message.

Each load also says which data it is (`DataProvenance`, recorded with every job's
evaluation): the archive's name and sha256, and how the test split is ordered, which is what
defines "the first test image" of exercises 8 and 15. The official batches keep their own
order; an image tree's test images are sorted by path and then permuted with a fixed seed
(`_TREE_ORDER_SEED`), and the description names the path that came first.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import pickle
import re
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, NamedTuple

import numpy as np

from app.files import file_digest
from app.ml.nets import CLASS_NAMES, INPUT_SHAPE
from app.ml.pixels import normalise  # noqa: F401  (re-exported: callers import it from here)

log = logging.getLogger(__name__)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# sha256 of the official archive (the value keras.datasets.cifar10 checks); only applied to
# that URL, so a test can point `origin` at an archive of its own.
_KNOWN_SHA256 = {CIFAR10_URL: "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"}
_DOWNLOAD_NAME = "cifar-10-batches-py.tar.gz"

# Bump when the decoded arrays would differ, so that old cache files are not used.
# 2: the cache also holds the provenance (archive, sha256, test layout and first test file).
_CACHE_FORMAT = 2
_SPLITS = ("train", "test")
_OFFICIAL_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_OFFICIAL_TEST = "test_batch"
# A batch file anywhere in an archive (the official one wraps them in cifar-10-batches-py/).
_OFFICIAL_MEMBER = re.compile(r"(?:^|/)(data_batch_[1-5]|test_batch)$")
_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
_PIL_FORMATS = ("JPEG", "PNG")
# Images per decode task: small enough that workers start while the archive is still being read.
_CHUNK = 1000
# Image trees are returned in this fixed pseudo-random order (like the official batches), because
# Keras' validation_split takes the *last* samples before shuffling: class-sorted arrays would
# make the validation set two classes only.
_TREE_ORDER_SEED = 0

LAYOUTS_HELP = (
    "expected either the official python format (data_batch_1..data_batch_5 and test_batch, "
    "e.g. cifar-10-python.tar.gz or its cifar-10-batches-py/ folder) or an image-folder tree "
    "(train/<class>/*.jpg|png and test/<class>/*.jpg|png, classes: " + ", ".join(CLASS_NAMES) + ")"
)


class DataError(ValueError):
    """The data source is missing or malformed; the message names the file or path at fault."""


@dataclass
class Cifar10:
    """The four arrays plus a human description of where they came from."""

    x_train: np.ndarray  # uint8 (N, 32, 32, 3)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    archive: str = ""  # the file or folder name the images came from (or the download URL)
    sha256: str | None = None  # of the archive file; of its files' digests for a folder
    test_layout: str = ""  # "official", "tree" or "subset": what orders the test split
    first_test_file: str = ""  # for a tree: the path of the first test image

    @property
    def test_order(self) -> str:
        """How the test split is ordered, which defines "the first test image". The words
        come from this code; the cache keeps only the facts (layout, first file)."""
        if self.test_layout == "official":
            return OFFICIAL_TEST_ORDER
        if self.test_layout == "tree":
            return tree_test_order(self.first_test_file)
        if self.test_layout == "subset":
            return "a seeded random subset of the test images (app.ml.data.subset)"
        return ""


@dataclass(frozen=True)
class DataProvenance:
    """Which data a run used: recorded with each job's evaluation, stated by the report."""

    archive: str
    sha256: str | None
    first_test_image: str  # how "the first test image" is defined, for this source
    train_images: int
    test_images: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def provenance(data: Cifar10) -> DataProvenance:
    """The provenance of loaded data (before any train_limit subset of a job)."""
    return DataProvenance(
        archive=data.archive or data.source,
        sha256=data.sha256,
        first_test_image=data.test_order or "not recorded by this loader",
        train_images=len(data.y_train),
        test_images=len(data.y_test),
    )


def file_sha256(path: Path) -> str:
    """sha256 of a file (app.files.file_digest, as the registry hashes models)."""
    return file_digest(path)[0]


def tree_sha256(root: Path) -> str:
    """sha256 of a folder: over '<relative path>\\0<file sha256>\\n' for every file, in
    sorted path order, so that the same files give the same digest on any disk."""
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        relative = file.relative_to(root).as_posix()
        digest.update(f"{relative}\0{file_sha256(file)}\n".encode())
    return digest.hexdigest()


OFFICIAL_TEST_ORDER = (
    "the first record of the official test_batch file (the loader keeps the file's order)"
)


def tree_test_order(first: str) -> str:
    """How an image tree's test split is ordered (see _TreeDecoder.finish), naming its first."""
    return (
        "the first of the test/ images sorted by path, then permuted by "
        f"numpy.random.default_rng({_TREE_ORDER_SEED}).permutation (app/ml/data.py): {first}"
    )


def subset(
    data: Cifar10, train_limit: int | None, test_limit: int | None = None, seed: int = 0
) -> Cifar10:
    """A random (seeded, repeatable) subset for quick runs; None keeps a split whole."""

    def pick(x: np.ndarray, y: np.ndarray, limit: int | None, stream: int):
        if limit is None:
            return x, y
        if limit < 1:
            raise ValueError(f"a subset needs at least 1 image. Received: limit={limit}")
        # One generator per split, so the train subset does not depend on test_limit.
        idx = np.random.default_rng([seed, stream]).permutation(len(y))[:limit]
        return x[idx], y[idx]

    x_train, y_train = pick(data.x_train, data.y_train, train_limit, 0)
    x_test, y_test = pick(data.x_test, data.y_test, test_limit, 1)
    return Cifar10(
        x_train,
        y_train,
        x_test,
        y_test,
        f"{data.source}; subset train={len(y_train)} test={len(y_test)} seed={seed}",
        archive=data.archive,
        sha256=data.sha256,
        test_layout=data.test_layout if test_limit is None else "subset",
        first_test_file=data.first_test_file if test_limit is None else "",
    )


def load_cifar10(
    source: str = "keras",
    cache_dir: Path | None = None,
    *,
    origin: str = CIFAR10_URL,
    download_dir: Path | None = None,
    workers: int | None = None,
) -> Cifar10:
    """Load CIFAR-10 from `source`, using (and filling) a decoded-array cache in `cache_dir`.

    `origin` and `download_dir` only matter for source "keras" (download_dir defaults to
    KERAS_HOME, i.e. ~/.keras). `workers` caps the processes that decode image trees
    (default: the CPU count; 1 decodes in this process).
    """
    source = source.strip()
    if not source:
        raise DataError("the CIFAR-10 source is empty: set CIFAR10_SOURCE to 'keras' or a path")
    n_workers = (os.cpu_count() or 1) if workers is None else max(1, workers)

    if source == "keras":
        key = _cache_key("keras", origin)
        return _cached(cache_dir, key, lambda: _load_keras(origin, download_dir))

    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"CIFAR-10 source {str(path)!r} does not exist")
    path = path.resolve()
    key = _cache_key(str(path), _fingerprint(path))
    if path.is_dir():
        return _cached(cache_dir, key, lambda: _with_digest(_load_dir(path, n_workers), path))
    return _cached(cache_dir, key, lambda: _with_digest(_load_tar(path, n_workers), path))


def _with_digest(data: Cifar10, path: Path) -> Cifar10:
    """Name the archive and add its sha256 (computed once, then kept in the cache)."""
    data.archive = path.name
    data.sha256 = tree_sha256(path) if path.is_dir() else file_sha256(path)
    return data


# --- caching -----------------------------------------------------------------------------------


def _cache_key(*parts: object) -> str:
    text = repr((_CACHE_FORMAT, *parts))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _fingerprint(path: Path) -> tuple[int, ...]:
    """Cheap change detector: size and mtime of a file; count, bytes, newest mtime of a tree."""
    st = path.stat()
    if not path.is_dir():
        return (st.st_size, st.st_mtime_ns)
    count, total, newest = 0, 0, st.st_mtime_ns
    for root, _dirs, files in os.walk(path):
        newest = max(newest, os.stat(root).st_mtime_ns)
        for name in files:
            fst = os.stat(os.path.join(root, name))
            count += 1
            total += fst.st_size
            newest = max(newest, fst.st_mtime_ns)
    return (count, total, newest)


def _cached(cache_dir: Path | None, key: str, build: Callable[[], Cifar10]) -> Cifar10:
    if cache_dir is None:
        return build()
    cache_file = Path(cache_dir) / f"cifar10-{key}.npz"
    data = _read_cache(cache_file)
    if data is not None:
        return data
    data = build()
    _write_cache(cache_file, data)
    return data


def _read_cache(cache_file: Path) -> Cifar10 | None:
    try:
        with np.load(cache_file, allow_pickle=False) as z:
            data = Cifar10(
                z["x_train"],
                z["y_train"],
                z["x_test"],
                z["y_test"],
                str(z["source"]),
                archive=str(z["archive"]),
                sha256=str(z["sha256"]) or None,
                test_layout=str(z["test_layout"]),
                first_test_file=str(z["first_test_file"]),
            )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        # A damaged cache is only a lost shortcut: decode again and overwrite it.
        log.warning("ignoring unreadable CIFAR-10 cache %s: %s", cache_file, exc)
        return None
    if not _valid_arrays(data):
        log.warning("ignoring CIFAR-10 cache %s: unexpected shapes or dtypes", cache_file)
        return None
    data.source = f"{data.source} (cached in {cache_file})"
    return data


def _valid_arrays(d: Cifar10) -> bool:
    return all(
        x.dtype == np.uint8 and x.shape[1:] == INPUT_SHAPE and y.shape == (len(x),)
        for x, y in ((d.x_train, d.y_train), (d.x_test, d.y_test))
    )


def _write_cache(cache_file: Path, data: Cifar10) -> None:
    """Write via a temp file and os.replace, so a concurrent reader never sees half a file."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=cache_file.name, suffix=".tmp", dir=cache_file.parent)
    except OSError as exc:
        log.warning("cannot write CIFAR-10 cache %s: %s", cache_file, exc)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                x_train=data.x_train,
                y_train=data.y_train,
                x_test=data.x_test,
                y_test=data.y_test,
                source=np.array(data.source),
                archive=np.array(data.archive),
                sha256=np.array(data.sha256 or ""),
                test_layout=np.array(data.test_layout),
                first_test_file=np.array(data.first_test_file),
            )
        os.replace(tmp, cache_file)
    except OSError as exc:
        # The data itself loaded fine; a full disk only costs the next run a decode.
        log.warning("cannot write CIFAR-10 cache %s: %s", cache_file, exc)
        Path(tmp).unlink(missing_ok=True)


# --- the keras download ------------------------------------------------------------------------


def _load_keras(origin: str, download_dir: Path | None) -> Cifar10:
    from keras.utils import get_file  # imported here: it pulls in TensorFlow

    if download_dir is not None:
        # get_file silently falls back to /tmp/.keras when the folder is not writable yet.
        download_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            # Its "Could not extract archive" warning becomes our DataError below.
            warnings.filterwarnings("ignore", message="Could not extract archive")
            extracted = get_file(
                fname=_DOWNLOAD_NAME,
                origin=origin,
                extract=True,
                file_hash=_KNOWN_SHA256.get(origin),
                cache_dir=None if download_dir is None else str(download_dir),
            )
    except Exception as exc:  # urllib, hash and tar errors all mean "no usable download"
        raise DataError(
            f"could not download CIFAR-10 from {origin}: {exc}. Without internet access, set "
            "CIFAR10_SOURCE to a local copy (cifar-10-python.tar.gz, its cifar-10-batches-py/ "
            "folder, or an image-folder tree)"
        ) from exc
    folder = Path(extracted)
    batches = _official_dir(folder) if folder.is_dir() else None
    if batches is None:
        # get_file only warns when the download is not an archive, so say which file it was.
        raise DataError(
            f"the download from {origin} ({folder.with_name(_DOWNLOAD_NAME)}) did not unpack "
            "to the official cifar-10-batches-py files; delete it to download again, or set "
            "CIFAR10_SOURCE to a local copy"
        )
    data = _load_official_dir(batches)
    data.source = f"official CIFAR-10 batches downloaded from {origin} into {folder}"
    data.archive = origin
    # get_file has checked the official archive against its known sha256.
    known = _KNOWN_SHA256.get(origin)
    download = folder.with_name(_DOWNLOAD_NAME)
    data.sha256 = known or (file_sha256(download) if download.is_file() else None)
    return data


# --- the official python format ----------------------------------------------------------------


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches contain (dicts, lists, numpy arrays), never code."""

    _ALLOWED = {
        ("_codecs", "encode"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        # The 2009 pickles name numpy.core, which numpy 2 only keeps as a deprecated alias.
        module = module.replace("numpy.core.", "numpy._core.")
        return super().find_class(module, name)


def _parse_batch(f: IO[bytes], where: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> (uint8 N x 32 x 32 x 3, int64 N); `where` names it in errors."""
    try:
        batch = _BatchUnpickler(f, encoding="bytes").load()
    except (tarfile.TarError, EOFError, OSError, zlib.error):
        raise  # a damaged archive, reported by the caller with the archive's name
    except Exception as exc:  # pickle raises many types for garbage input
        raise DataError(f"{where} is not a readable CIFAR-10 batch: {exc!r}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{where} is not a CIFAR-10 batch: expected a dict with data and labels")
    x = np.asarray(batch[b"data"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        raise DataError(f"{where}: data must be uint8 N x 3072, got {x.dtype} {x.shape}")
    y = np.asarray(batch[b"labels"], dtype=np.int64)
    if y.shape != (len(x),) or (len(y) and (y.min() < 0 or y.max() >= len(CLASS_NAMES))):
        raise DataError(f"{where}: expected {len(x)} labels in 0..{len(CLASS_NAMES) - 1}")
    # Rows are channels-first planes (1024 R, 1024 G, 1024 B, each row-major 32x32).
    x = np.ascontiguousarray(x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return x, y


def _assemble_official(batches: dict[str, tuple[np.ndarray, np.ndarray]], where: str) -> Cifar10:
    missing = [n for n in (*_OFFICIAL_TRAIN, _OFFICIAL_TEST) if n not in batches]
    if missing:
        raise DataError(f"{where} lacks the official batch file(s) {', '.join(missing)}")
    train = [batches[n] for n in _OFFICIAL_TRAIN]
    x_test, y_test = batches[_OFFICIAL_TEST]
    return Cifar10(
        np.concatenate([x for x, _ in train]),
        np.concatenate([y for _, y in train]),
        x_test,
        y_test,
        f"official CIFAR-10 batches in {where}",
        test_layout="official",
    )


def _official_dir(path: Path) -> Path | None:
    """The folder holding the batch files: `path` itself or its only subfolder."""
    if (path / _OFFICIAL_TEST).is_file() or (path / _OFFICIAL_TRAIN[0]).is_file():
        return path
    inner = _only_subdir(path)
    if inner is not None and (
        (inner / _OFFICIAL_TEST).is_file() or (inner / _OFFICIAL_TRAIN[0]).is_file()
    ):
        return inner
    return None


def _load_official_dir(folder: Path) -> Cifar10:
    batches = {}
    for name in (*_OFFICIAL_TRAIN, _OFFICIAL_TEST):
        file = folder / name
        if file.is_file():
            try:
                with open(file, "rb") as f:
                    batches[name] = _parse_batch(f, str(file))
            except (EOFError, OSError, zlib.error) as exc:
                raise DataError(f"{file} is truncated or unreadable: {exc!r}") from exc
    return _assemble_official(batches, str(folder))


# --- image-folder trees ------------------------------------------------------------------------


def _decode_chunk(items: Sequence[tuple[str, bytes | str]]) -> np.ndarray:
    """Decode (name, bytes or file path) pairs to uint8 HWC; runs in worker processes too."""
    from PIL import Image  # here, so importing this module stays light

    out = np.empty((len(items), *INPUT_SHAPE), dtype=np.uint8)
    for i, (name, payload) in enumerate(items):
        try:
            if isinstance(payload, str):
                with open(payload, "rb") as f:
                    payload = f.read()
            with Image.open(io.BytesIO(payload), formats=_PIL_FORMATS) as im:
                # No conversion: a grey or RGBA file is not a CIFAR-10 image, so say so.
                if im.mode != "RGB" or im.size != INPUT_SHAPE[:2]:
                    w, h = im.size
                    raise DataError(
                        f"{name} is a {w}x{h} {im.mode} image; CIFAR-10 images are 32x32 RGB"
                    )
                out[i] = np.asarray(im)
        except DataError:
            raise
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot decode image {name}: {exc}") from exc
    return out


class _TreeDecoder:
    """Collects images in walk order and decodes them in chunks, in worker processes if worth it.

    Worker processes start only once a second chunk exists (tiny trees are decoded here), use
    the spawn start method (TensorFlow may already be loaded in this process, and it must not
    fork), and any failure to use them falls back to decoding in this process.
    """

    def __init__(self, where: str, workers: int) -> None:
        self.where = where
        self.workers = workers
        self.keys: list[str] = []
        self.splits: list[int] = []
        self.labels: list[int] = []
        self._chunk: list[tuple[str, bytes | str]] = []
        self._chunks: list[list[tuple[str, bytes | str]]] = []
        self._futures: list[Future[np.ndarray]] = []
        self._pool: ProcessPoolExecutor | None = None
        self._pool_failed = False

    def __enter__(self) -> _TreeDecoder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    @property
    def count(self) -> int:
        return len(self.keys)

    def add(self, name: str, place: _Place, payload: bytes | str) -> None:
        self.keys.append(place.key)
        self.splits.append(place.split)
        self.labels.append(place.label)
        self._chunk.append((name, payload))
        if len(self._chunk) >= _CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._chunk:
            self._chunks.append(self._chunk)
            self._chunk = []
        pool = self._get_pool() if len(self._chunks) >= 2 else None
        if pool is not None:
            try:
                while len(self._futures) < len(self._chunks):
                    chunk = self._chunks[len(self._futures)]
                    self._futures.append(pool.submit(_decode_chunk, chunk))
            # A daemonic (e.g. Celery prefork) process may not start children. Other errors
            # propagate on purpose: in a child that is re-importing an unguarded __main__
            # script, spawn's RuntimeError stops that child before it runs the whole script.
            except (BrokenProcessPool, AssertionError, OSError) as exc:
                self._give_up_pool(exc)

    def _get_pool(self) -> ProcessPoolExecutor | None:
        if self._pool_failed or self.workers < 2:
            return None
        # A multiprocessing child (or daemon) must not start its own pool.
        if multiprocessing.parent_process() is not None or multiprocessing.current_process().daemon:
            return None
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx)
        return self._pool

    def finish(self) -> Cifar10:
        """Wait for every chunk and build the arrays: each split sorted by path, then shuffled."""
        self._flush()
        parts = [self._result(i, chunk) for i, chunk in enumerate(self._chunks)]
        x = np.concatenate(parts) if parts else np.empty((0, *INPUT_SHAPE), np.uint8)
        splits = np.asarray(self.splits, dtype=np.int64)
        labels = np.asarray(self.labels, dtype=np.int64)
        keys = np.asarray(self.keys)
        arrays = {}
        first_test = ""
        for s, split in enumerate(_SPLITS):
            idx = np.flatnonzero(splits == s)
            if len(idx) == 0:
                raise DataError(f"{self.where} has no {split} images; {LAYOUTS_HELP}")
            # Sorted by path (the walk order differs between tar and disk), then a fixed shuffle.
            idx = idx[np.argsort(keys[idx], kind="stable")]
            idx = idx[np.random.default_rng(_TREE_ORDER_SEED).permutation(len(idx))]
            arrays[split] = (x[idx], labels[idx])
            if split == "test":
                first_test = str(keys[idx[0]])
        (x_train, y_train), (x_test, y_test) = arrays["train"], arrays["test"]
        where = f"image-folder tree in {self.where} ({self.count} images)"
        return Cifar10(
            x_train, y_train, x_test, y_test, where, test_layout="tree", first_test_file=first_test
        )

    def _result(self, i: int, chunk: list[tuple[str, bytes | str]]) -> np.ndarray:
        if i < len(self._futures) and not self._pool_failed:
            try:
                return self._futures[i].result()
            except DataError:
                raise
            except BrokenProcessPool as exc:  # the chunk is still here to decode
                self._give_up_pool(exc)
        return _decode_chunk(chunk)

    def _give_up_pool(self, exc: BaseException) -> None:
        if not self._pool_failed:
            log.warning(
                "decoding CIFAR-10 in this process only, worker processes failed (%s); "
                "a script that loads it needs an `if __name__ == '__main__':` guard",
                exc,
            )
        self._pool_failed = True


class _Place(NamedTuple):
    split: int  # index into _SPLITS
    label: int
    key: str  # split/class/file: the sort key, the same on disk and in any archive


def _tree_position(parts: Sequence[str], name: str) -> _Place | None:
    """Where an image at relative path `parts` belongs; None for files to skip.

    Accepts split/class/file, optionally under one wrapping folder; skips hidden files and
    anything outside train/ and test/ (a README next to them, say).
    """
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return None
    if len(parts) > 1 and parts[0] not in _SPLITS and parts[1] in _SPLITS:
        parts = parts[1:]
    if not parts or parts[0] not in _SPLITS:
        return None
    if len(parts) != 3:
        raise DataError(f"{name} is not in a class folder; {LAYOUTS_HELP}")
    split, cls, file = parts
    if cls not in CLASS_NAMES:
        raise DataError(
            f"{name}: unknown class folder {cls!r} under {split}/; "
            f"known classes: {', '.join(CLASS_NAMES)}"
        )
    if PurePosixPath(file).suffix.lower() not in _IMAGE_SUFFIXES:
        raise DataError(f"{name} is not a .jpg, .jpeg or .png image")
    return _Place(_SPLITS.index(split), CLASS_NAMES.index(cls), "/".join(parts))


def _is_tree_dir(path: Path) -> bool:
    if any((path / s).is_dir() for s in _SPLITS):
        return True
    inner = _only_subdir(path)
    return inner is not None and any((inner / s).is_dir() for s in _SPLITS)


def _only_subdir(path: Path) -> Path | None:
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    dirs = [p for p in entries if p.is_dir()]
    return dirs[0] if len(dirs) == 1 else None


def _walk_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath, name)


# --- dispatch on what the path is --------------------------------------------------------------


def _load_dir(path: Path, workers: int) -> Cifar10:
    batches = _official_dir(path)
    if batches is not None:
        return _load_official_dir(batches)
    if not _is_tree_dir(path):
        kind = "empty" if not any(path.iterdir()) else "neither layout"
        raise DataError(f"directory {path} is {kind}; {LAYOUTS_HELP}")
    with _TreeDecoder(str(path), workers) as decoder:
        for file in _walk_files(path):
            place = _tree_position(file.relative_to(path).parts, str(file))
            if place is not None:
                decoder.add(str(file), place, payload=str(file))
        return decoder.finish()


def _load_tar(path: Path, workers: int) -> Cifar10:
    """Stream the archive once (no extraction to disk), handling either layout."""
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with _TreeDecoder(str(path), workers) as decoder:
        try:
            # "r|*": strictly sequential reads; random access into a .gz re-decompresses
            # from the start on every backwards seek.
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    name = member.name.removeprefix("./")
                    reader = tar.extractfile(member) if member.isfile() else None
                    if reader is None:
                        continue
                    where = f"{name} in {path}"
                    official = _OFFICIAL_MEMBER.search(name)
                    if official:
                        batches[official.group(1)] = _parse_batch(reader, where)
                        continue
                    place = _tree_position(PurePosixPath(name).parts, where)
                    if place is not None:
                        decoder.add(where, place, payload=reader.read())
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(
                f"{path} is not a readable tar archive (corrupt or truncated?): {exc}"
            ) from exc
        if batches and decoder.count:
            raise DataError(f"{path} mixes official batch files and image folders; {LAYOUTS_HELP}")
        if batches:
            return _assemble_official(batches, str(path))
        if not decoder.count:
            raise DataError(f"archive {path} holds no CIFAR-10 data; {LAYOUTS_HELP}")
        return decoder.finish()
