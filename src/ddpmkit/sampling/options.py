"""Sampler options from plain choices (what the CLI, benches and the web page ask for), checked
against what each sampler takes."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from ..errors import Note, UserError

NO_CLIP = ("euler_maruyama", "pc", "dopri5", "ddim_uniform", "consistency")  # samplers that never clip the predicted x_0


def sampler_options(sampler: str, grid: str | torch.Tensor | None = None, variance: str = "auto", clip_x0: bool = True,
                    eta: float | None = None, order: int | None = None, churn: float | None = None) -> dict:
    """The options `sample(..., sampler=sampler, **options)` takes. variance='auto' is the
    model's own (the ancestral sampler resolves it); grid may be a name, a tensor
    of timesteps, or a JSON file from `ddpmkit tune-grid`."""
    from_file = isinstance(grid, str) and grid.endswith(".json")
    options: dict = {}
    if grid is not None:
        options["grid"] = read_grid_file(grid, sampler) if from_file else grid
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
    if churn is not None:
        options["churn"] = churn
    return options


def read_grid_file(path, sampler: str | None = None) -> torch.Tensor:
    """The timesteps of a grid file {"timesteps": [...]} written by `ddpmkit tune-grid`; a Note where it was tuned for
    another sampler than `sampler` (it still runs: a grid is a grid)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        content = json.loads(path.read_text())
        timesteps = torch.tensor(content["timesteps"], dtype=torch.float64)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a grid file with a 'timesteps' list: {e}") from None
    tuned = content.get("sampler")
    if sampler is not None and tuned not in (None, sampler):
        warnings.warn(f"{path} was tuned for {tuned}, not {sampler}: another sampler's best grid may lie elsewhere "
                      f"(ddpmkit tune-grid RUN --sampler {sampler})", Note, stacklevel=2)
    return timesteps

