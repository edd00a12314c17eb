"""Training and loading the noisy classifier p_phi(y | x_t) of classifier guidance.

The classifier sees x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps at uniform t, with the
same schedule as the diffusion model it will guide (Dhariwal & Nichol 2021, section 4). It is
saved like a diffusion checkpoint: classifier.safetensors and config.json, written atomically.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import read_module_folder, save_module_folder
from .config import Config, build_config
from .data import load_dataset
from .nets.classifier import NoisyClassifier, random_shift
from .process import q_sample
from .schedules import NoiseSchedule
from .train import batch_indices, lr_at, make_schedule, step_generator


def build_classifier(cfg: Config, shape: tuple[int, ...]) -> NoisyClassifier:
    if len(shape) != 3:
        raise ValueError(f"the noisy classifier needs images (C, H, W); the data has shape {shape}")
    n = cfg.network
    if n.num_classes < 2:
        raise ValueError("set network.num_classes to the number of classes (>= 2) for the noisy classifier")
    return NoisyClassifier(shape[0], shape[1], n.num_classes, n.base_channels, n.channel_mult, n.num_res_blocks,
                           n.attention_resolutions, n.num_heads, n.dropout)


@torch.no_grad()
def accuracy_by_t(model: NoisyClassifier, x0: torch.Tensor, labels: torch.Tensor, schedule: NoiseSchedule,
                  timesteps: tuple[int, ...] = (0, 250, 500, 750, 900), seed: int = 0) -> dict[int, float]:
    """Held-out accuracy of the classifier on x_t at a few noise levels."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in timesteps:
        tt = torch.full((len(x0),), t)
        x_t = q_sample(x0, tt, schedule, torch.randn(x0.shape, generator=g))
        pred = torch.cat([model(c, tc.float()).argmax(1) for c, tc in zip(x_t.split(500), tt.split(500))])
        out[t] = (pred == labels).float().mean().item()
    return out


def train_noisy_classifier(cfg: Config, progress: bool = True) -> Path:
    """Train on the dataset's labels; returns the checkpoint folder (run_dir/classifier)."""
    from tqdm.auto import tqdm

    tc = cfg.train
    data = load_dataset(cfg.data.name, cfg.data.path or None, cfg.data.image_size, cfg.data.channels)
    if data.labels is None:
        raise ValueError(f"dataset {cfg.data.name!r} has no labels to train a classifier on")
    schedule = make_schedule(cfg)
    torch.manual_seed(tc.seed)
    model = build_classifier(cfg, data.shape)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    model.train()
    bar = tqdm(range(tc.steps), desc="classifier", disable=not progress, dynamic_ncols=True)
    for step in bar:
        g = step_generator(tc.seed, step)
        idx = batch_indices(step, tc.batch_size, len(data), tc.seed)
        x0 = random_shift(data.get_batch(idx), 2, g) if len(data.shape) == 3 else data.get_batch(idx)
        t = torch.randint(0, schedule.T, (len(idx),), generator=g)
        x_t = q_sample(x0, t, schedule, torch.randn(x0.shape, generator=g))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=tc.mixed_precision == "bf16"):
            logits = model(x_t, t.float())
        loss = F.cross_entropy(logits.float(), data.labels[idx])
        if not torch.isfinite(loss):
            raise RuntimeError(f"classifier loss became {loss.item()} at step {step}; lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        if step % tc.log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    try:
        test = load_dataset(cfg.data.name, cfg.data.path or None, cfg.data.image_size, cfg.data.channels, split="test")
        acc = accuracy_by_t(model, test.get_batch(torch.arange(len(test))), test.labels, schedule)
    except Exception:  # data without a held-out split
        acc = {}
    meta = {**cfg.to_dict(), "data_shape": list(data.shape), "held_out_accuracy_by_t": acc, "step": tc.steps}
    out = save_module_folder(Path(tc.run_dir) / "classifier", meta, "classifier", model)
    if acc:
        print("held-out accuracy on x_t: " + ", ".join(f"t={t}: {a:.1%}" for t, a in acc.items()))
    return out


@dataclass
class LoadedClassifier:
    network: NoisyClassifier
    config: Config
    schedule: NoiseSchedule
    accuracy_by_t: dict


def load_noisy_classifier(path: str | Path) -> LoadedClassifier:
    """A classifier folder from train-classifier (or its run folder)."""
    path, meta, weights = read_module_folder(path, "classifier", "train-classifier")
    shape, acc = tuple(meta.pop("data_shape")), meta.pop("held_out_accuracy_by_t", {})
    meta.pop("step", None)
    cfg = build_config(meta)
    net = build_classifier(cfg, shape)
    net.load_state_dict(weights)
    return LoadedClassifier(net.eval(), cfg, make_schedule(cfg), acc)
