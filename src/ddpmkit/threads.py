"""How ddpmkit's threads wait, set before torch loads its OpenMP runtime.

OpenMP threads that finish a parallel region spin for a while before they sleep, which is the fastest
choice when a process has the cores to itself. Two processes on the same cores (a server beside a
training run, tests beside one) then burn each other's time slices spinning: a 5-step sampling call
took 15x longer beside a training run on 2 cores. Passive waiting (threads sleep at once) keeps each
of two near its share (bench/two_processes.py), but alone it costs a training run on an AVX-512-bf16
CPU about a fifth of its speed (216 against 271 images/s spinning, that bench): its kernels are short,
and a thread woken from sleep for each one arrives late. So threads spin briefly first (GOMP_SPINCOUNT,
libgomp's spin before it sleeps: 1,000 turns, some microseconds, enough to bridge one kernel to the
next), then sleep.

A training run (`ddpmkit train ...`, `ddpmkit demo`) spins longer: 10,000 turns. Alone it trains the demo
at x1.067 the images/s on AVX-512-bf16 (bench/train_throughput.py --spin, docs/ordinary_machine.md), and a sampler or
server beside it, which keeps the brief spin, still keeps about half its speed (bench/two_processes.py); the
training run is the one that gives up time while both run. (Both at 3,000 turns left the sampler a quarter.)

Values the user set are kept; the settings take effect only if torch is not imported yet, which is why
the package imports this module first.
"""
from __future__ import annotations

import os
import sys
from pathlib import PureWindowsPath

SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
TRAINING_SETTINGS = {**SETTINGS, "GOMP_SPINCOUNT": "10000"}


def command(argv: list[str]) -> str | None:
    """The subcommand of a process started as `ddpmkit CMD ...` or `python -m ddpmkit.cli CMD ...` (what accelerate
    launch and torchrun start too), from its full command line (sys.orig_argv); None for any other process."""
    for i, arg in enumerate(argv[:-1]):
        script = PureWindowsPath(arg).name in ("ddpmkit", "ddpmkit.exe")  # (a Windows path splits at / and \ alike)
        if script or (arg == "ddpmkit.cli" and i > 0 and argv[i - 1] == "-m"):
            return argv[i + 1]
    return None


def settings_for(argv: list[str]) -> dict[str, str]:
    """TRAINING_SETTINGS for a process that trains (ddpmkit train*, demo), SETTINGS for any other."""
    cmd = command(argv)
    return dict(TRAINING_SETTINGS if cmd is not None and (cmd == "demo" or cmd.startswith("train")) else SETTINGS)


# what this module set rather than the user: a bench that starts another commit's code leaves these out of its environment
SET_HERE = {name: value for name, value in settings_for(sys.orig_argv).items() if name not in os.environ}
os.environ.update(SET_HERE)
