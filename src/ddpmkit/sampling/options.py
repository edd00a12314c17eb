"""Sampler options from plain choices (what the CLI, benches and the web page ask for), checked
against what each sampler takes."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import UserError

NO_CLIP = ("euler_maruyama", "pc", "dopri5", "ddim_uniform", "consistency")  # samplers that never clip the predicted x_0


def sampler_options(sampler: str, grid: str | torch.Tensor | None = None, variance: str = "auto", clip_x0: bool = True,
                    eta: float | None = None, order: int | None = None) -> dict:
    """The options `sample(..., sampler=sampler, **options)` takes. variance='auto' is the
    model's own (the ancestral sampler resolves it); grid may be a name, a tensor
    of timesteps, or a JSON file from `ddpmkit tune-grid`."""
    from_file = isinstance(grid, str) and grid.endswith(".json")
    options: dict = {}
    if grid is not None:
        options["grid"] = read_grid_file(grid) if from_file else grid
    if sampler == "ddpm":
        options["variance"] = variance
    elif variance != "auto":  # it was ignored
        raise UserError(f"`variance` {variance} is sigma_t^2 of Algorithm 2: only sampler 'ddpm' takes it, not {sampler!r}")
    if sampler not in NO_CLIP:
        options["clip_x0"] = clip_x0
    if eta is not None:
        options["eta"] = eta
    if order is not None:
        options["order"] = order
    return options


def read_grid_file(path) -> torch.Tensor:
    """The timesteps of a grid file {"timesteps": [...]} written by `ddpmkit tune-grid`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        return torch.tensor(json.loads(path.read_text())["timesteps"], dtype=torch.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a grid file with a 'timesteps' list: {e}") from None

