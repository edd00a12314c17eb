"""Progress bars: tqdm's, redrawn ten times a second on a terminal or in a notebook, but at most every
PIPED_INTERVAL_S seconds when they go to a file or a pipe (nohup, a SLURM job's output, CI), where every redraw is
one more line of the log: a training run of an hour wrote about 36,000 of them."""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

PIPED_INTERVAL_S = 30.0


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """tqdm(*args, **kwargs), drawn less often where nobody watches it redraw (module docstring)."""
    notebook = tqdm.__module__.endswith("notebook")  # tqdm.auto's widget: redrawn in place, whatever sys.stderr is
    stream = kwargs.get("file") or sys.stderr
    if not notebook and not (hasattr(stream, "isatty") and stream.isatty()):
        kwargs.setdefault("mininterval", PIPED_INTERVAL_S)
    return tqdm(*args, **kwargs)
