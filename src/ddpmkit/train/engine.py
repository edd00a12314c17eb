"""The one training loop, on accelerate: every kind of model (train.task) trains through it.

    for step in start .. steps - 1 (or fewer: train.fit_to_budget fits the run to train.max_minutes):
        indices, generator = the global batch of this step           (batches.py: a function of (seed, step))
        loss = mean of task.loss(model, this process's slice)        (the task's Algorithm 1, autoencoder loss, ...)
        skip the step if the loss or its gradient is not finite      (NaN guard, below)
        clip gradients, AdamW step at lr_at(step), EMA update
        log, pictures, held-out metrics, atomic checkpoint

One process or many (`torchrun`, `accelerate launch`) run the same code on any device accelerate
knows, in fp32, bf16 or fp16 autocast. The time budget (train.max_minutes) stops every process at
the same step and checkpoints there.

NaN guard: a step whose loss (on any process) or gradient norm is not finite changes nothing and
is logged as skipped. After train.nan_patience such steps in a row the run rolls back to its last
checkpoint with the learning rate halved; after train.max_rollbacks rollbacks it stops with one
line that names the step and the likely cause. (With fp16, accelerate's loss scaler already skips
steps with overflowing gradients and lowers its scale; only non-finite losses count there.)
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ..checkpoint import CheckpointInfo, list_checkpoints, load_training_state, read_config, save_checkpoint
from ..config import Config
from ..posthoc_ema import PowerEMA
from ..precision import resolve_precision
from ..viz import make_grid
from .batches import Batch, batch_indices, step_generator
from .optim import Decay, budget_horizon, ema_decay_at, ema_update, lr_at
from .task import Task, TrainingError


class _RunLog:
    """train_log.jsonl and TensorBoard, written by the main process only."""

    def __init__(self, run_dir: Path, main: bool):
        self.file = run_dir / "train_log.jsonl"
        self.writer = SummaryWriter(str(run_dir / "tb")) if main else None

    def record(self, entry: dict, scalars: dict[str, float] | None = None) -> None:
        if self.writer is None:
            return
        for name, value in (scalars or {}).items():
            self.writer.add_scalar(name, value, entry["step"])
        with open(self.file, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def image(self, name: str, x: torch.Tensor, step: int) -> None:
        if self.writer is not None and x is not None and x.ndim == 4:
            self.writer.add_image(name, make_grid(x), step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def has_accelerator() -> bool:
    """A CUDA, XPU or MPS device that accelerate would pick."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu is not None and xpu.is_available())


def set_cuda_determinism(on: bool) -> None:
    """Deterministic CUDA kernels (train.deterministic), or cuDNN's autotuned fastest ones. Without
    them atomics in backward passes and per-process algorithm choices make a resumed run drift."""
    # cuBLAS reads this when it creates its handle, i.e. at the first matrix product of the process
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = on, not on
    # warn_only: an op with no deterministic CUDA kernel warns (naming itself) instead of stopping the run
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # only results matter, not torch.empty's contents


