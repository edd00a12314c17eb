"""Every GPU figure of the project in one run, on whatever device is here (CUDA, then MPS, then the CPU):

    .venv/bin/python bench/gpu.py [--out gpu.json] [--rounds 5]     # the real measures (minutes on an H200)
    .venv/bin/python bench/gpu.py --tiny                            # every part at toy sizes, in seconds (the tests run it)

1. the demo preset's whole trainer (`ddpmkit train mnist`, 1,600 steps): steps/s, images/s and wall time, then the
   demo's grid (500 digits, 16 autoguided DDIM steps) for the demo's wall time end to end; then ("demo-graphed") the
   trainer again with train.compile = "cuda-graph" (forward and backward replayed as CUDA graphs; CUDA only);
2. sampling the demo model: 500 digits x 1,000 ancestral steps (Algorithm 2) in one chunk on the device, the network
   eager, captured as CUDA graphs (--compile cuda-graph) and torch.compile'd (reduce-overhead), fp32 and auto;
3. the engine's per-step overhead: the trainer's step (ddpmkit.train.engine: learning rate, accelerate, loss gather,
   gradient norm, the NaN guard's flags, EMA, the once-per-window read-back) against a minimal PyTorch loop of the same
   network, loss and batches (forward, backward, fused AdamW) in this process, alternating rounds, at batch 1 (where
   the network's work is negligible) and at the preset's batch, where torch.profiler also counts the step's kernel
   launches and its device time, and a dispatch mode the ops that compute in the network's forward, in the backward
   and in the rest of the step (what stays eager under train.compile = "cuda-graph");
4. DDPM's CIFAR-10 UNet (128-256-256-256 channels, 2 blocks per level, attention at 16x16) built by ddpmkit and by
   diffusers' UNet2DModel, in this process, alternating rounds, medians: a training step (MSE + AdamW) in fp32/TF32 and
   in bf16 autocast at batch 128, and the bf16 forward at batch 512, eager and torch.compile'd; images/s, TFLOP/s
   (torch.utils.flop_counter's count) and the fraction of this device's own bf16 matrix-product rate, measured here;
   ddpmkit's network also in channels-last memory (weights and input), eager, as a candidate for the bf16 step, and
   with its norms as CUDA autocast runs nn.GroupNorm (fp32 in and out; "autocast-norms", the form before
   layers.GroupNorm kept bf16); then torch.profiler's table of each eager bf16 step (the 15 ops with the most device
   time) to see where it goes;
5. the GPU digit recipe (`ddpmkit train mnist_gpu`, with train.compile = "cuda-graph" on CUDA): its training's wall
   time, then 500 samples judged by bench/digits_quality.py: the share judged p >= 0.9 (target >= 95%) with
   DPM-Solver++(2M) in 20 steps (as the preset suggests) and with 1,000 ancestral steps (digits_quality.py's default),
   each unguided and autoguided by the step-1,000 checkpoint the preset keeps (w = 1.5, the demo's);
6. the nearest-2x + 3x3 upsampling's forms at the CIFAR-10 UNet's sizes, forward + backward in bf16 autocast and fp32:
   the 2x2 phases ddpmkit computes, one stride-2 transposed convolution with a 4x4 kernel (the same map), and the plain
   interpolate-then-convolve: which one a GPU wants;
7. ("images") the images preset's trainer (one's own photos: 64x64 RGB, a 19.4M-parameter UNet) for 200 steps on a
   folder of random photos made here: images/s, and the minutes its 40,000 steps take at that rate;
8. ("demo-compiled") the demo preset's trainer again with train.compile = "reduce-overhead": with the compile, and the
   steps alone.

Figures go to stdout and, with --out, to a JSON file, rewritten after each part (a run cut short keeps the parts
it finished). With --deadline S the parts should be done S seconds after the start (a lent GPU's call has a time
limit): a part that would start later is skipped, and mnist_gpu's training stops in time for its judgings.
Name the device beside every figure you quote: the first line says which it is.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ddpmkit.threads  # noqa: F401 -- before torch: OpenMP threads wait passively beside other processes

# isort: split
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from ddpmkit.config import load_config
from ddpmkit.devices import default_device, describe_device
from ddpmkit.nets.layers import GroupNorm
from ddpmkit.nets.unet import UNet


def last_line(e: BaseException) -> str:
    """An error's last line: what a failed part prints in the log (the whole error goes to gpu.json)."""
    text = str(e).strip()
    return text.splitlines()[-1] if text else repr(e)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Seconds per call of fn, after one warm-up call, with the device drained before and after."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / reps


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / seconds(lambda: a @ b, device, reps) / 1e12


# --tiny: the demo preset at toy size
TINY_DEMO = ["train.steps=6", "train.log_every=2", "train.eval_every=0", "train.batch_size=8", "data.name=digits", "network.base_channels=8",
             "network.channel_mult=1,2", "network.attention_resolutions=4"]


