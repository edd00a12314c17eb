"""Checkpoints: a folder with safetensors weights, a JSON config and the optimizer state.

    ckpt-0001000/
        config.json        the full Config, the step and the data shape
        ema.safetensors    EMA weights (what sampling uses)
        model.safetensors  raw weights
        optimizer.pt       AdamW state (training only)

Each checkpoint is written into a temporary folder and renamed into place, so a crash or kill
never leaves a half-written checkpoint where resume or sampling would read it.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import Config, build_config
from .nets import build_network
from .nets.unet import UNet, upgrade_legacy_keys
from .schedules import NoiseSchedule

CKPT_RE = re.compile(r"^ckpt-(\d+)$")


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint."""


@contextlib.contextmanager
def atomic_folder(final: Path):
    """Yield a temporary folder next to `final`; on success it replaces `final` in one rename, on
    any error it is removed, so readers never see a half-written folder."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_module_folder(final: Path, meta: dict, name: str, module: nn.Module) -> Path:
    """A trained part (autoencoder, noisy classifier) as final/{config.json, name.safetensors}, atomically."""
    with atomic_folder(final) as tmp:
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
    return Path(final)


def read_module_folder(path: str | Path, name: str, command: str) -> tuple[Path, dict, dict[str, torch.Tensor]]:
    """(folder, config dict, weights) of a part saved by save_module_folder; path may be its run folder."""
    path = Path(path)
    if (path / name).is_dir():
        path = path / name
    if not (path / f"{name}.safetensors").is_file():
        raise CheckpointError(f"no {name} at {path} (expected {name}.safetensors from `ddpmkit {command}`)")
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'config.json'}: {e}") from None
    return path, meta, load_file(path / f"{name}.safetensors")


def save_checkpoint(
    run_dir: str | Path, step: int, config: Config, data_shape: tuple[int, ...], model: nn.Module, ema: nn.Module,
    optimizer: torch.optim.Optimizer | None = None, keep: int = 0,
) -> Path:
    """Write run_dir/ckpt-{step:07d} atomically and keep only the newest `keep` (0 = all)."""
    run_dir = Path(run_dir)
    final = run_dir / f"ckpt-{step:07d}"
    with atomic_folder(final) as tmp:
        meta = {**config.to_dict(), "step": step, "data_shape": list(data_shape)}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, tmp / "ema.safetensors")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in run_dir, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CKPT_RE.match(p.name)) and (p / "config.json").is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself or from its run folder (then the newest)."""
    path = Path(path)
    if (path / "config.json").is_file() and (path / "ema.safetensors").is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise CheckpointError(f"no checkpoint at {path} (expected a ckpt-XXXXXXX folder or a run folder containing one)")


@dataclass
class LoadedModel:
    """A trained model ready for sampling: the network, its config and its noise schedule."""

    network: nn.Module
    config: Config
    schedule: NoiseSchedule
    data_shape: tuple[int, ...]
    step: int
    path: Path
    autoencoder: "nn.Module | None" = None  # latent diffusion: decode samples with autoencoder.from_latent

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in data space: decoded latents for a latent model, else x itself."""
        return x if self.autoencoder is None else self.autoencoder.from_latent(x)


def read_config(ckpt: Path) -> tuple[Config, int, tuple[int, ...]]:
    try:
        meta = json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {ckpt / 'config.json'}: {e}") from None
    step, shape = meta.pop("step", 0), tuple(meta.pop("data_shape", ()))
    return build_config(meta), step, shape


def load_model(path: str | Path, weights: str = "ema", device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint for sampling ('ema' or 'model' weights), in eval mode."""
    ckpt = resolve_checkpoint(path)
    config, step, shape = read_config(ckpt)
    net = build_network(config.network, shape, config.diffusion.learned_variance)
    file = ckpt / f"{weights}.safetensors"
    if not file.is_file():
        raise CheckpointError(f"missing weights file {file}")
    try:
        state = load_file(file)
        net.load_state_dict(upgrade_legacy_keys(state) if isinstance(net, UNet) else state)
    except Exception as e:
        raise CheckpointError(f"cannot load {file}: {e}") from None
    net.to(device).eval()
    d = config.diffusion
    schedule = NoiseSchedule.from_name(d.schedule, d.T, d.zero_terminal_snr)
    autoencoder = None
    if config.data.autoencoder:
        from .autoencoder import load_autoencoder

        autoencoder = load_autoencoder(config.data.autoencoder).model.to(device)
    return LoadedModel(net, config, schedule, shape, step, ckpt, autoencoder)