def seed_dropout(device: torch.device, seed: int) -> None:
    """Seed the generator the step's dropout masks come from: the training device's alone, since
    torch.manual_seed also visits every other device kind (1.5 ms, a sixth of a tiny model's step)."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def _check_resumable(cfg: Config, ckpt: Path) -> CheckpointInfo:
    saved, info = read_config(ckpt)
    same = (saved.network, saved.diffusion, saved.data, saved.autoencoder, saved.train.task) == \
           (cfg.network, cfg.diffusion, cfg.data, cfg.autoencoder, cfg.train.task)
    if not same:
        raise TrainingError(f"`resume`: the task, data, network, diffusion or autoencoder settings differ from {ckpt / 'config.json'}")
    return info


def run(task: Task, cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train task's model as cfg.train says; returns the run folder. Launch with `accelerate
    launch` or `torchrun` for several processes; the code is the same."""
    tc = cfg.train
    # accelerate keeps settings such as mixed precision in a process-wide singleton; forget them so
    # run() can be called again with other settings (notebooks, tests). The process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    precision = resolve_precision(tc.mixed_precision)
    # cpu=True when there is no accelerator: accelerate then runs several CPU processes (gloo) as one job
    accelerator = Accelerator(mixed_precision=precision, cpu=not has_accelerator())
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.device.type == "cuda":
        set_cuda_determinism(tc.deterministic)
    if tc.batch_size % world:
        raise TrainingError(f"train.batch_size={tc.batch_size} must be divisible by the {world} processes")
    local_bs = tc.batch_size // world
    run_dir = Path(tc.run_dir)
    fp16 = precision == "fp16"

    torch.manual_seed(tc.seed)  # the initial weights come from the seed too
    model = task.build_model()
    ema = copy.deepcopy(model).requires_grad_(False)
    # fused: one kernel for all parameters instead of several per tensor group; deterministic, so resume and
    # several processes stay exact (its speed-up is below a shared 2-core machine's noise: docs/ordinary_machine.md)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay,
                                  fused=True)

    power = PowerEMA(model, tc.posthoc_ema) if tc.posthoc_ema else None

    def restore(ckpt: Path, into: nn.Module) -> None:
        load_training_state(ckpt, into, ema, optimizer)
        if power is not None:
            power.load_state_dict(load_file(ckpt / "power_ema.safetensors"))

    step, lr_scale, fitted = 0, 1.0, False  # fitted: train.fit_to_budget has chosen the decay's end
    decay = Decay.over(tc)
    if resume:
        found = list_checkpoints(run_dir)
        if not found:
            raise TrainingError(f"`resume`: no checkpoint in {run_dir}")
        info = _check_resumable(cfg, found[-1])
        restore(found[-1], model)
        step, lr_scale, fitted = info.step, info.lr_scale, bool(info.horizon)
        if fitted:  # a resumed run keeps the decay the budget chose (checkpoints before re-fitting have no decay_from)
            decay = Decay(*info.decay_from, info.horizon) if info.decay_from[0] else Decay.over(tc, info.horizon)
        accelerator.print(f"resumed from {found[-1]} at step {step}")

    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    ema.to(accelerator.device)
    if power is not None:
        power.to(accelerator.device)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
        for stale in run_dir.glob(".tmp-ckpt-*"):  # a checkpoint a killed run was writing: never complete, never read
            shutil.rmtree(stale, ignore_errors=True)
    log = _RunLog(run_dir, accelerator.is_main_process)

    def checkpoint(at: int, metrics: dict | None = None) -> None:
        if accelerator.is_main_process:
            info = CheckpointInfo(at, task.shape, lr_scale, metrics or {}, decay.end if fitted else 0, (decay.start, decay.progress))
            extra = {"power_ema": power.state_dict()} if power is not None else None
            save_checkpoint(run_dir, cfg, info, raw, ema, optimizer, tc.keep_checkpoints, extra, tc.keep_steps)
        accelerator.wait_for_everyone()

    def roll_back(at: int, reason: str) -> int:
        """Back to the last checkpoint with half the learning rate, or stop with one line."""
        nonlocal lr_scale, rollbacks
        found = list_checkpoints(run_dir)
        if not found or rollbacks >= tc.max_rollbacks:
            tried = f" after {rollbacks} rollback(s), each halving the learning rate" if rollbacks else ""
            raise TrainingError(
                f"training stopped at step {at}: {reason} for {tc.nan_patience} steps in a row{tried}; likely cause: "
                f"a learning rate too high for this model (train.lr={tc.lr:g}, now x{lr_scale:g}) or an fp16 overflow; "
                f"lower train.lr, raise train.warmup_steps or use bf16; last good checkpoint: {found[-1] if found else 'none'}")
        info = read_config(found[-1])[1]
        restore(found[-1], raw)
        lr_scale, rollbacks = lr_scale * 0.5, rollbacks + 1  # halved again on every rollback
        accelerator.print(f"step {at}: {reason} for {tc.nan_patience} steps in a row; rolled back to {found[-1].name} "
                          f"with the learning rate halved (x{lr_scale:g})")
        log.record({"step": at, "rollback_to": info.step, "lr_scale": lr_scale, "reason": reason})
        return info.step

    def fold_in_power_ema(t: int) -> None:
        if power is not None:
            power.update(raw, t)
            if accelerator.is_main_process and t % tc.posthoc_every == 0:
                power.save_snapshot(run_dir, t)

    # with a time budget, the decay's end is fitted after budget_calibration steps and re-fitted every as many
    # steps after that, at the pace of all steps so far (previews, evaluations and checkpoints included)
    budgeted = tc.fit_to_budget and tc.max_minutes > 0 and not fitted  # (a resumed run keeps its decay)
    ran, t_mark = 0, 0.0  # loop iterations in this process (a rollback's replayed steps count too)

    def fit_to_budget() -> int:
        """The steps that fit in the time budget at the pace of this process's steps so far (the
        shortest of all processes' answers, so every process stops at the same step)."""
        pace = (time.time() - t_mark) / (ran - 10)
        mine = budget_horizon(step, pace, 60 * tc.max_minutes - (time.time() - t_start), tc.steps)
        fit = int(accelerator.gather(torch.tensor([mine], device=accelerator.device)).min())
        if not fitted:
            accelerator.print(f"time budget: {pace:.2f} s/step, so {fit} of train.steps={tc.steps} steps fit in "
                              f"{tc.max_minutes} minutes; the learning rate now decays over {fit} steps (re-fitted every "
                              f"{tc.budget_calibration} steps)")
        log.record({"step": step, "horizon": fit, "seconds_per_step": pace})
        return fit

    bar = tqdm(total=tc.steps, initial=step, disable=not (progress and accelerator.is_main_process), desc=f"train {task.name}",
               dynamic_ncols=True)
    t_start = time.time()
    t_window, n_window, loss_window = time.time(), 0, []
    bad_in_a_row, rollbacks = 0, 0
    model.train()
    while step < decay.end:
        if budgeted and ran == 10:  # the first steps carry one-off costs: time from here
            t_mark = time.time()
        if budgeted and ran and ran % tc.budget_calibration == 0:
            end = fit_to_budget()
            if end != decay.end or not fitted:
                decay, fitted = decay.refit(step, end), True
                bar.total = end
                bar.refresh()
        ran += 1
        batch = Batch(step, batch_indices(step, tc.batch_size, task.num_examples, tc.seed), step_generator(tc.seed, step),
                      slice(rank * local_bs, (rank + 1) * local_bs), accelerator.device)
        seed_dropout(accelerator.device, (tc.seed * 1_000_003 + step) * 31 + rank)
        lr = lr_at(step, tc, decay) * lr_scale
        for group in optimizer.param_groups:
            group["lr"] = lr
        with accelerator.autocast():
            per_example = task.loss(model, batch)
        loss = per_example.float().mean()
        # one small all-gather per step: every process sees every loss and the stop flag
        out_of_time = tc.max_minutes > 0 and (time.time() - t_start) > 60 * tc.max_minutes
        flags = accelerator.gather(torch.stack([loss.detach(), torch.tensor(float(out_of_time), device=loss.device)])[None])
        if bool(flags[:, 1].any()):
            accelerator.print(f"stopping after {tc.max_minutes} minutes at step {step}")
            break
        reason = "" if bool(torch.isfinite(flags[:, 0]).all()) else "the loss was not finite"
        if not reason:
            accelerator.backward(loss)
            # the norm is the same on every process (gradients are all-reduced); clip at inf = measure only
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
            if not fp16 and not bool(torch.isfinite(grad_norm)):
                reason = "the gradient was not finite"
        if reason:
            optimizer.zero_grad(set_to_none=True)
            bad_in_a_row += 1
            log.record({"step": step, "skipped": reason, "loss": flags[:, 0].tolist(), "lr": lr})
            if progress and accelerator.is_main_process:
                bar.write(f"step {step}: skipped ({reason})")
            step += 1
            fold_in_power_ema(step)  # unchanged weights: the averages' profiles stay functions of the step alone
            bar.update(1)
            if bad_in_a_row >= tc.nan_patience:
                step, bad_in_a_row = roll_back(step - 1, reason), 0
                bar.n = step
                bar.refresh()
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, raw, ema_decay_at(step, tc.ema_decay))
        bad_in_a_row = 0
        step += 1
        fold_in_power_ema(step)

        n_window += tc.batch_size
        loss_window.append(flags[:, 0].mean().item())
        bar.update(1)
        if step % tc.log_every == 0 or step == decay.end:
            rate = n_window / max(time.time() - t_window, 1e-9)
            mean_loss = sum(loss_window) / len(loss_window)
            bar.set_postfix(loss=f"{mean_loss:.4f}", ex_s=f"{rate:.0f}")
            log.record({"step": step, "loss": mean_loss, "examples_per_s": rate, "lr": lr, "world_size": world,
                        "elapsed_s": round(time.time() - t_start, 2)},
                       {"train/loss": mean_loss, "train/lr": lr, "train/examples_per_s": rate})
            t_window, n_window, loss_window = time.time(), 0, []
        if tc.sample_every and step % tc.sample_every == 0 and accelerator.is_main_process:
            log.image("samples", task.preview(ema.eval(), run_dir / "samples" / f"step-{step:07d}.png"), step)
            model.train()
        if tc.eval_every and step % tc.eval_every == 0 and accelerator.is_main_process:
            metrics = task.evaluate(ema.eval())
            log.record({"step": step, **metrics}, {f"eval/{k}": v for k, v in metrics.items()})
            if progress and metrics:
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            model.train()
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < decay.end:
            checkpoint(step)
    bar.close()
    if power is not None and accelerator.is_main_process and step % tc.posthoc_every:
        power.save_snapshot(run_dir, step)  # the last weights (the end, or where the time budget stopped the run)
    in_sync = check_in_sync(accelerator, model)
    final: dict = {}
    if accelerator.is_main_process:
        final = task.finish(ema.eval(), raw)
        log.record({"step": step, "done": True, "world_size": world, "precision": precision, "params_in_sync": in_sync,
                    "elapsed_s": time.time() - t_start, **final})
    checkpoint(step, final)
    log.close()
    return run_dir


def check_in_sync(accelerator: Accelerator, model: nn.Module) -> bool:
    """Every process must end with the same weights; a difference means a broken all-reduce."""
    if accelerator.num_processes == 1:
        return True
    flat = torch.cat([p.detach().flatten().double() for p in accelerator.unwrap_model(model).parameters()])
    weights = torch.arange(len(flat), dtype=torch.float64, device=flat.device).sin()
    digest = torch.stack([flat.sum(), flat.pow(2).sum(), (flat * weights).sum()])
    everyone = accelerator.gather(digest[None])  # (world, 3)
    if not torch.equal(everyone.min(0).values, everyone.max(0).values):
        raise TrainingError(f"processes ended with different weights: {everyone.tolist()}")
    return True
