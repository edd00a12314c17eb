"""The command line: parsing and printing only; the work is in the library.

    ddpmkit train | train-autoencoder | train-classifier | train-clip | demo   (cli/train.py)
    ddpmkit sample | eval | tune-grid                                   (cli/sample.py)
    ddpmkit sample BASE --then SR | upscale                             (cli/cascade.py)
    ddpmkit img2img | inpaint | posterior | interpolate | voyage        (cli/edit.py)
    ddpmkit forward                                                     (cli/forward.py)
    ddpmkit unclip | variations | unclip-interpolate | text-diff        (cli/unclip.py)
    ddpmkit serve                                                       (cli/serve.py, the web page)
"""
from __future__ import annotations

import argparse
import difflib
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Callable

import torch

from ..devices import out_of_memory
from ..errors import USER_ERRORS, Note, compile_failure, render
from . import cascade, edit, forward, sample, serve, train, unclip
from .common import check_counts, check_out, no_memory, path_error

# the library's parameter names in its messages, as the command line spells them
FLAGS = {"classes": "--class", "prompts": "--prompt", "scale": "--guidance", "clip": "--clip", "classifier": "--classifier",
         "autoguide": "--autoguide", "features": "--features", "reference": "--reference", "metrics": "--metrics",
         "mask": "--mask", "resume": "--resume", "overwrite": "--overwrite", "variance": "--variance", "dtype": "--dtype",
         "precision": "--precision", "n": "--n", "n_bpd": "--n-bpd", "eta": "--eta", "churn": "--churn",
         "inception": "--inception", "source": "--from", "target": "--to", "sampler": "--sampler", "steps": "--steps"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpmkit", description="Denoising diffusion models: train, sample, look.",
                                epilog="ddpmkit COMMAND --help says what each command takes; `ddpmkit demo` trains and samples the digits.")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (train, sample, cascade, forward, edit, unclip, serve):
        module.add_commands(sub)
    p.set_defaults(commands=sub.choices)  # each command's own parser, for its usage in an error (parse)
    return p


def notes_as_lines(show: Callable[..., None]) -> Callable[..., None]:
    """A warnings.showwarning for the command line: ddpmkit's Notes as one "note:" line, any other warning by `show`."""
    def show_note(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, Note):
            print(f"note: {render(message, FLAGS)}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)
    return show_note


def version_line() -> str:
    """ddpmkit's version and the torch it runs on (what a bug report needs)."""
    try:
        mine = importlib.metadata.version("ddpmkit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        mine = "(not installed)"
    return f"ddpmkit {mine}, torch {torch.__version__}, Python {sys.version.split()[0]}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line; section.key=value overrides may also come after a flag (`train mnist --overwrite train.lr=1e-3`:
    argparse ends a positional list at the first flag and called the rest unrecognized)."""
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `ddpmkit`: the commands, not "arguments are required: command"
        parser.print_help()
        parser.exit(2)
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *(e for e in extra if "=" in e and not e.startswith("-"))]
        extra = [e for e in extra if e not in args.overrides]
    if extra:  # in the command's words: its usage and the flag meant, not `ddpmkit [-h] [--version] COMMAND ...`
        command = args.commands[args.command]
        flags = {o.lstrip("-"): o for action in command._actions for o in action.option_strings if o.startswith("--")}
        meant = [f"{e} (did you mean {flags[close[0]]}?)"
                 if e.startswith("--") and (close := difflib.get_close_matches(e.split("=")[0].lstrip("-"), flags, 1, cutoff=0.7)) else e
                 for e in extra]
        command.error(f"unrecognized arguments: {' '.join(meant)}")
    del args.commands
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with warnings.catch_warnings():  # show_note for this command only (main also runs inside tests and notebooks)
        warnings.showwarning = notes_as_lines(warnings.showwarning)
        return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """args.func(args), with every user error, allocation failure and refused path as one line (exit 2)."""
    try:
        check_counts(args)
        check_out(args)
        args.func(args)
    except USER_ERRORS as e:
        message = render(e, FLAGS)
        print(f"ddpmkit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if out_of_memory(e):
            print(f"ddpmkit {args.command}: error: {no_memory(e, args.command)}", file=sys.stderr)
            return 2
        if (why := compile_failure(e)) is None:
            raise  # a bug: its traceback
        print(f"ddpmkit {args.command}: error: {why}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the machine refuses (a folder where a file must go, no permission, a full disk)
        if e.filename is None:
            raise  # not about a file: a bug's traceback
        print(f"ddpmkit {args.command}: error: {path_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # once for a launch of several processes
            print("interrupted", file=sys.stderr)
        return 130
    return 0