def demo_trainer(device: torch.device, tiny: bool, results: dict) -> Path:
    """The demo preset's whole trainer on the device, then its grid: the wall time of `ddpmkit demo`."""
    from ddpmkit.cli.train import draw_demo
    from ddpmkit.train import train

    run_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-demo-"))
    extra = [*TINY_DEMO, "train.keep_steps=3", "train.checkpoint_every=3", "train.sample_every=0"] if tiny else ["train.log_every=100"]
    cfg = load_config("mnist", [f"train.run_dir={run_dir}", *extra])
    start = time.perf_counter()
    train(cfg, progress=False)
    trained = time.perf_counter() - start
    n = 4 if tiny else 500
    draw_demo(run_dir, cfg.train.keep_steps, n, "ddim_uniform", 2 if tiny else 16, 1.5)
    total = time.perf_counter() - start
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    rates = [e["examples_per_s"] for e in log if "examples_per_s" in e][1:] or [float("nan")]
    steps = cfg.train.steps
    results["demo"] = {"steps": steps, "train_s": trained, "steps_per_s": steps / trained, "images_per_s_median_window": statistics.median(rates),
                       "demo_wall_s": total, "grid_n": n, "precision": log[-1].get("precision")}
    print(f"demo trainer: {steps} steps in {trained:.1f} s = {steps / trained:.1f} steps/s, {statistics.median(rates):.0f} images/s "
          f"(median log window; {log[-1].get('precision')}); with the grid of {n}: {total:.1f} s end to end", flush=True)
    return run_dir


def sampling(run_dir: Path, device: torch.device, tiny: bool, compiled: bool, results: dict) -> None:
    """Algorithm 2 over all T steps for 500 digits in one chunk, on the device: the network eager, captured as CUDA
    graphs (--compile cuda-graph, on a GPU) and torch.compile'd with CUDA graphs (reduce-overhead), in fp32 and in the
    precision "auto" picks. A first call of 3 steps at the same batch does the one-off work (cuDNN's choices, the
    capture, the compile); its time is reported beside the timed run's."""
    from ddpmkit.models import load_diffusion
    from ddpmkit.pipelines.generate import generate

    n, steps = (4, 3) if tiny else (500, 1000)
    modes = [("fp32", None), ("auto", None)]
    modes += [("fp32", "cuda-graph"), ("auto", "cuda-graph")] if device.type == "cuda" else []
    modes += [("auto", "reduce-overhead")] if compiled else []
    for precision, mode in modes:
        label = precision if mode is None else f"{precision}, {mode}"
        m = load_diffusion(run_dir, device=device)
        try:
            if mode:
                m.compile(mode)
            start = time.perf_counter()
            generate(m, n, sampler="ddpm", steps=3, batch_size=n, progress=False, device=device, precision=precision)
            sync(device)
            first = time.perf_counter() - start
            start = time.perf_counter()
            generate(m, n, sampler="ddpm", steps=steps, batch_size=n, progress=False, device=device, precision=precision)
            sync(device)
            s = time.perf_counter() - start
        except RuntimeError as e:  # a compile that fails on this GPU is a finding too: the other modes go on
            results.setdefault("sampling", {})[label] = {"error": repr(e)[-2000:]}
            print(f"ancestral sampling ({label}): failed: {last_line(e)}", flush=True)
            continue
        results.setdefault("sampling", {})[label] = {"n": n, "steps": steps, "s": s, "ms_per_step": 1000 * s / steps, "first_call_s": first}
        print(f"ancestral sampling ({label}): {n} digits x {steps} steps in {s:.2f} s ({1000 * s / steps:.2f} ms per step, one chunk; "
              f"first call of 3 steps {first:.1f} s)", flush=True)


def demo_variant(device: torch.device, tiny: bool, mode: str, results: dict, keep: bool = False) -> Path | None:
    """The demo preset's trainer with train.compile = mode: "cuda-graph" (the network's forward and backward captured as
    CUDA graphs, no compile; CUDA only) or "reduce-overhead" (torch.compile with CUDA graphs on a GPU). The wall time
    with the capture or compile, and the steps' own rate (median log window after the first). --tiny leaves the compile
    out (minutes on a CPU), to keep the rest of the part runnable in the tests. keep: return the run's folder (its final
    checkpoint is the demo model, for the sampling part) instead of removing it; None when the part did not run."""
    import warnings

    from ddpmkit.train import train

    key = f"demo {mode}"
    if mode == "cuda-graph" and device.type != "cuda":
        results[key] = {"skipped": f"needs CUDA, the device is {device.type}"}
        print(f"demo trainer, train.compile={mode}: skipped (needs CUDA; the device is {device.type})", flush=True)
        return None
    run_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-demo-variant-"))
    mode = "no" if tiny and mode == "reduce-overhead" else mode
    cfg = load_config("mnist", [f"train.run_dir={run_dir}", f"train.compile={mode}", "train.sample_every=0", "train.keep_steps=",
                                "train.checkpoint_every=0", *(TINY_DEMO if tiny else ["train.log_every=100"])])
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            train(cfg, progress=False)
    except RuntimeError as e:  # the compile failing on this GPU is the finding
        results[key] = {"error": repr(e)[-2000:]}
        print(f"demo trainer, train.compile={mode}: failed: {last_line(e)}", flush=True)
        return None
    total = time.perf_counter() - start
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    rates = [e["examples_per_s"] for e in log if "examples_per_s" in e][1:] or [float("nan")]
    steps, rate = cfg.train.steps, statistics.median(rates)
    eager = [str(w.message) for w in said if "running it eagerly" in str(w.message)]  # a capture that failed: say so
    calls = log[-1].get("cuda_graph", {})  # the engine's count of the network's calls: replayed, eager, captured
    results[key] = {"steps": steps, "train_s_with_compile": total, "images_per_s_median_window": rate, "cuda_graph_calls": calls,
                    "steps_s_at_that_rate": steps * cfg.train.batch_size / rate, "fell_back": eager,
                    "loss_last": next((e["loss"] for e in reversed(log) if "loss" in e), None)}
    print(f"demo trainer, train.compile={mode}: {steps} steps in {total:.1f} s with the {'capture' if mode == 'cuda-graph' else 'compile'}; "
          f"{rate:.0f} images/s (median log window after the first) = {steps * cfg.train.batch_size / rate:.1f} s for the steps alone"
          f"{'; calls ' + ', '.join(f'{k} {v}' for k, v in calls.items()) if calls else ''}"
          f"{'; FELL BACK TO EAGER: ' + eager[0] if eager else ''}", flush=True)
    if keep:
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    return None


