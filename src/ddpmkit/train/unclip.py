"""unCLIP's two diffusion models as training tasks (Ramesh et al. 2022), on a trained CLIP (unclip.clip):

- the prior: a denoiser of CLIP image embeddings z_i, conditioned on the caption's tokens and its
  CLIP text embedding z_t (both dropped to the empty caption for classifier-free guidance);
- the decoder: the image denoiser conditioned on the image's own CLIP image embedding (dropped to
  the zero vector for classifier-free guidance).

Both are DenoiserTasks: same loss, schedules, conditioning drop and samplers; only their data and
condition differ.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import viz
from ..conditioning import TrainingConditions
from ..config import Config, ConfigError
from ..data import DataError, Dataset
from ..models import load
from ..nets.prior import prior_data_scale
from ..sampling import sample
from .denoiser import DenoiserTask, map_dataset


def frozen_clip(cfg: Config, image_shape: tuple[int, ...]) -> nn.Module:
    """The CLIP network of unclip.clip, checked against the config and the data."""
    if not cfg.unclip.clip:
        raise ConfigError("set unclip.clip to a CLIP run folder (ddpmkit train clip)")
    run = load(cfg.unclip.clip, device="cpu", kind="clip")  # embeddings are data: made on the CPU
    clip, theirs, ours = run.network, run.config.network, cfg.network
    if ours.text_encoder and (ours.text_encoder, ours.context_dim) != (theirs.text_encoder, theirs.context_dim):
        raise ConfigError(f"the CLIP at {cfg.unclip.clip} reads {theirs.text_encoder!r} tokens ({theirs.context_dim}-dim); set "
                          f"network.text_encoder and network.context_dim to match, not {ours.text_encoder!r} ({ours.context_dim})")
    if clip.embed_dim != cfg.unclip.embed_dim:
        raise ConfigError(f"the CLIP at {cfg.unclip.clip} embeds into {clip.embed_dim} dimensions but unclip.embed_dim = "
                          f"{cfg.unclip.embed_dim}; set unclip.embed_dim={clip.embed_dim}")
    if tuple(image_shape) != clip.image_shape:
        raise DataError(f"the CLIP at {cfg.unclip.clip} embeds images of shape {clip.image_shape}; the data has {tuple(image_shape)}")
    return clip


class PriorTask(DenoiserTask):
    name = "prior"

    def __init__(self, cfg: Config):
        if cfg.data.autoencoder:
            raise ConfigError("the prior diffuses CLIP image embeddings: leave data.autoencoder empty")
        self.clip = None
        super().__init__(cfg)

    def prepare(self, dataset: Dataset) -> Dataset:
        if self.clip is None:
            self.clip = frozen_clip(self.cfg, dataset.shape)
        scale = prior_data_scale(self.clip.embed_dim)
        return map_dataset(lambda x: scale * self.clip.embed_images(x), dataset)

    def training_conditions(self) -> TrainingConditions:
        """The caption's tokens plus its CLIP text embedding (key text_embed), as one table row."""
        tc = TrainingConditions.for_config(self.cfg, self.dataset)
        if tc.kind != "text":
            raise ConfigError("the prior is conditioned on captions: set network.text_encoder (e.g. 'all-MiniLM-L6-v2')")
        tc.table["text_embed"] = self.clip.embed_texts(tc.table)
        tc.null["text_embed"] = self.clip.embed_texts(tc.null)
        return tc

    def preview(self, ema: nn.Module, path: Path) -> None:
        return None  # embeddings are not pictures; evaluate() reports the VLB, the pipelines the cosine similarity


class DecoderTask(DenoiserTask):
    name = "decoder"

    def training_conditions(self) -> TrainingConditions:
        if self.autoencoder is not None:
            raise ConfigError("unCLIP's decoder works on pixels here: leave data.autoencoder empty")
        self.clip = frozen_clip(self.cfg, self.shape)
        embeds = self.clip.embed_images(self.dataset.get_batch(torch.arange(self.num_examples)))
        return TrainingConditions.image_embeddings(embeds, self.cfg.train.cond_drop_prob)

    def preview(self, ema: nn.Module, path: Path) -> torch.Tensor:
        """Held-out digits (odd rows) and a decoding of each one's CLIP embedding (even rows)."""
        tc = self.cfg.train
        device = next(ema.parameters()).device
        x = self.held_out[:min(16, tc.num_samples)]
        kwargs = {"image_embed": self.clip.embed_images(x).to(device)}
        out = sample(self.denoiser(ema), tuple(x.shape), steps=tc.sample_steps, generator=0, clip_x0=True, model_kwargs=kwargs)
        rows = torch.cat([x, out.x.cpu()])
        viz.save_grid(rows, path, nrow=len(x))
        return rows
