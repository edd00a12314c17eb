"""Sampling throughput of the demo UNet against its training forward pass, on this machine.

    .venv/bin/python bench/sampling_throughput.py [--batches 16,64,128,250,500] [--steps 20]

Prints image-evaluations per second (batch x network evaluations / seconds) of `ddpmkit.sample`
with the ancestral sampler at several batch sizes, in fp32 and (where the CPU or GPU computes it)
under bf16 autocast, and the same figure for the training forward pass (train mode, autograd on,
the preset's batch of 64) and a full training step (forward + backward + AdamW), measured in the
same process. The network is the demo preset's UNet (configs/mnist.toml) with its initial weights:
throughput does not depend on what it has learned.

Last, 500 samples drawn as `ddpmkit.generate` draws them by default (cache-sized chunks, two chunks at
once on a CPU with two or more threads), and with precision="bf16", against one eager batch of 500 (how
they were drawn before issue 20) and against the same chunks one at a time.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch

from ddpmkit.config import load_config
from ddpmkit.models import DiffusionModel, compile_for_sampling
from ddpmkit.nets import build_network
from ddpmkit.pipelines.generate import auto_batch_size, auto_streams, generate
from ddpmkit.precision import Autocast
from ddpmkit.sampling import sample
from ddpmkit.schedules import NoiseSchedule


def timed(fn, repeats: int) -> float:
    """Median seconds of fn() over repeats runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class ChannelsLast(torch.nn.Module):
    """The network with weights and activations in NHWC memory order (what oneDNN's CPU convolutions prefer)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = copy.deepcopy(net).to(memory_format=torch.channels_last)

    def forward(self, x, t, **kw):
        return self.net(x.contiguous(memory_format=torch.channels_last), t, **kw).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="16,64,128,250,500")
    ap.add_argument("--steps", type=int, default=20, help="network evaluations per sampling run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--channels-last", action="store_true", help="add a column for NHWC memory order")
    ap.add_argument("--compile", action="store_true", help="add a column for the network compiled for sampling (a compile per "
                    "batch size), and compare 500 samples drawn as generate() draws them (equal chunks, compiled) with one "
                    "eager batch of 500 (how they were drawn before issue 20)")
    args = ap.parse_args()
    cfg = load_config("mnist")
    torch.manual_seed(0)
    net = build_network(cfg.network, (1, 28, 28))
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.T)
    bs = cfg.train.batch_size

    # the training forward pass (autograd on, train mode) and a full step at the preset's batch size
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x, t = torch.randn(bs, 1, 28, 28), torch.randint(0, schedule.T, (bs,)).float()

    def forward_only():
        net(x, t).square().mean()

    def train_step():
        opt.zero_grad(set_to_none=True)
        net(x, t).square().mean().backward()
        opt.step()

    fwd = bs / timed(forward_only, args.repeats * 3)
    step = bs / timed(train_step, args.repeats * 3)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu count {os.cpu_count()}")
    print(f"training forward pass (batch {bs}, autograd on): {fwd:.0f} images/s; full training step: {step:.0f} images/s")

    net.eval()
    variants = {"fp32": net}
    if not args.no_bf16:
        variants["bf16"] = Autocast(net)
    if args.channels_last:
        variants["nhwc"] = ChannelsLast(net)
    if args.compile:
        variants["compiled"] = compile_for_sampling(net)
    print(f"{'batch':>6} | {'fp32 evals/s':>13} | {'vs training fwd':>15}" + "".join(f" | {k + ' evals/s':>16} | {k + ' / fp32':>14}"
                                                                              for k in variants if k != "fp32"))
    for b in (int(v) for v in args.batches.split(",")):
        rate = {}
        for name, model in variants.items():
            run = lambda model=model, b=b: sample(model, (b, 1, 28, 28), schedule, sampler="ddpm", steps=args.steps, generator=0)
            rate[name] = b * args.steps / timed(run, args.repeats)  # the warm-up run also compiles
        print(f"{b:>6} | {rate['fp32']:>13.0f} | {rate['fp32'] / fwd:>14.2f}x"
              + "".join(f" | {rate[k]:>16.0f} | {rate[k] / rate['fp32']:>13.2f}x" for k in variants if k != "fp32"))
    if args.compile:
        chunk = 500 // -(-500 // auto_batch_size((1, 28, 28)))  # generate()'s equal chunks for 500 samples
        run = lambda model, b: sample(model, (b, 1, 28, 28), schedule, sampler="ddpm", steps=args.steps, generator=0)
        before = 500 * args.steps / timed(lambda: run(net, 500), args.repeats)
        after = chunk * args.steps / timed(lambda: run(variants["compiled"], chunk), args.repeats)
        print(f"500 samples: one eager batch of 500 {before:.0f} evals/s; compiled chunks of {chunk} {after:.0f} evals/s "
              f"({after / before:.2f}x; {after / fwd:.2f}x the training forward pass); 1,000 steps would take "
              f"{500e3 / before / 60:.1f} -> {500e3 / after / 60:.1f} minutes")

    m = DiffusionModel(network=net, config=cfg, data_shape=(1, 28, 28), step=0, path=Path("initial weights"))
    drawn = lambda **kw: generate(m, 500, sampler="ddpm", steps=args.steps, progress=False, **kw)  # noqa: E731
    ways = {"one batch": {"batch_size": 500}, "chunks": {"streams": 1}, "generate": {}}
    if not args.no_bf16:
        ways["generate bf16"] = {"precision": "bf16"}
    rates = {name: 500 * args.steps / timed(lambda kw=kw: drawn(**kw), args.repeats) for name, kw in ways.items()}
    chunk, streams = auto_batch_size((1, 28, 28)), auto_streams(m, torch.device("cpu"), 2)
    before = rates["one batch"]
    print(f"500 samples with generate(): one batch of 500 {before:.0f} evals/s; chunks of up to {chunk}, one at a time "
          f"{rates['chunks']:.0f}; the default ({streams} at once) {rates['generate']:.0f}")
    for name in [k for k in rates if k.startswith("generate")]:
        print(f"  {name}: {rates[name]:.0f} evals/s = {rates[name] / before:.2f}x one batch of 500, {rates[name] / fwd:.2f}x the "
              f"training forward pass; 1,000 steps would take {500e3 / before / 60:.1f} -> {500e3 / rates[name] / 60:.1f} minutes")

if __name__ == "__main__":
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    main()
