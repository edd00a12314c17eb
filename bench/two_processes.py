"""Two ddpmkit processes on one machine: a training run and a sampling loop, each alone and both at once.

    .venv/bin/python bench/two_processes.py [--seconds 40] [--wait-policy brief|passive|active|both] [--spincount N]
                                            [--train-spincount N]

A server beside a training run, or tests beside one, share the cores. Each process's speed (training
images/s; 5-step DDIM calls on 4 digits per second) is measured alone and then with the other running,
and printed as the fraction kept (an even share of the cores would be 50%; target >= 40% each).

--wait-policy sets how both processes' OpenMP threads wait: "brief" is what ddpmkit sets when nothing
else did (ddpmkit/threads.py: OMP_WAIT_POLICY=PASSIVE, then GOMP_SPINCOUNT=1000 turns of spin before a thread
sleeps for the sampler, 10,000 for the training run), "passive" sleeps at once (GOMP_SPINCOUNT=0), "active" spins
(OpenMP's spin-then-sleep default is close to it), "both" runs the comparison once with each of the three.
--spincount N makes both spin N turns instead (how a longer spin trades the fairness for speed alone:
docs/ordinary_machine.md), --train-spincount N the training run alone.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import ddpmkit.threads

SAMPLER = r"""
import sys, time, torch
from ddpmkit.models import load_diffusion
from ddpmkit.pipelines import generate
m = load_diffusion(sys.argv[1])
generate(m, 4, sampler="ddim", steps=5, progress=False)  # warm-up
end, calls, start = time.time() + float(sys.argv[2]), 0, time.time()
while time.time() < end:
    generate(m, 4, sampler="ddim", steps=5, progress=False)
    calls += 1
print(calls / (time.time() - start))
"""


POLICIES = {"brief": dict(ddpmkit.threads.SETTINGS),
            "passive": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"},
            "active": {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "30000000000"}}


def train_cmd(run_dir: Path, seconds: float) -> list[str]:
    return [sys.executable, "-m", "ddpmkit.cli", "train", "mnist", f"train.run_dir={run_dir}", "train.steps=100000",
            f"train.max_minutes={seconds / 60}", "train.fit_to_budget=false", "train.log_every=10", "train.sample_every=0",
            "train.eval_every=0", "train.checkpoint_every=0", "train.keep_steps=", "train.mixed_precision=no", "--quiet"]


def training_rate(run_dir: Path) -> float:
    """images/s from the first log entry (after the first steps' one-off costs) to the end of the run."""
    entries = [e for e in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines()) if "elapsed_s" in e]
    first, done = entries[0], entries[-1]
    if first is done:  # not even one log window (a starved run): its whole time
        return done["step"] * 64 / done["elapsed_s"]
    return (done["step"] - first["step"]) * 64 / (done["elapsed_s"] - first["elapsed_s"])


def process_envs(policy: str, spincount: int | None = None, train_spincount: int | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The sampler's environment and the training run's: the policy's settings ("brief": each process's own, as
    ddpmkit/threads.py chooses them), then --spincount for both and --train-spincount for the training run."""
    training = ddpmkit.threads.TRAINING_SETTINGS if policy == "brief" else POLICIES[policy]
    env, train_env = {**os.environ, **POLICIES[policy]}, {**os.environ, **training}
    for spin, envs in ((spincount, (env, train_env)), (train_spincount, (train_env,))):
        for e in envs if spin is not None else ():
            e["GOMP_SPINCOUNT"] = str(spin)
    return env, train_env


def measure(policy: str, seconds: float, model: Path, tmp: Path, spincount: int | None = None, train_spincount: int | None = None) -> None:
    env, train_env = process_envs(policy, spincount, train_spincount)
    sampler = [sys.executable, "-c", SAMPLER, str(model), str(seconds)]
    alone_sampling = float(subprocess.run(sampler, env=env, capture_output=True, text=True, check=True).stdout)
    subprocess.run(train_cmd(tmp / f"alone-{policy}", seconds), env=train_env, check=True, capture_output=True)
    alone_training = training_rate(tmp / f"alone-{policy}")
    # both start together and run for the same window (each one's start-up is left out of its rate)
    trainer = subprocess.Popen(train_cmd(tmp / f"together-{policy}", seconds), env=train_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    together_sampling = float(subprocess.run(sampler, env=env, capture_output=True, text=True, check=True).stdout)
    trainer.wait()
    together_training = training_rate(tmp / f"together-{policy}")
    setting = " ".join(f"{k}={env[k]}" for k in POLICIES[policy])
    if train_env["GOMP_SPINCOUNT"] != env["GOMP_SPINCOUNT"]:
        setting += f" (training: GOMP_SPINCOUNT={train_env['GOMP_SPINCOUNT']})"
    print(f"{setting}: training {alone_training:.0f} images/s alone, {together_training:.0f} beside sampling "
          f"({together_training / alone_training:.0%} kept); sampling {alone_sampling:.2f} calls/s alone, {together_sampling:.2f} "
          f"beside training ({together_sampling / alone_sampling:.0%} kept)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=40.0, help="length of each timed window")
    p.add_argument("--wait-policy", default="both", choices=[*POLICIES, "both"])
    p.add_argument("--spincount", type=int, help="brief waiting with this many spin turns instead of ddpmkit's")
    p.add_argument("--train-spincount", type=int, help="the training run's spin turns only (the sampler keeps the policy's)")
    args = p.parse_args()
    for flag, value in (("--spincount", args.spincount), ("--train-spincount", args.train_spincount)):
        if value is not None and value < 0:
            p.error(f"{flag} {value} must be >= 0")
    tmp = Path(tempfile.mkdtemp(prefix="two-processes-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the runs go when the bench ends
    model = tmp / "model"  # a short run to sample from
    subprocess.run([sys.executable, "-m", "ddpmkit.cli", "train", "mnist", f"train.run_dir={model}", "train.steps=20",
                    "train.sample_every=0", "train.eval_every=0", "train.keep_steps=", "--quiet"], check=True, capture_output=True)
    print(f"{os.cpu_count()} CPUs; windows of {args.seconds:.0f} s")
    for policy in (list(POLICIES) if args.wait_policy == "both" else [args.wait_policy]):
        measure(policy, args.seconds, model, tmp, args.spincount, args.train_spincount)


if __name__ == "__main__":
    main()