def images_preset(device: torch.device, tiny: bool, results: dict) -> None:
    """The images preset's whole trainer (one's own photos: 64x64 RGB, flips, a 19.4M-parameter UNet, bf16 where the
    device has it) for 200 steps on a folder of random photos made here: its images/s (median log window after the
    first) and the minutes its 40,000 steps take at that rate."""
    from ddpmkit.train import train

    root = Path(tempfile.mkdtemp(prefix="gpu-bench-images-"))
    (root / "photos").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(64):  # the data's content does not change the step's work
        Image.fromarray(torch.randint(0, 256, (80, 96, 3), dtype=torch.uint8, generator=g).numpy()).save(root / "photos" / f"{i}.png")
    extra = (["data.image_size=16", "network.base_channels=8", "train.batch_size=4", "train.steps=6", "train.log_every=2"] if tiny
             else ["train.steps=200", "train.log_every=50"])
    cfg = load_config("images", [f"data.path={root / 'photos'}", f"train.run_dir={root / 'run'}", "train.sample_every=0", "train.eval_every=0",
                                 "train.checkpoint_every=0", "train.keep_steps=", *extra])
    start = time.perf_counter()
    try:
        train(cfg, progress=False)
        total = time.perf_counter() - start
        log = [json.loads(line) for line in (root / "run" / "train_log.jsonl").read_text().splitlines()]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    rate = statistics.median([e["examples_per_s"] for e in log if "examples_per_s" in e][1:] or [float("nan")])
    full = load_config("images").train
    minutes = full.steps * full.batch_size / rate / 60
    results["images"] = {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "train_s": total, "images_per_s_median_window": rate,
                         "precision": log[-1].get("precision"), "preset_steps": full.steps, "preset_minutes_at_that_rate": minutes}
    print(f"images preset: {cfg.train.steps} steps of {cfg.train.batch_size} in {total:.1f} s, {rate:,.0f} images/s (median log window "
          f"after the first; {log[-1].get('precision')}): its {full.steps:,} steps of {full.batch_size} take {minutes:.1f} min at that rate",
          flush=True)


# how bench/gpu.py judges mnist_gpu's 500 samples, in this order (the cheapest first: a call cut short keeps them):
# (the figures' key, sampler, steps, autoguided by the recipe's early checkpoint); DPM-Solver++(2M) in 20 steps is what
# a user samples with, 1,000 ancestral steps bench/digits_quality.py's default (Algorithm 2)
JUDGINGS = [("dpmpp_2m", "dpmpp_2m", 20, False), ("autoguided", "dpmpp_2m", 20, True),
            ("ancestral", "ddpm", None, False), ("ancestral autoguided", "ddpm", None, True)]


# what mnist_gpu's four judgings are given under --deadline: four runs of bench/digits_quality.py, each starting torch
# and its judge, the two ancestral ones 1,000 network calls of 500 digits (about 6 ms each for 4.1M parameters at
# 100 TFLOP/s, twice that autoguided); an estimate until a GPU has timed them (gpu.json's judgings give their seconds)
JUDGING_RESERVE_S = 120.0
MIN_TRAINING_S = 30.0  # however late the part starts: a pace to report


