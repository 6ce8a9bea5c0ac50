"""Data sets for training and evaluation.

Every data set is a pair of train/test splits of RGB images with integer labels. Names:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download), upscaled to
  32x32 RGB, with a fixed stratified 80/20 split. The embedded default.
- ``cifar10``, ``cifar100``, ``stl10``: torchvision's loaders, reading from ``--data-dir``. Nothing is
  downloaded unless ``download=True`` is passed explicitly.
- ``imagefolder``: a directory with ``train/<class>/*`` and ``test/<class>/*`` (or only class folders,
  split 80/20 with a fixed seed).
- a path to a ``.tar``/``.tar.gz``/``.tgz``/``.zip`` archive in ImageFolder layout (e.g. CIFAR-10 as
  JPEG files), extracted once into a cache directory; members that would escape it are refused, and so
  is an archive whose contents would expand past 100x its size or past the free space of the cache disk.

Small images (up to 128 px: digits, CIFAR, STL-10, small ImageFolders) are decoded once into a uint8
tensor (N, 3, H, W), so no JPEG is decoded while training; an ImageFolder's decoded pixels are kept in
the cache directory (memory-mapped when they would not fit comfortably in RAM) and reused by later runs.
Larger images are decoded per access, in the loader workers.

[`ViewDataset`][selfsup.data.ViewDataset] wraps a split with the part of a method's views that runs per image
(see `selfsup.views`). Its randomness is a function of (seed, epoch, sample index) only, so a run is
reproducible with any number of loader workers and a resumed run sees exactly the views it would have seen.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

BUILTIN = ("digits", "cifar10", "cifar100", "stl10", "imagefolder")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SMALL_IMAGE_MAX = 128
"""Images up to this side are decoded once into memory; larger ones per access."""
MAX_IMAGE_PIXELS = 64_000_000
"""A file that declares more pixels than this (a decompression bomb) is refused before it is decoded."""
MAX_EXPANSION = 100
"""An archive may expand to at most this multiple of its own size."""


class DataError(Exception):
    """A data set that cannot be loaded: unknown name, missing path, empty folder, bad archive or image."""


@dataclass
class Split:
    """Labels and images of one split: ``pixels`` (N, 3, H, W) uint8 when decoded in memory, else
    ``decode(i)`` returns image i as a (3, H, W) uint8 tensor."""

    labels: np.ndarray
    classes: list[str]
    pixels: torch.Tensor | None = None
    decode: Callable[[int], torch.Tensor] | None = None
    mapped: bool = False
    """``pixels`` is a memory-mapped file in the cache directory."""

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.pixels is not None

    def image(self, i: int) -> torch.Tensor:
        """Image i as a (3, H, W) uint8 tensor."""
        return self.pixels[i] if self.pixels is not None else self.decode(i)

    @property
    def nbytes(self) -> int:
        return self.pixels.numel() if self.pixels is not None else 0


@dataclass
class DataSet:
    name: str
    train: Split
    test: Split
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    budget: dict | None = None
    """Default epochs/batch size for this data set where the paper's would not fit (digits on a CPU)."""

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    def describe(self) -> str:
        """One line: sizes, and how much memory the decoded images take."""
        n = f"{self.name}: {len(self.train):,} train + {len(self.test):,} test images, {self.num_classes} classes"
        if self.train.in_memory:
            mib = (self.train.nbytes + self.test.nbytes) / 2**20
            mapped = " (memory-mapped)" if self.train.mapped else " in memory"
            return f"{n}, decoded to uint8 {tuple(self.train.pixels.shape[1:])}: {mib:.1f} MiB{mapped}"
        return f"{n}, decoded per access ({self.image_size} px views)"


def _stack_hwc(arrays: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 array -> contiguous (N, 3, H, W) uint8 tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(arrays).transpose(0, 3, 1, 2)))


# ------------------------------------------------------------------------------------------------
# digits: the embedded default
# ------------------------------------------------------------------------------------------------


def load_digits(image_size: int = 32, seed: int = 0) -> DataSet:
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    d = _load()
    x = (d.images / 16.0 * 255.0).clip(0, 255).astype(np.uint8)  # (1797, 8, 8)
    idx_train, idx_test = train_test_split(
        np.arange(len(x)), test_size=0.2, random_state=seed, stratify=d.target
    )

    def upscale(idx: np.ndarray) -> torch.Tensor:
        big = [np.asarray(Image.fromarray(x[i], mode="L").resize((image_size, image_size), Image.BILINEAR)) for i in idx]
        return torch.from_numpy(np.stack(big))[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)

    classes = [str(c) for c in range(10)]
    train = Split(d.target[idx_train].astype(np.int64), classes, pixels=upscale(idx_train))
    test = Split(d.target[idx_test].astype(np.int64), classes, pixels=upscale(idx_test))
    # 15 epochs of 22 steps at batch 64 with the methods' "small" presets: about two minutes per method
    # on a 2-core CPU with the small CNN (see benchmarks/results/knn-digits.json)
    budget = {"epochs": 15, "batch_size": 64, "preset": "small"}
    return DataSet("digits", train, test, image_size, (0.0784,) * 3, (0.1845,) * 3, budget)


