"""Training throughput of the demo UNet on this machine: fp32 vs bf16 autocast, and the cost of
conditioning (class labels, text cross-attention) per training step.

    .venv/bin/python bench/train_throughput.py
    .venv/bin/python bench/train_throughput.py --against HEAD~1 [--precision no]

--against REF: the whole trainer (`ddpmkit train mnist`, the demo preset) of this checkout
against the one at git REF, checked out into a temporary worktree: alternating runs of the same
steps in fresh processes, images/s read from each run's train_log.jsonl (first log window, with
start-up and warm-up, dropped); prints the median of each and the ratio (target: at most 3% slower).

Times full training steps (batch lookup with conditions, forward, L_simple, backward, AdamW) at
the presets' batch size (configs/mnist.toml, mnist_class.toml, mnist_text.toml: the same UNet)
and prints images/s. Conditioning variants are measured in interleaved rounds in one process
and compared by their median step time (target: at most 15% slower than unconditional).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ddpmkit.conditioning import TrainingConditions
from ddpmkit.config import load_config
from ddpmkit.data import load_dataset
from ddpmkit.losses import training_losses
from ddpmkit.nets import build_network
from ddpmkit.schedules import NoiseSchedule
from ddpmkit.train import batch_indices, step_generator

PRESETS = {"unconditional": "mnist.toml", "class": "mnist_class.toml", "text": "mnist_text.toml"}


class Trainer:
    """One preset's network, optimizer and conditions, ready to time training steps."""

    def __init__(self, preset: str, bf16: bool):
        self.cfg = load_config(preset)
        self.data = load_dataset("mnist5k")
        torch.manual_seed(0)
        self.net = build_network(self.cfg.network, (1, 28, 28))
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.cfg.train.lr)
        self.schedule = NoiseSchedule.from_name(self.cfg.diffusion.schedule, self.cfg.diffusion.T)
        self.conditions = TrainingConditions.for_config(self.cfg, self.data)
        self.bf16 = bf16
        self.step = 0

    def seconds_per_step(self, steps: int) -> float:
        bs = self.cfg.train.batch_size
        start = time.perf_counter()
        for _ in range(steps):
            g = step_generator(0, self.step)
            idx = batch_indices(self.step, bs, len(self.data), 0)
            cond = self.conditions.batch(idx, g)
            t = torch.randint(0, self.schedule.T, (bs,), generator=g)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = training_losses(self.net, self.data.get_batch(idx), t, self.schedule, model_kwargs=cond)["loss"].float().mean()
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            self.step += 1
        return (time.perf_counter() - start) / steps


def trainer_images_per_s(src: Path, run_dir: Path, steps: int, precision: str) -> float:
    """Median images/s of one `ddpmkit train mnist` run of the code under src, from its log."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-m", "ddpmkit.cli", "train", str(src / "ddpmkit" / "presets" / "mnist.toml")
                    if (src / "ddpmkit" / "presets").is_dir() else str(src.parent / "configs" / "mnist.toml"),
                    f"train.run_dir={run_dir}", f"train.steps={steps}", "train.max_minutes=0", "train.log_every=10",
                    "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0", f"train.mixed_precision={precision}",
                    "--quiet"], check=True, env=env, capture_output=True)
    rates = [e["examples_per_s"] for e in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines()) if "examples_per_s" in e]
    return statistics.median(rates[1:])


def compare_with(ref: str, steps: int, rounds: int, precision: str) -> None:
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="throughput-"))
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tmp / "before"), ref], check=True, capture_output=True)
    try:
        rates: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(rounds):  # interleaved: machine noise hits both alike
            for name, src in (("before", tmp / "before" / "src"), ("after", root / "src")):
                rates[name].append(trainer_images_per_s(src, tmp / f"{name}{r}", steps, precision))
                print(f"  round {r}: {name} {rates[name][-1]:.1f} images/s", flush=True)
        before, after = statistics.median(rates["before"]), statistics.median(rates["after"])
        verdict = "PASS" if after >= 0.97 * before else "FAIL"
        print(f"`ddpmkit train mnist` ({precision}), {steps} steps x {rounds} rounds: before ({ref}) {before:.1f} images/s, "
              f"after {after:.1f} images/s, ratio {after / before:.3f}  {verdict} (>= 0.97)")
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tmp / "before")], capture_output=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", default=None, help="a git ref: compare the whole trainer with the one at that ref")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precision", default="bf16", choices=["no", "bf16"], help="train.mixed_precision for --against")
    args = p.parse_args()
    if args.against:
        return compare_with(args.against, args.steps, args.rounds, args.precision)
    bs = load_config("mnist").train.batch_size
    print(f"demo UNet, batch {bs}, {torch.get_num_threads()} threads")
    fp32, bf16 = Trainer(PRESETS["unconditional"], False), Trainer(PRESETS["unconditional"], True)
    for tr in (fp32, bf16):
        tr.seconds_per_step(3)  # warm-up
    fp32_s, bf16_s = fp32.seconds_per_step(12), bf16.seconds_per_step(12)
    print(f"fp32: {bs / fp32_s:.0f} images/s")
    print(f"bf16 autocast: {bs / bf16_s:.0f} images/s  (x{fp32_s / bf16_s:.2f} vs fp32)")

    trainers = {kind: Trainer(preset, True) for kind, preset in PRESETS.items()}
    times: dict[str, list[float]] = {kind: [] for kind in trainers}
    for tr in trainers.values():
        tr.seconds_per_step(3)
    for _ in range(5):  # interleaved rounds: machine noise hits every variant alike
        for kind, tr in trainers.items():
            times[kind].append(tr.seconds_per_step(8))
    base = statistics.median(times["unconditional"])
    print("conditioning cost per training step (bf16, median of 5 interleaved rounds of 8 steps):")
    for kind, ts in times.items():
        med = statistics.median(ts)
        params = sum(p.numel() for p in trainers[kind].net.parameters())
        verdict = "" if kind == "unconditional" else ("  PASS (<= +15%)" if med <= 1.15 * base else "  FAIL (> +15%)")
        print(f"  {kind:<13} {1000 * med:6.1f} ms/step  {bs / med:5.0f} images/s  {params / 1e6:.2f}M params  "
              f"{100 * (med / base - 1):+5.1f}%{verdict}")


if __name__ == "__main__":
    main()
