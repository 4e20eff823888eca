"""Dataset readers for the robustness evaluations; every reader validates its layout first.

Layouts:

* ImageFolder: ``<root>/<class>/<image>``; a training root has ``train/`` and ``val/``.
* ImageNet-C: ``<root>/<corruption>/<severity 1-5>/<class>/<image>``.
* ImageNet-A / -R / -Sketch: ImageFolder with WordNet-id class folders (200 / 200 / 1000).
* Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte`` ...), gzipped or raw, in any folder;
  by default the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).
* digits: scikit-learn's bundled 8x8 digits (1,797 images), split deterministically.
* Fashion-MNIST-C: generated from the Fashion-MNIST test split with the ``imagecorruptions`` package
  (PyPI fork ``imagecorruptions-imaug``), cached on disk as ``.npz`` files.

A malformed folder raises :class:`DatasetError` (a ValueError) whose message names the path and what
is wrong, so scripts can fail before any training starts.
"""
from __future__ import annotations

import gzip
import os
import random
import zlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "DatasetError", "IMG_EXTENSIONS", "FASHION_MNIST_DIRS", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
    "check_image_folder", "check_train_val_root", "imagenet_c_folders", "read_idx", "find_fashion_mnist",
    "load_fashion_mnist", "load_digits_arrays", "BatchAugment", "TensorImageDataset", "fashion_mnist_c",
    "corrupt_images", "require_imagecorruptions",
]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".JPEG")
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
_FMNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


class DatasetError(ValueError):
    """A dataset folder or file is missing or does not have the expected layout."""


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in {e.lower() for e in IMG_EXTENSIONS}


# ----------------------------------------------------------------------------------------------
# ImageFolder layouts
# ----------------------------------------------------------------------------------------------
def check_image_folder(root, what: str = "dataset", expected_classes: Sequence[str] | None = None) -> list[str]:
    """Validate ``<root>/<class>/<image>`` and return the sorted class names.

    Raises DatasetError if root is missing, has no class folders, a class folder has no image, or
    the class names differ from ``expected_classes``.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{what}: folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{what}: {root} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        stray = [p.name for p in root.iterdir()][:5]
        raise DatasetError(f"{what}: {root} has no class sub-folders (expected <root>/<class>/<image>; "
                           f"found {stray or 'nothing'})")
    empty = [c for c in classes if not any(_is_image(p) for p in (root / c).iterdir())]
    if empty:
        raise DatasetError(f"{what}: class folder(s) {empty[:5]} in {root} contain no image "
                           f"(extensions {', '.join(sorted({e.lower() for e in IMG_EXTENSIONS}))})")
    if expected_classes is not None and list(expected_classes) != classes:
        missing = sorted(set(expected_classes) - set(classes))
        extra = sorted(set(classes) - set(expected_classes))
        raise DatasetError(f"{what}: classes in {root} differ from the training classes "
                           f"(missing {missing[:5]}, unexpected {extra[:5]})")
    return classes


def check_train_val_root(data_path) -> list[str]:
    """Validate ``<data_path>/train`` and ``<data_path>/val`` (same classes); return the classes."""
    root = Path(data_path)
    if not root.is_dir():
        raise DatasetError(f"--data-path {root} does not exist or is not a folder")
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DatasetError(f"--data-path {root} must contain train/ and val/ folders "
                               f"(ImageFolder layout <split>/<class>/<image>); {split}/ is missing")
    classes = check_image_folder(root / "train", "training set")
    check_image_folder(root / "val", "validation set", expected_classes=classes)
    return classes


def imagenet_c_folders(root, corruptions: Iterable[str] | None = None,
                       severities: Iterable[int] = (1, 2, 3, 4, 5),
                       expected_classes: Sequence[str] | None = None) -> list[tuple[str, int, Path]]:
    """Validate an ImageNet-C style tree and list ``(corruption, severity, folder)``.

    Arguments:
        root: ``<root>/<corruption>/<severity>/<class>/<image>``.
        corruptions: names to use; default every corruption folder found.
        severities: severities required for each corruption.
        expected_classes: when given, each folder's classes must equal these.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"ImageNet-C: folder {root} does not exist")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    names = list(corruptions) if corruptions is not None else found
    if not names:
        raise DatasetError(f"ImageNet-C: {root} has no corruption folders "
                           "(expected <root>/<corruption>/<severity>/<class>/<image>)")
    out = []
    for name in names:
        if name not in found:
            raise DatasetError(f"ImageNet-C: corruption folder {root / name} is missing")
        for s in severities:
            folder = root / name / str(s)
            if not folder.is_dir():
                raise DatasetError(f"ImageNet-C: severity folder {folder} is missing")
            check_image_folder(folder, f"ImageNet-C {name}/{s}", expected_classes)
            out.append((name, int(s), folder))
    return out


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX) and digits
# ----------------------------------------------------------------------------------------------
def read_idx(path) -> np.ndarray:
    """Read an IDX file (gzipped or raw): unsigned-byte data with any number of dimensions."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DatasetError(f"{path} is not an IDX file (bad magic number)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DatasetError(f"{path}: only unsigned-byte IDX data is supported (type code {dtype_code:#x})")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    n = int(np.prod(shape)) if shape else 0
    if len(data) - header != n:
        raise DatasetError(f"{path}: IDX header says {shape} ({n} bytes) but {len(data) - header} bytes follow")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _idx_path(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        if (folder / name).is_file():
            return folder / name
    return None


def find_fashion_mnist(root=None) -> Path:
    """The folder holding the Fashion-MNIST IDX files: ``root``, else ``$FASHION_MNIST_DIR``, else the
    Debian package's folder. Raises DatasetError naming the install step if none has them."""
    candidates = [Path(root)] if root else []
    if not root and os.environ.get("FASHION_MNIST_DIR"):
        candidates.append(Path(os.environ["FASHION_MNIST_DIR"]))
    if not root:
        candidates += [Path(d) for d in FASHION_MNIST_DIRS]
    for c in candidates:
        if c.is_dir() and all(_idx_path(c, s) for pair in _FMNIST_FILES.values() for s in pair):
            return c
    raise DatasetError(
        "Fashion-MNIST not found in " + ", ".join(str(c) for c in candidates) +
        ": install it with `apt-get install -y dataset-fashion-mnist` (files in "
        "/usr/share/datasets/fashion-mnist) or point --fmnist-path / $FASHION_MNIST_DIR at a folder with "
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz]")


