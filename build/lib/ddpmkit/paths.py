"""Where ddpmkit keeps what it makes for itself: one cache folder, never the working directory.

    $DDPMKIT_CACHE                      if set
    $XDG_CACHE_HOME/ddpmkit             else, if XDG_CACHE_HOME is set
    ~/.cache/ddpmkit                    else

It holds the evaluation judge (trained on first use) and anything else that is derived, not given.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (created on demand by whoever writes into it)."""
    if os.environ.get("DDPMKIT_CACHE"):
        return Path(os.environ["DDPMKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ddpmkit"
