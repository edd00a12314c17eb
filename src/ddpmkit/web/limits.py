"""What one request to the web page may ask for, and the checks that say so in one line.

A public page must not let one visitor ask for a million steps, a thousand images or a
gigapixel upload; each check raises ValueError naming the value and the bound, which the page
shows as its message.
"""
from __future__ import annotations

import math
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UserError
from ..sampling import SAMPLERS


@dataclass(frozen=True)
class Limits:
    max_steps: int = 1000  # network evaluations per sample (a schedule's T)
    max_images: int = 64  # images per request
    max_frames: int = 32  # frames of an interpolation or between two voyage keyframes
    max_keyframes: int = 12
    max_prompt_chars: int = 200
    max_upload_bytes: int = 8 * 1024 * 1024
    max_upload_pixels: int = 4096 * 4096
    max_seed: int = 2**31 - 1
    max_eta: float = 10.0  # a public page's bound: 1 is Algorithm 2's noise, and more is seldom wanted
    max_churn: float = 1000.0  # EDM's gamma saturates at sqrt(2) - 1 once churn / steps passes it
    keep_files_s: int = 3600  # how long a request's files (its download links) stay on disk

    def steps(self, steps: float | None, name: str = "steps") -> int:
        return self.whole(steps, name, 1, self.max_steps)

    def images(self, n: float | None) -> int:
        return self.whole(n, "number of images", 1, self.max_images)

    def frames(self, n: float | None) -> int:
        return self.whole(n, "frames", 2, self.max_frames)

    def whole(self, value: float | None, name: str, low: int, high: int) -> int:
        """A whole number in [low, high] (the page's number boxes send floats, or None when empty)."""
        if value is None or not math.isfinite(value) or float(value) != int(value):
            raise UserError(f"{name} must be a whole number in {low}..{high}, got {value!r}")
        if not low <= int(value) <= high:
            raise UserError(f"{name} must lie in {low}..{high}, got {int(value)}")
        return int(value)

    def noise(self, value: str | float | None, name: str, high: float) -> float | None:
        """A sampler's noise (eta, churn) in [0, high] from its text box, or None (empty: the sampler's own default)."""
        if isinstance(value, str):
            try:
                value = float(value) if value.strip() else None
            except ValueError:
                raise UserError(f"{name} must be a number in 0..{high:g}, or empty for the sampler's default; got {value!r}") from None
        if value is None:
            return None
        if not (math.isfinite(value) and 0 <= value <= high):
            raise UserError(f"{name} must lie in 0..{high:g} (empty = the sampler's default), got {value!r}")
        return float(value)

    def seed(self, seed: float | None) -> int:
        """-1 (or empty) draws a random seed; the page shows the one used."""
        if seed is None or seed == -1:
            return secrets.randbelow(self.max_seed + 1)
        return self.whole(seed, "seed", 0, self.max_seed)

    def prompt(self, text: str) -> str:
        text = (text or "").strip()
        if len(text) > self.max_prompt_chars:
            raise UserError(f"the prompt has {len(text)} characters; at most {self.max_prompt_chars} are allowed")
        return text

    def upload(self, path: str | Path) -> Path:
        """An uploaded image file: bounded in bytes and pixels before anything decodes it."""
        path = Path(path)
        size = os.path.getsize(path)
        if size > self.max_upload_bytes:
            raise UserError(f"the upload is {size / 2**20:.1f} MB; at most {self.max_upload_bytes / 2**20:.0f} MB are allowed")
        try:
            with Image.open(path) as im:  # reads the header only
                w, h = im.size
        except Exception as e:  # noqa: BLE001 -- Pillow raises many types for broken files
            raise UserError(f"the upload is not an image Pillow can read ({type(e).__name__}); use a PNG or JPEG") from None
        if w * h > self.max_upload_pixels:
            raise UserError(f"the upload is {w}x{h} pixels; at most {self.max_upload_pixels} pixels are allowed")
        return path


def check_sampler(name: str) -> str:
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    return name
