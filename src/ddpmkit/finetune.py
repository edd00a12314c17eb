"""Fine-tuning: a run that starts from another run's weights (train.init_from) and trains all of them, or
only low-rank adapters on chosen layers (LoRA, Hu et al. 2022: W x + (alpha / r) B A x, with B = 0 at the
start, so the adapted network begins exactly as its base). The adapters come from peft, the well-kept
library for them; this module decides where they go, what is frozen and what a checkpoint holds.

A LoRA run saves only its adapters (checkpoint.saved_state); its base is its init_from's EMA weights, which
the loader puts under them again (`adapt`), so a checkpoint stays small and frozen weights are never written twice.
"""
from __future__ import annotations

import torch
from torch import nn

from .checkpoint import ADAPTER_KEY, read_config, read_weights, resolve_checkpoint
from .config import Config
from .errors import UserError


class FineTuneError(UserError):
    pass


def base_weights(init_from: str, cfg: Config) -> dict[str, torch.Tensor]:
    """The EMA weights of the run to start from, checked to be of the same kind and network."""
    ckpt = resolve_checkpoint(init_from)
    base_cfg, _ = read_config(ckpt)
    if base_cfg.train.lora_rank:
        raise FineTuneError(f"train.init_from {init_from} is itself a LoRA run: start from a run with full weights")
    if (base_cfg.train.task, base_cfg.network) != (cfg.train.task, cfg.network):
        raise FineTuneError(f"train.init_from {init_from} is a {base_cfg.train.task} run with another network: a fine-tuning run has its "
                            f"base's train.task and [network] section (start from its config, `ddpmkit train {ckpt}/config.json ...`)")
    return read_weights(ckpt, "ema")


def adapt(net: nn.Module, cfg: Config) -> nn.Module:
    """The network a run with train.init_from trains or loads: its base's weights, with LoRA adapters on
    the train.lora_targets layers (only those train) when train.lora_rank > 0."""
    tc = cfg.train
    if not tc.init_from:
        return net
    net.load_state_dict(base_weights(tc.init_from, cfg))
    if not tc.lora_rank:
        return net
    from peft import LoraConfig, inject_adapter_in_model  # optional ([finetune] extra); imported only for LoRA runs

    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)
             and name.split(".")[-1] in tc.lora_targets]
    if not names:
        layers = sorted({name.split(".")[-1] for name, m in net.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)})
        raise FineTuneError(f"no layer of this network is named {list(tc.lora_targets)}: train.lora_targets takes some of {layers}")
    lora = LoraConfig(r=tc.lora_rank, lora_alpha=tc.lora_alpha or tc.lora_rank, target_modules=names, lora_dropout=0.0)
    net = inject_adapter_in_model(lora, net)
    for name, p in net.named_parameters():
        p.requires_grad_(ADAPTER_KEY in name)
    return net
