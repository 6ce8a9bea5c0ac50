"""Data sets: the embedded default, generated ImageFolders, archives (safely), clear errors."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup import data

SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"


def test_digits_fixed_stratified_split():
    a, b = data.load_digits(), data.load_digits()
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert np.array_equal(a.test.labels, b.test.labels)
    assert torch.equal(a.test.pixels, b.test.pixels)
    assert np.bincount(a.test.labels).min() >= 35  # every class in the test split
    img = a.train.image(0)
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and a.train.in_memory
    assert a.num_classes == 10


def make_folder(root: Path, classes=("cat", "dog"), per_class=6, size=12, split=True) -> Path:
    rng = np.random.default_rng(0)
    for part in ("train", "test") if split else ("",):
        for c in classes:
            d = root / part / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_imagefolder_with_train_and_test(tmp_path):
    ds = data.load_dataset(str(make_folder(tmp_path / "imgs")))
    assert (len(ds.train), len(ds.test), ds.train.classes, ds.image_size) == (12, 12, ["cat", "dog"], 12)
    assert ds.train.in_memory and ds.train.pixels.shape == (12, 3, 12, 12)
    first = sorted((tmp_path / "imgs" / "train" / "cat").iterdir())[0]
    assert torch.equal(ds.train.image(0), torch.from_numpy(np.array(Image.open(first).convert("RGB"))).permute(2, 0, 1))
    assert sorted(set(ds.train.labels.tolist())) == [0, 1]


def test_imagefolder_without_split_is_split_80_20(tmp_path):
    ds = data.load_dataset("imagefolder", data_dir=make_folder(tmp_path / "flat", per_class=10, split=False))
    assert (len(ds.train), len(ds.test)) == (16, 4)


def test_archive_is_extracted_once_and_loaded(tmp_path):
    src = make_folder(tmp_path / "src" / "tiny")
    archive = tmp_path / "tiny.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(src, arcname="tiny")
    cache = tmp_path / "cache"
    ds = data.load_dataset(str(archive), data_dir=cache)
    assert len(ds.train) == 12 and ds.name == "tiny"
    (extracted,) = [p for p in cache.iterdir() if p.name != "decoded"]
    stamp = (extracted / ".complete").stat().st_mtime_ns
    data.load_dataset(str(archive), data_dir=cache)
    assert (extracted / ".complete").stat().st_mtime_ns == stamp  # not extracted again


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/abs-evil.txt"])
def test_archive_path_traversal_is_refused(tmp_path, name):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tf:
        payload = b"x"
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    with pytest.raises(data.DataError, match="outside"):
        data.load_dataset(str(archive), data_dir=tmp_path / "cache")
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/abs-evil.txt").exists()


def test_archive_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("train/a/link.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(data.DataError, match="link"):
        data.load_dataset(str(archive), data_dir=tmp_path / "cache")


def test_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"not a tar file at all")
    with pytest.raises(data.DataError, match="cannot be extracted"):
        data.load_dataset(str(archive), data_dir=tmp_path / "cache")


@pytest.mark.parametrize(
    "name,data_dir,match",
    [
        ("mnist-ish", None, "unknown data set 'mnist-ish'; expected one of digits"),
        ("/no/such/dir", None, "no such file or directory"),
        ("missing.tar.gz", None, "no such archive file"),
        ("imagefolder", None, "imagefolder needs --data-dir"),
    ],
)
def test_bad_data_names(name, data_dir, match):
    with pytest.raises(data.DataError, match=match):
        data.load_dataset(name, data_dir)


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no class sub-folders"):
        data.load_dataset(str(tmp_path / "empty"))
    (tmp_path / "noimgs" / "cls").mkdir(parents=True)
    with pytest.raises(data.DataError, match="hold no images"):
        data.load_dataset(str(tmp_path / "noimgs"))


def test_cifar10_without_files_says_where_it_looked(tmp_path):
    with pytest.raises(data.DataError, match="no data set found under"):
        data.load_dataset("cifar10", tmp_path)


def test_views_depend_only_on_seed_epoch_index():
    ds = data.load_digits()
    tf = lambda img: torch.rand(3)  # noqa: E731 - consumes the global RNG like an augmentation
    a, b = data.ViewDataset(ds.train, [tf], seed=1), data.ViewDataset(ds.train, [tf], seed=1)
    torch.manual_seed(123)
    x = a[5][0][0]
    torch.rand(10)  # unrelated RNG use in between must not matter
    assert torch.equal(x, b[5][0][0])
    b.set_epoch(1)
    assert not torch.equal(x, b[5][0][0])


def test_epoch_sampler_shards_and_skips():
    full = list(data.EpochSampler(20, 4, seed=0))
    assert len(full) == 20 and sorted(full) == list(range(20))
    r0, r1 = data.EpochSampler(20, 4, 0, rank=0, world=2), data.EpochSampler(20, 4, 0, rank=1, world=2)
    a, b = list(r0), list(r1)
    assert len(a) == len(b) == 8 and not set(a) & set(b)
    s = data.EpochSampler(20, 4, seed=0)
    s.set_epoch(0, skip_batches=2)
    assert list(s) == full[8:]
    with pytest.raises(data.DataError, match="fewer than one batch"):
        data.EpochSampler(3, 4, 0)


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason="../shared/data/cifar10-jpeg.tar.gz is not present")
def test_shared_cifar10_archive(tmp_path_factory):
    ds = data.load_dataset(str(SHARED_ARCHIVE), data_dir=tmp_path_factory.mktemp("cache"))
    assert (len(ds.train), len(ds.test)) == (50_000, 10_000)
    assert ds.train.classes[:3] == ["airplane", "automobile", "bird"] and ds.image_size == 32
    assert ds.train.pixels.shape == (50_000, 3, 32, 32) and ds.train.pixels.dtype == torch.uint8


def test_decoded_pixels_are_cached_and_reused(tmp_path):
    root = make_folder(tmp_path / "imgs")
    cache = tmp_path / "cache"
    a = data.load_imagefolder(root, cache=cache)
    files = sorted(cache.glob("decoded-*.u8"))
    assert [f.stat().st_size for f in files] == [12 * 12 * 12 * 3] * 2  # 12 images of 12x12x3 per split
    stamps = [f.stat().st_mtime_ns for f in files]
    b = data.load_imagefolder(root, cache=cache)
    assert [f.stat().st_mtime_ns for f in files] == stamps and torch.equal(a.train.pixels, b.train.pixels)
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(root / "train" / "cat" / "0.png")  # a changed file
    c = data.load_imagefolder(root, cache=cache)
    assert not torch.equal(a.train.pixels, c.train.pixels) and int(c.train.pixels[0].sum()) == 0


def test_large_images_are_decoded_per_access(tmp_path):
    root = make_folder(tmp_path / "big", per_class=2, size=160)
    ds = data.load_dataset(str(root))
    assert not ds.train.in_memory and ds.image_size == 224
    assert ds.train.image(0).shape == (3, 160, 160) and ds.train.image(0).dtype == torch.uint8


def test_corrupt_image_is_named(tmp_path):
    root = make_folder(tmp_path / "imgs")
    bad = root / "train" / "dog" / "3.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(data.DataError, match=r"dog/3.png: cannot be decoded as an image"):
        data.load_dataset(str(root), data_dir=tmp_path / "cache")


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs")
    monkeypatch.setattr(data, "MAX_IMAGE_PIXELS", 100)  # 12x12 = 144 pixels declared
    with pytest.raises(data.DataError, match=r"declares 12x12 pixels, more than the 100 allowed"):
        data.load_dataset(str(root))


def test_one_class_folder_is_refused(tmp_path):
    root = make_folder(tmp_path / "one", classes=("cat",))
    with pytest.raises(data.DataError, match="one class folder"):
        data.load_dataset(str(root))


def test_archive_bomb_is_refused_before_anything_is_written(tmp_path):
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        info = tarfile.TarInfo("train/a/zeros.jpg")
        info.size = 50 * 2**20  # 50 MiB of zeros compress to about 50 KiB: far past 100x
        tf.addfile(info, io.BytesIO(bytes(info.size)))
    assert archive.stat().st_size < 200_000
    cache = tmp_path / "cache"
    with pytest.raises(data.DataError, match=r"would expand to 50.0 MiB, more than 100x the archive's size"):
        data.load_dataset(str(archive), data_dir=cache)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_archive_larger_than_the_free_space_is_refused(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src" / "tiny")
    archive = tmp_path / "tiny.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(src, arcname="tiny")
    monkeypatch.setattr(data.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(data.DataError, match="MiB free under"):
        data.load_dataset(str(archive), data_dir=tmp_path / "cache")
