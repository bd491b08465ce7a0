"""app.ml.data on tiny archives in the real formats: layouts, pixels, cache, and bad input."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.ml import data as data_module
from app.ml.data import Cifar10, DataError, load_cifar10, normalise, subset
from app.ml.nets import CLASS_NAMES

from .conftest import tar_folder, write_png_or_jpeg


def pairs(x: np.ndarray, y: np.ndarray) -> list[tuple[int, bytes]]:
    """Order-free view of a split: image trees come back shuffled, pairs must still match."""
    return sorted((int(label), image.tobytes()) for image, label in zip(x, y, strict=True))


def assert_shapes(d: Cifar10, n_train: int, n_test: int) -> None:
    assert d.x_train.shape == (n_train, 32, 32, 3) and d.x_train.dtype == np.uint8
    assert d.x_test.shape == (n_test, 32, 32, 3) and d.x_test.dtype == np.uint8
    assert d.y_train.shape == (n_train,) and d.y_train.dtype == np.int64
    assert d.y_test.shape == (n_test,) and d.y_test.dtype == np.int64


def assert_same(a: Cifar10, b: Cifar10) -> None:
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# --- the official python format -------------------------------------------------------------


def test_official_dir_round_trips_pixels_and_labels(archives):
    folder, expected = archives.official_dir(rows=4)
    d = load_cifar10(str(folder))
    assert_shapes(d, 20, 4)
    # The official batches keep their order: data_batch_1..5, row by row.
    assert_same(d, expected)
    assert str(folder) in d.source


def test_official_channels_first_rows_become_hwc(archives, tmp_path):
    """A hand-placed pattern, independent of the helper's own transpose."""
    folder, _ = archives.official_dir(rows=2)
    batch = pickle.loads((folder / "test_batch").read_bytes())
    rows = np.zeros((2, 3072), np.uint8)
    rows[0, 0] = 10  # R plane, pixel (row 0, col 0)
    rows[0, 1024] = 20  # G plane, pixel (0, 0)
    rows[0, 2048] = 30  # B plane, pixel (0, 0)
    rows[0, 1] = 40  # R, pixel (0, 1): planes are row-major
    rows[0, 32] = 50  # R, pixel (1, 0)
    rows[0, 1024 + 3 * 32 + 5] = 60  # G, pixel (3, 5)
    rows[1, 3071] = 70  # B, pixel (31, 31)
    batch[b"data"] = rows
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))

    x = load_cifar10(str(folder)).x_test
    assert x[0, 0, 0].tolist() == [10, 20, 30]
    assert x[0, 0, 1].tolist() == [40, 0, 0]
    assert x[0, 1, 0].tolist() == [50, 0, 0]
    assert x[0, 3, 5].tolist() == [0, 60, 0]
    assert x[1, 31, 31].tolist() == [0, 0, 70]
    assert int(x.sum()) == 10 + 20 + 30 + 40 + 50 + 60 + 70


def test_official_tar_gz_equals_its_folder(archives):
    archive, expected = archives.official_tar(rows=4)
    d = load_cifar10(str(archive))
    assert_shapes(d, 20, 4)
    np.testing.assert_array_equal(d.x_train, expected.x_train)
    np.testing.assert_array_equal(d.y_test, expected.y_test)
    # So do the extracted folder and a folder wrapping it (beside the archive file).
    extracted = archive.parent / "src-cifar-10-python.tar.gz"
    assert_same(d, load_cifar10(str(extracted)))
    assert_same(d, load_cifar10(str(archive.parent)))


def test_keras_source_downloads_from_origin_and_parses_it(archives, tmp_path):
    archive, expected = archives.official_tar(rows=3)
    downloads = tmp_path / "keras-home"
    cache = tmp_path / "cache"
    d = load_cifar10("keras", cache, origin=archive.as_uri(), download_dir=downloads)
    assert_shapes(d, 15, 3)
    np.testing.assert_array_equal(d.x_train, expected.x_train)
    np.testing.assert_array_equal(d.y_train, expected.y_train)
    assert archive.as_uri() in d.source
    assert (downloads / "datasets" / "cifar-10-batches-py.tar.gz").is_file()

    # Cached under the origin: the next load needs neither the download nor the network.
    shutil.rmtree(downloads)
    archive.unlink()
    again = load_cifar10("keras", cache, origin=archive.as_uri(), download_dir=downloads)
    assert_same(d, again)
    assert "cached" in again.source


