"""LoRA adapters on a loaded model, merged into its weights at a scale: W + scale * (alpha / r) B A
(`ddpmkit sample MODEL --lora FILE:0.8 --lora OTHER:0.5`). Two sources:

    a diffusers LoRA file or folder (pytorch_lora_weights.safetensors; diffusers' own and the Kohya/A1111
      formats diffusers converts) on a Stable Diffusion folder: diffusers' loader reads it, UNet and text
      encoder alike, so a file loads here as it does in `pipe.load_lora_weights`;
    a ddpmkit LoRA run (train.lora_rank > 0) on a run with the same network: its adapters, through peft.

Merging costs nothing per sampling step; `unmerge()` gives the base weights back (to float rounding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from .checkpoint import ADAPTER_KEY, read_config, read_weights, resolve_checkpoint
from .errors import UserError


class LoadedModel(Protocol):
    """What merging needs of a loaded model (models.DiffusionModel; models imports this module, not the reverse)."""

    network: nn.Module
    config: Any
    path: Path

    @property
    def device(self) -> torch.device: ...


class LoRAError(UserError):
    pass


@dataclass(frozen=True)
class LoRA:
    path: str
    scale: float = 1.0


def parse_lora(spec: str) -> LoRA:
    """FILE or FILE:SCALE (the scale multiplies the adapter's alpha / r; 1 by default)."""
    path, _, scale = spec.rpartition(":")
    if not path:  # no colon
        return LoRA(spec)
    try:
        value = float(scale)
    except ValueError:
        return LoRA(spec)  # a colon inside the path, no scale
    if not math.isfinite(value):
        raise LoRAError(f"--lora {spec}: the scale must be a finite number, e.g. {path}:0.8")
    return LoRA(path, value)


@dataclass
class MergedLoRAs:
    """The LoRAs merged into a model; unmerge() takes them out again."""

    loras: list[LoRA]
    _unmerge: list = field(default_factory=list, repr=False)

    def unmerge(self) -> None:
        for undo in reversed(self._unmerge):
            undo()
        self._unmerge.clear()


def merge_loras(m: LoadedModel, loras: list[LoRA]) -> MergedLoRAs:
    """Merge each LoRA into m's weights at its scale (m.parts: a diffusers folder; else a ddpmkit run)."""
    merged = MergedLoRAs(list(loras))
    if not loras:
        return merged
    for lora in loras:
        if not Path(lora.path).exists():
            raise LoRAError(f"--lora {lora.path}: no such file or folder")
    if getattr(m, "parts", None) is not None:
        merged._unmerge.append(_merge_diffusers(m, loras))
    else:
        for i, lora in enumerate(loras):
            merged._unmerge.append(_merge_run(m, lora, f"lora_{i}"))
    return merged


def _merge_diffusers(m: LoadedModel, loras: list[LoRA]):
    """diffusers' own loader on a pipeline made of the folder's parts (the same modules, so the merge lands in m)."""
    import diffusers  # optional ([diffusers] extra), as the folder itself

    parts = m.parts
    if parts.prompts is None:
        raise LoRAError(f"{m.path} is an unconditional pipeline: diffusers' LoRA files are for Stable Diffusion folders")
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts.autoencoder.vae, text_encoder=parts.prompts.text_encoder, tokenizer=parts.prompts.tokenizer, unet=parts.network.unet,
        scheduler=diffusers.DDPMScheduler.from_config(parts.scheduler_config), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    names = [f"lora_{i}" for i in range(len(loras))]
    for name, lora in zip(names, loras):
        if Path(lora.path, "config.json").is_file() and not Path(lora.path, "pytorch_lora_weights.safetensors").is_file():
            raise LoRAError(f"--lora {lora.path} is a ddpmkit run: a ddpmkit LoRA run merges into the run it fine-tuned, not into "
                            f"the pipeline folder {m.path}")
        try:
            pipe.load_lora_weights(lora.path, adapter_name=name)
        except (ValueError, KeyError, OSError, RuntimeError) as e:
            raise LoRAError(f"--lora {lora.path} is not a LoRA for this pipeline: {e}") from None
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])
    pipe.fuse_lora(adapter_names=names)

    def unmerge() -> None:
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
    return unmerge


def _merge_run(m: LoadedModel, lora: LoRA, name: str):
    """A ddpmkit LoRA run's adapters, injected into m's network by peft under `name` and merged at lora.scale."""
    from peft import LoraConfig, inject_adapter_in_model  # the [finetune] extra
    from peft.tuners.lora import LoraLayer

    if Path(lora.path).is_file():
        raise LoRAError(f"--lora {lora.path} is a LoRA file (diffusers' or Kohya's format): it merges into a Stable Diffusion "
                        f"folder; into a ddpmkit run such as {m.path} merges a ddpmkit LoRA run's folder (train.lora_rank > 0)")
    ckpt = resolve_checkpoint(lora.path)
    cfg, _ = read_config(ckpt)
    tc = cfg.train
    if not tc.lora_rank:
        raise LoRAError(f"--lora {lora.path} is a run without adapters (train.lora_rank = 0): load it as a model instead")
    if (cfg.train.task, cfg.network) != (m.config.train.task, m.config.network):
        raise LoRAError(f"--lora {lora.path} adapts another kind of network than {m.path}'s ({cfg.train.task}, its [network] "
                        f"section): merge it into the run it fine-tuned, {tc.init_from}")
    state = read_weights(ckpt, "ema")
    targets = sorted({k.split(f".{ADAPTER_KEY}")[0] for k in state})
    inject_adapter_in_model(LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha or tc.lora_rank, target_modules=targets,
                                       lora_dropout=0.0), m.network, adapter_name=name)
    renamed = {k.replace(".default.", f".{name}."): v.to(m.device) for k, v in state.items()}
    missing, unexpected = m.network.load_state_dict(renamed, strict=False)
    if unexpected or any(f".{name}." in k for k in missing):
        raise LoRAError(f"--lora {lora.path}: its adapters do not fit {m.path}'s network")
    layers = [mod for mod in m.network.modules() if isinstance(mod, LoraLayer) and name in mod.lora_A]
    for layer in layers:
        layer.scaling[name] *= lora.scale
        layer.merge(adapter_names=[name])

    def unmerge() -> None:
        for layer in layers:
            layer.unmerge()
    return unmerge

