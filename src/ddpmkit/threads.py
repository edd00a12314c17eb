"""How ddpmkit's threads wait, set before torch loads its OpenMP runtime.

OpenMP threads that finish a parallel region spin for a while before they sleep, which is the fastest
choice when a process has the cores to itself. Two processes on the same cores (a server beside a
training run, tests beside one) then burn each other's time slices spinning: a 5-step sampling call
took 15x longer beside a training run on 2 cores. Passive waiting (threads sleep at once) keeps each
of two near its share (bench/two_processes.py), but alone it costs a training run on an AVX-512-bf16
CPU about a fifth of its speed (216 against 271 images/s spinning, that bench): its kernels are short,
and a thread woken from sleep for each one arrives late. So threads spin briefly first (GOMP_SPINCOUNT,
libgomp's spin before it sleeps: 1,000 turns, some microseconds, enough to bridge one kernel to the
next), then sleep. (3,000 turns leave a sampler beside a training run a quarter of its speed, under the
bench's 40% target: bench/two_processes.py --spincount 3000, docs/ordinary_machine.md.) Values the user set are kept; the
settings take effect only if torch is not imported yet, which is why the package imports this module first.
"""
from __future__ import annotations

import os

SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
# what this module set rather than the user: a bench that starts another commit's code leaves these out of its environment
SET_HERE = {name: value for name, value in SETTINGS.items() if name not in os.environ}
os.environ.update(SET_HERE)
