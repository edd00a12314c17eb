"""The judge of generated digits, kept in the cache folder ($DDPMKIT_CACHE/judge/<dataset>). Evaluation
reads it here and never trains: the faces (`ddpmkit eval`, the benches) train it on first use with
ddpmkit.train.judge.ensure_judge (presets/judge.toml, about a minute on 2 CPU cores)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..checkpoint import list_checkpoints
from ..models import load
from ..paths import cache_dir


def judge_dir(dataset: str = "mnist5k") -> Path:
    return cache_dir() / "judge" / dataset


def load_judge(dataset: str = "mnist5k") -> tuple[nn.Module, float]:
    """(judge network in eval mode, its accuracy on the held-out split)."""
    run_dir = judge_dir(dataset)
    if not list_checkpoints(run_dir):
        raise FileNotFoundError(f"no judge for {dataset} in {run_dir}: `ddpmkit eval` trains one on first use, or "
                                f"ddpmkit.train.judge.ensure_judge({dataset!r}) (set DDPMKIT_CACHE to move it)")
    m = load(run_dir, device="cpu", kind="judge")  # scores images handed back on the CPU
    return m.network, float(m.metrics["accuracy"])
