"""Networks, built from a Config: the built-in kinds of model (kinds.py) register their builders here,
so the loader and the trainer build the same thing."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import Config, NetworkConfig
from ..diffusers_bridge import read_unet
from ..distillation import ConsistencyFunction
from ..errors import UserError
from ..kinds import ModelKind, kind_of, register
from ..preconditioning import EDMPreconditioned
from ..uncertainty import UncertaintyWeighted
from .autoencoder import Autoencoder
from .classifier import DigitClassifier, NoisyClassifier
from .clip import CLIP
from .mlp import MLPDenoiser
from .prior import PriorTransformer
from .unet import UNet


def build_network(cfg: NetworkConfig, data_shape: tuple[int, ...], learned_variance: bool = False, low_res_channels: int = 0,
                  upsample: str = "bicubic", image_embed_dim: int = 0, embed_tokens: int = 4) -> nn.Module:
    """The denoiser network for examples of shape data_shape: (C, H, W) images or (D,) vectors.
    low_res_channels > 0: a super-resolution UNet that also sees an upsampled low-res image;
    image_embed_dim > 0: unCLIP's decoder, conditioned on CLIP image embeddings."""
    out_mult = 2 if learned_variance else 1
    if cfg.kind == "diffusers":  # a pipeline folder's UNet with its trained weights (train.init_from = the folder)
        return read_unet(Path(cfg.pipeline))
    if cfg.kind == "unet":
        if len(data_shape) != 3 or data_shape[1] != data_shape[2]:
            raise UserError(f"the UNet needs square images (C, H, H); the data has shape {data_shape} (use network.kind='mlp' for vectors)")
        C, H, _ = data_shape
        return UNet(
            in_channels=C, out_channels=C * out_mult, image_size=H, base_channels=cfg.base_channels,
            channel_mult=cfg.channel_mult, num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=cfg.attention_resolutions, num_heads=cfg.num_heads, dropout=cfg.dropout,
            num_classes=cfg.num_classes, context_dim=cfg.context_dim if cfg.text_encoder else 0, patch_size=cfg.patch_size,
            low_res_channels=low_res_channels, upsample_mode=upsample, image_embed_dim=image_embed_dim, embed_tokens=embed_tokens,
            narrow_upsampling=cfg.narrow_upsampling,
        )
    if cfg.kind == "mlp":
        if cfg.text_encoder:
            raise UserError("text conditioning needs network.kind = 'unet' (cross-attention); the MLP takes class labels only")
        if len(data_shape) != 1:
            raise UserError(f"the MLP needs vectors (D,); the data has shape {data_shape} (use network.kind='unet')")
        return MLPDenoiser(dim=data_shape[0], hidden=cfg.mlp_hidden, num_layers=cfg.mlp_layers, out_dim=data_shape[0] * out_mult,
                            num_classes=cfg.num_classes)
    raise UserError(f"unknown network kind {cfg.kind!r}; choose one of ['unet', 'mlp', 'diffusers']")


def build_super_resolution(cfg: Config, shape: tuple[int, ...]) -> nn.Module:
    """A super-resolution stage: the UNet for the high-res images, with their low-res version
    (superres.low_res per side, same channels) as extra input."""
    if cfg.network.kind != "unet" or len(shape) != 3:
        raise UserError(f"a super-resolution stage needs network.kind = 'unet' and images (C, H, W); got {cfg.network.kind!r} and {shape}")
    if cfg.superres.low_res >= shape[-1]:
        raise UserError(f"superres.low_res = {cfg.superres.low_res} must be smaller than the images' side {shape[-1]}")
    return build_network(cfg.network, shape, cfg.diffusion.learned_variance, low_res_channels=shape[0], upsample=cfg.superres.upsample)


