"""Training and sampling throughput of the presets' networks on this machine, against its matrix-product rate.

    .venv/bin/python bench/train_throughput.py [--presets mnist mnist_2023 imagen_base ...] [--steps 10]
    .venv/bin/python bench/train_throughput.py --candidates
    .venv/bin/python bench/train_throughput.py --layers
    .venv/bin/python bench/train_throughput.py --blocks [--precision bf16]
    .venv/bin/python bench/train_throughput.py --against HEAD~1 [--precision no] [--steps 150] [--rounds 3] [--presets mnist]
    .venv/bin/python bench/train_throughput.py --distillation runs/demo [--steps 40] [--rounds 2]
    .venv/bin/python bench/train_throughput.py --heap [--steps 10] [--rounds 4]
    .venv/bin/python bench/train_throughput.py --spin [--steps 150] [--rounds 6] [--precision no]

For each preset: one task of the training engine (the preset's own network, loss, batch size and conditions),
timed over full training steps (batch lookup, forward, loss, backward, fused AdamW), and the same network's
forward pass under no_grad at the same batch (sampling). Each line gives images/s, the achieved GFLOP/s
(torch.utils.flop_counter's count of one step or one forward, divided by its time) and that rate as a
fraction of a 2048x2048 fp32 matrix product measured in the same process (and of a bf16 one where this CPU
computes bf16 natively, with the bf16 autocast step). images/s per matmul GFLOP/s is the machine-independent
figure: "mnist_2023" is the demo's earlier network (16-32-64 channels at 28/14/7) under the same recipe, so
the ratio of the two lines is the demo's gain at equal machine speed (target >= 1.3; with both presets the bench
also times the two in alternating rounds and prints the median ratio, which the VM's drift moves less); "mnist_patch2" folds
2x2 pixels into channels (32-64 at 14/7), the faster network it was measured against (docs/ordinary_machine.md);
"mnist_narrow" is the demo's network with network.narrow_upsampling (each upsampling convolution outputs the finer
level's width).

Presets that need another run (mnist_latent*: an autoencoder; unclip_*: a CLIP) are skipped unless
--autoencoder / --clip name one; the images preset (your own images, sized for a GPU) is timed on the folder --images names:
`--presets images --images my_photos`, and a smaller form with `--overrides data.image_size=32 network.base_channels=32`.

--against REF: the whole trainer (`ddpmkit train mnist`) of this checkout against the one at git REF,
in a temporary worktree: alternating runs in fresh processes (before-after, then after-before), images/s from each run's train_log.jsonl
(first log window dropped); prints the medians and their ratio. `--against 32bebf1` is the trainer and demo
preset (16-32-64 UNet) as they were when issue 32 measured 90 images/s: the ratio is the whole gain since,
network and layers, on this machine (target >= 1.3).

--spin: the whole trainer (`ddpmkit train mnist`) with a training run's OpenMP spin (ddpmkit/threads.py: 10,000 turns
before a thread sleeps) against the brief spin every other process gets (1,000), alternating fresh processes.

--heap: the demo's training step with ddpmkit/heap.py's malloc thresholds against glibc's defaults, alternating fresh
processes: ms per step, page faults per step and the kernel's (system) CPU time per step.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ddpmkit.threads  # before torch: how OpenMP threads wait (ddpmkit/threads.py)

# isort: split
import torch
from torch.utils.flop_counter import FlopCounterMode

from ddpmkit.config import load_config
from ddpmkit.devices import cpu_kind, describe_cpu
from ddpmkit.precision import cpu_computes_bf16, resolve_precision
from ddpmkit.train import TASKS, step_batch
from ddpmkit.train.batches import Batch

# variants of the demo preset: its network until 2026-12-03, and the patched one it was measured against
VARIANTS = {"mnist_2023": ["network.base_channels=16", "network.channel_mult=1,2,4"],
            "mnist_patch2": ["network.patch_size=2", "network.base_channels=32", "network.channel_mult=1,2"],
            "mnist_narrow": ["network.narrow_upsampling=true"]}
DEFAULT_PRESETS = ["mnist", "mnist_2023", "mnist_patch2", "mnist_class", "mnist_text", "mnist_eps", "imagen_base", "imagen_sr", "mnist_autoencoder",
                   "mnist_classifier", "judge", "clip", "mnist_latent", "unclip_prior", "unclip_decoder"]


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 8) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


class Timed:
    """One preset's task, model and optimizer, ready to time training steps and forwards."""

    def __init__(self, preset: str, overrides: list[str]):
        self.cfg = load_config(preset, overrides)
        self.task = TASKS[self.cfg.train.task](self.cfg)
        torch.manual_seed(0)
        self.model = self.task.build_model()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.train.lr, fused=True)
        self.bs, self.step = self.cfg.train.batch_size, 0

    def batch(self) -> Batch:
        b = step_batch(self.cfg.train.seed, self.step, self.bs, self.task.num_examples, torch.device("cpu"))
        self.step += 1
        return b

    def train_step(self, bf16: bool = False) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = self.task.loss(self.model, self.batch()).float().mean()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def inputs(self) -> tuple[torch.Tensor, dict] | None:
        """What a sampler hands the denoiser: x_t and t (and conditions), or None for other kinds."""
        if self.cfg.train.task not in ("denoiser", "superres", "decoder"):
            return None
        seen = {}

        def grab(module, args, kwargs):
            seen.setdefault("call", (args, kwargs))

        handle = self.model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            self.task.loss(self.model, self.batch())
        finally:
            handle.remove()
        return seen.get("call")

    def forward(self, call) -> None:
        with torch.no_grad():
            self.model(*call[0], **call[1])

    def flops(self, fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    @staticmethod
    def seconds(fn, reps: int) -> float:
        fn()  # warm-up (oneDNN picks its kernels at the first call of each shape)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps


def report(preset: str, overrides: list[str], reps: int, fp32_rate: float, bf16_rate: float | None) -> float | None:
    try:
        t = Timed("mnist" if preset in VARIANTS else preset, overrides)
    except Exception as e:  # noqa: BLE001 -- a preset that needs another run, or an extra that is not installed
        print(f"{preset:<18} skipped: {str(e).splitlines()[0][:110]}")
        return None
    params = sum(p.numel() for p in t.model.parameters()) / 1e6
    step_flops = t.flops(t.train_step)
    s = t.seconds(t.train_step, reps)
    per_rate = t.bs / s / fp32_rate
    line = (f"{preset:<18} {params:5.2f}M  batch {t.bs:<4} train fp32 {t.bs / s:7.1f} images/s  {step_flops / s / 1e9:6.1f} GFLOP/s "
            f"= {step_flops / s / 1e9 / fp32_rate:4.0%} of matmul  ({per_rate:.3f} images/s per matmul GFLOP/s; "
            f"train.steps={t.cfg.train.steps} take ~{t.cfg.train.steps * s / 60:.0f} min)")
    if bf16_rate:
        sb = t.seconds(lambda: t.train_step(bf16=True), reps)
        line += f";  bf16 {t.bs / sb:7.1f} images/s = {step_flops / sb / 1e9 / bf16_rate:4.0%} of bf16 matmul"
    print(line, flush=True)
    call = t.inputs()
    if call is not None:
        fwd_flops = t.flops(lambda: t.forward(call))
        sf = t.seconds(lambda: t.forward(call), 2 * reps)
        print(f"{'':<18} {'':6} {'':10} sample fp32 {t.bs / sf:7.1f} images/s  {fwd_flops / sf / 1e9:6.1f} GFLOP/s "
              f"= {fwd_flops / sf / 1e9 / fp32_rate:4.0%} of matmul  ({fwd_flops / t.bs / 1e6:.0f} MFLOP per image per evaluation)",
              flush=True)
    return per_rate


def in_turns(items: list, r: int) -> list:
    """items in round r's order: as given in even rounds, reversed in odd ones, so that no item always runs first (the
    VM's speed drifts within a round too: in one run of the same code twice per round, the second was faster in every
    round, which a fixed order would have credited to whichever runs second)."""
    return items if r % 2 == 0 else items[::-1]


def interleaved_ratio(rounds: int, steps: int, networks: list[str]) -> None:
    """Each demo network's training images/s over the earlier network's, timed in alternating rounds of a few steps
    in this process, so that the shared machine's drift hits all alike; the median of the per-round ratios."""
    fp32 = ["train.mixed_precision=no"]
    timed = {name: Timed("mnist", [*fp32, *VARIANTS.get(name, [])]) for name in ["mnist_2023", *networks]}
    rates: dict[str, list[float]] = {name: [] for name in timed}
    for t in timed.values():
        t.train_step()  # warm-up
    for r in range(rounds):
        for name, t in in_turns(list(timed.items()), r):
            rates[name].append(t.bs / Timed.seconds(t.train_step, steps))
    print(f"interleaved, {rounds} rounds of {steps} steps: earlier network {statistics.median(rates['mnist_2023']):.1f} images/s")
    for name in networks:
        ratios = [a / b for a, b in zip(rates[name], rates["mnist_2023"])]
        print(f"  {name}: {statistics.median(rates[name]):.1f} images/s; per-round ratios {' '.join(f'{r:.2f}' for r in ratios)}; "
              f"median ratio x{statistics.median(ratios):.2f} (target >= 1.3)")


def candidates(reps: int) -> None:
    """The speed-ups the issue listed, on the earlier demo UNet's bare training step (network, MSE, AdamW) in one process."""
    from ddpmkit.nets.unet import UNet

    def timed(name: str, bs: int = 64, fused: bool = False, channels_last: bool = False, compiled: bool = False) -> None:
        torch.manual_seed(0)
        net = UNet(1, None, 28, 16, (1, 2, 4), 1, (7,), 4, 0.0)
        x, t = torch.randn(bs, 1, 28, 28), torch.rand(bs) * 1000
        if channels_last:
            net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=fused)
        fn = torch.compile(net) if compiled else net

        def step() -> None:
            (fn(x, t) - x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        start = time.perf_counter()
        step()
        first = time.perf_counter() - start
        s = Timed.seconds(step, reps)
        print(f"  {name:<34} {bs / s:6.1f} images/s  (first step {first:.1f} s)", flush=True)

    print("candidates on the earlier demo UNet (16-32-64), fp32:")
    timed("eager, AdamW foreach")
    timed("AdamW fused", fused=True)
    timed("channels-last", channels_last=True)
    timed("batch 128", bs=128)
    timed("torch.compile (forward + backward)", compiled=True)


def layers(reps: int) -> None:
    """The three layers computed another way since 2026-12-04, each against its plain form at the demo UNet's shapes
    (batch 64, forward and backward, median of 5 rounds in this process)."""
    import torch.nn.functional as F
    from torch import nn

    from ddpmkit.nets.layers import PointwiseConv2d, SelfAttention, upsample_conv3x3

    def plain_attention(m: SelfAttention, x: torch.Tensor) -> torch.Tensor:  # the layer as it was: Conv1d, strided q/k/v
        B, C, H, W = x.shape
        qkv = F.conv1d(m.norm(x).reshape(B, C, H * W), m.qkv.weight, m.qkv.bias)
        q, k, v = qkv.reshape(B, 3, m.num_heads, C // m.num_heads, H * W).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(B, C, H * W)
        return x + F.conv1d(h, m.proj.weight, m.proj.bias).reshape(B, C, H, W)

    def ms(fn, x: torch.Tensor) -> float:
        out = fn(x)
        grad = torch.randn_like(out)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(reps):
                fn(x).backward(grad)
            times.append((time.perf_counter() - start) / reps * 1000)
        return statistics.median(times)

    torch.manual_seed(0)
    cases = []
    attn = SelfAttention(64, 4)
    cases.append(("self-attention, 64 ch at 7x7", torch.randn(64, 64, 7, 7, requires_grad=True),
                  lambda x: plain_attention(attn, x), attn))
    for cin, cout, size in [(40, 8, 28), (16, 8, 28), (96, 32, 14), (128, 64, 7)]:
        fast = PointwiseConv2d(cin, cout)
        cases.append((f"1x1 skip {cin}->{cout} at {size}x{size}", torch.randn(64, cin, size, size, requires_grad=True),
                      lambda x, f=fast: F.conv2d(x, f.weight, f.bias), fast))
    for ch, size in [(32, 14), (64, 7)]:
        conv = nn.Conv2d(ch, ch, 3, padding=1)
        cases.append((f"upsample + 3x3, {ch} ch {size}->{2 * size}", torch.randn(64, ch, size, size, requires_grad=True),
                      lambda x, c=conv: c(F.interpolate(x, scale_factor=2, mode="nearest")),
                      lambda x, c=conv: upsample_conv3x3(x, c.weight, c.bias)))
    print("the demo UNet's layers, plain form against the one ddpmkit computes (batch 64, forward + backward, fp32):")
    for name, x, plain, fast in cases:
        a, b = ms(plain, x), ms(fast, x)
        print(f"  {name:<32} plain {a:6.2f} ms   ddpmkit {b:6.2f} ms   x{a / b:.2f}", flush=True)
    if cpu_computes_bf16():
        bf16_layers(ms)


def bf16_layers(ms) -> None:
    """Under CPU bf16 autocast (where the CPU computes bf16): the narrow convolutions in channels-last against oneDNN's
    NCHW bf16 kernels, and attention written out against torch's fused kernel in bf16 and in fp32."""
    import torch.nn.functional as F

    from ddpmkit.nets.layers import Conv2d, attention

    def autocast(fn):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x).float()
        return run

    torch.manual_seed(0)
    cases = []
    for cin, cout, size in [(8, 8, 28), (40, 8, 28), (16, 8, 28), (8, 1, 28), (32, 32, 14)]:  # 32->32: not narrow, the same kernel
        conv = Conv2d(cin, cout, 3, padding=1)
        cases.append((f"3x3 conv {cin}->{cout} at {size}x{size}", torch.randn(64, cin, size, size, requires_grad=True),
                      autocast(lambda x, c=conv: F.conv2d(x, c.weight, c.bias, padding=1)), autocast(conv)))
    qkv = torch.randn(64, 49, 3 * 64, requires_grad=True)  # (B, L, 3C), as SelfAttention makes it

    def heads(x):
        return x.reshape(64, 49, 3, 4, 16).permute(2, 0, 3, 1, 4).unbind(0)  # q, k, v: (B, nh, L, hs), hs contiguous

    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        kernel = autocast(lambda x, d=dtype: F.scaled_dot_product_attention(*(t.to(d) for t in heads(x))))
        cases.append((f"attention, 4 heads at 7x7 ({label} kernel)", qkv, kernel, autocast(lambda x: attention(*heads(x)))))

    def fp32_softmax(x):  # ddpmkit's written-out form until 2026-12-05: the logits cast to fp32, scaled, cast back
        q, k, v = (t.to(torch.bfloat16) for t in heads(x))
        with torch.autocast("cpu", enabled=False):
            return ((q @ k.transpose(-1, -2)).float() * 16**-0.5).softmax(-1).to(torch.bfloat16) @ v

    cases.append(("attention, 4 heads at 7x7 (fp32 softmax)", qkv, autocast(fp32_softmax), autocast(lambda x: attention(*heads(x)))))
    print("under bf16 autocast (this CPU computes bf16), plain form against ddpmkit's (batch 64, forward + backward):")
    for name, x, plain, fast in cases:
        a, b = ms(plain, x), ms(fast, x)
        print(f"  {name:<40} plain {a:6.2f} ms   ddpmkit {b:6.2f} ms   x{a / b:.2f}", flush=True)


TRAINER_LOG_EVERY = 10  # steps per log window of the trainer runs that --against and --spin time


def trainer_images_per_s(src: Path, run_dir: Path, steps: int, precision: str, preset: str = "mnist", extra: tuple[str, ...] = (),
                         wait: dict[str, str] | None = None) -> float:
    """Median images/s of one `ddpmkit train PRESET` run of the code under src, from its log."""
    # each commit's code waits as its own ddpmkit/threads.py says, not as this process's does (unless `wait` says how)
    env = {**{k: v for k, v in os.environ.items() if k not in ddpmkit.threads.SET_HERE}, **(wait or {}), "PYTHONPATH": str(src)}
    subprocess.run([sys.executable, "-m", "ddpmkit.cli", "train", preset, f"train.run_dir={run_dir}", f"train.steps={steps}",
                    "train.max_minutes=0", f"train.log_every={TRAINER_LOG_EVERY}", "train.sample_every=0", "train.eval_every=0",
                    "train.checkpoint_every=0",
                    "train.warmup_steps=0", f"train.mixed_precision={precision}", *extra, "--quiet"], check=True, env=env, capture_output=True)
    rates = [e["examples_per_s"] for e in map(json.loads, (run_dir / "train_log.jsonl").read_text().splitlines()) if "examples_per_s" in e]
    return statistics.median(rates[1:])


def compare_with(ref: str, steps: int, rounds: int, precision: str, preset: str = "mnist") -> None:
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="throughput-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the runs go when the bench ends
    kind = f"{describe_cpu()}; train.mixed_precision={precision} (here: {resolve_precision(precision)})"
    print(f"CPU: {kind}", flush=True)
    subprocess.run(["git", "-C", str(root), "worktree", "add", "--detach", str(tmp / "before"), ref], check=True, capture_output=True)
    try:
        rates: dict[str, list[float]] = {"before": [], "after": []}
        per_rate: dict[str, list[float]] = {"before": [], "after": []}  # images/s per matmul GFLOP/s
        sources = [("before", tmp / "before" / "src"), ("after", root / "src")]
        for r in range(rounds):  # interleaved: machine noise hits both alike
            for name, src in in_turns(sources, r):
                matmul = matmul_gflops(torch.float32)
                rates[name].append(trainer_images_per_s(src, tmp / f"{name}{r}", steps, precision, preset))
                matmul = (matmul + matmul_gflops(torch.float32)) / 2  # this process's matmul rate around the run
                per_rate[name].append(rates[name][-1] / matmul)
                print(f"  round {r}: {name} {rates[name][-1]:.1f} images/s, matmul {matmul:.1f} GFLOP/s: "
                      f"{per_rate[name][-1]:.3f} images/s per matmul GFLOP/s", flush=True)
        for label, v in (("images/s", rates), ("images/s per matmul GFLOP/s", per_rate)):
            before, after = statistics.median(v["before"]), statistics.median(v["after"])
            paired = [a / b for a, b in zip(v["after"], v["before"])]
            print(f"`ddpmkit train {preset}` ({precision}, {cpu_kind()}), {steps} steps x {rounds} rounds, {label}: before ({ref}) {before:.3f}, "
                  f"after {after:.3f}, ratio {after / before:.3f} (per round: {' '.join(f'{r:.2f}' for r in paired)}; "
                  f"median {statistics.median(paired):.3f})")
        if preset == "mnist":
            print(f"issue 32's figure for the trainer at 32bebf1 on its machine: 90 images/s at 66.5 GFLOP/s = {90 / 66.5:.3f} "
                  f"images/s per matmul GFLOP/s; after / that = {statistics.median(per_rate['after']) / (90 / 66.5):.2f}")
    finally:
        subprocess.run(["git", "-C", str(root), "worktree", "remove", "--force", str(tmp / "before")], capture_output=True)


def distillation_cost(teacher: str, steps: int, rounds: int) -> None:
    """The distillation presets' whole runs against the demo's (their teacher's), from the whole trainer: alternating
    short runs in fresh processes, median images/s, times each preset's own train.steps."""
    from ddpmkit.config import load_config as config_of

    src, tmp = Path(__file__).resolve().parents[1] / "src", Path(tempfile.mkdtemp(prefix="distill-cost-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the runs go when the bench ends
    presets = ["mnist", "mnist_progressive", "mnist_progressive_guided", "mnist_consistency"]
    kept = Path(config_of("mnist_progressive_guided").distill.autoguide).name  # the demo's kept checkpoint, as the preset names it
    rates: dict[str, list[float]] = {p: [] for p in presets}
    for r in range(rounds):
        for preset in in_turns(presets, r):
            extra = (f"distill.teacher={teacher}", f"distill.autoguide={teacher}/{kept}") if preset == "mnist_progressive_guided" else \
                (f"distill.teacher={teacher}",) if preset != "mnist" else ()
            rates[preset].append(trainer_images_per_s(src, tmp / f"{preset}{r}", steps, "no", preset, extra))
    minutes = {p: config_of(p).train.steps * config_of(p).train.batch_size / statistics.median(v) / 60 for p, v in rates.items()}
    for p in presets:
        print(f"{p:<26} {statistics.median(rates[p]):6.1f} images/s (runs: {' '.join(f'{v:.1f}' for v in rates[p])}), "
              f"train.steps={config_of(p).train.steps}: ~{minutes[p]:.1f} min = {minutes[p] / minutes['mnist']:.2f}x the teacher's")


def blocks(reps: int, precision: str) -> None:
    """The demo UNet block by block: each block (and the input and output layers) timed alone, forward + backward, on
    the inputs it receives in one training step of the demo preset (batch 64), under the precision `auto` picks here
    (or the one given); the sum beside the whole step's time says how much lies between the blocks."""
    from ddpmkit.nets import layers as L

    bf16 = resolve_precision(precision) == "bf16"
    t = Timed("mnist", [])
    seen = []
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: seen.append((name, m, args, out)))
             for name, module in t.model.named_modules()
             if isinstance(module, (L.ResBlock, L.AttentionBlock, L.Upsample, L.Downsample)) or name.endswith(("input_conv", "out_conv"))]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        t.task.loss(t.model, t.batch())
    for hook in hooks:
        hook.remove()
    print(f"{describe_cpu()}; the demo UNet's blocks, forward + backward, batch 64, {'bf16 autocast' if bf16 else 'fp32'}:")
    total = 0.0
    for name, module, args, out in seen:
        inputs = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a for a in args]
        grad = torch.randn_like(out)

        def run(module=module, inputs=inputs, grad=grad):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = module(*inputs)
            y.backward(grad)

        ms = statistics.median(Timed.seconds(run, reps) for _ in range(3)) * 1000
        total += ms
        print(f"  {name.removeprefix('net.'):<22} {str(tuple(inputs[0].shape)):<18} -> {str(tuple(out.shape)):<18} {ms:6.2f} ms", flush=True)
    step = Timed.seconds(lambda: t.train_step(bf16=bf16), reps) * 1000
    print(f"  sum {total:.1f} ms; one whole training step {step:.1f} ms")