def test_keras_download_failure_tells_to_set_a_local_path(tmp_path):
    missing = (tmp_path / "nowhere.tar.gz").as_uri()
    with pytest.raises(DataError) as err:
        load_cifar10("keras", origin=missing, download_dir=tmp_path / "k")
    assert missing in str(err.value)
    assert "CIFAR10_SOURCE" in str(err.value)


def test_keras_download_that_is_not_the_archive(tmp_path):
    junk = tmp_path / "junk.html"
    junk.write_text("<html>captive portal</html>")
    with pytest.raises(DataError) as err:
        load_cifar10("keras", origin=junk.as_uri(), download_dir=tmp_path / "k")
    assert "cifar-10-batches-py.tar.gz" in str(err.value)


# --- image-folder trees ----------------------------------------------------------------------


def test_png_tree_round_trips_exactly(archives):
    root, expected = archives.tree(".png", train_per_class=2, test_per_class=1)
    d = load_cifar10(str(root))
    assert_shapes(d, 20, 10)
    assert pairs(d.x_train, d.y_train) == pairs(expected.x_train, expected.y_train)
    assert pairs(d.x_test, d.y_test) == pairs(expected.x_test, expected.y_test)
    assert sorted(d.y_test.tolist()) == list(range(10))


def test_tree_order_is_fixed_and_mixed_not_grouped_by_class(archives):
    """Keras' validation_split takes the last samples unshuffled, so classes must be mixed."""
    root, _ = archives.tree(".png", train_per_class=3)
    first, second = load_cifar10(str(root)), load_cifar10(str(root))
    assert_same(first, second)
    assert first.y_train.tolist() != sorted(first.y_train.tolist())
    assert len(set(first.y_train[-6:].tolist())) > 2


def test_jpeg_tree_decodes_close_to_the_written_colours(archives):
    root, expected = archives.tree(".jpg", train_per_class=1, test_per_class=1)
    d = load_cifar10(str(root))
    assert_shapes(d, 10, 10)
    # Flat colours survive JPEG almost exactly; match each decoded image to its label's colour.
    colours = {
        int(y): x[0, 0].astype(int) for x, y in zip(expected.x_train, expected.y_train, strict=True)
    }
    for x, y in zip(d.x_train, d.y_train, strict=True):
        assert np.abs(x.astype(int) - colours[int(y)]).max() <= 3


def test_tar_gz_of_tree_with_wrapping_folder_equals_the_folder(archives, tmp_path):
    root, _ = archives.tree(".png")
    archive = tar_folder(root, tmp_path / "tree.tar.gz", arcname="cifar10")
    plain_tar = tar_folder(root, tmp_path / "tree.tar")
    from_dir, from_tgz, from_tar = (load_cifar10(str(p)) for p in (root, archive, plain_tar))
    # Same images in the same order, whatever the container and the wrapping folder.
    assert_same(from_dir, from_tgz)
    assert_same(from_dir, from_tar)
    assert str(archive) in from_tgz.source


def test_tree_ignores_hidden_files_and_files_beside_the_splits(archives):
    root, expected = archives.tree(".png", wrapper="data")
    (root / "data" / "README.md").write_text("about")
    (root / "data" / "train" / "cat" / ".DS_Store").write_bytes(b"\0")
    d = load_cifar10(str(root))
    assert pairs(d.x_train, d.y_train) == pairs(expected.x_train, expected.y_train)


