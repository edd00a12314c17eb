"""The evaluation judge as a training task: a small CNN classifier of clean digits, trained on
shifted copies of the training split and tested on the held-out split (presets/judge.toml)."""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import list_checkpoints
from ..config import PRESET_DIR, load_config
from ..evaluate.cached_judge import judge_dir
from ..evaluate.judge import accuracy
from .batches import Batch
from .classifier import LabelledImagesTask
from .engine import run


class JudgeTask(LabelledImagesTask):
    name = "judge"

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        # no label smoothing: it would cap the confidence the judge's p >= 0.9 test reads
        logits = model(batch.local(self.shifted(batch)))
        return F.cross_entropy(logits.float(), batch.local(self.data.labels[batch.indices]), reduction="none")

    def evaluate(self, ema: nn.Module) -> dict[str, float]:
        return {"accuracy": accuracy(ema, self.held_out.get_batch(torch.arange(len(self.held_out))), self.held_out.labels)}

    def finish(self, ema: nn.Module, model: nn.Module) -> dict:
        metrics = self.evaluate(ema)
        print(f"judge accuracy on {len(self.held_out)} held-out images: {metrics['accuracy']:.2%}")
        return metrics


def ensure_judge(dataset: str = "mnist5k", progress: bool = True, overrides: Sequence[str] = ()) -> Path:
    """The cached judge's run folder (evaluate.cached_judge.judge_dir), trained through the engine first if
    there is none. overrides: section.key=value changes to presets/judge.toml (e.g. a shorter run on a small
    dataset). It never writes to the working directory."""
    run_dir = judge_dir(dataset)
    if not list_checkpoints(run_dir):
        print(f"training the judge on {dataset} into {run_dir} (once; set DDPMKIT_CACHE to move it)", file=sys.stderr)
        cfg = load_config(PRESET_DIR / "judge.toml", [f"data.name={dataset}", *overrides, f"train.run_dir={run_dir}"])
        run(JudgeTask(cfg), cfg, progress=progress)
    return run_dir