def _check_classes(cfg: Config, shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 3:
        raise UserError(f"the {what} needs images (C, H, W); the data has shape {shape}")
    if cfg.network.num_classes < 2:
        raise UserError(f"set network.num_classes to the number of classes (>= 2) for the {what}")


def build_noisy_classifier(cfg: Config, shape: tuple[int, ...]) -> NoisyClassifier:
    """p_phi(y | x_t) for classifier guidance: the UNet's down path with the config's widths."""
    _check_classes(cfg, shape, "noisy classifier")
    n = cfg.network
    return NoisyClassifier(shape[0], shape[1], n.num_classes, n.base_channels, n.channel_mult, n.num_res_blocks,
                           n.attention_resolutions, n.num_heads, n.dropout)


def build_judge(cfg: Config, shape: tuple[int, ...]) -> DigitClassifier:
    """The evaluation judge: a small CNN on clean images."""
    _check_classes(cfg, shape, "judge")
    return DigitClassifier(shape[0], cfg.network.num_classes)


def build_clip(cfg: Config, shape: tuple[int, ...]) -> CLIP:
    """A CLIP: the image tower has the noisy classifier's architecture with an embed_dim-wide head."""
    if len(shape) != 3:
        raise UserError(f"CLIP's image tower needs images (C, H, W); the data has shape {shape}")
    if not cfg.network.text_encoder:
        raise UserError("CLIP's text tower projects a frozen text encoder: set network.text_encoder (e.g. 'all-MiniLM-L6-v2')")
    n, c = cfg.network, cfg.clip
    tower = NoisyClassifier(shape[0], shape[1], c.embed_dim, n.base_channels, n.channel_mult, n.num_res_blocks,
                            n.attention_resolutions, n.num_heads, n.dropout)
    return CLIP(tower, shape, n.context_dim, c.embed_dim, c.text_hidden, c.init_temperature, c.noisy)


def build_prior(cfg: Config, shape: tuple[int, ...]) -> PriorTransformer:
    """unCLIP's diffusion prior over (embed_dim,) CLIP image embeddings."""
    u = cfg.unclip
    if tuple(shape) != (u.embed_dim,):
        raise UserError(f"the prior denoises CLIP embeddings of shape ({u.embed_dim},); got {tuple(shape)}")
    if not cfg.network.text_encoder:
        raise UserError("the prior is conditioned on captions: set network.text_encoder (e.g. 'all-MiniLM-L6-v2')")
    return PriorTransformer(u.embed_dim, cfg.network.context_dim, u.prior_width, u.prior_layers, u.prior_heads, cfg.network.text_max_tokens)


def build_decoder(cfg: Config, shape: tuple[int, ...]) -> nn.Module:
    """unCLIP's decoder: the UNet, also conditioned on a CLIP image embedding."""
    if cfg.network.kind != "unet":
        raise UserError(f"unCLIP's decoder is a UNet: set network.kind = 'unet', not {cfg.network.kind!r}")
    return build_network(cfg.network, shape, cfg.diffusion.learned_variance, image_embed_dim=cfg.unclip.embed_dim,
                         embed_tokens=cfg.unclip.embed_tokens)


# every kind of run the engine trains: its network, whether it samples, its inputs and the next step (kinds.py)
register(ModelKind("denoiser", lambda cfg, shape: build_network(cfg.network, shape, cfg.diffusion.learned_variance), samples=True,
                   next_step="sample it: ddpmkit sample {run}"))
register(ModelKind("progressive", lambda cfg, shape: build_network(cfg.network, shape, cfg.diffusion.learned_variance), samples=True,
                   sampler="ddim_uniform", next_step="sample it in its student steps: ddpmkit sample {run}; "
                             "distil it again: ddpmkit train {run}/config.json distill.teacher={run} distill.student_steps=HALF "
                             "train.run_dir=NEW"))
register(ModelKind("consistency", lambda cfg, shape: build_network(cfg.network, shape, cfg.diffusion.learned_variance), samples=True,
                   wrap=lambda net, cfg: ConsistencyFunction(net, cfg.diffusion.noise_schedule()),
                   sampler="consistency", next_step="sample it in one to a few steps: ddpmkit sample {run} --steps 2"))
register(ModelKind("superres", build_super_resolution, samples=True, inputs=("low_res", "aug_level"),
                   next_step="upscale with it: ddpmkit upscale {run} mnist5k:7 --fit, or after a base model: ddpmkit sample BASE --then {run}"))
register(ModelKind("autoencoder", lambda cfg, shape: Autoencoder(shape, cfg.autoencoder),
                   next_step="latent diffusion: ddpmkit train mnist_latent data.autoencoder={run}"))
register(ModelKind("classifier", build_noisy_classifier,
                   next_step="classifier guidance: ddpmkit sample MODEL --classifier {run} --class 3 --classifier-scale 2"))
register(ModelKind("judge", build_judge))
register(ModelKind("clip", build_clip,
                   next_step="unCLIP: ddpmkit train unclip_prior unclip.clip={run} && ddpmkit train unclip_decoder unclip.clip={run}; "
                             "CLIP guidance (noisy CLIP): ddpmkit sample MODEL --clip {run} --prompt \"a handwritten seven\""))
register(ModelKind("prior", build_prior, samples=True, inputs=("text_embed",),
                   next_step="text to image: ddpmkit unclip {run} DECODER --prompt \"a handwritten seven\""))
register(ModelKind("decoder", build_decoder, samples=True, inputs=("image_embed",),
                   next_step="image variations: ddpmkit variations {run} mnist5k:7 --fit; "
                             "text to image: ddpmkit unclip PRIOR {run} --prompt \"...\""))


def build_for_task(cfg: Config, shape: tuple[int, ...]) -> nn.Module:
    """The network of a run of kind cfg.train.task (a denoiser wrapped in EDM's preconditioning
    when diffusion.precondition = 'edm', and given a learned per-level uncertainty head when
    diffusion.uncertainty_weighting)."""
    kind = kind_of(cfg.train.task)
    net = kind.build(cfg, tuple(shape))
    if kind.samples:
        if cfg.diffusion.precondition == "edm":
            net = EDMPreconditioned(net, cfg.diffusion.noise_schedule(), cfg.diffusion.sigma_data)
        if cfg.diffusion.uncertainty_weighting:
            net = UncertaintyWeighted(net, cfg.diffusion.noise_schedule())
    return net if kind.wrap is None else kind.wrap(net, cfg)


__all__ = ["Autoencoder", "CLIP", "DigitClassifier", "PriorTransformer", "MLPDenoiser", "NoisyClassifier", "UNet",
           "build_for_task", "build_network"]
