"""The kinds of model ddpmkit trains and loads (train.task), each declared once: the network it builds,
whether it samples, the model inputs it needs beyond (x_t, t, condition), and what to do with a finished
run. The loader, the CLI, the web page and the training engine read these; a new kind is one
``register(ModelKind(...))`` and one Task subclass of the same name (train/task.py), in one module.

    register(ModelKind("denoiser", build=..., samples=True, next_step="sample it: ddpmkit sample {run}"))
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UserError

if TYPE_CHECKING:  # annotations only: config and nets import this module's registry, not the other way round
    from torch import nn

    from .config import Config


INPUT_WORDS = {"low_res": "a low-res image", "text_embed": "a prompt's CLIP text embedding", "image_embed": "a CLIP image embedding"}


@dataclass(frozen=True)
class ModelKind:
    name: str  # the train.task value
    build: Callable[[Config, tuple[int, ...]], nn.Module]  # the network, from the config and one example's shape
    samples: bool = False  # a diffusion model: loads as a DiffusionModel, samples, takes guidance and preconditioning
    # model inputs it needs beyond (x_t, t, condition): a super-resolution stage's low-res image, unCLIP's CLIP embeddings
    inputs: tuple[str, ...] = ()
    next_step: str = ""  # printed after training; {run} is the run folder
    # applied last to the built (and preconditioned) network: e.g. a consistency run's boundary parameterization
    wrap: Callable[[nn.Module, Config], nn.Module] | None = None
    sampler: str = ""  # its own sampler, when `ddpmkit sample` is given none (a distilled run's few-step sampler)

    @property
    def needs_low_res(self) -> bool:
        return "low_res" in self.inputs

    @property
    def takes(self) -> str:
        """Its inputs beyond (x_t, t, condition) in words, for messages ('' for none)."""
        return " and ".join(INPUT_WORDS[k] for k in self.inputs if k in INPUT_WORDS)

    @property
    def uses_clip(self) -> bool:
        """unCLIP's prior (conditioned on a CLIP text embedding) and decoder (on a CLIP image embedding)."""
        return "text_embed" in self.inputs or "image_embed" in self.inputs


KINDS: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
    """Make a kind of model known to the loader, the trainer and the faces (a second one of a name replaces the first)."""
    KINDS[kind.name] = kind
    return kind


def kind_of(name: str) -> ModelKind:
    """The kind train.task names, or one clear error with the valid names."""
    if name not in KINDS:
        raise UserError(f"unknown train.task {name!r}; choose one of {sorted(KINDS)}")
    return KINDS[name]


def sampling_kinds() -> tuple[str, ...]:
    """The names of the kinds that sample."""
    return tuple(name for name, kind in KINDS.items() if kind.samples)
