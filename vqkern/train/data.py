"""Image data for the training script, read with numpy (and Pillow for PNG/JPEG).

Accepted sources (``--data``):
- nothing: Fashion-MNIST from the Debian package ``dataset-fashion-mnist``
  (IDX files under /usr/share/datasets/fashion-mnist);
- a folder of MNIST-format IDX files (``train-images-idx3-ubyte`` and
  ``t10k-images-idx3-ubyte``, gzipped or raw);
- a ``.npy`` array of images (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 in
  [0, 255] or float in [0, 1];
- a folder of PNG/JPEG images, or a folder of class sub-folders of them.

Labels, for a prior conditioned on the class name: an IDX folder's
``train-labels-idx1-ubyte`` and ``t10k-labels-idx1-ubyte``, both (class names from a
``classes.txt`` beside them, one per line; Fashion-MNIST's ten names for the
default data or a folder named fashion-mnist; else the label numbers), or the
sub-folder names of an image folder. A ``.npy`` array and a flat image folder
carry none.

Every loader returns uint8 arrays (N, C, H, W): keeping the bytes (55 MB for
Fashion-MNIST instead of 220 MB as float32) and converting one batch at a time.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

DEFAULT_DATA = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = (
    "install Fashion-MNIST with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), "
    "or pass --data with a folder of MNIST-format IDX files, a .npy array or a folder of PNG/JPEG images"
)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# IDX type codes (the third magic byte) -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle boot")


class DataSplits(NamedTuple):
    """train, test: uint8 arrays (N, C, H, W); source: where they came from.

    train_labels, test_labels: int64 arrays (N,) of indices into ``classes``
    (the class names), or None (and ``classes`` empty) when the data carries no labels.
    """
    train: np.ndarray
    test: np.ndarray
    source: str
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    classes: tuple[str, ...] = ()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or raw) into a numpy array of its own shape and dtype.

    Raises ValueError naming the file when the header or the size is wrong.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip stream ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(f"{path}: not an IDX file (its magic number {raw[:4].hex() or 'is missing'} "
                         "is not 00 00 <type> <ndim>)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX header truncated ({len(raw)} bytes, the header needs {header})")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, 4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX file of shape {shape} should be {expected} bytes, got {len(raw)} "
                         "(truncated or corrupt)")
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, prefix: str, kind: str = "idx3") -> Path | None:
    hits = sorted(p for p in folder.iterdir() if p.name.startswith(prefix) and kind in p.name)
    if not hits and kind != "idx3":
        return None
    if not hits:
        raise FileNotFoundError(f"{folder}: no {prefix}*idx3-ubyte[.gz] file (an MNIST-format IDX folder "
                                "holds train-images-idx3-ubyte and t10k-images-idx3-ubyte)")
    return hits[0]


def _to_uint8_nchw(array: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) uint8/float -> uint8 (N, C, H, W)."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
            array = array.transpose(0, 3, 1, 2)
        elif array.shape[1] not in (1, 3):
            raise ValueError(f"{name}: 4-d images need 1 or 3 channels first or last, got shape {array.shape}")
    else:
        raise ValueError(f"{name}: images must have shape (N, H, W), (N, H, W, C) or (N, C, H, W), "
                         f"got shape {array.shape}")
    if array.shape[0] == 0:
        raise ValueError(f"{name}: holds no images")
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all() or array.min() < 0 or array.max() > 1:
            raise ValueError(f"{name}: float images must be finite and lie in [0, 1]")
        return np.ascontiguousarray(np.rint(array * 255).astype(np.uint8))
    raise ValueError(f"{name}: images must be uint8 or float, got dtype {array.dtype}")


def read_npy(path: str | os.PathLike) -> np.ndarray:
    """A .npy array of images -> uint8 (N, C, H, W); ValueError naming the file if it is not one."""
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    return _to_uint8_nchw(array, str(path))


def read_image_folder(folder: str | os.PathLike) -> np.ndarray:
    """Every PNG/JPEG in a folder (sorted by name) -> uint8 (N, C, H, W).

    All grayscale -> C = 1, otherwise every image is converted to RGB (C = 3).
    The images must share one size.
    """
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{folder}: no .png/.jpg/.jpeg images")
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
                images.append(im.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"{f}: not a readable image ({exc})") from None
    mode = "L" if all(im.mode in ("L", "1", "I;16") for im in images) else "RGB"
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"{folder}: images must share one size, found {sorted(sizes)[:4]}")
    return _to_uint8_nchw(np.stack([np.asarray(im.convert(mode)) for im in images]), str(folder))


def read_class_folders(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """A folder of sub-folders of PNG/JPEG images, one per class -> (uint8 (N, C, H, W), int64 labels (N,), names).

    Classes are the sub-folder names in sorted order; empty sub-folders are an error.
    """
    subs = sorted(p for p in Path(folder).iterdir() if p.is_dir())
    parts = [read_image_folder(sub) for sub in subs]
    shapes = {p.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: the class folders' images must share one size and mode, found {sorted(shapes)}")
    labels = np.concatenate([np.full(len(p), i, np.int64) for i, p in enumerate(parts)])
    return np.concatenate(parts), labels, tuple(sub.name for sub in subs)


def _class_names(folder: Path, labels: np.ndarray) -> tuple[str, ...]:
    listing = folder / "classes.txt"
    if listing.is_file():
        names = tuple(line.strip() for line in listing.read_text().splitlines() if line.strip())
    elif folder.resolve() == DEFAULT_DATA.resolve() or folder.name.lower().replace("_", "-") == "fashion-mnist":
        names = FASHION_MNIST_CLASSES
    else:
        names = tuple(str(i) for i in range(int(labels.max()) + 1))
    if labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"{folder}: labels run from {labels.min()} to {labels.max()}, but there are "
                         f"{len(names)} class names")
    return names


def _idx_labels(folder: Path, prefix: str, n: int) -> np.ndarray | None:
    path = _find_idx(folder, prefix, "idx1")
    if path is None:
        return None
    labels = read_idx(path)
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: expected {n} integer labels (one per image), got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _holdout(images: np.ndarray, fraction: float, seed: int, labels: np.ndarray | None = None):
    """A fixed, seeded split for sources without their own test set: (train, test, train_labels, test_labels)."""
    n = images.shape[0]
    n_test = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    if n_test == 0:
        raise ValueError("need at least 2 images to hold one out for testing")
    order = np.random.default_rng(seed).permutation(n)
    train, test = order[n_test:], order[:n_test]
    if labels is None:
        return images[train], images[test], None, None
    return images[train], images[test], labels[train], labels[test]


def load_data(data: str | os.PathLike | None = None, *, holdout: float = 0.1, seed: int = 0) -> DataSplits:
    """Load train and held-out test images as uint8 (N, C, H, W).

    data: None for Fashion-MNIST from the Debian package, an IDX folder, a .npy
    file or an image folder. Sources without a test split (.npy, image folders)
    hold out ``holdout`` of the images, chosen by ``seed``.
    """
    if data is None:
        if not DEFAULT_DATA.is_dir():
            raise FileNotFoundError(f"Fashion-MNIST not found at {DEFAULT_DATA}: {INSTALL_HINT}")
        data = DEFAULT_DATA
    path = Path(data)
    if not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".npy":
            raise ValueError(f"--data {path}: a file must be a .npy array (or pass a folder of IDX or image files)")
        train, test, _, _ = _holdout(read_npy(path), holdout, seed)
        return DataSplits(train, test, str(path))
    names = [p.name for p in path.iterdir()]
    if any("idx3" in n for n in names):
        train = _to_uint8_nchw(read_idx(_find_idx(path, "train-images")), str(path))
        test = _to_uint8_nchw(read_idx(_find_idx(path, "t10k-images")), str(path))
        if train.shape[1:] != test.shape[1:]:
            raise ValueError(f"{path}: train images {train.shape[1:]} and test images {test.shape[1:]} differ in shape")
        train_labels = _idx_labels(path, "train-labels", len(train))
        test_labels = _idx_labels(path, "t10k-labels", len(test))
        # Labels for one split only cannot condition a prior that is measured on the other;
        # the images still train a VQ-VAE (and an unconditional prior).
        if train_labels is None or test_labels is None:
            return DataSplits(train, test, str(path))
        classes = _class_names(path, np.concatenate([train_labels, test_labels]))
        return DataSplits(train, test, str(path), train_labels, test_labels, classes)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()) and any(p.is_dir() for p in path.iterdir()):
        images, labels, classes = read_class_folders(path)
        train, test, train_labels, test_labels = _holdout(images, holdout, seed, labels)
        return DataSplits(train, test, str(path), train_labels, test_labels, classes)
    train, test, _, _ = _holdout(read_image_folder(path), holdout, seed)
    return DataSplits(train, test, str(path))
