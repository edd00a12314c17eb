"""The one kind of error a user's input causes: the faces (CLI, web page) show a UserError as one line and
let everything else, a bug, show its traceback.

A message names the library's parameters in backticks (`classes`, `prompts`); each face renders them in
its own words (`--class` on the command line) with ``render``.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch

_NAME = re.compile(r"`([A-Za-z_.]+)`")


def render(error: BaseException, words: Mapping[str, str]) -> str:
    """The message with each `name` that `words` knows replaced by the face's word for it (any of USER_ERRORS)."""
    return _NAME.sub(lambda m: words.get(m[1], m[0]), str(error))


class Note(UserWarning):
    """Not an error, but what a user should know about their input (data that look mis-scaled): warnings.warn(msg, Note);
    the command line shows it as one "note:" line, without the warning's file and line."""


class UserError(ValueError):
    """Bad input: a value, a file, a config, a combination of options. Subclasses say which part."""


# what the faces show as one line: user errors, and files that are not there
USER_ERRORS: tuple[type[Exception], ...] = (UserError, FileNotFoundError)


def read_user_text(path: str | Path, error: type[UserError] = UserError) -> str:
    """A text file a user wrote (a config, captions, keyframes): UTF-8 on every system (not the locale's encoding), the
    byte-order mark some Windows editors write dropped; another encoding is one `error` naming the file and the byte."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at {e.start}); save it as UTF-8") from None


def compile_failure(e: BaseException) -> str | None:
    """One line for torch.compile failing on this machine (no C++ compiler for a CPU, a lowering this torch lacks),
    or None for any other error. Not the user's input, but nothing they can fix in ddpmkit either: they can run
    without compiling, which computes the same."""
    if "torch._dynamo" not in sys.modules:  # nothing was compiled: not a compile failure (and no 1.2 s import to find out)
        return None
    from torch._dynamo.exc import BackendCompilerFailed  # loaded already (above); InductorError is one

    if not isinstance(e, BackendCompilerFailed):
        return None
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    return (f"torch.compile could not compile the network with torch {torch.__version__}: {first[:300]}. Run without "
            "compiling (train.compile=no, or leave --compile out); on a CPU torch.compile needs a working C++ compiler (CXX)")
