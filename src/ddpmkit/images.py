"""Single images the user points at: a file, or an example of a built-in dataset ('mnist5k:7'),
and inpainting masks. Used by the editing commands, `forward`, the benches and the web page."""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from PIL import Image

from .data import GREY_MODES, DataError, Dataset, load_dataset, load_image_file
from .errors import Note, UserError
from .superres import downsample, upsample

MASK_HALVES = ("left", "right", "top", "bottom")


@functools.lru_cache(maxsize=4)
def _builtin(name: str) -> Dataset:
    """A built-in dataset, read once per process (the web page picks single examples often)."""
    return load_dataset(name, split="all")


def load_image(spec: str, size: int | None = None, channels: int | None = None) -> torch.Tensor:
    """An image file, or 'mnist5k:INDEX' / 'digits:INDEX' from the built-in data: (1, C, H, W) in
    [-1, 1]. Files are centre-cropped to a square and resized to `size` (default: their shorter
    side, at most 256), grey or RGB as stored unless `channels` says; built-in examples are resized to `size` and
    given `channels` likewise (fit_image)."""
    if ":" in spec and not Path(spec).exists():
        name, idx = spec.split(":", 1)
        ds = _builtin(name)
        if not idx.isdigit() or int(idx) >= len(ds):
            raise DataError(f"{spec}: the index must be a number in 0..{len(ds) - 1}")
        image = ds.get_batch(torch.tensor([int(idx)]))
        if size or channels:  # as a file is resized: `forward mnist5k:7 --size 64` ignored its size
            image = fit_image(image, (channels or image.shape[1], size or image.shape[-1], size or image.shape[-1]))
        return image
    path = Path(spec)
    if not path.is_file():  # spec, not path: Path('') is '.', and "not found: ." named no input at all
        what = "an empty path" if not spec.strip() else f"{spec} is a folder" if path.is_dir() else f"image not found: {spec}"
        raise DataError(f"{what}: give an image file (or a built-in one such as mnist5k:0)")
    try:
        with Image.open(path) as im:
            grey, side = im.mode in GREY_MODES, min(im.size)
    except Exception as e:  # noqa: BLE001 -- Pillow raises many types for broken files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    return load_image_file(path, size or min(side, 256), channels or (1 if grey else 3))[None]


def load_image_as(spec: str, shape: tuple[int, ...]) -> torch.Tensor:
    """An image in the (square) shape (C, H, W) a model makes: (1, C, H, W), a file resized from its own pixels and a
    built-in example fitted (load_image; a built-in example of another shape was an error, so `img2img` of mnist5k:7 on
    a 64x64 model failed where the web page fits the same digit)."""
    return load_image(spec, shape[-1], shape[0])


def fit_image(image: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An image (1, C, H, W) in [-1, 1] brought to (1, *shape): grey <-> RGB, area-downsampled or
    bicubic-upsampled (the web page lets any built-in digit stand for a model's image)."""
    channels, size = shape[0], shape[-1]
    if image.shape[1] != channels:
        image = image.mean(1, keepdim=True).expand(-1, channels, -1, -1) if channels in (1, 3) else image
    if image.shape[-1] > size:
        image = downsample(image, size)
    elif image.shape[-1] < size:
        image = upsample(image, size, "bicubic").clamp(-1, 1)
    if tuple(image.shape[1:]) != tuple(shape):
        raise UserError(f"cannot fit an image of shape {tuple(image.shape[1:])} to {tuple(shape)}")
    return image


def make_mask(spec: str, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """'left', 'right', 'top' or 'bottom' (that half is filled in), or a PNG (white = keep): (1, 1, H, W)."""
    H, W = shape[-2:]
    mask = torch.ones(1, 1, H, W)
    halves = {"left": (slice(None), slice(0, W // 2)), "right": (slice(None), slice(W // 2, None)),
              "top": (slice(0, H // 2), slice(None)), "bottom": (slice(H // 2, None), slice(None))}
    if spec in halves:
        rows, cols = halves[spec]
        mask[0, 0, rows, cols] = 0.0
        return mask
    if not Path(spec).is_file():
        raise UserError(f"`mask` must be one of {list(MASK_HALVES)} or a PNG file (white = keep); got {spec!r}")
    mask = (load_image_file(spec, H, 1)[None] > 0).float()
    if bool(mask.all()):  # an inpainting that returns the image (or a mask drawn the other way: white where to fill)
        raise UserError(f"the mask {spec} keeps every pixel (white = keep, black = fill): nothing to fill; paint black where "
                        "the image should be filled in")
    if not bool(mask.any()):
        warnings.warn(f"the mask {spec} fills every pixel (black = fill): the samples ignore the image", Note, stacklevel=2)
    return mask