def gpu_preset(device: torch.device, tiny: bool, results: dict, keep: Callable[[], None] = lambda: None,
               time_left: Callable[[], float] = lambda: math.inf) -> None:
    """`ddpmkit train mnist_gpu` on the device, then bench/digits_quality.py on its EMA weights, each way JUDGINGS names.
    --tiny: a toy network, and the first two judgings on 20 samples in 2 steps where a judge is cached (the carried one
    in bench/gpu_rehearsal.sh: the judging path as the GPU runs it; none is trained here). `keep` saves the figures.
    `time_left` (--deadline): the training stops early enough (train.max_minutes) to leave JUDGING_RESERVE_S for the
    judgings, and a judging that would start past the deadline is skipped, so that a call's time limit never costs
    the figures of a run that took longer than planned: its pace, and the quality of the weights it reached."""
    from ddpmkit.checkpoint import list_checkpoints
    from ddpmkit.evaluate.cached_judge import judge_dir
    from ddpmkit.train import train

    run_dir = Path(tempfile.mkdtemp(prefix="gpu-bench-preset-"))
    extra = ["train.steps=4", "train.batch_size=8", "train.warmup_steps=1", "train.keep_steps=[2]", "train.checkpoint_every=0", "train.log_every=1",
             "train.sample_every=0", "network.base_channels=8", "network.channel_mult=1,2", "network.num_res_blocks=1",
             "network.attention_resolutions=14"] if tiny else []
    graphed = device.type == "cuda"  # the recipe as docs/gpu.md gives it for a CUDA GPU: train.compile = "cuda-graph"
    if math.isfinite(budget := time_left() - JUDGING_RESERVE_S):
        extra.append(f"train.max_minutes={max(budget, MIN_TRAINING_S) / 60!r}")
    cfg = load_config("mnist_gpu", [f"train.run_dir={run_dir}", *extra, *(["train.compile=cuda-graph"] if graphed else [])])
    start = time.perf_counter()
    train(cfg, progress=False)
    trained = time.perf_counter() - start
    done = final_step(run_dir)
    results["mnist_gpu"] = figures = {"steps": cfg.train.steps, "steps_done": done, "batch_size": cfg.train.batch_size,
                                      "train_s": trained, "compile": cfg.train.compile, "judged": {}}
    said = f"{cfg.train.steps} steps of {cfg.train.batch_size} in {trained:.1f} s"
    if done < cfg.train.steps:  # train.max_minutes stopped it: its pace, and what the whole run would take at that pace
        figures["whole_run_s"] = trained * cfg.train.steps / max(done, 1)
        said = (f"stopped by --deadline at step {done} of {cfg.train.steps} (of {cfg.train.batch_size}) after {trained:.1f} s: "
                f"the whole run about {figures['whole_run_s']:.0f} s at that pace; its weights so far are judged")
    print(f"mnist_gpu (train.compile={cfg.train.compile}): {said}", flush=True)
    keep()
    weaker = run_dir / f"ckpt-{cfg.train.keep_steps[0]:07d}" if cfg.train.keep_steps else None
    judgings, n = JUDGINGS, 500
    if tiny:
        judgings, n = [(key, sampler, 2, guided) for key, sampler, _, guided in JUDGINGS[:2]] if list_checkpoints(judge_dir()) else [], 20
    for key, sampler, steps, guided in judgings:
        if guided and (weaker is None or not weaker.is_dir()):
            continue  # the recipe keeps an early checkpoint for autoguidance, as the demo does
        if time_left() <= 0:
            figures["judged"][key] = {"skipped": "past --deadline"}
            print(f"mnist_gpu: judging {key}: skipped (past --deadline)", flush=True)
            continue
        figures["judged"][key], said = judge_samples(run_dir, device, sampler, steps, weaker if guided else None, n=n)
        print(f"mnist_gpu: {said}", flush=True)
        keep()
    shutil.rmtree(run_dir, ignore_errors=True)


def final_step(run_dir: Path) -> int:
    """The step a run stopped at: its train_log.jsonl's last "done" line."""
    entries = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    return max(e["step"] for e in entries if e.get("done"))


def judge_samples(run_dir: Path, device: torch.device, sampler: str, steps: int | None, autoguide: Path | None = None,
                  scale: float = 1.5, n: int = 500) -> tuple[dict, str]:
    """bench/digits_quality.py on a run: n samples by `sampler` in `steps` (None: all T), judged; with `autoguide`,
    guided by that weaker checkpoint at w = scale (the demo's w). (figures, a line)."""
    out = run_dir / f"quality-{sampler}{'-autoguided' if autoguide else ''}"
    guided = ["--autoguide", str(autoguide), "--autoguide-scale", f"{scale:g}"] if autoguide else []
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("digits_quality.py")), "--checkpoint", str(run_dir), "--n", str(n),
                           "--sampler", sampler, *(["--steps", str(steps)] if steps else []), "--device", str(device),
                           "--out", str(out), *guided], capture_output=True, text=True)
    reports = sorted(out.glob("report_*.json"))
    if not reports:  # a failure is a figure too: keep its last lines, and go on with the other parts
        error = (done.stderr or done.stdout)[-2000:]
        return {"judge_error": error}, f"judging failed (exit {done.returncode}): {(error.strip().splitlines() or [''])[-1]}"
    report = json.loads(reports[0].read_text())
    figures = {k: report[k] for k in ("confident_fraction", "judge_fd", "nfe", "n", "seconds", "judge_test_accuracy",
                                      "real_confident_fraction", "copied_fraction", "real_copied_fraction", "class_shares", "classes_even")}
    figures["how"] = how = (f"{'DPM-Solver++(2M)' if sampler == 'dpmpp_2m' else sampler}, {report['nfe']} NFE" +
                            (f", autoguided by {autoguide.name} at w = {scale:g}" if autoguide else ""))
    return figures, (f"{report['n']} samples ({how}) judged p >= 0.9: {report['confident_fraction']:.1%} (target >= 95%), "
                     f"judge-FD {report['judge_fd']:.2f}, copies of a training digit {report['copied_fraction']:.1%}, {report['seconds']:.0f} s")


def engine_overhead(device: torch.device, tiny: bool, rounds: int, results: dict) -> None:
    """ms per training step of the engine's loop and of a minimal loop of the same network (same init, loss, batches,
    precision, fused AdamW), alternating rounds on the same device; the difference is what the engine adds per step."""
    for bs in (1, 4 if tiny else 64):
        if not overhead_at(bs, device, tiny, rounds, results):
            return