def test_parallel_decoding_matches_serial_and_reports_bad_files(archives, monkeypatch):
    monkeypatch.setattr(data_module, "_CHUNK", 4)  # several chunks from a tiny tree
    root, _ = archives.tree(".png", train_per_class=2)
    serial = load_cifar10(str(root), workers=1)
    assert_same(serial, load_cifar10(str(root), workers=2))

    bad = root / "test" / "ship" / "0000.png"
    write_png_or_jpeg(bad, np.zeros((32, 31, 3), np.uint8))
    with pytest.raises(DataError, match="0000.png"):
        load_cifar10(str(root), workers=2)


# --- cache ----------------------------------------------------------------------------------


def test_cache_is_written_atomically_and_reused_without_decoding(archives, tmp_path, monkeypatch):
    root, _ = archives.tree(".png")
    cache = tmp_path / "cache"
    first = load_cifar10(str(root), cache)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp file left behind

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(data_module, "_decode_chunk", no_decoding)
    second = load_cifar10(str(root), cache)
    assert_same(first, second)
    assert "cached" in second.source


def test_cache_key_follows_changes_to_the_source(archives, tmp_path):
    root, _ = archives.tree(".png")
    cache = tmp_path / "cache"
    before = load_cifar10(str(root), cache)
    extra = archives.images(1)[0]
    write_png_or_jpeg(root / "test" / "frog" / "9999.png", extra)
    after = load_cifar10(str(root), cache)
    assert len(after.y_test) == len(before.y_test) + 1
    assert any(np.array_equal(x, extra) for x in after.x_test)
    assert len(list(cache.glob("*.npz"))) == 2


def test_damaged_cache_is_rebuilt(archives, tmp_path):
    folder, expected = archives.official_dir()
    cache = tmp_path / "cache"
    load_cifar10(str(folder), cache)
    (cache_file,) = cache.glob("*.npz")
    cache_file.write_bytes(b"PK\x03\x04 not really a zip")
    d = load_cifar10(str(folder), cache)
    np.testing.assert_array_equal(d.x_train, expected.x_train)
    assert "cached" not in d.source
    assert "cached" in load_cifar10(str(folder), cache).source


# --- bad input ------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "no-such.tar.gz"
    with pytest.raises(DataError, match="does not exist") as err:
        load_cifar10(str(missing))
    assert str(missing) in str(err.value)


def test_empty_source_string():
    with pytest.raises(DataError, match="CIFAR10_SOURCE"):
        load_cifar10("  ")


def test_corrupt_archive(tmp_path):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError) as err:
        load_cifar10(str(bad))
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("kind", ["official", "tree"])
def test_truncated_tar_gz(archives, tmp_path, kind):
    if kind == "official":
        archive, _ = archives.official_tar(rows=8)
    else:
        root, _ = archives.tree(".png")
        archive = tar_folder(root, tmp_path / "tree.tar.gz")
    blob = archive.read_bytes()
    archive.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="corrupt or truncated") as err:
        load_cifar10(str(archive))
    assert str(archive) in str(err.value)


def test_official_archive_missing_a_batch(archives, tmp_path):
    folder, _ = archives.official_dir()
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(str(folder))
    archive = tar_folder(folder, tmp_path / "partial.tar.gz")
    with pytest.raises(DataError, match="data_batch_3") as err:
        load_cifar10(str(archive))
    assert str(archive) in str(err.value)


def test_official_batch_that_is_not_a_batch(archives):
    folder, _ = archives.official_dir()
    (folder / "data_batch_2").write_bytes(pickle.dumps({b"data": [1, 2, 3]}, protocol=2))
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(str(folder))


