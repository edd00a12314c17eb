"""`ddpmkit forward`: the forward process of one image and its Fourier spectrum."""
from __future__ import annotations

import argparse

from ..errors import UserError
from ..images import load_image
from ..schedules import SCHEDULES, NoiseSchedule
from ..viz import forward_process_figures
from .common import IMAGE_HELP, out_help

# the default --t: these fractions of T (0, 50, ..., 700 of 1000), then T - 1, so that any --T has its own default
DEFAULT_T_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.7)


def default_timesteps(T: int) -> list[int]:
    """0, 50, 100, 200, 400, 700, 999 for T = 1000; the same fractions of another T, without repeats."""
    return sorted({min(round(f * T), T - 1) for f in DEFAULT_T_FRACTIONS} | {T - 1})


def cmd_forward(args: argparse.Namespace) -> None:
    schedule = NoiseSchedule.from_name(args.schedule, args.T)
    try:
        ts = default_timesteps(schedule.T) if args.t is None else [int(t) for t in args.t.split(",")]
    except ValueError:
        raise UserError(f"--t takes comma-separated timesteps, e.g. 0,100,999; got {args.t!r}") from None
    strip, spectrum = forward_process_figures(load_image(args.image, args.size), schedule, ts, args.out, args.seed,
                                              f"q(x_t | x_0), {args.schedule} schedule, T={schedule.T}")
    print(f"wrote {strip} and {spectrum}")


def add_commands(sub) -> None:
    f = sub.add_parser("forward", help="show the forward process of an image and its Fourier spectrum")
    f.add_argument("image", help=IMAGE_HELP)
    f.add_argument("--t", default=None, help="comma-separated timesteps in 0..T-1 (default: 0,50,100,200,400,700,999 for T=1000; "
                                             "the same fractions of another --T)")
    f.add_argument("--schedule", default="linear", help=f"the noise schedule: {', '.join(SCHEDULES)} (default: %(default)s)")
    f.add_argument("--T", type=int, default=1000, help="the schedule's steps (default: %(default)s)")
    f.add_argument("--size", type=int, default=None, help="resize to this square size")
    f.add_argument("--seed", type=int, default=0, help="the seed of the noise eps (default: %(default)s)")
    f.add_argument("--out", default="forward", help=out_help())
    f.set_defaults(func=cmd_forward)
