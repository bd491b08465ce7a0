"""Tiny CIFAR-10 look-alikes in the real on-disk formats, generated per test in tmp_path."""

from __future__ import annotations

import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.ml.nets import CLASS_NAMES


@dataclass
class Expected:
    """What a generated source holds, in the order it was written."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def to_official_rows(x: np.ndarray) -> np.ndarray:
    """HWC images -> official rows: 1024 R, 1024 G, 1024 B, each plane row-major."""
    return x.transpose(0, 3, 1, 2).reshape(len(x), 3 * 32 * 32)


def write_png_or_jpeg(path: Path, pixels: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(pixels) if mode is None else Image.fromarray(pixels, mode)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    image.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def tar_folder(folder: Path, archive: Path, arcname: str = "") -> Path:
    """Tar the *contents* of `folder` (under `arcname` when given), compressed by suffix."""
    mode = "w:gz" if archive.name.endswith((".tar.gz", ".tgz")) else "w"
    with tarfile.open(archive, mode) as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=f"{arcname}/{child.name}" if arcname else child.name)
    return archive


class Archives:
    """Factory for the sources load_cifar10 accepts, all tiny and seeded."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rng = np.random.default_rng(1234)

    def images(self, n: int) -> np.ndarray:
        return self.rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)

    def labels(self, n: int) -> np.ndarray:
        return self.rng.integers(0, len(CLASS_NAMES), size=n).astype(np.int64)

    def official_dir(
        self, rows: int = 4, name: str = "cifar-10-batches-py"
    ) -> tuple[Path, Expected]:
        """The extracted official layout: data_batch_1..5 + test_batch (+ batches.meta)."""
        folder = self.root / name
        folder.mkdir(parents=True)
        xs, ys = [], []
        for i in range(1, 7):
            x, y = self.images(rows), self.labels(rows)
            batch = {
                b"batch_label": f"batch {i}".encode(),
                b"labels": [int(v) for v in y],  # a plain list, as in the real files
                b"data": to_official_rows(x),
                b"filenames": [f"img_{i}_{k}.png".encode() for k in range(rows)],
            }
            file = folder / (f"data_batch_{i}" if i <= 5 else "test_batch")
            # Protocol 2, bytes keys, and numpy.core (not numpy 2's numpy._core) as the module
            # of the array constructor: what the 2009 Python 2 pickles name.
            blob = pickle.dumps(batch, protocol=2)
            file.write_bytes(blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
            xs.append(x)
            ys.append(y)
        meta = {b"label_names": [n.encode() for n in CLASS_NAMES], b"num_cases_per_batch": rows}
        (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
        (folder / "readme.html").write_text("<p>tiny</p>")
        expected = Expected(np.concatenate(xs[:5]), np.concatenate(ys[:5]), xs[5], ys[5])
        return folder, expected

    def official_tar(self, rows: int = 4, name: str = "cifar-10-python.tar.gz"):
        folder, expected = self.official_dir(rows, name="src-" + name)
        archive = tar_folder(folder, self.root / name, arcname="cifar-10-batches-py")
        return archive, expected

    def tree(
        self,
        suffix: str = ".png",
        train_per_class: int = 2,
        test_per_class: int = 1,
        wrapper: str = "",
        name: str = "tree",
    ) -> tuple[Path, Expected]:
        """train/<class>/NNNN<suffix> and test/<class>/...; JPEGs get flat colours (lossy codec)."""
        root = self.root / name
        base = root / wrapper if wrapper else root
        out: dict[str, tuple[list[np.ndarray], list[int]]] = {"train": ([], []), "test": ([], [])}
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            for label, cls in enumerate(CLASS_NAMES):
                for k in range(per_class):
                    if suffix == ".png":
                        pixels = self.images(1)[0]
                    else:
                        colour = self.rng.integers(16, 240, size=3, dtype=np.uint8)
                        pixels = np.broadcast_to(colour, (32, 32, 3)).copy()
                    write_png_or_jpeg(base / split / cls / f"{k:04d}{suffix}", pixels)
                    out[split][0].append(pixels)
                    out[split][1].append(label)
        expected = Expected(
            np.stack(out["train"][0]),
            np.asarray(out["train"][1], np.int64),
            np.stack(out["test"][0]),
            np.asarray(out["test"][1], np.int64),
        )
        return root, expected


@pytest.fixture
def archives(tmp_path: Path) -> Archives:
    return Archives(tmp_path)