def load_fashion_mnist(split: str = "train", root=None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as ``(images uint8 (N, 28, 28), labels int64 (N,))``; split 'train' or 'test'."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"split must be one of {sorted(_FMNIST_FILES)}, got {split!r}")
    folder = find_fashion_mnist(root)
    img_file, lab_file = (_idx_path(folder, s) for s in _FMNIST_FILES[split])
    images, labels = read_idx(img_file), read_idx(lab_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST {split} in {folder}: images {images.shape} and labels "
                           f"{labels.shape} do not match")
    return images, labels.astype(np.int64)


def load_digits_arrays(split: str = "train", test_fraction: float = 0.25, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as ``(uint8 (N, 8, 8) scaled to 0-255, int64 labels)``; a fixed
    stratification-free random split (seed 0) into 'train' and 'test'."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover
        raise DatasetError("--data-set digits needs scikit-learn (pip install scikit-learn)") from e
    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    perm = np.random.RandomState(seed).permutation(len(images))
    n_test = int(round(test_fraction * len(images)))
    idx = perm[n_test:] if split == "train" else perm[:n_test]
    return images[idx], d.target[idx].astype(np.int64)


class BatchAugment:
    """Random crop (zero padding) and horizontal flip, then normalisation, for a whole batch at once.

    Each image gets its own offsets and flip (drawn from torch's global generator), as with
    torchvision's per-image ``RandomCrop(size, padding)`` + ``RandomHorizontalFlip`` + ``Normalize``;
    applied to a (B, C, H, W) batch in a few tensor operations instead of B calls, which on small images
    costs less than the model (per-image transforms took about half a millisecond an image).
    """
    batched = True

    def __init__(self, padding: int, flip: bool, mean: Sequence[float], std: Sequence[float]):
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding, self.flip = int(padding), bool(flip)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        single = x.ndim == 3
        x = x[None] if single else x
        b, c, h, w = x.shape
        p = self.padding
        if p:
            xp = torch.nn.functional.pad(x, (p, p, p, p))
            i = torch.randint(0, 2 * p + 1, (b, 1, 1, 1))
            j = torch.randint(0, 2 * p + 1, (b, 1, 1, 1))
            rows = (i + torch.arange(h).view(1, 1, h, 1)).expand(b, c, h, w + 2 * p)
            cols = (j + torch.arange(w).view(1, 1, 1, w)).expand(b, c, h, w)
            x = xp.gather(2, rows).gather(3, cols)
        if self.flip:
            f = torch.rand(b) < 0.5
            x = torch.where(f.view(b, 1, 1, 1), x.flip(-1), x)
        x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x[0] if single else x


class TensorImageDataset(Dataset):
    """In-memory uint8 images (N, H, W) or (N, H, W, C) -> float (C, H, W) pixels in [0, 1].

    ``transform`` (optional) is applied to the float tensor, e.g. random crop / flip / normalise; a
    transform with ``batched = True`` (:class:`BatchAugment`) is applied once to each batch the
    DataLoader asks for.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        t = torch.as_tensor(np.asarray(images))
        self.images = t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]

    def __getitems__(self, indices):
        if not getattr(self.transform, "batched", False):
            return [self[i] for i in indices]
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        x = self.transform(self.images[idx].float().div_(255.0))
        return list(zip(x.unbind(0), self.labels[idx].unbind(0)))


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST-C
# ----------------------------------------------------------------------------------------------
def require_imagecorruptions():
    """Import ``imagecorruptions`` or raise ImportError with the install step."""
    try:
        import imagecorruptions  # noqa: F401
    except ImportError as e:
        raise ImportError("Fashion-MNIST-C needs the `imagecorruptions` package: "
                          "pip install imagecorruptions-imaug  (the NumPy-2 compatible fork of "
                          "imagecorruptions 1.1.2, same import name)") from e
    return imagecorruptions


def corrupt_images(images: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """Corrupt uint8 grayscale images (N, H, W) with ``imagecorruptions``.

    The package needs at least 32 x 32 colour images, so each image is zero-padded (Fashion-MNIST's
    background is black) to at least 32 x 32, replicated to 3 channels, corrupted, averaged back to
    one channel and cropped to its original size. NumPy's and Python's global random states are
    seeded with ``seed`` for the duration and restored afterwards, so the result is reproducible.
    """
    ic = require_imagecorruptions()
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W) grayscale, got shape {images.shape}")
    if not 1 <= int(severity) <= 5:
        raise ValueError(f"severity must be in 1..5, got {severity}")
    n, h, w = images.shape
    ph, pw = max(0, 32 - h), max(0, 32 - w)
    top, left = ph // 2, pw // 2
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    out = np.empty_like(images)
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(n):
                img = np.pad(images[i], ((top, ph - top), (left, pw - left)))
                rgb = np.repeat(img[:, :, None], 3, axis=2)
                c = np.asarray(ic.corrupt(rgb, corruption_name=corruption, severity=int(severity)))
                if c.ndim == 3:
                    c = c.astype(np.float64).mean(axis=2)
                c = c[top:top + h, left:left + w]
                out[i] = np.clip(np.round(c), 0, 255).astype(np.uint8)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    return out


def fashion_mnist_c(cache_dir, corruptions: Iterable[str] | None = None, severities: Iterable[int] = (1, 2, 3, 4, 5),
                    num_images: int | None = None, fmnist_root=None, verbose: bool = False,
                    ) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST-C: the test split under ImageNet-C's corruptions, generated once and cached.

    Arguments:
        cache_dir: folder for ``<corruption>-<severity>-n<N>.npz`` files (created).
        corruptions: names (default: the 15 ImageNet-C benchmark corruptions).
        severities: 1..5.
        num_images: use the first N test images (default all 10,000).
        fmnist_root: folder of the Fashion-MNIST IDX files (see :func:`find_fashion_mnist`).
    Returns:
        {(corruption, severity): (images uint8 (N, 28, 28), labels int64 (N,))}.
    """
    from .metrics import IMAGENET_C_CORRUPTIONS
    corruptions = list(corruptions) if corruptions is not None else list(IMAGENET_C_CORRUPTIONS)
    images, labels = load_fashion_mnist("test", fmnist_root)
    if num_images is not None:
        images, labels = images[:num_images], labels[:num_images]
    n = len(images)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in corruptions:
        for s in severities:
            f = cache / f"{name}-{s}-n{n}.npz"
            if f.is_file():
                with np.load(f) as z:
                    out[(name, int(s))] = (z["images"], z["labels"])
                continue
            require_imagecorruptions()
            if verbose:
                print(f"generating Fashion-MNIST-C {name} severity {s} ({n} images) -> {f}", flush=True)
            x = corrupt_images(images, name, int(s), seed=(zlib.crc32(name.encode()) + int(s)) % 2**31)
            tmp = f.with_name(f.name + ".tmp.npz")
            np.savez_compressed(tmp, images=x, labels=labels)
            os.replace(tmp, f)
            out[(name, int(s))] = (x, labels)
    return out
