"""Ctrl-C during training stops the run at a step boundary, with a checkpoint of that step.

A KeyboardInterrupt raised wherever the interpreter happens to be (inside the optimizer step, between it and the EMA
update, half-way through a checkpoint's write) leaves no state a run could continue from exactly, so the newest
checkpoint was all that was kept: up to train.checkpoint_every steps were lost. The first Ctrl-C now only asks; the
training loop stops at the next step boundary and writes a checkpoint there, from which `--resume` continues bit for
bit. A second Ctrl-C stops at once, as before.

Several processes must stop at the same step (a checkpoint is written by all of them together, and a process that
stopped alone would leave the others waiting in an all-reduce), and each sees the Ctrl-C at a step of its own, so
there the request is compared at the next log step, where the processes already exchange the time budget's flag:
every process stops there if any was asked. A launcher (torchrun, accelerate launch) passes the terminal's Ctrl-C
on to its processes, which also get it from the terminal: a second SIGINT within ECHO_S (3 s) of the first is that copy,
not a second Ctrl-C. Off the main thread, where signal handlers cannot be set, Ctrl-C is Python's own.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

ECHO_S = 3.0  # a launcher's copy of a Ctrl-C arrives within milliseconds, a busy machine's within seconds; a second press later


class GracefulStop:
    """A context in which the first SIGINT sets `requested` (and says so when `announce`) instead of raising
    KeyboardInterrupt; `when` says where the run will stop."""

    def __init__(self, processes: int = 1, announce: bool = True, when: str = "after this step"):
        self.requested = False
        self.active = threading.current_thread() is threading.main_thread()
        self.echo_s = ECHO_S if processes > 1 else 0.0
        self.announce, self.when = announce, when
        self.previous: Any = None
        self.t_requested = 0.0

    def __enter__(self) -> GracefulStop:
        if self.active:
            # None: a handler set outside Python (an embedding program); Python's own raises KeyboardInterrupt
            self.previous = signal.signal(signal.SIGINT, self.request) or signal.default_int_handler
        return self

    def request(self, signum: int, frame: FrameType | None) -> None:
        if not self.requested:
            self.requested, self.t_requested = True, time.monotonic()
            if self.announce:
                print(f"\nCtrl-C: stopping {self.when}, with a checkpoint of it (Ctrl-C again stops at once)", file=sys.stderr, flush=True)
            return
        if time.monotonic() - self.t_requested < self.echo_s:
            return  # the launcher's copy of the same Ctrl-C
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C: at once, as the handler before would
        if callable(self.previous):
            self.previous(signum, frame)
        else:
            os.kill(os.getpid(), signum)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