# ------------------------------------------------------------------------------------------------
# torchvision data sets (real loaders; download only when asked)
# ------------------------------------------------------------------------------------------------

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_torchvision(name: str, root: Path, download: bool = False) -> DataSet:
    from torchvision import datasets

    try:
        if name in ("cifar10", "cifar100"):
            cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
            tr = cls(str(root), train=True, download=download)
            te = cls(str(root), train=False, download=download)
            classes = list(tr.classes)
            train = Split(np.asarray(tr.targets, dtype=np.int64), classes, pixels=_stack_hwc(tr.data))
            test = Split(np.asarray(te.targets, dtype=np.int64), classes, pixels=_stack_hwc(te.data))
            return DataSet(name, train, test, 32, CIFAR_MEAN, CIFAR_STD)
        if name == "stl10":
            tr = datasets.STL10(str(root), split="train", download=download)
            te = datasets.STL10(str(root), split="test", download=download)
            classes = list(tr.classes)
            train = Split(np.asarray(tr.labels, dtype=np.int64), classes, pixels=torch.from_numpy(tr.data))
            test = Split(np.asarray(te.labels, dtype=np.int64), classes, pixels=torch.from_numpy(te.data))
            return DataSet(name, train, test, 96, IMAGENET_MEAN, IMAGENET_STD)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. You can use download=True"
        raise DataError(
            f"{name}: no data set found under {root} ({e}). Point --data-dir at a directory holding it, "
            "or download it first (torchvision's download=True, outside selfsup)."
        ) from None
    raise DataError(f"unknown torchvision data set {name!r}")


# ------------------------------------------------------------------------------------------------
# Image files: bounded, named decoding errors
# ------------------------------------------------------------------------------------------------


