"""Learning-rate schedule and weight averaging: functions of the step alone, so a resumed run
follows the same curves."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import TrainConfig


@dataclass(frozen=True)
class Decay:
    """Where the cosine decay stands: its progress (0 -> 1) runs linearly from `progress` at step
    `start` to 1 at step `end`. A run fitted to its time budget re-fits `end` as its pace changes;
    each re-fit starts a new piece at the current step and progress, so the learning rate never jumps."""

    start: int
    progress: float
    end: int

    @classmethod
    def over(cls, cfg: TrainConfig, end: int = 0) -> Decay:
        """The whole decay, after the warm-up, to step `end` (default train.steps)."""
        return cls(cfg.warmup_steps, 0.0, end or cfg.steps)

    def progress_at(self, step: int) -> float:
        # (a rollback to a checkpoint before `start` extends the current piece backwards)
        return min(1.0, max(0.0, self.progress + (1.0 - self.progress) * (step - self.start) / max(1, self.end - self.start)))

    def refit(self, step: int, end: int) -> Decay:
        """The same decay up to `step`, then on to 1 at `end` instead."""
        return Decay(step, self.progress_at(step), end)


def lr_at(step: int, cfg: TrainConfig, decay: Decay | None = None) -> float:
    """Linear warm-up, then constant (DDPM) or a cosine decay to 5% of lr at the decay's end
    (train.steps unless train.fit_to_budget chose fewer)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = (decay or Decay.over(cfg)).progress_at(step)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, applied: torch.Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters; buffers are copied. applied: a 0-dim bool on the
    device, False for a skipped step (the NaN guard), which then leaves the average as it was without a host sync."""
    # one fused call over all tensors (a per-tensor loop costs more than a tiny model's step); under no_grad the
    # model's parameters go in as they are (a detach of each was 168 more ops a step for the demo's UNet)
    params, source = list(ema.parameters()), list(model.parameters())
    if applied is None:
        torch._foreach_lerp_(params, source, 1.0 - decay)
    else:
        weight = applied.to(params[0].dtype) * (1.0 - decay) if params else None
        torch._foreach_lerp_(params, source, [weight] * len(params))
    buffers, sources = list(ema.buffers()), list(model.buffers())
    if buffers:
        torch._foreach_copy_(buffers, sources)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA decay (min(decay, (1 + s) / (10 + s))) so early weights fade fast."""
    return min(decay, (1 + step) / (10 + step))


def budget_horizon(step: int, seconds_per_step: float, seconds_left: float, steps: int, margin: float = 0.97) -> int:
    """The last step that fits in the time left at the measured pace (a margin for checkpoints and
    pictures), never past train.steps and never before the next step."""
    return max(step + 1, min(steps, step + int(margin * seconds_left / seconds_per_step)))
