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
import sys

from ..checkpoint import CheckpointError
from ..config import ConfigError
from ..data import DataError
from ..text import TextEncoderError
from ..train import TrainingError
from . import cascade, edit, forward, sample, serve, train, unclip

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError, TextEncoderError, ValueError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpmkit", description="Denoising diffusion models: train, sample, look.")
    sub = p.add_subparsers(dest="command", required=True)
    for module in (train, sample, cascade, forward, edit, unclip, serve):
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        print(f"ddpmkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
