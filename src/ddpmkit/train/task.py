"""What a kind of model gives the training engine. The engine owns everything else (devices,
processes, precision, clipping, learning rate, EMA, checkpoints, resume, NaN guard, logging,
time budget), so a new kind of model is its declaration (kinds.register: network, whether it samples,
inputs, next step) and one small Task subclass of the same name, which registers itself in TASKS."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..config import Config
from ..data import Dataset, dataset_for
from ..errors import UserError
from ..finetune import adapt, base_checkpoint
from ..nets import build_for_task
from .batches import Batch


class TrainingError(UserError, RuntimeError):
    """Training cannot go on (non-finite losses, a bad batch size, a resume that does not match)."""


TASKS: dict[str, type[Task]] = {}  # train.task -> the Task subclass of that name


class Task:
    """One kind of model. Subclasses set `name`, `shape` (one example) and `num_examples` (the
    size of the data the engine draws batch indices from) in __init__, and implement
    loss. The periodic hooks are optional; they run on the main process with
    the EMA model in eval mode."""

    name: str = ""  # the kind (kinds.KINDS) this task trains; a subclass that sets it is registered in TASKS
    shape: tuple[int, ...] = ()
    num_examples: int = 0

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__ and cls.name:
            TASKS[cls.name] = cls

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes' names where the data names them (an image folder's subfolders; label i is the i-th), else ()."""
        return ()

    def load_data(self, split: str = "train") -> Dataset:
        """The configured dataset (data.name, data.path, data.resize, ...), one split of it."""
        return dataset_for(self.cfg.data, split)

    def build_model(self) -> nn.Module:
        """A freshly initialised network of this kind (the engine seeds torch first), or, with train.init_from,
        the weights of the run it fine-tunes (with LoRA adapters when train.lora_rank > 0)."""
        if self.cfg.train.init_from and self.cfg.network.kind != "diffusers":
            base_checkpoint(self.cfg.train.init_from, self.cfg)  # its kind and network first
        return adapt(build_for_task(self.cfg, self.shape), self.cfg)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Per-example losses (B_local,) of this process's slice of the batch; the engine averages.
        Draw the global batch's randomness from batch.generator, then slice with batch.local."""
        raise NotImplementedError

    def attach_ema(self, ema: nn.Module) -> None:
        """The engine's EMA of the weights, handed over once before training (consistency distillation's target
        network); most tasks ignore it."""

    def export(self, ema: nn.Module, folder: Path) -> None:
        """More files for each checkpoint folder (the weights in another library's format); most tasks write none."""

    def preview(self, ema: nn.Module, path: Path) -> torch.Tensor | None:
        """Write a picture of the model's progress to path (every train.sample_every steps);
        return the images shown (for TensorBoard) or None."""
        return None

    def evaluate(self, ema: nn.Module) -> dict[str, float]:
        """Cheap held-out metrics, logged every train.eval_every steps."""
        return {}

    def finish(self, ema: nn.Module, model: nn.Module) -> dict:
        """After the last step: final touches to the weights (both copies) and the metrics the
        last checkpoint records."""
        return {}