def overhead_at(bs: int, device: torch.device, tiny: bool, rounds: int, results: dict) -> bool:
    """engine_overhead at one batch size; False when the engine trains elsewhere than `device`."""
    from ddpmkit.train import TASKS, step_batch
    from ddpmkit.train.engine import Trainer

    small = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=4"] if tiny else []
    run_dir = tempfile.mkdtemp(prefix="gpu-bench-overhead-")  # the log the engine writes; removed after
    cfg = load_config("mnist", [f"train.run_dir={run_dir}", f"train.batch_size={bs}", "train.steps=1000000", "train.sample_every=0",
                                "train.eval_every=0", "train.checkpoint_every=0", "train.keep_steps=", "train.warmup_steps=0", *small])
    trainer = Trainer(TASKS[cfg.train.task](cfg), cfg, progress=False)
    trainer.start()
    if trainer.accelerator.device.type != device.type:  # (accelerate names the index: cuda:0)
        print(f"engine overhead: skipped (the engine trains on {trainer.accelerator.device}, not {device})")
        return False

    def engine_step() -> None:  # one turn of ddpmkit.train.engine.run's loop
        trainer.budget.tick()
        trainer.train_step(trainer.next_batch())
        trainer.periodic()

    task = TASKS[cfg.train.task](cfg)
    torch.manual_seed(cfg.train.seed)
    model = task.build_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, fused=device.type != "mps")
    bf16, step, seed = trainer.precision == "bf16", [0], cfg.train.seed

    def plain_step() -> None:
        batch = step_batch(seed, step[0], bs, task.num_examples, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = task.loss(model, batch).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1

    reps = 2 if tiny else 30
    times: dict[str, list[float]] = {"engine": [], "plain": []}
    for _ in range(rounds):
        times["engine"].append(1000 * seconds(engine_step, device, reps))
        times["plain"].append(1000 * seconds(plain_step, device, reps))
    if bs > 1:  # the preset's batch: how many kernels a step launches, and how much of the step the device is busy
        profile_step(engine_step, device, f"demo UNet, the engine's step at batch {bs}", results, calls=1 if tiny else 3)
        ops_by_phase(trainer, engine_step, results)
    trainer.log.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    engine, plain = statistics.median(times["engine"]), statistics.median(times["plain"])
    results.setdefault("overhead", {})[f"batch {bs}"] = {"engine_ms": engine, "plain_ms": plain, "rounds": times, "precision": trainer.precision}
    print(f"engine overhead, batch {bs} ({trainer.precision}): engine {engine:.2f} ms/step, minimal loop {plain:.2f} ms/step: "
          f"{engine - plain:+.2f} ms ({engine / plain - 1:+.1%})", flush=True)
    return True


class _Ops(TorchDispatchMode):
    """Counts the aten ops that compute (not the views) by phase: set .phase from outside."""

    VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "unsqueeze", "squeeze", "slice", "select", "as_strided",
             "alias", "detach", "unbind", "split", "split_with_sizes", "_reshape_alias", "lift_fresh", "unflatten"}

    def __init__(self):
        super().__init__()
        self.phase, self.counts = "rest", {"forward": 0, "backward": 0, "rest": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in self.VIEWS:
            self.counts[self.phase] += 1
        return func(*args, **(kwargs or {}))


def ops_by_phase(trainer, engine_step: Callable[[], None], results: dict) -> None:
    """The ops of one engine step that compute, in the network's forward, in the backward and the rest (batch, loss, NaN
    guard, clipping, optimizer, EMA): with train.compile = "cuda-graph" the first two are two graph replays and the
    rest stays one launch per op."""
    ops = _Ops()
    net = trainer.raw
    hooks = [net.register_forward_pre_hook(lambda *_: setattr(ops, "phase", "forward")),
             net.register_forward_hook(lambda *_: setattr(ops, "phase", "rest"))]
    backward = trainer.accelerator.backward

    def counted_backward(loss, **kwargs):
        ops.phase = "backward"
        backward(loss, **kwargs)
        ops.phase = "rest"

    trainer.accelerator.backward = counted_backward
    try:
        with ops:
            engine_step()
    finally:
        trainer.accelerator.backward = backward
        for hook in hooks:
            hook.remove()
    results.setdefault("overhead", {})["ops_per_step"] = ops.counts
    print(f"engine step's ops that compute ({trainer.precision}): network forward {ops.counts['forward']}, backward "
          f"{ops.counts['backward']}, the rest {ops.counts['rest']} (eager even with train.compile = cuda-graph)", flush=True)


def cifar_unets(tiny: bool) -> dict[str, Callable[[], torch.nn.Module]]:
    """DDPM's CIFAR-10 UNet as ddpmkit builds it and as diffusers' UNet2DModel does (same widths and levels)."""
    ch, mult = (8, (1, 2)) if tiny else (128, (1, 2, 2, 2))

    def ours() -> torch.nn.Module:
        return UNet(3, None, 32, ch, mult, 2 if not tiny else 1, (16,), num_heads=1, dropout=0.1)

    def theirs() -> torch.nn.Module:
        from diffusers import UNet2DModel

        widths = tuple(ch * m for m in mult)
        down = tuple("AttnDownBlock2D" if 32 // 2**i == 16 else "DownBlock2D" for i in range(len(mult)))
        up = tuple("AttnUpBlock2D" if 32 // 2 ** (len(mult) - 1 - i) == 16 else "UpBlock2D" for i in range(len(mult)))
        return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=widths, layers_per_block=2 if not tiny else 1,
                           down_block_types=down, up_block_types=up, dropout=0.1, attention_head_dim=None, norm_num_groups=min(32, ch))

    return {"ddpmkit": ours, "diffusers": theirs}


def wrap(name: str, net: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """net(x, t) -> the prediction, for either library (diffusers hands back an output object)."""
    return (lambda x, t: net(x, t).sample) if name == "diffusers" else net


def unet_modes(device: torch.device, tiny: bool, rounds: int, compiled: bool, results: dict, bf16_rate: float,
               all_compiles: bool = True, keep: Callable[[], None] = lambda: None) -> None:
    """The CIFAR-10 UNets' modes (module docstring, 4.), each case's medians saved (`keep`) as soon as it is timed, the
    eager forms before the compiled ones: a call cut short during a compile keeps every eager figure."""
    batch_train, batch_fwd = (2, 4) if tiny else (128, 512)
    dev = device.type
    rows: dict[tuple[str, str], list[float]] = {}
    flops: dict[tuple[str, str], float] = {}
    cases = []
    forms = [(name, build, form) for name, build in cifar_unets(tiny).items()
             for form in (["", " channels-last", " autocast-norms"] if name == "ddpmkit" else [""])]
    for name, build, form in forms:
        layout = torch.channels_last if "channels-last" in form else torch.contiguous_format
        net = build().to(device, memory_format=layout)
        if "autocast-norms" in form:  # the norms as CUDA autocast runs nn.GroupNorm (fp32 in and out): ddpmkit before layers.GroupNorm
            for m in net.modules():
                if isinstance(m, GroupNorm):
                    m.__class__ = torch.nn.GroupNorm
        params = sum(p.numel() for p in net.parameters()) / 1e6
        results.setdefault("cifar_params_M", {})[name] = params
        # compiled: each library's plain form and ddpmkit's channels-last one; with --quick (all_compiles False) only
        # ddpmkit's plain form's bf16 training step, the acceptance's figure (each other compile costs a GPU minute or so)
        compile_this = not form or (form == " channels-last" and all_compiles)
        for comp in ([False, True] if compiled and compile_this and (all_compiles or name == "ddpmkit") else [False]):
            fn = wrap(name, torch.compile(net) if comp else net)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type != "mps")
            x = torch.randn(batch_train, 3, 32, 32, device=device).contiguous(memory_format=layout)
            xf = torch.randn(batch_fwd, 3, 32, 32, device=device).contiguous(memory_format=layout)
            t, tf = (torch.randint(0, 1000, (n,), device=device).float() for n in (batch_train, batch_fwd))

            def train_step(fn=fn, opt=opt, x=x, t=t, bf16=False) -> None:
                with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
                    loss = F.mse_loss(fn(x, t).float(), x)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            @torch.no_grad()
            def forward(fn=fn, x=xf, t=tf) -> None:
                with torch.autocast(dev, dtype=torch.bfloat16):
                    fn(x, t)

            tag = f"{name}{form}{' compiled' if comp else ''}"
            cases.append(((tag, "train bf16"), lambda f=train_step: f(bf16=True), batch_train))
            if comp and not all_compiles:
                continue
            cases.append(((tag, "forward bf16"), forward, batch_fwd))
            if "autocast-norms" not in form:  # that form differs from the first only under autocast
                cases.append(((tag, "train fp32/TF32"), train_step, batch_train))
    for key, fn, _ in cases:  # FLOPs of eager forms (compiled graphs do the same arithmetic)
        base = (key[0].split()[0], key[1])
        if base not in flops:
            with FlopCounterMode(display=False) as counter:
                fn()
            flops[base] = counter.get_total_flops()
    reps = 1 if tiny else 10
    out = results.setdefault("cifar", {})

    def record(tag: str, mode: str, say: bool = False) -> None:  # the case's median so far into the results
        ips = statistics.median(rates := rows[(tag, mode)])
        per_image = flops[(tag.split()[0], mode)] / (batch_train if mode.startswith("train") else batch_fwd)
        achieved = ips * per_image / 1e12
        out[f"{tag} / {mode}"] = {"images_per_s": ips, "tflops": achieved, "of_bf16_matmul": achieved / bf16_rate, "rounds": rates}
        if say:
            print(f"CIFAR-10 UNet {tag:<24} {mode:<16} {ips:9.1f} images/s  {achieved:7.2f} TFLOP/s = {achieved / bf16_rate:5.1%} of bf16 matmul",
                  flush=True)

    cases.sort(key=lambda case: "compiled" in case[0][0])  # (stable) the eager forms first
    failed = set()
    for r in range(rounds):  # alternating rounds: drift hits every form alike
        for key, fn, batch in cases:
            if key in failed:
                continue
            if r == 0:  # the first call compiles a compiled form; one that fails on this GPU is reported, the rest go on
                try:
                    fn()
                except RuntimeError as e:
                    failed.add(key)
                    results.setdefault("cifar_errors", {})[" / ".join(key)] = repr(e)[-2000:]
                    print(f"CIFAR-10 UNet {' / '.join(key)}: failed: {last_line(e)}", flush=True)
                    continue
            rows.setdefault(key, []).append(batch / seconds(fn, device, reps))
            record(*key)
            keep()
    for tag, mode in rows:
        record(tag, mode, say=True)
    cases = [case for case in cases if case[0] not in failed]
    for comp in (["", " compiled"] if compiled else [""]):
        for mode in ("train fp32/TF32", "train bf16", "forward bf16"):
            a, b = out.get(f"ddpmkit{comp} / {mode}"), out.get(f"diffusers{comp} / {mode}")
            if a and b:
                print(f"  ddpmkit{comp} / diffusers{comp}, {mode}: x{a['images_per_s'] / b['images_per_s']:.2f}")
    ours = [row for key, row in out.items() if key.startswith("ddpmkit") and key.endswith("/ train bf16")]
    ours_bf16 = max(ours, key=lambda row: row["images_per_s"]) if ours else None
    theirs_bf16 = out.get("diffusers / train bf16")
    if ours_bf16 and theirs_bf16:
        bf16_over_tf32 = out["ddpmkit / train bf16"]["images_per_s"] / out["ddpmkit / train fp32/TF32"]["images_per_s"]
        print(f"  ddpmkit's best bf16 train step / diffusers' eager bf16 step: x{ours_bf16['images_per_s'] / theirs_bf16['images_per_s']:.2f} "
              f"(target >= 2); bf16 / TF32 for ddpmkit eager: x{bf16_over_tf32:.2f}")
    plain, before = out.get("ddpmkit / train bf16"), out.get("ddpmkit autocast-norms / train bf16")
    if plain and before:
        print(f"  ddpmkit's bf16 norms / autocast's fp32 norms, train bf16: x{plain['images_per_s'] / before['images_per_s']:.2f}")
    for key, fn, _ in cases:  # where each eager bf16 step's time goes, kernel by kernel
        if key[1] == "train bf16" and "compiled" not in key[0]:
            profile_step(fn, device, f"CIFAR-10 UNet {key[0]}, bf16 train step", results, calls=1 if tiny else 3)


def profile_step(fn: Callable[[], object], device: torch.device, label: str, results: dict, calls: int = 3) -> None:
    """torch.profiler over `calls` calls of fn after one warm-up: the ops that take the most device time (CPU time on a
    CPU), kernel launches per call and the host's time per call, printed and kept in results["profiles"]. (Reading the
    profile back takes seconds per call profiled on a CPU: --tiny profiles one.)"""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    fn()
    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
            for _ in range(calls):
                fn()
            sync(device)
    except (RuntimeError, ValueError, AssertionError) as e:  # a profile explains the figures, it is not one: go on
        results.setdefault("profiles", {})[label] = {"error": repr(e)}
        print(f"profile: {label}: failed: {e!r}", flush=True)
        return
    events = prof.key_averages()
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=15, max_name_column_width=60)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    device_ms = sum(e.self_device_time_total for e in events) / 1000 / calls if cuda else float("nan")
    summary = {"kernel_launches_per_call": launches / calls, "device_ms_per_call": device_ms, "table": table}
    results.setdefault("profiles", {})[label] = summary
    print(f"profile: {label}: {launches / calls:.0f} kernel launches and {device_ms:.2f} ms of device time per call\n{table}", flush=True)


def upsampling_forms(device: torch.device, tiny: bool, rounds: int, results: dict) -> None:
    """ddpmkit's 2x2-phase upsampling against a stride-2 transposed convolution and the plain form, at the CIFAR-10
    UNet's sizes (batch 128, 256 channels, 8 -> 16 and 16 -> 32), forward + backward, alternating rounds."""
    from ddpmkit.nets.layers import upsample_conv3x3

    taps = torch.tensor([[0, 0, 1.0], [0, 1, 1], [1, 1, 0], [1, 0, 0]], device=device)  # 4x4 tap k <- these 3x3 rows

    def transposed(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, torch.einsum("ku,oiuv,lv->iokl", taps.to(w), w, taps.to(w)), b, stride=2, padding=1)

    def plain(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), w, b, padding=1)

    forms = {"phases (ddpmkit)": upsample_conv3x3, "transposed conv": transposed, "plain": plain}
    batch, ch, sizes = (2, 8, (4,)) if tiny else (128, 256, (8, 16))
    out = results.setdefault("upsampling", {})
    for size in sizes:
        x = torch.randn(batch, ch, size, size, device=device, requires_grad=True)
        w = (torch.randn(ch, ch, 3, 3, device=device) / (3 * ch**0.5)).requires_grad_()
        b = torch.zeros(ch, device=device, requires_grad=True)
        want = plain(x, w, b)
        for name, form in forms.items():  # the same map, or the figures mean nothing (TF32 rounds at ~1e-3)
            err = (form(x, w, b) - want).abs().max().item() / want.abs().max().item()
            if err > 2e-2:
                out["error"] = f"{name} differs from the plain form by {err:.2g} of its largest value: not timed"
                print(f"upsampling: {out['error']}", flush=True)
                return
        for bf16 in (True, False):
            def step(form: Callable, bf16: bool = bf16, x: torch.Tensor = x, w: torch.Tensor = w, b: torch.Tensor = b) -> None:
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    y = form(x, w, b)
                y.float().square().mean().backward()

            times: dict[str, list[float]] = {}
            for _ in range(rounds):
                for name, form in forms.items():
                    times.setdefault(name, []).append(seconds(lambda form=form: step(form), device, 1 if tiny else 20) * 1e3)
            label = f"{ch} ch {size}->{2 * size}, batch {batch}, {'bf16' if bf16 else 'fp32'}"
            out[label] = {name: statistics.median(ms) for name, ms in times.items()}
            print(f"upsampling {label}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in out[label].items()), flush=True)


PARTS = ["demo-graphed", "demo", "sampling", "preset", "overhead", "cifar", "upsampling", "images", "demo-compiled"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="default: CUDA, then MPS, then the CPU (ddpmkit's one rule)")
    p.add_argument("--tiny", action="store_true", help="every part at toy sizes (seconds, any device): keeps the script runnable")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the engine-overhead and CIFAR-10 UNet comparisons")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd forms (their compile takes minutes)")
    p.add_argument("--quick", action="store_true", help="only the compile the acceptance needs: ddpmkit's CIFAR-10 UNet's bf16 "
                   "training step, not its forward or fp32 step, diffusers' or the sampler's reduce-overhead, and no "
                   "demo-compiled part (a lent GPU's 15 minutes)")
    p.add_argument("--parts", nargs="*", default=None, choices=PARTS, help="the parts to run, in this order (default: all, in the "
                   "order above, the demo-graphed part first: the acceptance's likeliest figure; sampling uses the demo model "
                   "a part before it trained, or trains one eagerly first (part demo))")
    p.add_argument("--skip", nargs="*", default=[], choices=PARTS, help="parts to leave out")
    p.add_argument("--out", default=None, help="write every figure to this JSON file too")
    p.add_argument("--deadline", type=float, default=0.0, help="seconds from the start by which the parts should be done (a "
                   "call's time limit less what runs after it): a part past it is skipped, and mnist_gpu's training stops in "
                   "time for its judgings (0: none)")
    args = p.parse_args()
    t0 = time.perf_counter()

    def time_left() -> float:
        return args.deadline - (time.perf_counter() - t0) if args.deadline > 0 else math.inf
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # "fp32" below means TF32 where the GPU has it
    n, reps = (128, 1) if args.tiny else (8192, 20) if device.type != "cpu" else (2048, 8)  # a CPU: seconds, not minutes
    results: dict = {"device": describe_device(device), "tiny": args.tiny}
    results["bf16_matmul_tflops"] = bf16 = matmul_tflops(device, torch.bfloat16, n, reps)
    results["fp32_matmul_tflops"] = matmul_tflops(device, torch.float32, n, reps)
    print(f"device: {results['device']}; {n}^2 matmul: bf16 {bf16:.1f} TFLOP/s, fp32{'/TF32' if device.type == 'cuda' else ''} "
          f"{results['fp32_matmul_tflops']:.1f} TFLOP/s", flush=True)
    if device.type == "cpu" and not args.tiny:  # the GPU's minutes are hours here, and nothing said so
        print("note: no GPU here, so every part runs at its GPU size on the CPU (a 38M-parameter UNet at batch 128, 1,600 demo steps); "
              "--tiny checks every part in seconds, --parts picks some", flush=True)

    started = time.perf_counter()

    def keep() -> None:  # the figures so far to the file: a run cut short keeps what it measured
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))

    def save(part: str) -> None:  # after every part, with what each part took
        results.setdefault("part_seconds", {})[part] = seconds_taken = time.perf_counter() - started
        print(f"[{part}: done at {seconds_taken:.0f} s]", flush=True)
        keep()

    rounds, compiles = 1 if args.tiny else args.rounds, not (args.no_compile or args.tiny)
    run_dir: list[Path | None] = [None]  # the demo model a part trained, for the sampling part

    trained: list[Path] = []  # the demo runs kept for sampling, removed at the end

    def trained_demo(run: Path | None) -> None:
        if run is not None:
            run_dir[0] = run
            trained.append(run)

    def demo_graphed() -> None:
        trained_demo(demo_variant(device, args.tiny, "cuda-graph", results, keep=True))

    def demo() -> None:
        trained_demo(demo_trainer(device, args.tiny, results))

    def sample() -> None:
        if run_dir[0] is None:  # demo-graphed did not run, needs CUDA or failed: the sampling figure must not be lost to it
            print("ancestral sampling: no demo model yet, so the demo trainer first, eagerly (part demo)", flush=True)
            demo()
            save("demo")
        sampling(run_dir[0], device, args.tiny, compiles and not args.quick, results)

    def demo_compiled() -> None:  # (--tiny runs the part with train.compile = "no": the compile takes minutes on a CPU)
        if args.no_compile or args.quick:
            print("demo trainer, train.compile=reduce-overhead: skipped (--quick or --no-compile)", flush=True)
        else:
            demo_variant(device, args.tiny, "reduce-overhead", results)

    run = {"demo-graphed": demo_graphed, "demo": demo, "sampling": sample, "preset": lambda: gpu_preset(device, args.tiny, results, keep, time_left),
           "overhead": lambda: engine_overhead(device, args.tiny, rounds, results),
           "cifar": lambda: unet_modes(device, args.tiny, rounds, compiles, results, bf16, all_compiles=not args.quick, keep=keep),
           "upsampling": lambda: upsampling_forms(device, args.tiny, rounds, results), "images": lambda: images_preset(device, args.tiny, results),
           "demo-compiled": demo_compiled}
    for part in args.parts or PARTS:
        if part in args.skip:
            continue
        if time_left() <= 0:  # what comes after this script (the tests) keeps its time
            results.setdefault("part_skipped", {})[part] = f"past --deadline {args.deadline:g} s"
            print(f"part {part}: skipped (past --deadline {args.deadline:g} s)", flush=True)
            keep()
            continue
        try:
            run[part]()
        except Exception as e:  # noqa: BLE001 -- a lent GPU comes once: a part that breaks costs its own figures only
            results.setdefault("part_errors", {})[part] = repr(e)[-2000:]
            print(f"part {part}: failed: {last_line(e)}", flush=True)
        save(part)
    for run in trained:
        shutil.rmtree(run, ignore_errors=True)
    if args.out:
        print(f"figures -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
