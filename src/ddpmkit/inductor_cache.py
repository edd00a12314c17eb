"""torch.compile's kernel cache, one per CPU capability cap.

Inductor keys the kernels it caches on disk without the ATEN_CPU_CAPABILITY cap (the way this project measures an AVX2
CPU on an AVX-512 one, docs/ordinary_machine.md). Kernels built uncapped and then loaded into a capped process
trained a compiled toy to NaN within 5 steps (tests/test_train.py's compiled run under the AVX2 caps, its cache warm
from an uncapped run; with a cache of its own it trains as eagerly). So a capped process whose user chose no cache folder
gets one named after the cap; an uncapped one keeps torch's default. Read by inductor when it compiles, so setting it
at import is early enough.
"""
from __future__ import annotations

import getpass
import os
import re
import tempfile


def cache_dir_for(env: dict[str, str] | os._Environ) -> str | None:
    """The cache folder a process with this environment should use, or None to leave torch's choice."""
    cap = env.get("ATEN_CPU_CAPABILITY")
    if not cap or env.get("TORCHINDUCTOR_CACHE_DIR"):
        return None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container without a passwd entry for its uid
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    user = re.sub(r'[\\/:*?"<>|]', "_", user)  # as torch names its default folder, torchinductor_<user>
    return os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_{cap.lower()}")


folder = cache_dir_for(os.environ)
if folder is not None:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
