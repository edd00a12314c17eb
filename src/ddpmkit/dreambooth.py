"""DreamBooth (Ruiz et al. 2023): teach a text model a new subject from a few images, bound to a rare-token prompt,
without forgetting its class. The instance images all get dreambooth.instance_prompt ("a sks digit"); the base
model's own images of dreambooth.class_prompt ("a digit"), drawn once and cached in the run folder, keep the
class as the base model drew it (prior preservation). Training minimises

    L = E_instance[ L_simple ] + prior_loss_weight * E_class[ L_simple ],

which, with batches drawn uniformly from the n_i + n_c examples together, is each example's loss times
(n_i + n_c) / n_i for an instance image and prior_loss_weight * (n_i + n_c) / n_c for a class image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Config
from .errors import UserError
from .models import load_diffusion
from .pipelines.generate import generate
from .pipelines.guided import GuidanceRequest

CACHE = "class_images.safetensors"


class DreamBoothError(UserError):
    pass


def example_weights(n_instance: int, n_class: int, prior_loss_weight: float) -> torch.Tensor:
    """Per-example loss weights (n_i + n_c,) that make the uniform-batch mean the DreamBooth loss above."""
    n = n_instance + n_class
    w = torch.full((n,), n / n_instance)
    if n_class:
        w[n_instance:] = prior_loss_weight * n / n_class
    return w


def class_images(cfg: Config, image_shape: tuple[int, ...]) -> torch.Tensor:
    """dreambooth.class_images images of dreambooth.class_prompt drawn by the base model (train.init_from), seeds
    0, 1, ..., in data space (n, C, H, W); cached in the run folder, keyed by how they were drawn."""
    db = cfg.dreambooth
    how = {"base": str(cfg.train.init_from), "prompt": db.class_prompt, "n": db.class_images, "sampler": db.class_sampler,
           "steps": db.class_steps, "guidance": db.class_guidance}
    cache = Path(cfg.train.run_dir) / CACHE
    if cache.is_file():
        with safe_open(str(cache), "pt") as f:
            if json.loads((f.metadata() or {}).get("drawn", "{}")) == how:
                return f.get_tensor("images")
    base = load_diffusion(cfg.train.init_from, device="cpu")  # class images are data: made on the CPU, as the engine's data is
    if base.conditioning != "text":  # else GuidanceRequest's "giving --prompt needs ...", a flag this command has not
        raise DreamBoothError(f"DreamBooth binds a new subject to a prompt: the base model {cfg.train.init_from} (train.init_from) is "
                              f"conditioned on {base.conditioning}, not text (e.g. ddpmkit train mnist_text)")
    if tuple(base.image_shape) != tuple(image_shape):
        C, size = base.image_shape[0], base.image_shape[-1]
        raise DreamBoothError(f"the base model {cfg.train.init_from} draws images of shape {tuple(base.image_shape)}, the instance images "
                              f"are {tuple(image_shape)}: load them at its size with data.image_size={size} data.channels={C}")
    print(f"dreambooth: drawing {db.class_images} class images of {db.class_prompt!r} with the base model (cached in {cache})")
    images = generate(base, db.class_images, GuidanceRequest(prompts=[db.class_prompt], scale=db.class_guidance), db.class_sampler,
                      db.class_steps, seed=0, progress=False).images.contiguous()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".tmp-{os.getpid()}-{cache.name}")  # each process of a multi-process run draws the same images
    save_file({"images": images}, tmp, metadata={"drawn": json.dumps(how)})
    tmp.replace(cache)  # whole or not at all
    return images


def check(cfg: Config) -> None:
    """One clear error for a DreamBooth run that cannot work."""
    if not cfg.train.init_from:
        raise DreamBoothError("DreamBooth fine-tunes a trained text model: give train.init_from (e.g. runs/mnist_text)")
    if not (cfg.network.text_encoder or cfg.network.kind == "diffusers"):
        raise DreamBoothError("DreamBooth binds a new subject to a prompt: the model must be text-conditional (network.text_encoder)")