def test_official_batch_file_truncated(archives):
    folder, _ = archives.official_dir()
    blob = (folder / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar10(str(folder))


def test_official_batch_pickle_may_not_run_code(archives):
    folder, _ = archives.official_dir()
    # A pickle that would call print() when loaded: the loader must refuse, not run it.
    (folder / "test_batch").write_bytes(b"cbuiltins\nprint\n(S'pwned'\ntR.")
    with pytest.raises(DataError, match="test_batch") as err:
        load_cifar10(str(folder))
    assert "builtins.print" in str(err.value)


def test_image_31x32(archives):
    root, _ = archives.tree(".png")
    bad = root / "train" / "dog" / "0001.png"
    write_png_or_jpeg(bad, np.zeros((32, 31, 3), np.uint8))  # width 31, height 32
    with pytest.raises(DataError, match="31x32 RGB") as err:
        load_cifar10(str(root))
    assert str(bad) in str(err.value)


def test_grayscale_image_in_a_tar(archives, tmp_path):
    root, _ = archives.tree(".jpg")
    write_png_or_jpeg(root / "test" / "deer" / "0000.jpg", np.zeros((32, 32), np.uint8), "L")
    archive = tar_folder(root, tmp_path / "grey.tar.gz")
    with pytest.raises(DataError, match="32x32 L image") as err:
        load_cifar10(str(archive))
    assert "test/deer/0000.jpg" in str(err.value) and str(archive) in str(err.value)


def test_undecodable_image(archives):
    root, _ = archives.tree(".png")
    bad = root / "train" / "horse" / "0000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    with pytest.raises(DataError, match="cannot decode") as err:
        load_cifar10(str(root))
    assert str(bad) in str(err.value)


def test_unknown_class_folder(archives):
    root, _ = archives.tree(".png")
    (root / "train" / "cat").rename(root / "train" / "kitten")
    with pytest.raises(DataError, match="kitten") as err:
        load_cifar10(str(root))
    assert all(name in str(err.value) for name in CLASS_NAMES)


def test_image_outside_a_class_folder(archives):
    root, _ = archives.tree(".png")
    write_png_or_jpeg(root / "train" / "stray.png", archives.images(1)[0])
    with pytest.raises(DataError, match="stray.png"):
        load_cifar10(str(root))


def test_tree_without_test_images(archives):
    root, _ = archives.tree(".png")
    shutil.rmtree(root / "test")
    with pytest.raises(DataError, match="no test images") as err:
        load_cifar10(str(root))
    assert str(root) in str(err.value)


def test_empty_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty") as err:
        load_cifar10(str(empty))
    assert str(empty) in str(err.value) and "test_batch" in str(err.value)


def test_directory_in_neither_layout(tmp_path):
    other = tmp_path / "photos"
    (other / "holiday").mkdir(parents=True)
    (other / "a.txt").write_text("x")
    (other / "b.txt").write_text("y")
    with pytest.raises(DataError, match="neither layout") as err:
        load_cifar10(str(other))
    assert str(other) in str(err.value) and "train/<class>" in str(err.value)


def test_tar_with_neither_layout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "notes.txt").write_text("hello")
    archive = tar_folder(src, tmp_path / "notes.tar.gz")
    with pytest.raises(DataError, match="holds no CIFAR-10 data") as err:
        load_cifar10(str(archive))
    assert str(archive) in str(err.value)


# --- normalise and subset -------------------------------------------------------------------


def test_normalise_scales_to_unit_float32():
    x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    out = normalise(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    assert out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out.ravel(), np.arange(256) / 255.0, rtol=1e-6)
    assert normalise(np.array([51], np.uint8))[0] == np.float32(0.2)


def test_subset_is_seeded_paired_and_bounded(archives):
    folder, _ = archives.official_dir(rows=10)
    d = load_cifar10(str(folder))
    s = subset(d, 12, 3, seed=7)
    assert_shapes(s, 12, 3)
    assert_same(s, subset(d, 12, 3, seed=7))
    assert not np.array_equal(s.x_train, subset(d, 12, 3, seed=8).x_train)
    # Images keep their labels.
    originals = {x.tobytes(): int(y) for x, y in zip(d.x_train, d.y_train, strict=True)}
    for x, y in zip(s.x_train, s.y_train, strict=True):
        assert originals[x.tobytes()] == y
    # The train subset does not depend on the test limit; None keeps a split whole.
    assert_same(subset(d, 12, None, seed=7), Cifar10(s.x_train, s.y_train, d.x_test, d.y_test, ""))
    assert len(subset(d, 10_000).y_train) == 50
    with pytest.raises(ValueError, match="limit=0"):
        subset(d, 0)


# --- provenance: which archive, its sha256, and which test image is "the first" ---------------


