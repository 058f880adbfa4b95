"""Image data sets as uint8 tensors, and the encode/decode pair between pixels and model space.

Every loader returns an :class:`ImageDataset`: ``images`` uint8 ``(N, C, H, W)``, ``labels`` long
``(N,)`` (-1 where unlabelled) and ``class_names``. The trainer sees only ``to_model(images)``, floats
in [-1, 1]; samples come back to pixels through ``to_uint8``, the exact inverse on the 256 levels.

Sources: scikit-learn's 8x8 digits, Fashion-MNIST from its IDX files (as Debian's
``dataset-fashion-mnist`` installs them), or a folder of PNG/JPEG files, one subfolder per class.
"""

from __future__ import annotations

import gzip
import inspect
import math
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIRS",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "load_digits",
    "load_fashion_mnist",
    "load_folder",
    "load_images",
    "to_model",
    "to_uint8",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Where Debian's dataset-fashion-mnist puts the four .gz files; the globs are a fallback for other layouts.
FASHION_MNIST_DIRS: tuple[str, ...] = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/local/share/datasets/fashion-mnist",
    "/usr/share/*/fashion-mnist",
    "/usr/share/*/*/fashion-mnist",
)
_FASHION_MNIST_HINT = (
    "install it with `apt-get install dataset-fashion-mnist`, or pass path= a folder holding the IDX files"
)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class ImageDataset:
    """Images and labels as tensors.

    Attributes:
        images: uint8 ``(N, C, H, W)``, C = 1 (grey) or 3 (RGB).
        labels: long ``(N,)``, class ids into ``class_names``, or -1 where unlabelled.
        class_names: one name per class id (empty when unlabelled).
    """

    images: Tensor
    labels: Tensor
    class_names: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be uint8 (N, C, H, W) with C in (1, 3); got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.long or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be long ({len(self.images)},); got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if len(self.labels) and not (-1 <= self.labels.min() and self.labels.max() < len(self.class_names)):
            raise ValueError(f"labels must lie in -1..{len(self.class_names) - 1} (the class ids, or -1 unlabelled)")

    def __len__(self) -> int:
        return len(self.images)


def to_model(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 pixels -> model space: ``x = images / 127.5 - 1`` in [-1, 1], same shape."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_model needs uint8 pixels 0..255; got {images.dtype}")
    return images.to(dtype) / 127.5 - 1


