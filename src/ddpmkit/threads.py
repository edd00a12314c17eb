"""How ddpmkit's threads wait, set before torch loads its OpenMP runtime.

OpenMP threads that finish a parallel region spin for a while before they sleep, which is the fastest
choice when a process has the cores to itself. Two processes on the same cores (a server beside a
training run, tests beside one) then burn each other's time slices spinning: a 5-step sampling call
took 15x longer beside a training run on 2 cores. Passive waiting (threads sleep at once) costs one
process alone little and keeps each of two near its share (bench/two_processes.py). A value the user
set in OMP_WAIT_POLICY is kept; the setting takes effect only if torch is not imported yet, which is
why the package imports this module first.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