def test_a_tree_archive_states_its_sha256_and_names_its_first_test_image(archives, tmp_path):
    root, _ = archives.tree(".png", train_per_class=2, test_per_class=3)
    archive = tar_folder(root, tmp_path / "tree.tar.gz")
    d = load_cifar10(str(archive), workers=1)
    assert d.archive == "tree.tar.gz"
    assert d.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    # The definition is the loader's: paths sorted, then the fixed permutation; it names the
    # first image, and that file holds exactly the first test image's pixels and class.
    assert "sorted by path, then permuted by numpy.random.default_rng(0)" in d.test_order
    first = d.test_order.rsplit(": ", 1)[1]
    assert first == d.first_test_file
    split, cls, _ = first.split("/")
    assert split == "test" and CLASS_NAMES.index(cls) == d.y_test[0]
    with Image.open(root / first) as im:
        np.testing.assert_array_equal(np.asarray(im), d.x_test[0])
    facts = data_module.provenance(d).to_dict()
    assert facts == {
        "archive": "tree.tar.gz",
        "sha256": d.sha256,
        "first_test_image": d.test_order,
        "train_images": 20,
        "test_images": 30,
    }


def test_official_sources_keep_the_file_order_and_a_folder_gets_a_digest_of_its_files(archives):
    folder, expected = archives.official_dir(rows=4)
    d = load_cifar10(str(folder))
    assert d.test_order == data_module.OFFICIAL_TEST_ORDER
    np.testing.assert_array_equal(d.x_test[0], expected.x_test[0])
    assert d.archive == folder.name and d.sha256 == data_module.tree_sha256(folder)
    before = d.sha256
    (folder / "readme.html").write_text("<p>changed</p>")
    assert data_module.tree_sha256(folder) != before


def test_the_cache_keeps_the_provenance_and_a_subset_keeps_it_too(archives, tmp_path):
    archive, _ = archives.official_tar(rows=4)
    cache = tmp_path / "cache"
    first = load_cifar10(str(archive), cache)
    again = load_cifar10(str(archive), cache)
    assert "cached" in again.source
    for field in ("archive", "sha256", "test_layout", "first_test_file", "test_order"):
        assert getattr(again, field) == getattr(first, field)
    assert again.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    small = subset(again, 5, seed=3)
    assert (small.archive, small.sha256, small.test_order) == (
        again.archive,
        again.sha256,
        again.test_order,
    )
    assert "seeded random subset of the test images" in subset(again, 5, 2, 3).test_order


# --- the real archive (fixture cifar10_archive; decoded once, then served from var/test-cache) ---


@pytest.mark.slow
def test_real_jpeg_archive(cifar10_archive, cifar10_cache):
    d = load_cifar10(str(cifar10_archive), cifar10_cache)
    assert_shapes(d, 50_000, 10_000)
    assert np.bincount(d.y_train).tolist() == [5000] * 10
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    assert len(set(d.y_train[-1000:].tolist())) == 10  # mixed, not grouped by class
    assert 100 < d.x_train.mean() < 140  # CIFAR-10's mean pixel is about 120
    # The archive's first image is among its class's images, pixel for pixel.
    with tarfile.open(cifar10_archive, "r|gz") as tar:
        member = next(m for m in tar if m.isfile())
        reader = tar.extractfile(member)
        assert reader is not None
        with Image.open(reader) as im:
            first = np.asarray(im)
    cls = CLASS_NAMES.index(Path(member.name).parent.name)
    assert (d.x_train[d.y_train == cls] == first).all(axis=(1, 2, 3)).any()
    # What every job records of it: the archive's sha256, and which file is the first test image.
    assert d.sha256 == data_module.file_sha256(cifar10_archive)
    name = d.test_order.rsplit(": ", 1)[1]
    with tarfile.open(cifar10_archive, "r|gz") as tar:
        member = next(m for m in tar if m.name.removeprefix("./").endswith(name))
        reader = tar.extractfile(member)
        assert reader is not None
        with Image.open(reader) as im:
            np.testing.assert_array_equal(np.asarray(im), d.x_test[0])
