"""The one training loop, on accelerate: every kind of model (train.task) trains through it.

    for step in start .. steps - 1 (or fewer: train.fit_to_budget fits the run to train.max_minutes):
        indices, generator = the global batch of this step           (batches.py: a function of (seed, step))
        loss = mean of task.loss(model, this process's slice)        (the task's Algorithm 1, autoencoder loss, ...)
        skip the step if the loss or its gradient is not finite      (NaN guard, below)
        clip gradients, AdamW step at lr_at(step), EMA update
        log, pictures, held-out metrics, atomic checkpoint

`run` below is that loop, in one screen; `Trainer` holds the run's pieces and one method per part of a
step (train_step, advance, skip and roll_back for the NaN guard, periodic for logs, pictures and
checkpoints), `TrainState` what a checkpoint records, `Budget` the time budget.

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
from dataclasses import dataclass
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
from ..devices import has_accelerator
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
        info = _check_resumable(self.cfg, found[-1])
        self.restore(found[-1], self.model)
        st = self.state
        st.step, st.lr_scale, st.fitted = info.step, info.lr_scale, bool(info.horizon)
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
            for stale in self.run_dir.glob(".tmp-ckpt-*"):  # a checkpoint a killed run was writing: never complete, never read
                shutil.rmtree(stale, ignore_errors=True)
        self.log = _RunLog(self.run_dir, acc.is_main_process)
        self.bar = tqdm(total=self.tc.steps, initial=self.state.step, disable=not (self.progress and acc.is_main_process),
                        desc=f"train {self.task.name}", dynamic_ncols=True)
        self.t_start = time.time()
        self.budget.start(self.t_start)
        self.window = LogWindow()
        self.model.train()

    def checkpoint(self, metrics: dict | None = None) -> None:
        st = self.state
        if self.accelerator.is_main_process:
            info = CheckpointInfo(st.step, self.task.shape, st.lr_scale, metrics or {}, st.decay.end if st.fitted else 0,
                                  (st.decay.start, st.decay.progress))
            extra = {"power_ema": self.power.state_dict()} if self.power is not None else None
            save_checkpoint(self.run_dir, self.cfg, info, self.raw, self.ema, self.optimizer, self.tc.keep_checkpoints, extra,
                            self.tc.keep_steps, export=lambda folder: self.task.export(self.ema, folder))
        self.accelerator.wait_for_everyone()

    # ---- one step

    def next_batch(self) -> Batch:
        """This step's global batch (a function of the seed and the step) and this process's slice of it."""
        step, tc, local = self.state.step, self.tc, self.tc.batch_size // self.world
        seed_dropout(self.accelerator.device, (tc.seed * 1_000_003 + step) * 31 + self.rank)
        return Batch(step, batch_indices(step, tc.batch_size, self.task.num_examples, tc.seed), step_generator(tc.seed, step),
                     slice(self.rank * local, (self.rank + 1) * local), self.accelerator.device)

    def train_step(self, batch: Batch) -> tuple[torch.Tensor, bool, str]:
        """Forward and backward of one batch: (every process's loss, whether the time is up, why the step must be
        skipped: "" or a non-finite loss or gradient). The optimizer has not stepped yet."""
        acc, tc, st = self.accelerator, self.tc, self.state
        self.lr = lr_at(st.step, tc, st.decay) * st.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with acc.autocast():
            loss = self.task.loss(self.model, batch).float().mean()
        # one small all-gather per step: every process sees every loss and the stop flag
        flags = acc.gather(torch.stack([loss.detach(), torch.tensor(float(self.budget.out_of_time()), device=loss.device)])[None])
        if bool(flags[:, 1].any()):
            return flags[:, 0], True, ""
        if not bool(torch.isfinite(flags[:, 0]).all()):
            return flags[:, 0], False, "the loss was not finite"
        acc.backward(loss)
        # the norm is the same on every process (gradients are all-reduced); clip at inf = measure only
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        if self.precision != "fp16" and not bool(torch.isfinite(grad_norm)):  # fp16: the loss scaler skips these itself
            return flags[:, 0], False, "the gradient was not finite"
        return flags[:, 0], False, ""

    def advance(self, losses: torch.Tensor) -> None:
        """Apply the step: optimizer, EMA, post-hoc EMA, the step counter and the log window."""
        st = self.state
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        ema_update(self.ema, self.raw, ema_decay_at(st.step, self.tc.ema_decay))
        st.bad_in_a_row = 0
        st.step += 1
        self.fold_in_power_ema()
        self.window.add(self.tc.batch_size, losses.mean().item())
        self.bar.update(1)

    def fold_in_power_ema(self) -> None:
        if self.power is not None:
            self.power.update(self.raw, self.state.step)
            if self.accelerator.is_main_process and self.state.step % self.tc.posthoc_every == 0:
                self.power.save_snapshot(self.run_dir, self.state.step)

    # ---- the NaN guard

    def skip(self, reason: str, losses: torch.Tensor) -> None:
        """A step whose loss or gradient is not finite changes no weight; train.nan_patience of them in a row roll
        the run back to its last checkpoint with half the learning rate."""
        st = self.state
        self.optimizer.zero_grad(set_to_none=True)
        st.bad_in_a_row += 1
        self.log.record({"step": st.step, "skipped": reason, "loss": losses.tolist(), "lr": self.lr})
        if self.progress and self.accelerator.is_main_process:
            self.bar.write(f"step {st.step}: skipped ({reason})")
        st.step += 1
        self.fold_in_power_ema()  # unchanged weights: the averages' profiles stay functions of the step alone
        self.bar.update(1)
        if st.bad_in_a_row >= self.tc.nan_patience:
            self.roll_back(st.step - 1, reason)

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

    def periodic(self) -> None:
        """The log line, previews and held-out metrics (main process), and checkpoints, when their step comes."""
        st, tc, main = self.state, self.tc, self.accelerator.is_main_process
        if st.step % tc.log_every == 0 or st.step == st.decay.end:
            rate, mean_loss = self.window.flush()
            self.bar.set_postfix(loss=f"{mean_loss:.4f}", ex_s=f"{rate:.0f}")
            self.log.record({"step": st.step, "loss": mean_loss, "examples_per_s": rate, "lr": self.lr, "world_size": self.world,
                             "elapsed_s": round(time.time() - self.t_start, 2)},
                            {"train/loss": mean_loss, "train/lr": self.lr, "train/examples_per_s": rate})
        if tc.sample_every and st.step % tc.sample_every == 0 and main:
            self.log.image("samples", self.task.preview(self.ema.eval(), self.run_dir / "samples" / f"step-{st.step:07d}.png"), st.step)
            self.model.train()
        if tc.eval_every and st.step % tc.eval_every == 0 and main:
            metrics = self.task.evaluate(self.ema.eval())
            self.log.record({"step": st.step, **metrics}, {f"eval/{k}": v for k, v in metrics.items()})
            if self.progress and metrics:
                self.bar.write(f"step {st.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            self.model.train()
        # a kept step (train.keep_steps, e.g. autoguidance's weaker model) is written even between checkpoint_every's
        due = (tc.checkpoint_every and st.step % tc.checkpoint_every == 0) or st.step in tc.keep_steps
        if due and st.step < st.decay.end:
            self.checkpoint()

    def finish(self) -> Path:
        """The last post-hoc EMA snapshot, the task's final metrics and the last checkpoint."""
        acc, st = self.accelerator, self.state
        self.bar.close()
        if self.power is not None and acc.is_main_process and st.step % self.tc.posthoc_every:
            self.power.save_snapshot(self.run_dir, st.step)  # the last weights (the end, or where the time budget stopped the run)
        in_sync = check_in_sync(acc, self.model)
        final: dict = {}
        if acc.is_main_process:
            final = self.task.finish(self.ema.eval(), self.raw)
            self.log.record({"step": st.step, "done": True, "world_size": self.world, "precision": self.precision,
                             "params_in_sync": in_sync, "elapsed_s": time.time() - self.t_start, **final})
        self.checkpoint(final)
        self.log.close()
        return self.run_dir


