"""The models a page serves: run folders given on the command line or found under them, loaded
once on first use and shared by every request."""
from __future__ import annotations

import threading
from pathlib import Path

from ..checkpoint import CheckpointError, list_checkpoints, read_config, resolve_checkpoint
from ..diffusers_bridge import PIPELINE_INDEX
from ..errors import UserError
from ..kinds import KINDS
from ..models import DiffusionModel, load_diffusion


def find_runs(paths: list[str | Path], skipped: list[str] | None = None) -> list[str]:
    """Run folders of models that sample images, and diffusers pipeline folders: each path is one, or a
    folder of them (one level down). Runs of vectors (the 2-D toys), which the page cannot show, and runs whose network
    takes more than a class or prompt (super-resolution stages, unCLIP's prior and decoder) go to `skipped` with the
    reason."""
    found = []
    for path in map(Path, paths):
        single = list_checkpoints(path) or (path / PIPELINE_INDEX).is_file()
        candidates = [path] if single else sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
        for run in candidates:
            if (run / PIPELINE_INDEX).is_file():
                found.append(str(run))
                continue
            try:
                config, info = read_config(resolve_checkpoint(run))
            except CheckpointError:
                continue
            kind = KINDS.get(config.train.task)
            if kind is None or not kind.samples:
                continue
            if kind.inputs:  # an SR stage, unCLIP's prior or decoder: the page has no low-res image or CLIP embedding to give
                if skipped is not None:
                    skipped.append(f"{run} (a {kind.name} run, whose network takes {kind.takes}: {kind.next_step.format(run=run)})")
                continue
            if len(info.data_shape) != 3:  # the page draws images; its generate crashed in the grid's permute
                if skipped is not None:
                    skipped.append(f"{run} (its samples are {info.data_shape[0]}-D points, not images: ddpmkit sample {run} draws them)")
                continue
            found.append(str(run))
    return list(dict.fromkeys(found))


class Shelf:
    """Loaded models by run folder. Only the runs on the shelf are served: a visitor cannot make
    the server read an arbitrary path."""

    def __init__(self, runs: list[str], loras: list[str] | None = None, device: str | None = None):
        self.runs, self.device = list(runs), device  # device None: the default (CUDA, then MPS, then the CPU)
        self.loras = list(loras or [])  # `ddpmkit serve --lora FILE:SCALE`: merged into every model served (the operator's choice)
        self._models: dict[str, DiffusionModel] = {}
        self._lock = threading.Lock()

    def get(self, run: str | None) -> DiffusionModel:
        if not run or run not in self.runs:
            raise UserError(f"unknown run {run!r}; this page serves {self.runs or 'no runs (start it with ddpmkit serve RUN)'}")
        with self._lock:  # two first requests for one model load it once
            if run not in self._models:
                self._models[run] = load_diffusion(run, device=self.device, loras=self.loras)
            return self._models[run]
