"""What a conditional model is conditioned on during training: class labels or prompt embeddings.

With probability cond_drop_prob an example's condition is replaced by the null condition (the
null label, or the empty prompt), so one network learns both p(x|c) and p(x): the two branches
of classifier-free guidance (Ho & Salimans 2022).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .captions import TRAIN_TEMPLATES, digit_captions, read_caption_files
from .config import Config
from .diffusers_bridge import frozen_parts
from .errors import UserError
from .text import TextEncoder


class ConditioningError(UserError):
    """The data cannot provide what the network is conditioned on."""


def listed_classes(names: tuple[str, ...], most: int = 20) -> str:
    """'0 cat, 1 dog, ...': class numbers with their names (the first `most` and the last)."""
    shown = ", ".join(f"{i} {name}" for i, name in enumerate(names[:most]))
    return shown + (f", ... {len(names) - 1} {names[-1]}" if len(names) > most else "")


def prompt_encoder(cfg: Config):
    """The frozen encoder of a text model's prompts: a pipeline's own tokenizer and text encoder, or network.text_encoder."""
    net = cfg.network
    encoder = frozen_parts(net.pipeline).prompts if net.kind == "diffusers" else TextEncoder(net.text_encoder, net.text_max_tokens)
    if encoder.dim != net.context_dim:
        raise ConditioningError(f"text encoder {net.text_encoder!r} gives {encoder.dim}-dim tokens; set network.context_dim = {encoder.dim}")
    return encoder


@dataclass
class TrainingConditions:
    """batch(indices, generator) -> model kwargs for a global batch, drawn from that generator."""

    kind: str = "none"  # 'none', 'class', 'text' or 'embed' (unCLIP's decoder: each example's own CLIP image embedding)
    drop_prob: float = 0.0
    labels: torch.Tensor | None = None  # (N,) for 'class'
    null_label: int = 0
    table: dict[str, torch.Tensor] = field(default_factory=dict)  # 'text': embeddings of every caption ('embed': of every image)
    caption_ids: torch.Tensor | None = None  # (N, K): the K captions example n may get (rows of `table`)
    null: dict[str, torch.Tensor] = field(default_factory=dict)  # 'text': the empty prompt's embedding
    preview_rows: torch.Tensor | None = None  # 'text': captions shown in the periodic sample grids
    names: tuple[str, ...] = ()  # 'class' where the data names its labels (a folder's subfolders, an .npz's names): label i is names[i]

    @classmethod
    def for_config(cls, cfg: Config, dataset) -> TrainingConditions:
        net, p = cfg.network, cfg.train.cond_drop_prob
        if net.text_encoder:
            return cls._text(cfg, dataset)
        if net.num_classes > 0:
            labels, names = getattr(dataset, "labels", None), getattr(dataset, "classes", ())
            if labels is None and hasattr(dataset, "files"):  # an image folder with images outside subfolders
                raise ConditioningError(f"network.num_classes = {net.num_classes} but {cfg.data.path} has images outside subfolders: for "
                                        f"classes, put each class's images in a subfolder of its own ({cfg.data.path}/cat/..., "
                                        f"{cfg.data.path}/dog/...)")
            if labels is None:
                raise ConditioningError(f"network.num_classes = {net.num_classes} but dataset {cfg.data.name!r} has no labels "
                                        "(use mnist5k, digits, a toy with labels, an image folder with a subfolder per class, "
                                        "or an .npz with a 'y' array)")
            if names and len(names) != net.num_classes:
                kind = "class subfolders" if hasattr(dataset, "files") else "class names"
                raise ConditioningError(f"{cfg.data.path} has {len(names)} {kind} ({', '.join(names[:10])}"
                                        f"{', ...' if len(names) > 10 else ''}): set network.num_classes = {len(names)}")
            if int(labels.max()) >= net.num_classes or int(labels.min()) < 0:
                raise ConditioningError(f"the labels lie in [{int(labels.min())}, {int(labels.max())}] but network.num_classes = {net.num_classes}")
            return cls("class", p, labels=labels.long(), null_label=net.num_classes, names=tuple(names or ()))
        return cls()

    @classmethod
    def image_embeddings(cls, embeds: torch.Tensor, drop_prob: float) -> TrainingConditions:
        """Example n is conditioned on embeds[n] (B, E); dropped to the zero vector (DALL-E 2's decoder)."""
        n = len(embeds)
        return cls("embed", drop_prob, table={"image_embed": embeds}, caption_ids=torch.arange(n)[:, None],
                   null={"image_embed": torch.zeros(1, embeds.shape[1])}, preview_rows=torch.arange(min(n, 64)))

    @classmethod
    def prompts(cls, cfg: Config, prompts: list[str], caption_ids: torch.Tensor) -> TrainingConditions:
        """Example n is conditioned on prompts[caption_ids[n]] (DreamBooth: the instance and the class prompt)."""
        encoder = prompt_encoder(cfg)
        return cls("text", cfg.train.cond_drop_prob, table=encoder.encode(prompts), caption_ids=caption_ids[:, None],
                   null=encoder.encode([""]), preview_rows=torch.arange(len(prompts)))

    @classmethod
    def _text(cls, cfg: Config, dataset) -> TrainingConditions:
        encoder = prompt_encoder(cfg)
        if cfg.data.name in ("mnist5k", "digits"):
            captions = [c for row in digit_captions() for c in row]  # row-major: label * K + k
            k = len(TRAIN_TEMPLATES)
            caption_ids = dataset.labels.long()[:, None] * k + torch.arange(k)
            preview = torch.arange(10) * k  # the first template for 0..9
        elif hasattr(dataset, "files"):
            captions = read_caption_files(dataset.files)
            caption_ids = torch.arange(len(captions))[:, None]
            preview = caption_ids[:, 0]
        else:
            raise ConditioningError(f"text conditioning needs captions: the built-in digits or an image folder with "
                                    f"a .txt next to each image, not dataset {cfg.data.name!r}")
        return cls("text", cfg.train.cond_drop_prob, table=encoder.encode(captions), caption_ids=caption_ids,
                   null=encoder.encode([""]), preview_rows=preview)

    def null_batch(self, n: int) -> dict[str, torch.Tensor]:
        """Model kwargs of the null condition for n examples (the unconditional model)."""
        if self.kind == "class":
            return {"y": torch.full((n,), self.null_label)}
        return {key: value.expand(n, *value.shape[1:]) for key, value in self.null.items()}

    def preview(self, n: int) -> dict[str, torch.Tensor]:
        """Model kwargs for n samples of the periodic grids: classes 0, 1, 2, ... or the first captions."""
        if self.kind == "class":
            return {"y": torch.arange(n) % self.null_label}
        if self.kind in ("text", "embed"):
            rows = self.preview_rows[torch.arange(n) % len(self.preview_rows)]
            return {key: table[rows] for key, table in self.table.items()}
        return {}

    def batch(self, indices: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Model kwargs for the examples at `indices`: (B,) labels or (B, L, D) contexts with (B, L) masks."""
        if self.kind == "none":
            return {}
        drop = torch.rand(len(indices), generator=generator) < self.drop_prob
        if self.kind == "class":
            return {"y": torch.where(drop, self.null_label, self.labels[indices])}
        choice = torch.randint(self.caption_ids.shape[1], (len(indices),), generator=generator)
        rows = self.caption_ids[indices, choice]
        out = {}
        for key, table in self.table.items():
            keep = drop.view(-1, *[1] * (table.ndim - 1))
            out[key] = torch.where(keep, self.null[key], table[rows])
        return out
