"""The noisy classifier p_phi(y | x_t) of classifier guidance as a training task.

The classifier sees x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps at uniform t, with the
same schedule as the diffusion model it will guide (Dhariwal & Nichol 2021, section 4), and
shifted copies of the images (2 pixels), with the cross-entropy loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..data import DataError
from ..evaluate.judge import accuracy_by_t
from ..nets.classifier import random_shift
from ..process import q_sample
from .batches import Batch
from .task import Task


class LabelledImagesTask(Task):
    """Shared set-up of the classifiers: labelled images of the configured dataset."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.data = self.load_data()
        if self.data.labels is None:
            raise DataError(f"dataset {cfg.data.name!r} has no labels to train a classifier on")
        self.shape, self.num_examples = tuple(self.data.shape), len(self.data)
        self.held_out = self.load_data("test")

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(getattr(self.data, "classes", ()))  # a folder's subfolders or an .npz's names, where the data has them

    def shifted(self, batch: Batch) -> torch.Tensor:
        """The global batch, each image shifted by up to 2 pixels (drawn from the step's generator)."""
        return random_shift(self.data.get_batch(batch.indices), 2, batch.generator)


class NoisyClassifierTask(LabelledImagesTask):
    name = "classifier"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.schedule = cfg.diffusion.noise_schedule()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        g = batch.generator
        x0 = self.shifted(batch)
        t = torch.randint(0, self.schedule.T, (batch.size,), generator=g)
        x_t = q_sample(x0, t, self.schedule, torch.randn(x0.shape, generator=g))
        logits = model(batch.local(x_t), batch.local(t).float())
        return F.cross_entropy(logits.float(), batch.local(self.data.labels[batch.indices]), reduction="none")

    def evaluate(self, ema: nn.Module) -> dict[str, float]:
        acc = accuracy_by_t(ema, self.held_out.get_batch(torch.arange(len(self.held_out))), self.held_out.labels, self.schedule)
        return {f"accuracy_t{t}": a for t, a in acc.items()}

    def finish(self, ema: nn.Module, model: nn.Module) -> dict:
        acc = self.evaluate(ema)
        print("held-out accuracy on x_t: " + ", ".join(f"{k.removeprefix('accuracy_')}: {a:.1%}" for k, a in acc.items()))
        return acc
