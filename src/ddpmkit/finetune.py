"""Fine-tuning: a run that starts from another run's weights (train.init_from) and trains all of them, or
only low-rank adapters on chosen layers (LoRA, Hu et al. 2022: W x + (alpha / r) B A x, with B = 0 at the
start, so the adapted network begins exactly as its base). The adapters come from peft, the well-kept
library for them; this module decides where they go, what is frozen and what a checkpoint holds.

A LoRA run saves only its adapters (checkpoint.saved_state); its base is its init_from's EMA weights, which
the loader puts under them again (`adapt`), so a checkpoint stays small and frozen weights are never written twice.

init_from may also name a diffusers pipeline folder (Stable Diffusion, or an unconditional UNet pipeline):
`pipeline_config` makes the run's network that folder's UNet (network.kind = "diffusers"), its [diffusion] the
folder's scheduler, its latents the folder's VAE and its prompts the folder's text encoder, all frozen but the UNet.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from .checkpoint import ADAPTER_KEY, read_config, read_weights, resolve_checkpoint
from .config import Config
from .diffusers_bridge import diffusion_config, pipeline_folder, read_index
from .errors import UserError


class FineTuneError(UserError):
    pass


def base_checkpoint(init_from: str, cfg: Config) -> Path:
    """The checkpoint of the run to start from, checked to be of the same kind and network (before this run's network
    is built: one of another shape fails in its own words, far from the cause)."""
    ckpt = resolve_checkpoint(init_from)
    base_cfg, _ = read_config(ckpt)
    if base_cfg.train.lora_rank:
        raise FineTuneError(f"train.init_from {init_from} is itself a LoRA run: start from a run with full weights")
    if differ := cfg.differences(base_cfg, ("network",)):
        config = ckpt.parent / "config.json" if (ckpt.parent / "config.json").is_file() else ckpt / "config.json"
        raise FineTuneError(f"train.init_from {init_from}: a fine-tuning run has its base's train.task and [network] section, and "
                            f"{'; '.join(differ)}: give the same keys, or start from its config (`ddpmkit train {config} ...`)")
    return ckpt


def base_weights(init_from: str, cfg: Config) -> dict[str, torch.Tensor]:
    """The EMA weights of the run to start from (base_checkpoint)."""
    return read_weights(base_checkpoint(init_from, cfg), "ema")


def pipeline_config(cfg: Config) -> Config:
    """cfg for fine-tuning (or distilling) the diffusers pipeline folder train.init_from (or distill.teacher) names (cfg
    itself for anything else):
    the folder's UNet, scheduler, VAE and text encoder replace [network], [diffusion], data.autoencoder and the
    text encoder, so the run's config.json says what it trained."""
    # the pipeline a run fine-tunes, or the one a distillation run's student starts from (its teacher)
    base = cfg.train.init_from or (cfg.distill.teacher if cfg.train.task in ("progressive", "consistency") else "")
    folder = pipeline_folder(base) if base else None
    if folder is None:
        return cfg
    index = read_index(folder)
    scheduler = json.loads(next((folder / "scheduler").glob("*.json")).read_text())
    diffusion = diffusion_config(scheduler)
    # the model's parameterization is the folder's; the loss weighting and timestep sampling stay the config's
    diffusion = dataclasses.replace(cfg.diffusion, schedule=diffusion.schedule, T=diffusion.T, zero_terminal_snr=diffusion.zero_terminal_snr,
                                    prediction=diffusion.prediction, learned_variance=diffusion.learned_variance, precondition="none")
    text = "text_encoder" in index and (folder / "text_encoder").is_dir()
    # SDXL's context is both encoders' hidden states side by side
    encoders = [folder / name for name in ("text_encoder", "text_encoder_2") if name in index and (folder / name).is_dir()]
    context = sum(json.loads((e / "config.json").read_text()).get("hidden_size", 0) for e in encoders) if text else cfg.network.context_dim
    network = dataclasses.replace(cfg.network, kind="diffusers", pipeline=str(folder), text_encoder=str(folder) if text else "",
                                  context_dim=context, num_classes=0)
    data = dataclasses.replace(cfg.data, autoencoder=str(folder) if "vae" in index else "")
    return dataclasses.replace(cfg, diffusion=diffusion, network=network, data=data)


def adapt(net: nn.Module, cfg: Config) -> nn.Module:
    """The network a run with train.init_from trains or loads: its base's weights, with LoRA adapters on
    the train.lora_targets layers (only those train) when train.lora_rank > 0."""
    tc = cfg.train
    if not tc.init_from:
        return net
    if cfg.network.kind != "diffusers":  # a pipeline's UNet comes with its weights
        net.load_state_dict(base_weights(tc.init_from, cfg))
    if not tc.lora_rank:
        return net
    from peft import LoraConfig, inject_adapter_in_model  # optional ([finetune] extra); imported only for LoRA runs

    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)
             and any(name == t or name.endswith("." + t) for t in tc.lora_targets)]  # "qkv", or diffusers' "to_out.0"
    if not names:
        layers = sorted({name.split(".")[-1] for name, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)})
        raise FineTuneError(f"no layer of this network is named {list(tc.lora_targets)}: train.lora_targets takes some of {layers}")
    lora = LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha or tc.lora_rank, target_modules=names, lora_dropout=0.0)
    net = inject_adapter_in_model(lora, net)
    for name, p in net.named_parameters():
        p.requires_grad_(ADAPTER_KEY in name)
    return net


def write_diffusers_lora(net: nn.Module, cfg: Config, folder) -> None:
    """The adapters of a LoRA run on a Stable Diffusion UNet (network.kind = "diffusers"), written by diffusers'
    own writer as folder/pytorch_lora_weights.safetensors, with their rank and alpha, for pipe.load_lora_weights."""
    import diffusers  # optional extras ([diffusers], [finetune]): only Stable Diffusion LoRA runs come here
    from peft import LoraConfig  # (the same)

    tc = cfg.train
    state = {k.removeprefix("unet.").replace(".default.", "."): v.detach().cpu().contiguous()
             for k, v in net.state_dict().items() if ADAPTER_KEY in k}
    targets = sorted({k.split(f".{ADAPTER_KEY}")[0] for k in state})
    lora = LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha or tc.lora_rank, target_modules=targets, lora_dropout=0.0)
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=state, unet_lora_adapter_metadata=lora.to_dict())
