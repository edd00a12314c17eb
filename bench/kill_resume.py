"""Exact resume under SIGKILL: kill training at random moments, resume, compare with a run that
was never interrupted.

    .venv/bin/python bench/kill_resume.py [--trials 10 --steps 200]

For the denoiser and the autoencoder (tiny models on the 8x8 digits, fp32, a checkpoint every 2
steps so that kills often land while one is being written): one uninterrupted run, then `trials`
runs that are each killed with SIGKILL at a random moment and resumed with --resume (started
afresh when the kill came before the first checkpoint). Prints, per kind, how many resumed runs
end with weights (raw and EMA) identical to the uninterrupted run, and whether any half-written
checkpoint (a .tmp-ckpt-* folder) is left. Target: 10/10 and none.
"""
from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch
from safetensors.torch import load_file

from ddpmkit.checkpoint import list_checkpoints

KINDS = {
    "denoiser": ["mnist", "data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=4"],
    "autoencoder": ["mnist_autoencoder", "data.name=digits", "autoencoder.pad_to=8", "autoencoder.channel_mult=1,2",
                    "autoencoder.base_channels=8"],
}
COMMON = ["train.batch_size=16", "train.sample_every=0", "train.warmup_steps=5", "train.mixed_precision=no", "train.max_minutes=0",
          "train.checkpoint_every=2", "train.keep_checkpoints=2", "train.ema_decay=0.9"]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ddpmkit.cli", "train", *args, "--quiet"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = list_checkpoints(run_dir)[-1]
    return {f"{w}/{k}": v for w in ("model", "ema") for k, v in load_file(last / f"{w}.safetensors").items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_resume-"))
    ok_all = True
    for kind, preset in KINDS.items():
        base = [*preset, *COMMON, f"train.steps={args.steps}"]
        straight = root / kind / "straight"
        subprocess.run(cli(*base, f"train.run_dir={straight}"), check=True, capture_output=True)
        # the training part of a run: from its config.json (written after start-up) to its last checkpoint
        training = list_checkpoints(straight)[-1].stat().st_mtime - (straight / "config.json").stat().st_mtime
        reference = final_weights(straight)
        identical, litter, kills_in_write = 0, 0, 0
        for trial in range(args.trials):
            run_dir = root / kind / f"trial{trial}"
            proc = subprocess.Popen(cli(*base, f"train.run_dir={run_dir}"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while not (run_dir / "config.json").exists() and proc.poll() is None:  # start-up over
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 1.0) * training)  # a random moment of the training
            finished = proc.poll() is not None
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills_in_write += bool(list(run_dir.glob(".tmp-ckpt-*")))
            found = list_checkpoints(run_dir)
            resume = ["--resume"] if found else []
            subprocess.run(cli(*base, f"train.run_dir={run_dir}", *resume), check=True, capture_output=True)
            got = final_weights(run_dir)
            same = got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
            identical += same
            litter += bool(list(run_dir.glob(".tmp-*")))
            what = "finished before the kill" if finished else f"killed, resumed from {found[-1].name if found else 'scratch'}"
            print(f"  {kind} trial {trial}: {what}: {'identical' if same else 'DIFFERENT'}", flush=True)
        ok = identical == args.trials and litter == 0
        ok_all &= ok
        print(f"{kind}: {identical}/{args.trials} resumed runs identical to the uninterrupted one; "
              f"{kills_in_write} kills left a checkpoint half-written, {litter} runs still hold one after resuming "
              f"({'PASS' if ok else 'FAIL'})", flush=True)
    shutil.rmtree(root, ignore_errors=True)
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
