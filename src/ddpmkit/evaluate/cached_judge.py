"""The judge of generated digits, kept in the cache folder ($DDPMKIT_CACHE/judge/<dataset>) and
trained there through the training engine on first use (presets/judge.toml, about a minute on
2 CPU cores). It never writes to the working directory."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from torch import nn

from ..checkpoint import list_checkpoints
from ..config import PRESET_DIR, load_config
from ..models import load
from ..paths import cache_dir
from ..train import train


def judge_dir(dataset: str = "mnist5k"):
    return cache_dir() / "judge" / dataset


def load_judge(dataset: str = "mnist5k", progress: bool = True, overrides: Sequence[str] = ()) -> tuple[nn.Module, float]:
    """(judge network in eval mode, its accuracy on the held-out split). overrides: section.key=value
    changes to presets/judge.toml for the first training (e.g. a shorter run on a small dataset)."""
    run_dir = judge_dir(dataset)
    if not list_checkpoints(run_dir):
        print(f"training the judge on {dataset} into {run_dir} (once; set DDPMKIT_CACHE to move it)", file=sys.stderr)
        cfg = load_config(PRESET_DIR / "judge.toml", [f"data.name={dataset}", *overrides, f"train.run_dir={run_dir}"])
        train(cfg, progress=progress)
    m = load(run_dir, kind="judge")
    return m.network, float(m.metrics["accuracy"])