def to_uint8(x: Tensor) -> Tensor:
    """Model space -> uint8 pixels: ``round((x + 1) * 127.5)`` clamped to 0..255; inverts ``to_model``."""
    if not x.is_floating_point():
        raise ValueError(f"to_uint8 needs floating-point model output in [-1, 1]; got {x.dtype}")
    if torch.isnan(x).any():
        raise ValueError(f"to_uint8 got {int(torch.isnan(x).sum())} NaN values; only finite model output converts")
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def load_digits() -> ImageDataset:
    """scikit-learn's 1,797 handwritten 8x8 digits: images ``(1797, 1, 8, 8)`` (0..16 scaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise ModuleNotFoundError("load_digits needs scikit-learn: pip install scikit-learn") from err
    bunch = sk_load_digits()
    images = torch.from_numpy(bunch.images).mul(255 / 16).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    return ImageDataset(images, labels, [str(d) for d in range(10)])


def _read_idx(file: Path, ndim: int) -> np.ndarray:
    """One IDX file of unsigned bytes (gzipped or not) -> array of the shape its header states."""
    raw = file.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"corrupt or truncated gzip file {file}: {err}") from err
    header = 4 + 4 * ndim
    magic = 0x800 + ndim  # 0x00 0x00, type 0x08 (unsigned byte), number of dimensions
    if len(raw) < header or struct.unpack(">I", raw[:4])[0] != magic:
        found = f"0x{struct.unpack('>I', raw[:4])[0]:08x}" if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise ValueError(f"{file} is not a {ndim}-D uint8 IDX file: magic number {found}, expected 0x{magic:08x}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(dims):
        raise ValueError(
            f"truncated or corrupt IDX file {file}: header says {dims} = {math.prod(dims)} bytes, "
            f"found {len(raw) - header}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fashion_mnist_dir(names: tuple[str, str]) -> Path | None:
    """The first of FASHION_MNIST_DIRS (glob patterns allowed) that holds both files."""
    for pattern in FASHION_MNIST_DIRS:
        for folder in sorted(Path("/").glob(pattern.lstrip("/"))) if "*" in pattern else [Path(pattern)]:
            if all(_find_idx(folder, n) for n in names):
                return folder
    return None


def load_fashion_mnist(split: Literal["train", "test"] = "train", path: str | Path | None = None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): images ``(60000 | 10000, 1, 28, 28)``, labels 0..9.

    Reads ``train-*`` or ``t10k-*`` ``images-idx3-ubyte`` / ``labels-idx1-ubyte`` (each optionally
    ``.gz``) from ``path``, else from Debian's ``dataset-fashion-mnist`` (/usr/share/datasets/fashion-mnist).
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown Fashion-MNIST split {split!r}; allowed: 'train', 'test'")
    prefix = "train" if split == "train" else "t10k"
    names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    if path is None:
        folder = _fashion_mnist_dir(names)
        if folder is None:
            raise FileNotFoundError(f"Fashion-MNIST not found in {FASHION_MNIST_DIRS[0]}: {_FASHION_MNIST_HINT}")
    else:
        folder = Path(path)
    image_file, label_file = (_find_idx(folder, n) for n in names)
    if image_file is None or label_file is None:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files {names[0]}(.gz) and {names[1]}(.gz) not found in {folder}: "
            f"{_FASHION_MNIST_HINT}"
        )
    images, labels = _read_idx(image_file, 3), _read_idx(label_file, 1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST files disagree: {image_file} holds {images.shape}, expected (N, 28, 28) with "
            f"N = {len(labels)} labels from {label_file}"
        )
    if len(labels) and labels.max() > 9:
        raise ValueError(f"corrupt label file {label_file}: labels must be 0..9, found {labels.max()}")
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
    )


def _load_image(file: Path, size: int, mode: Literal["L", "RGB"]) -> np.ndarray:
    """Open, orient, resize (shorter side -> size, bicubic, antialiased) and center-crop: (size, size[, 3])."""
    from PIL import Image, ImageOps

    with Image.open(file) as im:
        im = ImageOps.exif_transpose(im).convert(mode)
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)  # Pillow widens the filter when shrinking
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def load_folder(
    path: str | Path,
    *,
    size: int,
    mode: Literal["L", "RGB"] = "RGB",
    labels_from_subfolders: bool = True,
    on_error: Literal["skip", "fail"] = "fail",
) -> ImageDataset:
    """Every PNG/JPEG under ``path`` (recursively, hidden names skipped) -> images ``(N, 1 | 3, size, size)``.

    Each image's shorter side is resized to ``size`` (bicubic, antialiased), then center-cropped.
    With ``labels_from_subfolders``, the immediate subfolders holding images are the classes (sorted
    names -> ids 0, 1, ...) and images directly in ``path`` get -1; otherwise every label is -1.
    An unreadable image raises ValueError (``on_error="fail"``) or is skipped with a warning (``"skip"``).
    """
    from PIL import Image

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a folder")
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive int (output is size x size pixels); got {size!r}")
    if mode not in ("L", "RGB"):
        raise ValueError(f"unknown mode {mode!r}; allowed: 'L' (grey, 1 channel), 'RGB' (3 channels)")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"unknown on_error {on_error!r}; allowed: 'skip', 'fail'")
    # hidden files and folders (.ipynb_checkpoints, macOS ._name.png) are not data
    files = sorted(
        f
        for f in root.rglob("*")
        if f.suffix.lower() in IMAGE_EXTENSIONS
        and not any(q.startswith(".") for q in f.relative_to(root).parts)
        and f.is_file()
    )
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}, any case) under {root}")
    parts = [f.relative_to(root).parts for f in files]
    class_names = sorted({p[0] for p in parts if len(p) > 1}) if labels_from_subfolders else []
    class_id = {name: i for i, name in enumerate(class_names)}

    images, labels, skipped = [], [], []
    for file, part in zip(files, parts, strict=True):
        try:
            pixels = _load_image(file, size, mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            if on_error == "fail":
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise ValueError(f"cannot read image {file}: {reason} (pass on_error='skip' to skip it)") from err
            skipped.append(str(file.relative_to(root)))
            continue
        images.append(torch.from_numpy(pixels.copy()).reshape(size, size, -1).permute(2, 0, 1))
        labels.append(class_id.get(part[0], -1) if len(part) > 1 else -1)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) under {root}: {', '.join(skipped)}", stacklevel=2)
    if not images:
        raise ValueError(f"none of the {len(files)} image file(s) under {root} could be read")
    return ImageDataset(torch.stack(images), torch.tensor(labels, dtype=torch.long), class_names)


_LOADERS: dict[str, Callable[..., ImageDataset]] = {"digits": load_digits, "fashion-mnist": load_fashion_mnist}


def load_images(spec: str, **kw) -> ImageDataset:
    """A data set by name (``"digits"``, ``"fashion-mnist"``) or a folder path; ``kw`` go to its loader."""
    if spec in _LOADERS:
        loader = _LOADERS[spec]
    elif Path(spec).is_dir():
        loader = load_folder
        kw = {"path": spec, **kw}
    else:
        raise ValueError(
            f"unknown image data {spec!r}: allowed are {', '.join(map(repr, _LOADERS))}, or an existing image folder"
        )
    signature = inspect.signature(loader)
    try:
        signature.bind(**kw)
    except TypeError as err:
        raise ValueError(f"bad options for image data {spec!r}: {err}; it takes {signature}") from err
    return loader(**kw)
