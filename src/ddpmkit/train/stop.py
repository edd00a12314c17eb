"""Ctrl-C during training stops the run after the step it is in, with a checkpoint of that step.

A KeyboardInterrupt raised wherever the interpreter happens to be (inside the optimizer step, between it and the EMA
update, half-way through a checkpoint's write) leaves no state a run could continue from exactly, so the newest
checkpoint was all that was kept: up to train.checkpoint_every steps were lost. The first Ctrl-C now only asks; the
training loop stops at the next step boundary and writes a checkpoint there, from which `--resume` continues bit for
bit. A second Ctrl-C stops at once, as before.

One process only: each process of a multi-process run would notice the request at a step of its own, and a
checkpoint is written by all of them together; there, and off the main thread (where signal handlers cannot be set),
Ctrl-C is Python's own.
"""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any


class GracefulStop:
    """A context in which the first SIGINT sets `requested` (and says so) instead of raising KeyboardInterrupt."""

    def __init__(self, processes: int = 1):
        self.requested = False
        self.active = processes == 1 and threading.current_thread() is threading.main_thread()
        self.previous: Any = None

    def __enter__(self) -> GracefulStop:
        if self.active:
            # None: a handler set outside Python (an embedding program); Python's own raises KeyboardInterrupt
            self.previous = signal.signal(signal.SIGINT, self.request) or signal.default_int_handler
        return self

    def request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C: at once
        print("\nCtrl-C: stopping after this step, with a checkpoint of it (Ctrl-C again stops at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