HEAP_CHILD = """
import resource, sys, time, types
if sys.argv[1] == "default":  # glibc's own thresholds: ddpmkit's package import then finds heap.py already loaded
    sys.modules["ddpmkit.heap"] = types.ModuleType("ddpmkit.heap")
sys.path.insert(0, sys.argv[3])
import train_throughput as tt
t = tt.Timed("mnist", [])
bf16 = tt.resolve_precision("auto") == "bf16"
for _ in range(3):
    t.train_step(bf16=bf16)
n, r0, start = int(sys.argv[2]), resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(n):
    t.train_step(bf16=bf16)
seconds, r1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
print(seconds / n * 1e3, (r1.ru_minflt - r0.ru_minflt) / n, (r1.ru_stime - r0.ru_stime) / n * 1e3)
"""


def spin_effect(steps: int, rounds: int, precision: str) -> None:
    """The whole trainer with ddpmkit's training spin against the brief one, alternating fresh processes."""
    src, tmp = Path(__file__).resolve().parents[1] / "src", Path(tempfile.mkdtemp(prefix="spin-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # the runs go when the bench ends
    waits = {"brief": ddpmkit.threads.SETTINGS, "training": ddpmkit.threads.TRAINING_SETTINGS}
    print(f"{describe_cpu()}; `ddpmkit train mnist`, {steps} steps, precision {precision} = {resolve_precision(precision)}:", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in waits}
    for r in range(rounds):
        for name in in_turns(list(waits), r):
            rates[name].append(trainer_images_per_s(src, tmp / f"{name}{r}", steps, precision, wait=waits[name]))
            print(f"  round {r}: {name:<8} (GOMP_SPINCOUNT={waits[name]['GOMP_SPINCOUNT']}) {rates[name][-1]:.1f} images/s", flush=True)
    paired = [t / b for t, b in zip(rates["training"], rates["brief"])]
    print(f"medians: brief {statistics.median(rates['brief']):.1f}, training {statistics.median(rates['training']):.1f} images/s; "
          f"training / brief x{statistics.median(paired):.3f} (per round: {' '.join(f'{x:.2f}' for x in paired)})")


def heap_effect(steps: int, rounds: int) -> None:
    """ddpmkit.heap's thresholds against glibc's defaults on the demo step, alternating fresh processes."""
    print(f"{describe_cpu()}; the demo's training step (precision auto = {resolve_precision('auto')}), {steps} steps per process:")
    got: dict[str, list[list[float]]] = {"default": [], "ddpmkit": []}
    for r in range(rounds):
        for name in in_turns(["default", "ddpmkit"], r):
            out = subprocess.run([sys.executable, "-c", HEAP_CHILD, name, str(steps), str(Path(__file__).parent)],
                                 check=True, capture_output=True, text=True).stdout.split()
            got[name].append([float(v) for v in out[-3:]])
            ms, faults, sys_ms = got[name][-1]
            print(f"  round {r}: {name:<8} {ms:6.1f} ms/step, {faults:6.0f} page faults/step, system time {sys_ms:5.2f} ms/step", flush=True)
    for name, rows in got.items():
        ms, faults, sys_ms = (statistics.median(col) for col in zip(*rows))
        print(f"{name:<8} medians: {ms:.1f} ms/step, {faults:.0f} page faults/step, system time {sys_ms:.2f} ms/step")
    paired = [d[0] / k[0] for d, k in zip(got["default"], got["ddpmkit"])]
    print(f"step speed, ddpmkit's thresholds / glibc's: x{statistics.median(paired):.3f} (per round: {' '.join(f'{x:.2f}' for x in paired)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=None, help="presets to time (default: the demo's and the others'; "
                   "--against: one, default mnist)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per preset, after one warm-up step (default 8; --against and --spin: 150 steps of the whole trainer, "
                        "--distillation 40, --heap 10)")
    p.add_argument("--autoencoder", default=None, help="an autoencoder run for the latent presets")
    p.add_argument("--clip", default=None, help="a CLIP run for the unCLIP presets")
    p.add_argument("--images", default=None, metavar="FOLDER", help="a folder of images for the images preset")
    p.add_argument("--overrides", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every timed preset")
    p.add_argument("--candidates", action="store_true", help="time fused AdamW, channels-last, batch 128 and torch.compile instead")
    p.add_argument("--layers", action="store_true", help="time the attention, 1x1 skip and upsampling layers against their plain forms")
    p.add_argument("--blocks", action="store_true", help="time each block of the demo UNet alone, forward + backward")
    p.add_argument("--heap", action="store_true", help="the demo step with ddpmkit's malloc thresholds against glibc's defaults")
    p.add_argument("--spin", action="store_true", help="the whole trainer with a training run's OpenMP spin against the brief one")
    p.add_argument("--against", default=None, help="a git ref: compare the whole trainer with the one at that ref")
    p.add_argument("--rounds", type=int, default=None, help="rounds for --against (default 3) and the interleaved demo ratio (default 9)")
    p.add_argument("--precision", default="auto", choices=["auto", "no", "bf16"],
                   help="train.mixed_precision for --against and --blocks (default auto, what `make demo` does; under the AVX2 caps "
                        "give `no` to --against: older trainers do not see the caps and would pick an emulated bf16)")
    p.add_argument("--distillation", default=None, metavar="TEACHER",
                   help="a demo run (with its step-250 checkpoint): the distillation presets' training time against the teacher's")
    args = p.parse_args()
    if (args.against or args.spin) and args.steps is not None and args.steps < 3 * TRAINER_LOG_EVERY:
        p.error(f"--steps {args.steps}: the whole trainer's images/s come from its log, every {TRAINER_LOG_EVERY} steps, "
                f"the first window being warm-up; give --steps >= {3 * TRAINER_LOG_EVERY} (default 150)")
    if args.distillation:
        return distillation_cost(args.distillation, args.steps or 40, args.rounds or 2)
    if args.heap:
        return heap_effect(args.steps or 10, args.rounds or 4)
    if args.spin:
        return spin_effect(args.steps or 150, args.rounds or 6, args.precision)
    if args.against:
        if args.presets and len(args.presets) != 1:
            p.error("--against times one preset's whole trainer: give one --presets NAME (default mnist)")
        return compare_with(args.against, args.steps or 150, args.rounds or 3, args.precision, (args.presets or ["mnist"])[0])
    args.presets = args.presets or DEFAULT_PRESETS
    args.steps = args.steps or 8
    if args.candidates:
        return candidates(args.steps)
    if args.layers:
        return layers(args.steps)
    if args.blocks:
        return blocks(args.steps, args.precision)
    fp32 = matmul_gflops(torch.float32)
    bf16 = matmul_gflops(torch.bfloat16) if cpu_computes_bf16() else None
    print(f"{describe_cpu()}; 2048^2 matmul: fp32 {fp32:.1f} GFLOP/s"
          + (f", bf16 {bf16:.1f} GFLOP/s" if bf16 else " (no native bf16: bf16 autocast not timed)"))
    per_rate = {}
    for preset in args.presets:
        overrides = ["train.mixed_precision=no", *VARIANTS.get(preset, [])]
        if args.autoencoder and preset.startswith("mnist_latent"):
            overrides.append(f"data.autoencoder={args.autoencoder}")
        if args.clip and preset.startswith("unclip"):
            overrides.append(f"unclip.clip={args.clip}")
        if args.images and preset == "images":
            overrides.append(f"data.path={args.images}")
        overrides += args.overrides
        per_rate[preset] = report(preset, overrides, args.steps, fp32, bf16)
    if per_rate.get("mnist") and per_rate.get("mnist_2023"):
        print(f"demo network, images/s per matmul GFLOP/s: {per_rate['mnist']:.3f} against {per_rate['mnist_2023']:.3f} for the earlier "
              f"one: x{per_rate['mnist'] / per_rate['mnist_2023']:.2f} (target >= 1.3)")
        interleaved_ratio(args.rounds or 9, 4, [name for name in args.presets if name in ("mnist", *VARIANTS) and name != "mnist_2023"])


if __name__ == "__main__":
    main()
