"""The evaluation judge as a training task: a small CNN classifier of clean digits, trained on
shifted copies of the training split and tested on the held-out split (presets/judge.toml)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluate.judge import accuracy
from .batches import Batch
from .classifier import LabelledImagesTask


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
