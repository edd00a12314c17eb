"""Learning-rate schedule and weight averaging: functions of the step alone, so a resumed run
follows the same curves."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TrainConfig


def lr_at(step: int, cfg: TrainConfig, horizon: int = 0) -> float:
    """Linear warm-up, then constant (DDPM) or a cosine decay to 5% of lr at the horizon (cfg.steps
    unless train.fit_to_budget chose fewer)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, (horizon or cfg.steps) - cfg.warmup_steps))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA decay (min(decay, (1 + s) / (10 + s))) so early weights fade fast."""
    return min(decay, (1 + step) / (10 + step))


def budget_horizon(step: int, seconds_per_step: float, seconds_left: float, steps: int, margin: float = 0.97) -> int:
    """The last step that fits in the time left at the measured pace (a margin for checkpoints and
    pictures), never past train.steps and never before the next step."""
    return max(step + 1, min(steps, step + int(margin * seconds_left / seconds_per_step)))
