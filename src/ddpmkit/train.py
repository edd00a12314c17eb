"""Training (DDPM Algorithm 1) on accelerate: one process or many run the same code.

    repeat
        x_0 ~ q(x_0);  t ~ Uniform({0, ..., T-1});  eps ~ N(0, I)
        gradient step on || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
    until converged

Reproducibility by construction: the data order of step s comes from a permutation seeded by
(seed, epoch), and t, eps, flips and dropout of step s from generators seeded by (seed, step).
Nothing random is carried from step to step, so a resumed run continues exactly, and N processes
draw the global batch's randomness and each take their slice of it: two processes train like one
process with the same global batch.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from .checkpoint import list_checkpoints, read_config, save_checkpoint
from .conditioning import TrainingConditions
from .config import Config, DiffusionConfig
from .data import Dataset, load_dataset
from .losses import training_losses
from .nets import build_network
from .reverse import default_variance
from .sampling import sample
from .schedules import NoiseSchedule


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, bad batch size ...)."""


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A generator that depends only on (seed, step, stream)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 7 + stream)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: positions [step*B, (step+1)*B) of an endless stream made of
    permutations of range(n), one per epoch, each seeded by (seed, epoch)."""
    start, stop = step * batch_size, (step + 1) * batch_size
    out = []
    for epoch in range(start // n, (stop - 1) // n + 1):
        perm = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))
        lo, hi = max(start - epoch * n, 0), min(stop - epoch * n, n)
        out.append(perm[lo:hi])
    return torch.cat(out)


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters and float buffers."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def ema_decay_at(step: int, decay: float) -> float:
    """Warm-up of the EMA decay (min(decay, (1 + s) / (10 + s))) so early weights fade fast."""
    return min(decay, (1 + step) / (10 + step))


def lr_at(step: int, cfg) -> float:
    """Linear warm-up, then constant (DDPM) or a cosine decay to 5% of lr at cfg.steps.

    A function of the step alone, so a resumed run follows the same curve."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def load_training_data(cfg: Config, split: str = "train") -> Dataset:
    """The configured dataset, or its latents when data.autoencoder names a trained autoencoder."""
    d = cfg.data
    dataset = load_dataset(d.name, d.path or None, d.image_size, d.channels, split=split)
    if d.autoencoder:
        from .autoencoder import encode_dataset, load_autoencoder

        dataset = encode_dataset(load_autoencoder(d.autoencoder).model, dataset)
    return dataset


def sample_timesteps(dc: DiffusionConfig, schedule: NoiseSchedule, n: int, generator: torch.Generator) -> torch.Tensor:
    """n training timesteps in 0..T-1: uniform (Algorithm 1); logit-normal, t = floor(T * sigmoid(u)),
    u ~ N(mean, std^2) (Esser et al. 2024), which trains the middle of the chain more often; or
    asymmetric (SpeeD, Wang et al. 2024): P(t) is asymmetric_k times larger where log-SNR(t) >=
    asymmetric_log_snr than in the nearly pure-noise tail beyond it."""
    T = schedule.T
    if dc.timestep_sampling == "uniform":
        return torch.randint(0, T, (n,), generator=generator)
    if dc.timestep_sampling == "asymmetric":
        weights = torch.where(schedule.log_snr >= dc.asymmetric_log_snr, dc.asymmetric_k, 1.0)
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    u = dc.logit_normal_mean + dc.logit_normal_std * torch.randn(n, generator=generator, dtype=torch.float64)
    return (torch.sigmoid(u) * T).long().clamp(0, T - 1)


def make_schedule(cfg: Config) -> NoiseSchedule:
    d = cfg.diffusion
    return NoiseSchedule.from_name(d.schedule, d.T, d.zero_terminal_snr)


def save_samples(model: nn.Module, cfg: Config, schedule: NoiseSchedule, shape: tuple[int, ...], path: Path, dataset: Dataset | None = None,
                 conditioning: TrainingConditions | None = None, decode=None):
    """Draw cfg.train.num_samples samples with fixed seeds and save a grid (images) or scatter (2-D).
    A conditional model draws classes 0, 1, 2, ... (or the first captions) without guidance."""
    from . import viz

    model.eval()
    n = cfg.train.num_samples
    device = next(model.parameters()).device
    model_kwargs = {k: v.to(device) for k, v in conditioning.preview(n).items()} if conditioning is not None else None
    out = sample(model, (n, *shape), schedule, steps=cfg.train.sample_steps, prediction=cfg.diffusion.prediction,
                 learned_variance=cfg.diffusion.learned_variance, generator=0, clip_x0=len(shape) == 3,
                 variance=default_variance(cfg.diffusion.learned_variance),
                 model_kwargs=model_kwargs)
    x = out.x if decode is None else decode(out.x)  # latent diffusion: show decoded images
    if x.ndim == 4:
        viz.save_grid(x, path)
    else:
        ref = dataset.get_batch(torch.arange(min(len(dataset), 5000))) if dataset is not None else None
        viz.scatter_2d(out.x, path, ref)
    return x


