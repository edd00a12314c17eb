"""One training engine for every kind of model: `train(cfg)` picks the task by cfg.train.task.

A kind of model is declared once (kinds.register: its network, whether it samples, its inputs, the next
step) with a Task subclass of the same name (task.py), which registers itself in TASKS; the loop
(engine.py) does not change.
"""
from __future__ import annotations

from pathlib import Path

from ..config import Config
from ..finetune import pipeline_config
from ..kinds import kind_of
from .autoencoder import AutoencoderTask
from .batches import Batch, batch_indices, step_batch, step_generator
from .classifier import NoisyClassifierTask
from .clip import CLIPTask
from .denoiser import DenoiserTask, sample_timesteps
from .engine import run
from .judge import JudgeTask
from .optim import Decay, budget_horizon, ema_decay_at, ema_update, lr_at
from .progressive import ConsistencyTask, ProgressiveTask
from .superres import SuperResTask
from .task import TASKS, Task, TrainingError
from .unclip import DecoderTask, PriorTask


def train(cfg: Config, resume: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Train the model cfg.train.task names, as configured; returns the run folder. resume: continue the newest
    checkpoint in train.run_dir; otherwise a folder that already holds a run is refused, or with overwrite=True
    cleared of that run's files first."""
    cfg = pipeline_config(cfg)  # fine-tuning a diffusers pipeline folder: its UNet, scheduler, VAE and text encoder
    kind = kind_of(cfg.train.task)
    if kind.name not in TASKS:
        raise TrainingError(f"train.task {kind.name!r} has no Task subclass of that name to train it; the ones with one: {sorted(TASKS)}")
    return run(TASKS[kind.name](cfg), cfg, resume=resume, progress=progress, overwrite=overwrite)


# the built-in tasks are imported above so that they register themselves in TASKS
__all__ = ["AutoencoderTask", "Batch", "CLIPTask", "ConsistencyTask", "Decay", "DecoderTask", "DenoiserTask", "JudgeTask", "NoisyClassifierTask",
           "PriorTask", "ProgressiveTask", "SuperResTask", "TASKS", "Task", "TrainingError", "batch_indices", "budget_horizon",
           "ema_decay_at", "ema_update", "lr_at", "run", "sample_timesteps", "step_batch", "step_generator", "train"]
