"""One training engine for every kind of model: `train(cfg)` picks the task by cfg.train.task.

    TASKS = {"denoiser": ..., "autoencoder": ..., "classifier": ..., "judge": ...}

A new kind of model is a Task subclass (task.py) and an entry here; the loop (engine.py) does not change.
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from .autoencoder import AutoencoderTask
from .batches import Batch, batch_indices, step_generator
from .classifier import NoisyClassifierTask
from .clip import CLIPTask
from .denoiser import DenoiserTask, sample_timesteps
from .engine import run
from .judge import JudgeTask
from .optim import Decay, budget_horizon, ema_decay_at, ema_update, lr_at
from .superres import SuperResTask
from .task import Task, TrainingError
from .unclip import DecoderTask, PriorTask

TASKS: dict[str, type[Task]] = {
    "denoiser": DenoiserTask,
    "superres": SuperResTask,
    "autoencoder": AutoencoderTask,
    "classifier": NoisyClassifierTask,
    "judge": JudgeTask,
    "clip": CLIPTask,
    "prior": PriorTask,
    "decoder": DecoderTask,
}


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train the model cfg.train.task names, as configured; returns the run folder."""
    return run(TASKS[cfg.train.task](cfg), cfg, resume=resume, progress=progress)


__all__ = ["Batch", "Decay", "DenoiserTask", "SuperResTask", "TASKS", "Task", "TrainingError", "batch_indices", "budget_horizon",
           "ema_decay_at", "ema_update", "lr_at", "run",
           "sample_timesteps", "step_generator", "train"]
