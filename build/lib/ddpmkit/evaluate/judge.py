"""Judge generated digits with a classifier trained on real digits and tested on held-out ones.

A sample counts as a recognisable digit when the classifier gives some class probability >= 0.9.
Mode coverage is the share of samples given to each class. The judge itself trains through the
training engine (presets/judge.toml); evaluate.cached_judge keeps one in the cache folder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..process import q_sample
from ..schedules import NoiseSchedule


@dataclass
class Judgement:
    confident_fraction: float  # share of samples with max class probability >= threshold
    class_shares: list[float]  # share of samples assigned to each class
    mean_confidence: float
    n: int

    def table(self) -> str:
        shares = " ".join(f"{d}:{s:.1%}" for d, s in enumerate(self.class_shares))
        return (f"samples judged: {self.n}\nconfident (p >= 0.9): {self.confident_fraction:.1%}\n"
                f"mean confidence: {self.mean_confidence:.3f}\nclass shares: {shares}")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of x: (N, C, H, W) that the classifier labels correctly."""
    model.eval()
    pred = torch.cat([model(chunk.to(_device(model))).argmax(1).cpu() for chunk in x.split(500)])
    return (pred == labels).float().mean().item()


@torch.no_grad()
def accuracy_by_t(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule,
                  timesteps: tuple[int, ...] = (0, 250, 500, 750, 900), seed: int = 0) -> dict[int, float]:
    """Held-out accuracy of a noisy classifier p(y | x_t) on x_t at a few noise levels."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        tt = torch.full((len(x0),), t)
        x_t = q_sample(x0, tt, schedule, torch.randn(x0.shape, generator=g))
        pred = torch.cat([model(c.to(_device(model)), tc.float().to(_device(model))).argmax(1).cpu()
                          for c, tc in zip(x_t.split(500), tt.split(500))])
        out[t] = (pred == labels).float().mean().item()
    return out


@torch.no_grad()
def judge(model: nn.Module, x: torch.Tensor, threshold: float = 0.9, num_classes: int = 10) -> Judgement:
    """Classify samples x: (B, 1, H, W) in [-1, 1]."""
    model.eval()
    probs = torch.cat([model(chunk.clamp(-1, 1).to(_device(model))).softmax(1).cpu() for chunk in x.split(500)])
    conf, cls = probs.max(1)
    shares = torch.bincount(cls, minlength=num_classes).float() / len(cls)
    return Judgement((conf >= threshold).float().mean().item(), shares.tolist(), conf.mean().item(), len(cls))
