"""The one training loop, on accelerate: every kind of model (train.task) trains through it.

    for step in start .. steps - 1 (or fewer: train.fit_to_budget fits the run to train.max_minutes):
        indices, generator = the global batch of this step           (batches.py: a function of (seed, step))
        loss = mean of task.loss(model, this process's slice)        (the task's Algorithm 1, autoencoder loss, ...)
        clip gradients, AdamW step at lr_at(step), EMA update        (a step whose loss or gradient is not
                                                                      finite changes nothing: NaN guard)
        log, pictures, held-out metrics, atomic checkpoint          (every so many steps: the host reads back here)

`run` below is that loop, in one screen; `Trainer` holds the run's pieces and one method per part of a
step (train_step and apply; settle and roll_back for the NaN guard; periodic for logs, pictures and
checkpoints), `TrainState` what a checkpoint records, `Budget` the time budget.

No host sync in an ordinary step: the host never waits for a device value between log steps, so on a GPU the
CPU queues the next steps while the GPU computes (nothing is read back but at log, preview, evaluation and
checkpoint steps: one read of the window's flags and losses).

One process or many (`torchrun`, `accelerate launch`) run the same code on any device accelerate
knows, in fp32, bf16 or fp16 autocast. The time budget (train.max_minutes) stops every process at
the same log step and checkpoints there.

NaN guard: a step whose loss (on any process) or gradient norm is not finite changes nothing (the
fused AdamW's found_inf, decided on the device) and is logged as skipped when its window is read
back. After train.nan_patience such steps in a row the run rolls back to its last checkpoint with
the learning rate halved; after train.max_rollbacks rollbacks it stops with one line that names
the step and the likely cause. (With fp16, accelerate's loss scaler already skips steps with
overflowing gradients and lowers its scale; only non-finite losses count there.)
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch import nn
from torch.utils.tensorboard import SummaryWriter

try:
    import fcntl  # POSIX only: the run folder's lock
except ImportError:  # Windows: no lock
    fcntl = None

from ..checkpoint import (
    CheckpointError,
    CheckpointInfo,
    list_checkpoints,
    load_training_state,
    one_before,
    read_config,
    save_checkpoint,
    tidy_interrupted_writes,
)
from ..conditioning import listed_classes
from ..config import Config
from ..devices import describe_device, has_accelerator, unused_gpu
from ..errors import Note
from ..graphs import capture_training
from ..posthoc_ema import PowerEMA
from ..precision import resolve_precision
from ..progress import progress_bar
from ..utils import queued_copy
from ..viz import make_grid
from .batches import Batch, step_batch
from .optim import Decay, budget_horizon, ema_decay_at, ema_update, lr_at
from .stop import GracefulStop
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


# train settings a resume may change without changing the steps still to come: how long, where, and how often it
# logs, samples, evaluates, keeps and snapshots; the others (lr, batch size, seed, precision, ...) change the run's path
RESUME_FREE = frozenset({"task", "run_dir", "steps", "max_minutes", "fit_to_budget", "budget_calibration", "log_every", "sample_every",
                         "sample_steps", "eval_every", "num_samples", "checkpoint_every", "keep_checkpoints", "keep_steps", "posthoc_ema",
                         "posthoc_every", "nan_patience", "max_rollbacks", "compile", "init_from"})


def _check_resumable(cfg: Config, ckpt: Path) -> CheckpointInfo:
    saved, info = read_config(ckpt)
    if differ := cfg.differences(saved, ("network", "diffusion", "data", "autoencoder")):  # the weights or the data would not be the run's
        raise TrainingError(f"`resume`: settings that define the run differ from {ckpt / 'config.json'}: {'; '.join(differ)}")
    # another lr (say) is allowed, a lower one to go on with being common, but the resume is then not exact: said, not silent
    if changed := cfg.differences(saved, ("train",), ignore=RESUME_FREE):
        warnings.warn(f"resuming with train settings other than {ckpt.name}'s: {'; '.join(changed)}; the run goes on with them, "
                      "not as it would have gone on", Note, stacklevel=2)
    return info


def fresh_accelerator(precision: str) -> Accelerator:
    """An Accelerator for this run's precision. accelerate keeps the mixed precision in a process-wide
    singleton and refuses a second one in the same process (a notebook or a test suite that trains an fp32
    run after a bf16 one); it has no public way to start over, so this forgets the singleton's settings
    with its one reset function. The process group (PartialState) stays."""
    AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True when there is no accelerator: accelerate then runs several CPU processes (gloo) as one job
    return Accelerator(mixed_precision=precision, cpu=not has_accelerator())


@dataclass
class TrainState:
    """Where the run stands, besides the weights and the optimizer: what a checkpoint records and a resume restores."""

    decay: Decay  # the learning rate's cosine decay (its end is train.steps, or what the time budget fitted)
    step: int = 0
    lr_scale: float = 1.0  # halved by every NaN rollback
    fitted: bool = False  # train.fit_to_budget has chosen the decay's end
    rollbacks: int = 0
    bad_in_a_row: int = 0  # consecutive skipped steps (non-finite loss or gradient)


class Trainer:
    """The pieces of one run (accelerator, model, EMA, optimizer, log, state) and the steps of its loop,
    which ``run`` strings together. Every method runs on every process unless it says otherwise."""

    def __init__(self, task: Task, cfg: Config, progress: bool):
        self.task, self.cfg, self.tc = task, cfg, cfg.train
        self.precision = resolve_precision(self.tc.mixed_precision)
        self.accelerator = fresh_accelerator(self.precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        if self.accelerator.device.type == "cuda":
            set_cuda_determinism(self.tc.deterministic)
        if self.tc.batch_size % self.world:
            raise TrainingError(f"train.batch_size={self.tc.batch_size} must be divisible by the {self.world} processes")
        self.run_dir = Path(self.tc.run_dir)
        self.progress = progress
        torch.manual_seed(self.tc.seed)  # the initial weights come from the seed too
        self.model = task.build_model()
        self.ema = copy.deepcopy(self.model).requires_grad_(False)
        task.attach_ema(self.ema)
        # in place: parameters, state dict and checkpoints stay those of the plain module
        self.graphs = None
        self.saved_step = -1  # the step of this run's newest checkpoint (every process knows it alike)
        if self.tc.compile == "cuda-graph":
            self.graphs = capture_training(self.model, self.accelerator.device, self.world)
        elif self.tc.compile != "no":
            self.model.compile(mode=None if self.tc.compile == "default" else self.tc.compile)
        # fused: one kernel for all parameters instead of several per tensor group; deterministic, so resume and
        # several processes stay exact (its speed-up is below a shared 2-core machine's noise: docs/ordinary_machine.md)
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # all of them, except under LoRA (finetune.py)
        self.optimizer = torch.optim.AdamW(trainable, lr=self.tc.lr, betas=self.tc.adam_betas,
                                           weight_decay=self.tc.weight_decay, fused=True)
        self.power = PowerEMA(self.model, self.tc.posthoc_ema) if self.tc.posthoc_ema else None
        self.state = TrainState(Decay.over(self.tc))
        self.budget = Budget(self)

    # ---- start, resume, checkpoints

    def resume(self) -> None:
        found = list_checkpoints(self.run_dir)
        if not found:
            raise TrainingError(f"`resume`: no checkpoint in {self.run_dir}")
        try:
            info = _check_resumable(self.cfg, found[-1])
            self.restore(found[-1], self.model)
        except CheckpointError as e:  # damaged from outside (the writes are atomic): say how to go on from the one before
            before = one_before(found[-1])
            raise CheckpointError(f"{e}; move it out of {self.run_dir} to resume from {before.name}, the one before" if before else str(e)) from None
        st = self.state
        st.step, st.lr_scale, st.fitted = info.step, info.lr_scale, bool(info.horizon)
        self.saved_step = st.step
        if st.fitted:  # a resumed run keeps the decay the budget chose (checkpoints before re-fitting have no decay_from)
            st.decay = Decay(*info.decay_from, info.horizon) if info.decay_from[0] else Decay.over(self.tc, info.horizon)
        self.accelerator.print(f"resumed from {found[-1]} at step {st.step}")

    def restore(self, ckpt: Path, into: nn.Module) -> None:
        load_training_state(ckpt, into, self.ema, self.optimizer)
        if self.power is not None:
            self.power.load_state_dict(load_file(ckpt / "power_ema.safetensors"))

    def start(self) -> None:
        """Wrap the model and optimizer for the processes, write the config, open the log and the progress bar."""
        acc = self.accelerator
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        self.raw = acc.unwrap_model(self.model)
        self.ema.to(acc.device)
        if self.power is not None:
            self.power.to(acc.device)
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(self.cfg.to_json())
        self.log = _RunLog(self.run_dir, acc.is_main_process)
        if self.progress and acc.is_main_process:  # where and how it trains, before the bar: a GPU user sees it is used
            how = {"no": "", "cuda-graph": ", the network replayed as CUDA graphs"}.get(self.tc.compile, f", compiled ({self.tc.compile})")
            processes = f", {self.world} processes" if self.world > 1 else ""
            precision = ("fp32" if self.precision == "no" else self.precision) + (" (auto)" if self.tc.mixed_precision == "auto" else "")
            print(f"train {self.task.name} on {describe_device(acc.device)}; {precision}{how}{processes}", flush=True)
            if acc.device.type == "cpu" and (hint := unused_gpu()):
                print(hint, flush=True)
            if names := self.task.class_names:  # which number is which class (the checkpoints record it too)
                print(f"classes of {self.cfg.data.path}: {listed_classes(names)} (sample one: --class NAME or NUMBER)", flush=True)
            if 0 < self.tc.steps < self.tc.warmup_steps:  # a preset shortened for a first try: its warm-up outlasts the run
                peak = lr_at(self.tc.steps - 1, self.tc) / self.tc.lr
                print(f"note: train.warmup_steps = {self.tc.warmup_steps} > train.steps = {self.tc.steps}: the learning rate climbs "
                      f"to {peak:.0%} of train.lr and no further; give train.warmup_steps=N below {self.tc.steps}", flush=True)
        self.bar = progress_bar(total=self.tc.steps, initial=self.state.step, disable=not (self.progress and acc.is_main_process),
                                desc=f"train {self.task.name}", dynamic_ncols=True)
        self.t_start = time.time()
        self.budget.start(self.t_start)
        self.window = LogWindow(self.tc.batch_size)
        self.model.train()

    def checkpoint(self, metrics: dict | None = None) -> None:
        st = self.state
        if self.accelerator.is_main_process:
            info = CheckpointInfo(st.step, self.task.shape, st.lr_scale, metrics or {}, st.decay.end if st.fitted else 0,
                                  (st.decay.start, st.decay.progress), self.task.class_names)
            extra = {"power_ema": self.power.state_dict()} if self.power is not None else None
            save_checkpoint(self.run_dir, self.cfg, info, self.raw, self.ema, self.optimizer, self.tc.keep_checkpoints, extra,
                            self.tc.keep_steps, export=lambda folder: self.task.export(self.ema, folder))
        self.saved_step = st.step
        self.accelerator.wait_for_everyone()

    # ---- one step

    def next_batch(self) -> Batch:
        """This step's global batch (a function of the seed and the step) and this process's slice of it."""
        step, tc, local = self.state.step, self.tc, self.tc.batch_size // self.world
        seed_dropout(self.accelerator.device, (tc.seed * 1_000_003 + step) * 31 + self.rank)
        return step_batch(tc.seed, step, tc.batch_size, self.task.num_examples, self.accelerator.device,
                          slice(self.rank * local, (self.rank + 1) * local))

    def train_step(self, batch: Batch) -> None:
        """Forward, backward, clipping and the optimizer step of one batch, with no read of a device value by the host:
        whether the step counts (the loss on every process and the gradient finite) is decided on the device and the
        fused optimizer and the EMA skip a step that does not (found_inf); the host reads the flags once per log
        window (settle)."""
        acc, tc, st = self.accelerator, self.tc, self.state
        self.lr = lr_at(st.step, tc, st.decay) * st.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with acc.autocast():
            loss = self.task.loss(self.model, batch).float().mean()
        losses = acc.gather(loss.detach()[None])  # (world,): one small all-gather per step, so every process decides alike
        acc.backward(loss)
        # the norm is the same on every process (gradients are all-reduced); clip at inf = measure only
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        # 0: a good step; 1: a loss was not finite; 2: the gradient was not finite (fp16: the loss scaler skips those itself)
        bad = torch.where(torch.isfinite(losses).all(), 0, 1)
        if self.precision != "fp16":
            bad = torch.where((bad == 0) & ~torch.isfinite(grad_norm.float()), 2, bad)
        self.window.add(st.step, self.lr, losses, bad)
        self.apply(bad)

    def apply(self, bad: torch.Tensor) -> None:
        """The optimizer step, EMA and post-hoc EMA for a step whose flag `bad` (0 = good) lives on the device."""
        st = self.state
        if self.precision == "fp16":
            # accelerate's loss scaler hands the optimizer its own found_inf: decide a non-finite loss on the host, as before
            if bool(bad):
                self.optimizer.zero_grad(set_to_none=True)
            else:
                self.optimizer.step()
        else:
            inner = self.optimizer.optimizer  # the fused AdamW: found_inf = 1 leaves weights, moments and step count as they were
            inner.found_inf = (bad != 0).float()
            try:
                self.optimizer.step()
            finally:
                del inner.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema, self.raw, ema_decay_at(st.step, self.tc.ema_decay), applied=(bad == 0))
        st.step += 1
        self.fold_in_power_ema()  # skipped steps too: the averages' profiles stay functions of the step alone
        self.bar.update(1)

    def fold_in_power_ema(self) -> None:
        if self.power is not None:
            self.power.update(self.raw, self.state.step)
            if self.accelerator.is_main_process and self.state.step % self.tc.posthoc_every == 0:
                self.power.save_snapshot(self.run_dir, self.state.step)

    # ---- the NaN guard, read back once per log window

    def settle(self, shared: torch.Tensor | None = None) -> bool:
        """Read the window's step flags back (the one host sync of a log window), log its skipped steps, and roll back
        if train.nan_patience steps in a row were skipped. Returns whether it rolled back. Steps after the one that
        triggered a rollback are undone by it (it restores weights, optimizer and EMA), so a rollback decided here
        leaves the run as one decided after every step would. shared: the processes' gathered stop flags
        (Budget.share), read back in the same sync."""
        st = self.state
        for step, lr, losses, bad in self.window.read(shared):
            if not bad:
                st.bad_in_a_row = 0
                continue
            reason = REASONS[bad]
            st.bad_in_a_row += 1
            self.log.record({"step": step, "skipped": reason, "loss": losses, "lr": lr})
            if self.progress and self.accelerator.is_main_process:
                self.bar.write(f"step {step}: skipped ({reason})")
            if st.bad_in_a_row >= self.tc.nan_patience:
                self.window.clear()
                self.roll_back(step, reason)
                return True
        return False

    def roll_back(self, at: int, reason: str) -> None:
        """Back to the last checkpoint with half the learning rate, or stop with one line."""
        st, tc = self.state, self.tc
        found = list_checkpoints(self.run_dir)
        if not found or st.rollbacks >= tc.max_rollbacks:
            tried = f" after {st.rollbacks} rollback(s), each halving the learning rate" if st.rollbacks else ""
            raise TrainingError(
                f"training stopped at step {at}: {reason} for {tc.nan_patience} steps in a row{tried}; likely cause: "
                f"a learning rate too high for this model (train.lr={tc.lr:g}, now x{st.lr_scale:g}) or an fp16 overflow; "
                f"lower train.lr, raise train.warmup_steps or use bf16; last good checkpoint: {found[-1] if found else 'none'}")
        info = read_config(found[-1])[1]
        self.restore(found[-1], self.raw)
        st.lr_scale, st.rollbacks = st.lr_scale * 0.5, st.rollbacks + 1  # halved again on every rollback
        self.accelerator.print(f"step {at}: {reason} for {tc.nan_patience} steps in a row; rolled back to {found[-1].name} "
                               f"with the learning rate halved (x{st.lr_scale:g})")
        self.log.record({"step": at, "rollback_to": info.step, "lr_scale": st.lr_scale, "reason": reason})
        st.step, st.bad_in_a_row = info.step, 0
        self.bar.n = st.step
        self.bar.refresh()

    # ---- what happens every so many steps

    def periodic(self, stop_requested: bool = False) -> str | None:
        """At a log step (or before a preview, evaluation or checkpoint): read the window back (NaN guard, time budget),
        then the log line, previews and held-out metrics (main process), and checkpoints. Returns why every process
        stops at this log step, if it does: "time" (train.max_minutes) or "stop" (Ctrl-C in a multi-process run:
        stop_requested in any process); else None."""
        st, tc, main = self.state, self.tc, self.accelerator.is_main_process
        log_due = st.step % tc.log_every == 0 or st.step == st.decay.end
        sample_due = bool(tc.sample_every and st.step % tc.sample_every == 0)
        eval_due = bool(tc.eval_every and st.step % tc.eval_every == 0)
        # a kept step (train.keep_steps, e.g. autoguidance's weaker model) is written even between checkpoint_every's
        ckpt_due = bool((tc.checkpoint_every and st.step % tc.checkpoint_every == 0) or st.step in tc.keep_steps) and st.step < st.decay.end
        if not (log_due or sample_due or eval_due or ckpt_due):
            return None  # an ordinary step: nothing read back
        shared = self.budget.share(stop_requested) if log_due else None  # several processes: their flags, gathered on the device
        if self.settle(shared):
            return None
        if log_due and self.window.steps:
            rate, mean_loss = self.window.flush()
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", ex_s=f"{rate:.0f}")
            self.log.record({"step": st.step, "loss": mean_loss, "examples_per_s": rate, "lr": self.lr, "world_size": self.world,
                             "elapsed_s": round(time.time() - self.t_start, 2)},
                            {"train/loss": mean_loss, "train/lr": self.lr, "train/examples_per_s": rate})
        if sample_due and main:
            self.log.image("samples", self.task.preview(self.ema.eval(), self.run_dir / "samples" / f"step-{st.step:07d}.png"), st.step)
            self.model.train()
        if eval_due and main:
            metrics = self.task.evaluate(self.ema.eval())
            self.log.record({"step": st.step, **metrics}, {f"eval/{k}": v for k, v in metrics.items()})
            if self.progress and metrics:
                self.bar.write(f"step {st.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            self.model.train()
        if ckpt_due:
            self.checkpoint()
        return self.budget.verdict(stop_requested, self.window.shared) if log_due else None

    def stop_here(self) -> None:
        """A checkpoint of this step (unless periodic() just wrote one) for an exact `resume`: the run was asked to stop."""
        st = self.state
        self.settle()
        # not the folder's listing: another process may not have seen the first process's checkpoint of this step yet, and
        # one that wrote none would leave the others waiting in the checkpoint's barrier
        if self.saved_step != st.step:
            self.checkpoint()
        self.log.record({"step": st.step, "interrupted": True})
        self.log.close()
        self.bar.close()
        self.accelerator.print(f"stopped at step {st.step} of {st.decay.end}, with a checkpoint of it: continue with "
                               f"`ddpmkit train {self.run_dir / 'config.json'} --resume`")

    def close_after_error(self) -> None:
        """What start() made, if it ran: the bar (an error's line goes under it, not onto its end) and the log, whose
        TensorBoard writer (a thread and a file) a caller that goes on after the error (a notebook, a test) would keep."""
        for part in (getattr(self, "bar", None), getattr(self, "log", None)):
            if part is not None:
                part.close()

    def finish(self) -> Path:
        """The last post-hoc EMA snapshot, the task's final metrics and the last checkpoint."""
        acc, st = self.accelerator, self.state
        self.settle()
        self.bar.close()
        if self.power is not None and acc.is_main_process and st.step % self.tc.posthoc_every:
            self.power.save_snapshot(self.run_dir, st.step)  # the last weights (the end, or where the time budget stopped the run)
        in_sync = check_in_sync(acc, self.model)
        final: dict = {}
        if acc.is_main_process:
            final = self.task.finish(self.ema.eval(), self.raw)
            graphs = {"cuda_graph": dict(self.graphs.counts)} if self.graphs is not None else {}  # calls replayed, eager, captured
            self.log.record({"step": st.step, "done": True, "world_size": self.world, "precision": self.precision,
                             "params_in_sync": in_sync, "elapsed_s": time.time() - self.t_start, **graphs, **final})
        self.checkpoint(final)
        self.log.close()
        return self.run_dir


REASONS = {1: "the loss was not finite", 2: "the gradient was not finite"}


class LogWindow:
    """The steps since the last log line: their flags and losses stay on the device until read() reads them all back
    at once, then examples/s and the mean loss of the good steps."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.shared: list[float] | None = None  # the values of the last read()'s `shared`
        self.clear()

    def clear(self) -> None:
        self.t, self.steps, self.pending, self.good_losses = time.time(), 0, [], []

    def add(self, step: int, lr: float, losses: torch.Tensor, bad: torch.Tensor) -> None:
        """losses: (world,) this step's loss on every process; bad: 0-dim flag (0 = good). Both stay on the device."""
        self.steps += 1
        self.pending.append((step, lr, losses, bad))

    def read(self, shared: torch.Tensor | None = None) -> list[tuple[int, float, list[float], int]]:
        """(step, lr, losses, flag) of every step added since the last read, in one read of device values; the values
        of `shared` (a device tensor read in the same sync) are left in self.shared."""
        if not self.pending and shared is None:
            self.shared = None
            return []
        parts = [torch.cat([bad[None].float(), losses.float()]) for _, _, losses, bad in self.pending]  # (flag, loss per process)
        flat = torch.cat([*parts, *([] if shared is None else [shared.flatten().float()])]).tolist()  # the window's one host sync
        width = len(parts[0]) if parts else 0
        values = [flat[k * width:(k + 1) * width] for k in range(len(parts))]
        self.shared = None if shared is None else flat[len(parts) * width:]
        out = [(step, lr, row[1:], int(row[0])) for (step, lr, _, _), row in zip(self.pending, values)]
        self.good_losses += [sum(row[1:]) / len(row[1:]) for row in values if not row[0]]
        self.pending = []
        return out

    def flush(self) -> tuple[float, float]:
        """(examples/s, mean loss of the good steps) over the window, and a new window."""
        rate = self.steps * self.batch_size / max(time.time() - self.t, 1e-9)
        mean = sum(self.good_losses) / len(self.good_losses) if self.good_losses else math.nan
        self.clear()
        return rate, mean


class Budget:
    """train.max_minutes: stop every process at the same step when the time is up, and with train.fit_to_budget
    fit the cosine decay's end to the steps that fit, after budget_calibration steps and every as many after that,
    at the pace of all steps so far (previews, evaluations and checkpoints included)."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.tc = trainer, trainer.tc
        self.ran, self.t_mark, self.t_start = 0, 0.0, 0.0  # loop iterations in this process (a rollback's replayed steps count too)

    def start(self, t_start: float) -> None:
        self.t_start = t_start
        self.fitting = self.tc.fit_to_budget and self.tc.max_minutes > 0 and not self.trainer.state.fitted  # (a resumed run keeps its decay)

    def time_up(self) -> bool:
        return self.tc.max_minutes > 0 and (time.time() - self.t_start) > 60 * self.tc.max_minutes

    def share(self, stop_requested: bool) -> torch.Tensor | None:
        """Several processes: every process's (time up, stop requested), gathered on the device (world, 2) for the log
        window's one read (LogWindow.read); one process: None (it decides alone)."""
        if self.trainer.world == 1:
            return None
        acc = self.trainer.accelerator
        mine = torch.tensor([[float(self.time_up()), float(stop_requested)]])
        return acc.gather(queued_copy(mine, acc.device))  # queued from pinned memory: a plain copy would make the host wait

    def verdict(self, stop_requested: bool, shared: list[float] | None = None) -> str | None:
        """At a log step: "time" if train.max_minutes has passed on any process, else "stop" if any process of a
        multi-process run was asked to stop (one process stops at its own step boundary), so that every process stops at
        the same step; else None. shared: every process's (time up, stop requested) as read back with the window
        (share), several processes only."""
        if self.trainer.world > 1:
            up, stop_requested = any(shared[0::2]), any(shared[1::2])
            return "time" if up else "stop" if stop_requested else None
        return "time" if self.time_up() else None

    def tick(self) -> None:
        """Before each step: time from the 10th (the first carry one-off costs) and re-fit when it is due."""
        if self.fitting and self.ran == 10:
            self.t_mark = time.time()
        if self.fitting and self.ran and self.ran % self.tc.budget_calibration == 0:
            st = self.trainer.state
            end = self.fit()
            if end != st.decay.end or not st.fitted:
                st.decay, st.fitted = st.decay.refit(st.step, end), True
                self.trainer.bar.total = end
                self.trainer.bar.refresh()
        self.ran += 1

    def fit(self) -> int:
        """The steps that fit in the time budget at the pace of this process's steps so far (the shortest of all
        processes' answers, so every process stops at the same step)."""
        acc, st, tc = self.trainer.accelerator, self.trainer.state, self.tc
        pace = (time.time() - self.t_mark) / (self.ran - 10)
        mine = budget_horizon(st.step, pace, 60 * tc.max_minutes - (time.time() - self.t_start), tc.steps)
        fit = int(acc.gather(torch.tensor([mine], device=acc.device)).min())
        if not st.fitted:
            acc.print(f"time budget: {pace:.2f} s/step, so {fit} of train.steps={tc.steps} steps fit in {tc.max_minutes} minutes; "
                      f"the learning rate now decays over {fit} steps (re-fitted every {tc.budget_calibration} steps)")
        self.trainer.log.record({"step": st.step, "horizon": fit, "seconds_per_step": pace})
        return fit


# what a run writes into its folder: its previews by name, not all of samples/, which is also `ddpmkit sample`'s
# default --out (a run folder that is the working folder holds what was drawn there)
RUN_FILES = ("ckpt-*", "train_log.jsonl", "tb", "samples/step-*.png", "posthoc")


def check_fresh(run_dir: Path, overwrite: bool) -> None:
    """A run that does not resume must not start in another run's folder: `sample RUN` and `--resume` read the newest
    checkpoint, so an older, longer run's would shadow this one's, and the logs would mix. overwrite: start over."""
    found = list_checkpoints(run_dir)
    if found and not overwrite:
        raise TrainingError(f"{run_dir} already holds a run (newest checkpoint {found[-1].name}): continue it with `resume`, "
                            "start it over with `overwrite`, or give another train.run_dir")


def clear_run(run_dir: Path) -> None:
    """Remove what an earlier run wrote into run_dir (RUN_FILES; nothing else), for a run started over."""
    for pattern in RUN_FILES:
        for path in run_dir.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    previews = run_dir / "samples"
    if previews.is_dir() and not any(previews.iterdir()):
        previews.rmdir()


class RunLock:
    """One training run at a time in a run folder: a second `ddpmkit train` into it (another terminal, a job started
    twice) would mix its checkpoints and logs into the first's, and with `overwrite` delete them. The launch's first
    process holds an exclusive lock on RUN/.lock while it trains; the system drops it when the process ends, however
    it ends, so a killed run leaves nothing stale. A run that ends before it wrote anything (a setting refused when the
    network is built) removes the lock file and the folders it made, so a mistyped command leaves no empty run behind."""

    def __init__(self, run_dir: Path):
        self.file = None
        self.run_dir = run_dir
        self.made: list[Path] = []  # the folders this run created, innermost first
        if int(os.environ.get("RANK", "0")) != 0:  # not the launch's first process
            return
        self.made = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
        if fcntl is None:  # no flock (Windows): no lock, but the folder is still tidied
            run_dir.mkdir(parents=True, exist_ok=True)
            tidy_interrupted_writes(run_dir)
            return
        f = self._lock()
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        self.file = f
        tidy_interrupted_writes(run_dir)  # what a killed run left of a checkpoint it was writing, before anyone lists them

    def _lock(self, tries: int = 10):
        """RUN/.lock, opened and locked. A run that failed before it began unlinks its lock file while it holds it; a
        process that had opened that file then locks a file no longer on the path, so it opens the path's again (a few
        times at most: a file system whose inode numbers do not hold still keeps the lock it got, as before, not a hang)."""
        path = self.run_dir / ".lock"
        for attempt in range(tries):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            try:
                f = open(path, "a+")  # noqa: SIM115 -- held open for the run's length, closed by release()
            except FileNotFoundError:  # the folder went between the two lines: made again
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip()
                f.close()
                raise TrainingError(f"{self.run_dir} is being trained by another process{f' (pid {pid})' if pid else ''}: let it finish "
                                    "(then continue it with `resume`), or give another train.run_dir") from None
            if is_path_of(f, path) or attempt == tries - 1:
                return f
            f.close()
        raise TrainingError(f"cannot create {path}: its folder keeps disappearing")

    def release(self) -> None:
        if self.file is None:
            return
        lock = self.run_dir / ".lock"
        try:
            wrote_nothing = bool(self.made) and [p.name for p in self.run_dir.iterdir()] == [".lock"]
        except OSError:  # the folder went meanwhile (removed by hand): nothing to tidy, and the run's own error stays the one shown
            wrote_nothing = False
        if wrote_nothing:  # leave no trace
            lock.unlink()  # while held, so no one locks it after (_lock); removing it later could let two processes lock two files
            self.file.close()
            for folder in self.made:
                try:
                    folder.rmdir()
                except OSError:  # something else was put there meanwhile: it stays
                    break
        else:
            self.file.close()  # closing drops the lock; the file stays (removing it could let two processes lock two files)
        self.file = None


def is_path_of(f, path: Path) -> bool:
    """Whether the open file f is the file now at path (not one unlinked, or replaced, since it was opened)."""
    try:
        on_path = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(f.fileno())
    return (mine.st_dev, mine.st_ino) == (on_path.st_dev, on_path.st_ino)


def run(task: Task, cfg: Config, resume: bool = False, progress: bool = True, overwrite: bool = False) -> Path:
    """Train task's model as cfg.train says; returns the run folder. Launch with `accelerate
    launch` or `torchrun` for several processes; the code is the same. A run that does not resume starts in a
    folder without checkpoints, or with overwrite=True removes the earlier run's files first. One run at a time
    trains in a folder (RunLock)."""
    lock = RunLock(Path(cfg.train.run_dir))
    try:
        return _run(task, cfg, resume, progress, overwrite)
    finally:
        lock.release()


def _run(task: Task, cfg: Config, resume: bool, progress: bool, overwrite: bool) -> Path:
    if not resume:
        check_fresh(Path(cfg.train.run_dir), overwrite)
    trainer = Trainer(task, cfg, progress)
    try:
        return _train(trainer, cfg, resume, overwrite)
    except BaseException:
        trainer.close_after_error()
        raise


def _train(trainer: Trainer, cfg: Config, resume: bool, overwrite: bool) -> Path:
    if resume:
        trainer.resume()
    elif overwrite and trainer.accelerator.is_main_process:
        clear_run(trainer.run_dir)
    trainer.accelerator.wait_for_everyone()  # no process starts before the folder is cleared
    trainer.start()
    state = trainer.state
    if resume and state.step >= state.decay.end:  # else it ended at once without a word
        if trainer.accelerator.is_main_process:
            trainer.bar.write(f"{trainer.run_dir} is at step {state.step}, train.steps = {state.decay.end}: nothing more to train "
                              "(give a larger train.steps to go on)")
    # Ctrl-C: stop at the end of the step (several processes: at the next log step), with a checkpoint of it
    when = "after this step" if trainer.world == 1 else f"at the next log step (every train.log_every = {cfg.train.log_every} steps)"
    with GracefulStop(trainer.world, trainer.accelerator.is_main_process, when) as stop:
        while state.step < state.decay.end:
            trainer.budget.tick()
            trainer.train_step(trainer.next_batch())
            why = trainer.periodic(stop.requested)
            if why == "time":
                trainer.accelerator.print(f"stopping after {cfg.train.max_minutes} minutes at step {state.step}")
                break
            if why == "stop" or (stop.requested and trainer.world == 1):
                trainer.stop_here()
                raise KeyboardInterrupt
    return trainer.finish()


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
