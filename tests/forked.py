"""`ddpmkit` command lines in processes of their own, forked from a server that imported torch and ddpmkit once.

The tests that kill a training run (SIGKILL, Ctrl-C) need it in another process. A fresh interpreter for each paid
3-5 s of imports on a 2-core machine, most of a tiny run's time; a child of multiprocessing's fork server starts in
milliseconds. The server only imports (no tensor work, so no OpenMP threads to lose in a fork); each child then sets
its thread count, so that it sums in the same order as the test's own process."""
from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401 -- torch.optim imports it on an optimizer's first step: the server pays it once

from ddpmkit.cli import main

CONTEXT = multiprocessing.get_context("forkserver")
CONTEXT.set_forkserver_preload(["forked"])  # this module: torch, dynamo and ddpmkit's command line


def _run(argv: list[str], threads: int, output: str | None) -> None:
    if output is not None:  # the child's stdout and stderr into the file, as a pipe would collect them
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    torch.set_num_threads(threads)
    sys.exit(main(argv))


def start(argv: list[str], output: Path | None = None) -> multiprocessing.Process:
    """`ddpmkit ARGV` in a new process with as many threads as this one; `output`: a file for what it prints."""
    proc = CONTEXT.Process(target=_run, args=(argv, torch.get_num_threads(), None if output is None else str(output)))
    proc.start()
    return proc