def held_out_bpd(model: nn.Module, cfg: Config, schedule: NoiseSchedule, train_set: Dataset, n: int = 64,
                 conditioning: TrainingConditions | None = None) -> float:
    """The cheap metric logged during training: an unbiased VLB estimate in bits/dim on the same
    n held-out examples, noise levels and noise every time (the training set for data without a
    held-out split). Conditional models are scored unconditionally (null condition)."""
    from .evaluate.likelihood import LN2, vlb_estimate

    try:
        data = load_training_data(cfg, split="test")
    except Exception:
        data = train_set
    device = next(model.parameters()).device
    x0 = data.get_batch(torch.arange(min(n, len(data)))).to(device)
    images = x0.ndim == 4
    null = conditioning.null_batch(len(x0)) if conditioning is not None else {}
    est = vlb_estimate(model, x0, schedule, cfg.diffusion.prediction, cfg.diffusion.learned_variance, draws=8,
                       decoder="discretized" if images else "gaussian", clip_x0=images,
                       generator=torch.Generator().manual_seed(cfg.train.seed),
                       model_kwargs={k: v.to(device) for k, v in null.items()})
    return est.mean().item() / LN2


def train(cfg: Config, resume: bool = False, progress: bool = True) -> Path:
    """Train a model as configured; returns the run folder. Launch with `accelerate launch` or
    `torchrun` for several processes; the code is the same."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from accelerate.state import AcceleratorState

    tc, dc = cfg.train, cfg.diffusion
    # accelerate keeps settings such as mixed precision in a process-wide singleton; forget them so
    # train() can be called again with other settings (notebooks, tests). The process group stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    if tc.batch_size % world:
        raise TrainingError(f"train.batch_size={tc.batch_size} must be divisible by the {world} processes")
    local_bs = tc.batch_size // world
    run_dir = Path(tc.run_dir)

    dataset = load_training_data(cfg)
    shape = dataset.shape
    schedule = make_schedule(cfg)
    conditioning = TrainingConditions.for_config(cfg, dataset)
    decode = None
    if cfg.data.autoencoder:
        from .autoencoder import load_autoencoder

        decode = load_autoencoder(cfg.data.autoencoder).model.from_latent
    torch.manual_seed(tc.seed)  # the initial weights come from the seed too
    model = build_network(cfg.network, shape, dc.learned_variance)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)

    start_step = 0
    if resume:
        found = list_checkpoints(run_dir)
        if not found:
            raise TrainingError(f"--resume: no checkpoint in {run_dir}")
        ckpt = found[-1]
        saved_cfg, start_step, _ = read_config(ckpt)
        if saved_cfg.network != cfg.network or saved_cfg.diffusion != cfg.diffusion or saved_cfg.data != cfg.data:
            raise TrainingError(f"--resume: the data, network or diffusion settings differ from {ckpt / 'config.json'}")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ckpt / "model.safetensors"))
        ema.load_state_dict(load_file(ckpt / "ema.safetensors"))
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
        accelerator.print(f"resumed from {ckpt} at step {start_step}")

    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    writer = None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(cfg.to_json())
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tb"))
    log_file = run_dir / "train_log.jsonl"

    def checkpoint(step: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(run_dir, step, cfg, shape, accelerator.unwrap_model(model), ema, optimizer, tc.keep_checkpoints)
        accelerator.wait_for_everyone()

    bar = tqdm(total=tc.steps, initial=start_step, disable=not (progress and accelerator.is_main_process), desc="train", dynamic_ncols=True)
    t_start = time.time()
    t_window, n_window, loss_window = time.time(), 0, []
    step = start_step
    model.train()
    while step < tc.steps:
        # ---- the randomness of this step, for the global batch; this process takes its slice
        g = step_generator(tc.seed, step)
        idx = batch_indices(step, tc.batch_size, len(dataset), tc.seed)
        t_all = sample_timesteps(dc, schedule, tc.batch_size, g)
        noise_all = torch.randn((tc.batch_size, *shape), generator=g)
        flip_all = torch.rand(tc.batch_size, generator=g) < 0.5
        cond_all = conditioning.batch(idx, g)  # labels or prompt embeddings, some dropped to the null condition
        mine = slice(rank * local_bs, (rank + 1) * local_bs)
        x0 = dataset.get_batch(idx[mine])
        if cfg.data.hflip:
            x0 = torch.where(flip_all[mine, None, None, None], x0.flip(-1), x0)
        x0, t, noise = (v.to(accelerator.device) for v in (x0, t_all[mine], noise_all[mine]))
        cond = {k: v[mine].to(accelerator.device) for k, v in cond_all.items()}
        torch.manual_seed((tc.seed * 1_000_003 + step) * 31 + rank)  # dropout masks

        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tc)
        with accelerator.autocast():
            losses = training_losses(model, x0, t, schedule, noise, dc.prediction, dc.loss, dc.learned_variance,
                                     dc.min_snr_gamma or None, model_kwargs=cond)
        loss = losses["loss"].float().mean()
        # one small all-gather per step: every process sees every loss and the stop flag
        out_of_time = tc.max_minutes > 0 and (time.time() - t_start) > 60 * tc.max_minutes
        flags = accelerator.gather(torch.stack([loss.detach(), torch.tensor(float(out_of_time), device=loss.device)])[None])
        if not bool(torch.isfinite(flags[:, 0]).all()):
            last = list_checkpoints(run_dir)
            raise TrainingError(
                f"loss became {flags[:, 0].tolist()} at step {step} (lr={lr_at(step, tc):.3g}); nothing was saved for this step. "
                f"Lower train.lr or raise train.warmup_steps; last good checkpoint: {last[-1] if last else 'none'}"
            )
        if bool(flags[:, 1].any()):
            accelerator.print(f"stopping after {tc.max_minutes} minutes at step {step}")
            break
        accelerator.backward(loss)
        if tc.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema, accelerator.unwrap_model(model), ema_decay_at(step, tc.ema_decay))
        step += 1

        n_window += tc.batch_size
        loss_window.append(flags[:, 0].mean().item())
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            rate = n_window / max(time.time() - t_window, 1e-9)
            mean_loss = sum(loss_window) / len(loss_window)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
            if writer is not None:
                writer.add_scalar("train/loss", mean_loss, step)
                writer.add_scalar("train/lr", lr_at(step - 1, tc), step)
                writer.add_scalar("train/examples_per_s", rate, step)
                with open(log_file, "a") as f:
                    f.write(json.dumps({"step": step, "loss": mean_loss, "examples_per_s": rate, "lr": lr_at(step - 1, tc), "world_size": world}) + "\n")
            t_window, n_window, loss_window = time.time(), 0, []
        if tc.sample_every and step % tc.sample_every == 0 and accelerator.is_main_process:
            x = save_samples(ema, cfg, schedule, shape, run_dir / "samples" / f"step-{step:07d}.png", dataset, conditioning, decode)
            if writer is not None and x.ndim == 4:
                from .viz import make_grid

                writer.add_image("samples", make_grid(x), step, dataformats="HWC")
            model.train()
        if tc.eval_every and step % tc.eval_every == 0 and accelerator.is_main_process:
            bpd = held_out_bpd(ema, cfg, schedule, dataset, conditioning=conditioning)
            if writer is not None:
                writer.add_scalar("eval/bpd_vlb_estimate", bpd, step)
                with open(log_file, "a") as f:
                    f.write(json.dumps({"step": step, "bpd_vlb_estimate": bpd}) + "\n")
            if progress:
                bar.write(f"step {step}: held-out bits/dim (VLB estimate) {bpd:.3f}")
        if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps:
            checkpoint(step)
    bar.close()
    checkpoint(step)
    in_sync = check_in_sync(accelerator, model)
    if accelerator.is_main_process:
        with open(log_file, "a") as f:
            f.write(json.dumps({"step": step, "done": True, "world_size": world, "params_in_sync": in_sync}) + "\n")
    if writer is not None:
        writer.close()
    return run_dir


def check_in_sync(accelerator, model: nn.Module) -> bool:
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
