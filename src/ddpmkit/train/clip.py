"""CLIP as a training task: matching (image, caption) pairs, the symmetric InfoNCE loss.

    (x_i, c_i) ~ data, i = 1..B;  u_i = g(x_i) / |g(x_i)|;  v_i = h(c_i) / |h(c_i)|
    logits = u v^T / temperature;  loss = mean_i [CE(logits[i, :], i) + CE(logits[:, i], i)] / 2

Captions come as in text-conditional diffusion (a template per digit per step, or the .txt next
to each image of a folder). The noisy variant (clip.noisy) embeds x_t at uniform t, so it can
guide sampling. With several processes the embeddings are gathered (with their gradients), so
every process's examples see the whole global batch as negatives, as one process would.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_gather  # the autograd-aware all-gather

from ..captions import NUMBER_WORDS
from ..conditioning import TrainingConditions
from ..config import Config
from ..data import DataError
from ..losses import info_nce
from ..nets.classifier import random_shift
from ..process import q_sample
from ..text import TextEncoder
from .batches import Batch
from .task import Task

ZERO_SHOT_TEMPLATE = "a handwritten {word}"
ZERO_SHOT_TIMESTEPS = (0, 250, 500, 750)  # the noisy CLIP's zero-shot accuracy is logged on x_t at these t


def gather(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows of x, in rank order, keeping the gradient to this process's rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return torch.cat(all_gather(x.contiguous()))


@torch.no_grad()
def zero_shot_logits(clip: nn.Module, images: torch.Tensor, class_texts: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
    """Cosine similarity of each image's embedding to each class caption's: (B, K)."""
    device = next(clip.parameters()).device
    out = [clip.encode_image(x.to(device), None if t is None else t[:len(x)].to(device)) @ class_texts.to(device).T
           for x in images.split(500)]
    return torch.cat(out).cpu()


def digit_class_texts(clip: nn.Module, encoder: TextEncoder, template: str = ZERO_SHOT_TEMPLATE) -> torch.Tensor:
    """CLIP text embeddings of "a handwritten zero" .. "a handwritten nine": (10, E)."""
    tokens = encoder.encode([template.format(word=w, digit=d) for d, w in enumerate(NUMBER_WORDS)])
    device = next(clip.parameters()).device
    with torch.no_grad():
        return clip.encode_text(tokens["context"].to(device), tokens["context_mask"].to(device)).cpu()


class CLIPTask(Task):
    name = "clip"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.data = self.load_data()
        if len(self.data.shape) != 3:
            raise DataError(f"CLIP needs images with captions; dataset {cfg.data.name!r} has examples of shape {tuple(self.data.shape)}")
        self.shape, self.num_examples = tuple(self.data.shape), len(self.data)
        self.captions = TrainingConditions.for_config(cfg, self.data)
        if self.captions.kind != "text":
            raise DataError("CLIP trains on captions: set network.text_encoder (e.g. 'all-MiniLM-L6-v2')")
        self.captions.drop_prob = 0.0  # every image keeps its caption: there is no unconditional branch here
        self.schedule = cfg.diffusion.noise_schedule()

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        g, B = batch.generator, batch.size
        text = self.captions.batch(batch.indices, g)  # one caption per image, drawn per step
        x0 = random_shift(self.data.get_batch(batch.indices), 2, g)
        t = torch.randint(0, self.schedule.T, (B,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        if self.cfg.clip.noisy:
            x = q_sample(x0, t, self.schedule, noise)
        else:
            x, t = x0, torch.zeros(B, dtype=torch.long)
        image_embed, text_embed, scale = model(batch.local(x), batch.local(t).float(), batch.local(text["context"]),
                                               batch.local(text["context_mask"]))
        return info_nce(gather(image_embed), gather(text_embed), scale, batch.mine)

    def evaluate(self, ema: nn.Module) -> dict[str, float]:
        """Zero-shot accuracy on the held-out digits with the ten captions "a handwritten zero" ..
        (on x_t at a few t for a noisy CLIP), and the learned temperature."""
        out = {"temperature": 1.0 / float(ema.scale)}
        held_out = self.load_data("test")
        if held_out.labels is None or self.cfg.data.name not in ("mnist5k", "digits"):
            return out
        texts = digit_class_texts(ema, TextEncoder(self.cfg.network.text_encoder, self.cfg.network.text_max_tokens))
        x0 = held_out.get_batch(torch.arange(len(held_out)))
        g = torch.Generator().manual_seed(0)
        for t in ZERO_SHOT_TIMESTEPS if self.cfg.clip.noisy else (0,):
            tt = torch.full((len(x0),), t)
            x = q_sample(x0, tt, self.schedule, torch.randn(x0.shape, generator=g)) if t else x0
            pred = zero_shot_logits(ema, x, texts, tt.float() if self.cfg.clip.noisy else None).argmax(1)
            out[f"zero_shot_t{t}" if self.cfg.clip.noisy else "zero_shot"] = (pred == held_out.labels).float().mean().item()
        return out

    def finish(self, ema: nn.Module, model: nn.Module) -> dict:
        metrics = self.evaluate(ema)
        print("CLIP held-out zero-shot accuracy: " + ", ".join(f"{k}: {v:.1%}" for k, v in metrics.items() if k != "temperature")
              + f"; temperature {metrics['temperature']:.4f}")
        return metrics
