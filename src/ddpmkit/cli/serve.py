"""`ddpmkit serve`: the web page (gradio) on a loopback port."""
from __future__ import annotations

import argparse
import signal
import sys

from ..errors import UserError
from ..web.limits import Limits
from .common import add_device_option


def cmd_serve(args: argparse.Namespace) -> None:
    try:
        from ..web.server import serve  # the web face needs the optional gradio extra: imported only for this command
    except ImportError as e:
        raise UserError(f"the web page needs gradio: pip install 'ddpmkit[web]' ({e})") from None
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: give a port in 1..65535 (default 7860)")
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the page as Ctrl-C does: its files are removed
    try:
        serve(args.runs or ["runs"], host=args.host, port=args.port, concurrency=args.concurrency,
              limits=Limits(max_steps=args.max_steps, max_images=args.max_images), loras=args.lora, device=args.device)
    finally:  # a caller of main() in its own process (a notebook, the tests) keeps its own handler
        signal.signal(signal.SIGTERM, previous)


def add_commands(sub) -> None:
    s = sub.add_parser("serve", help="a web page: generate with a live preview, the forward process, edit, interpolate")
    s.add_argument("runs", nargs="*", help="run folders, or folders of runs (default: ./runs)")
    s.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves other machines too")
    s.add_argument("--port", type=int, default=7860, help="the port to serve on (default: %(default)s)")
    s.add_argument("--concurrency", type=int, default=1, help="sampling requests run at once; the others queue")
    s.add_argument("--max-steps", type=int, default=1000, help="steps one request may ask for")
    s.add_argument("--max-images", type=int, default=64, help="images one request may ask for")
    s.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA into the served model(s) at a scale (repeatable); chosen here, never by a visitor")
    add_device_option(s)
    s.set_defaults(func=cmd_serve)
