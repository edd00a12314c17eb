"""One training engine for every kind of model: `train(cfg)` picks the task by cfg.train.task.

A kind of model is declared once (kinds.register: its network, whether it samples, its inputs, the next
step) with a Task subclass of the same name (task.py), which registers itself in TASKS; the loop
(engine.py) does not change.
"""
from __future__ import annotations

from pathlib import Path

from ..checkpoint import CheckpointError, resolve_checkpoint
from ..config import Config, how_to_make
from ..diffusers_bridge import pipeline_folder
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
    check_named_runs(cfg)
    cfg = pipeline_config(cfg)  # fine-tuning a diffusers pipeline folder: its UNet, scheduler, VAE and text encoder
    kind = kind_of(cfg.train.task)
    if kind.name not in TASKS:
        raise TrainingError(f"train.task {kind.name!r} has no Task subclass of that name to train it; the ones with one: {sorted(TASKS)}")
    return run(TASKS[kind.name](cfg), cfg, resume=resume, progress=progress, overwrite=overwrite)


# the trained runs a config may name, which must exist before training starts
NAMED_RUNS = (("train", "init_from"), ("data", "autoencoder"), ("unclip", "clip"), ("distill", "teacher"))


def check_named_runs(cfg: Config) -> None:
    """Each run the config names exists, else one line with its key and, where a preset or the demo makes it, the
    command (`ddpmkit train unclip_prior` before `ddpmkit train clip` said only "no checkpoint at runs/clip")."""
    run_dir = Path(cfg.train.run_dir).resolve()
    for section, key in NAMED_RUNS:
        value = getattr(getattr(cfg, section), key)
        if value and (Path(value).resolve() == run_dir or run_dir in Path(value).resolve().parents):  # its writes would replace it
            raise TrainingError(f"{section}.{key} = {value} is in this run's own folder (train.run_dir): the run would write over the "
                                "model it reads; give another train.run_dir")
        if not value or pipeline_folder(value) is not None:
            continue
        try:
            resolve_checkpoint(value)
        except CheckpointError as e:
            make = how_to_make(value)
            raise TrainingError(f"{section}.{key} = {value}: {e}" + (f"; make it first: {make}" if make else "")) from None


# the built-in tasks are imported above so that they register themselves in TASKS
__all__ = ["AutoencoderTask", "Batch", "CLIPTask", "ConsistencyTask", "Decay", "DecoderTask", "DenoiserTask", "JudgeTask", "NoisyClassifierTask",
           "PriorTask", "ProgressiveTask", "SuperResTask", "TASKS", "Task", "TrainingError", "batch_indices", "budget_horizon",
           "check_named_runs", "ema_decay_at", "ema_update", "lr_at", "run", "sample_timesteps", "step_batch", "step_generator", "train"]