class LogWindow:
    """Examples and losses since the last log line."""

    def __init__(self):
        self.t, self.examples, self.losses = time.time(), 0, []

    def add(self, examples: int, loss: float) -> None:
        self.examples += examples
        self.losses.append(loss)

    def flush(self) -> tuple[float, float]:
        """(examples/s, mean loss) over the window, and a new window."""
        rate = self.examples / max(time.time() - self.t, 1e-9)
        mean = sum(self.losses) / len(self.losses)
        self.t, self.examples, self.losses = time.time(), 0, []
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

    def out_of_time(self) -> bool:
        return self.tc.max_minutes > 0 and (time.time() - self.t_start) > 60 * self.tc.max_minutes

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


def run(task: Task, cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train task's model as cfg.train says; returns the run folder. Launch with `accelerate
    launch` or `torchrun` for several processes; the code is the same."""
    trainer = Trainer(task, cfg, progress)
    if resume:
        trainer.resume()
    trainer.start()
    state = trainer.state
    while state.step < state.decay.end:
        trainer.budget.tick()
        losses, out_of_time, skip_reason = trainer.train_step(trainer.next_batch())
        if out_of_time:
            trainer.accelerator.print(f"stopping after {cfg.train.max_minutes} minutes at step {state.step}")
            break
        if skip_reason:
            trainer.skip(skip_reason, losses)
            continue
        trainer.advance(losses)
        trainer.periodic()
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