def read_image(path: Path, size: int | None = None) -> np.ndarray:
    """One image file as an (H, W, 3) uint8 array; resized (shorter side) and centre-cropped to
    ``size`` x ``size`` when given. A corrupt file or a decompression bomb is a DataError naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size  # read from the header, before any pixel is decoded
                if w * h > MAX_IMAGE_PIXELS:
                    raise DataError(f"{path}: declares {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed; refusing to decode it")
                im = im.convert("RGB")
                if size is not None and (w, h) != (size, size):
                    scale = size / min(w, h)
                    im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
                    left, top = (im.width - size) // 2, (im.height - size) // 2
                    im = im.crop((left, top, left + size, top + size))
                return np.asarray(im)
    except DataError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: cannot be decoded as an image ({type(e).__name__}: {e})") from None


def _tensor_of(path: Path) -> torch.Tensor:
    return torch.from_numpy(read_image(path).transpose(2, 0, 1).copy())


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def decode_files(files: Sequence[Path], size: int, cache: Path | None) -> tuple[torch.Tensor, bool]:
    """Decode every file into (N, 3, size, size) uint8, in threads (PIL releases the GIL while decoding).

    With a cache directory, the pixels are written to ``cache/<key>.u8`` once and reused while the files
    are unchanged; they are read into memory when they take under a quarter of the available RAM, else
    memory-mapped. Returns the tensor and whether it is memory-mapped."""
    shape = (len(files), size, size, 3)
    nbytes = int(np.prod(shape))
    path = None
    if cache is not None:
        h = hashlib.sha256(f"{size}".encode())
        for f in files:
            st = f.stat()
            h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        path = cache / f"decoded-{h.hexdigest()[:16]}.u8"
    if path is None or not path.is_file() or path.stat().st_size != nbytes:
        out = np.empty(shape, dtype=np.uint8)

        def put(i: int) -> None:
            out[i] = read_image(files[i], size)

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(put, range(len(files)), chunksize=256))
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".partial")
                out.tofile(tmp)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only cache only costs the decoding next time
        return _stack_hwc(out), False
    if nbytes < _available_memory() // 4:
        return _stack_hwc(np.fromfile(path, dtype=np.uint8).reshape(shape)), False
    mm = np.memmap(path, dtype=np.uint8, mode="c", shape=shape)
    return torch.from_numpy(mm).permute(0, 3, 1, 2), True  # (N, 3, H, W) view of the file


# ------------------------------------------------------------------------------------------------
# ImageFolder directories and archives
# ------------------------------------------------------------------------------------------------


def _scan_classes(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{folder}: no class sub-folders (expected {folder}/<class>/<image files>)")
    files, labels = [], []
    for c, cls in enumerate(classes):
        found = sorted(
            p for p in (folder / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS
        )
        files += found
        labels += [c] * len(found)
    if not files:
        raise DataError(f"{folder}: the class folders hold no images ({', '.join(IMG_EXTENSIONS)})")
    if len(classes) < 2:
        raise DataError(f"{folder}: one class folder ({classes[0]}); k-NN and linear evaluation need at least two classes")
    return files, np.asarray(labels, dtype=np.int64), classes


def load_imagefolder(root: Path, image_size: int | None = None, seed: int = 0, cache: Path | None = None) -> DataSet:
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    if (root / "train").is_dir():
        tr_files, tr_labels, classes = _scan_classes(root / "train")
        test_dir = root / "test" if (root / "test").is_dir() else root / "val"
        if not test_dir.is_dir():
            raise DataError(f"{root}: has train/ but neither test/ nor val/")
        te_files, te_labels, te_classes = _scan_classes(test_dir)
        if te_classes != classes:
            raise DataError(f"{root}: train/ and {test_dir.name}/ have different class folders")
    else:
        files, labels, classes = _scan_classes(root)
        perm = np.random.default_rng(seed).permutation(len(files))
        n_test = max(1, len(files) // 5)
        te_idx, tr_idx = perm[:n_test], perm[n_test:]
        tr_files, tr_labels = [files[i] for i in tr_idx], labels[tr_idx]
        te_files, te_labels = [files[i] for i in te_idx], labels[te_idx]
    side = min(read_image(tr_files[0]).shape[:2])
    if side <= SMALL_IMAGE_MAX:  # decoded once, at the first image's side (all of CIFAR's are 32x32)
        cache = cache or default_cache_dir() / "decoded"
        tr_px, mapped = decode_files(tr_files, side, cache)
        te_px, _ = decode_files(te_files, side, cache)
        train = Split(tr_labels, classes, pixels=tr_px, mapped=mapped)
        test = Split(te_labels, classes, pixels=te_px, mapped=mapped)
        image_size = image_size or side
    else:  # large images train at 224 px unless told otherwise
        train = Split(tr_labels, classes, decode=lambda i: _tensor_of(tr_files[i]))
        test = Split(te_labels, classes, decode=lambda i: _tensor_of(te_files[i]))
        image_size = image_size or 224
    return DataSet(root.name, train, test, image_size, IMAGENET_MEAN, IMAGENET_STD)


def default_cache_dir() -> Path:
    """``$SELFSUP_CACHE``, else ``$XDG_CACHE_HOME/selfsup``, else ``~/.cache/selfsup``."""
    if os.environ.get("SELFSUP_CACHE"):
        return Path(os.environ["SELFSUP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "selfsup"


def _safe_target(dest: Path, member_name: str) -> Path:
    target = (dest / member_name).resolve()
    if not target.is_relative_to(dest.resolve()):
        raise DataError(f"archive member {member_name!r} would be written outside {dest}; refusing to extract")
    return target


def _check_expansion(archive: Path, total: int, dest_parent: Path) -> None:
    """Refuse, before anything is written, an archive that would fill the disk (a zip or tar bomb)."""
    limit = MAX_EXPANSION * max(archive.stat().st_size, 1)
    if total > limit:
        raise DataError(
            f"{archive}: its members would expand to {total / 2**20:,.1f} MiB, more than {MAX_EXPANSION}x the "
            f"archive's size; refusing to extract"
        )
    dest_parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest_parent).free
    if total > free:
        raise DataError(
            f"{archive}: its members would expand to {total / 2**20:,.1f} MiB, more than the "
            f"{free / 2**20:,.1f} MiB free under {dest_parent}; refusing to extract"
        )


def extract_archive(archive: Path, cache_dir: Path | None = None) -> Path:
    """Extract once into ``cache_dir/<name>-<hash>``; refuses links, members outside the target and
    archives that would expand past their bound."""
    archive = Path(archive)
    if not archive.is_file():
        raise DataError(f"{archive}: no such archive file")
    stat = archive.stat()
    key = hashlib.sha256(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    stem = archive.name.split(".")[0]
    dest = (cache_dir or default_cache_dir()) / f"{stem}-{key}"
    if (dest / ".complete").exists():
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                for info in infos:
                    _safe_target(tmp, info.filename)
                _check_expansion(archive, sum(i.file_size for i in infos), dest.parent)
                _fresh_dir(tmp)
                zf.extractall(tmp)
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
                for m in members:
                    _safe_target(tmp, m.name)
                    if not (m.isfile() or m.isdir()):
                        raise DataError(f"archive member {m.name!r} is a link or device; refusing to extract")
                _check_expansion(archive, sum(m.size for m in members), dest.parent)
                _fresh_dir(tmp)
                extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
                tf.extractall(tmp, members=members, **extra)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{archive}: cannot be extracted ({e})") from None
    except DataError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (tmp / ".complete").touch()
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete earlier extraction (no .complete)
    os.replace(tmp, dest)
    return dest


def _fresh_dir(path: Path) -> None:
    """The ``.partial`` directory of an interrupted extraction is ours to replace."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _archive_root(dest: Path) -> Path:
    """The folder inside an extracted archive that holds train/ (or the class folders)."""
    entries = [p for p in dest.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not (dest / "train").is_dir():
        return entries[0]
    return dest


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def load_dataset(
    name: str, data_dir: str | Path | None = None, image_size: int | None = None, download: bool = False
) -> DataSet:
    """Load a data set by name or path. Raises [`DataError`][selfsup.data.DataError] with what is wrong."""
    lowered = str(name).lower()
    if lowered == "digits":
        return load_digits(image_size or 32)
    if lowered in ("cifar10", "cifar100", "stl10"):
        root = Path(data_dir) if data_dir else default_cache_dir() / lowered
        ds = load_torchvision(lowered, root, download=download)
        ds.image_size = image_size or ds.image_size
        return ds
    if lowered == "imagefolder":
        if not data_dir:
            raise DataError("imagefolder needs --data-dir pointing at the image folder")
        return load_imagefolder(Path(data_dir), image_size)
    path = Path(name)
    if any(str(path).endswith(s) for s in ARCHIVE_SUFFIXES):
        cache = Path(data_dir) if data_dir else None
        dest = extract_archive(path, cache)
        ds = load_imagefolder(_archive_root(dest), image_size, cache=(cache or default_cache_dir()) / "decoded")
        ds.name = path.name.split(".")[0]
        if ds.name.startswith("cifar"):
            ds.mean, ds.std = CIFAR_MEAN, CIFAR_STD
        return ds
    if path.is_dir():
        return load_imagefolder(path, image_size)
    if path.suffix or "/" in str(name):
        raise DataError(f"{name}: no such file or directory")
    raise DataError(
        f"unknown data set {name!r}; expected one of {', '.join(BUILTIN)}, an ImageFolder directory, "
        f"or an archive ({', '.join(ARCHIVE_SUFFIXES)})"
    )


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's views: independent of worker count and visiting order."""
    return (seed * 1_000_003 + epoch * 7_919 + index * 104_729) % (2**63 - 1)


class ViewDataset(Dataset):
    """A split whose items are ``(views, index, label)``.

    ``transforms`` is one per-image transform per view (``None``: the image as it is, uint8); when every
    transform is ``None`` the image is returned once and the views are made from it on the device."""

    def __init__(self, split: Split, transforms: Sequence[Callable | None], seed: int = 0):
        self.split, self.transforms, self.seed, self.epoch = split, list(transforms), seed, 0
        self.shared = all(t is None for t in self.transforms)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        img = self.split.image(i)
        if self.shared:
            return [img], i, int(self.split.labels[i])
        state = torch.random.get_rng_state()
        torch.manual_seed(sample_seed(self.seed, self.epoch, i))
        try:
            views = [img if t is None else t(img) for t in self.transforms]
        finally:
            torch.random.set_rng_state(state)
        return views, i, int(self.split.labels[i])


def collate_views(items):
    """Stack view v of every sample: a list of V tensors (N, C, H_v, W_v); multi-crop sizes may differ."""
    views, index, label = zip(*items)
    n_views = len(views[0])
    stacked = [torch.stack([v[k] for v in views]) for k in range(n_views)]
    return {"views": stacked, "index": torch.as_tensor(index), "label": torch.as_tensor(label)}


class EpochSampler(torch.utils.data.Sampler):
    """A permutation seeded by (seed, epoch), sharded over ranks, that can skip already-seen batches."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.skip_batches = 0, 0
        # drop_last over the global batch so every rank sees the same number of full batches
        self.batches_per_epoch = n // (batch_size * world)
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the training split has {n} samples, fewer than one batch of {batch_size} x {world} rank(s); "
                "lower --batch-size"
            )

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        perm = torch.randperm(self.n, generator=g)[: self.batches_per_epoch * self.batch_size * self.world]
        per_batch = perm.view(self.batches_per_epoch, self.world, self.batch_size)[:, self.rank]
        return iter(per_batch[self.skip_batches :].reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip_batches) * self.batch_size
