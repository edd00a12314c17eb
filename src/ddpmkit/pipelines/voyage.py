"""The lectures' seed + prompt "voyage": an animation through (seed, prompt) keyframes.

Between keyframes k and k+1 the starting noise moves along the slerp between the two seeds'
x_T and the prompt along the line between the two prompts' token embeddings; every frame is
sampled with the same sampler and guidance (a stochastic sampler with the same noise for every
frame), so the animation is smooth and the same file always renders the same frames (and the
same GIF bytes).

The keyframe file is either the lecture's Python list

    seed_and_prompt_sequence = [
      3764, 'in the beginning there was nothing, just darkness',
      1537, 'special effects render of the big bang',
    ]

or one keyframe per line, "SEED PROMPT" (blank lines and # comments are skipped).
"""
from __future__ import annotations

import ast
from pathlib import Path

import torch

from ..editing import lerp_condition, seed_noise, slerp
from ..errors import UserError, read_user_text
from ..models import DiffusionModel
from ..progress import progress_bar
from ..sampling import sample
from .generate import resolve_options
from .guided import DEFAULT_SCALE, GuidanceRequest, guided_model


def read_keyframes(path: str | Path) -> list[tuple[int, str]]:
    """[(seed, prompt), ...] from a keyframe file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keyframe file not found: {path}")
    text = read_user_text(path)
    if "[" in text:
        try:
            items = ast.literal_eval(text[text.index("["):text.rindex("]") + 1])
        except (ValueError, SyntaxError) as e:
            raise UserError(f"{path}: cannot read the list of seeds and prompts ({e})") from None
        if all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items):  # [(seed, prompt), ...] as well
            items = [x for item in items for x in item]
        if len(items) % 2 or not all(isinstance(s, int) and isinstance(p, str) for s, p in zip(items[::2], items[1::2])):
            raise UserError(f"{path}: the list must alternate integer seeds and prompt strings (or hold (seed, prompt) pairs)")
        frames = list(zip(items[::2], items[1::2]))
    else:
        frames = []
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            seed, _, prompt = line.partition(" ")
            if not seed.lstrip("-").isdigit():
                raise UserError(f"{path}:{n}: expected 'SEED PROMPT', got {line!r}")
            frames.append((int(seed), prompt.strip().strip("'\"")))
    if len(frames) < 2:
        raise UserError(f"{path}: a voyage needs at least 2 keyframes, found {len(frames)}")
    return frames


@torch.no_grad()
def render_voyage(m: DiffusionModel, keyframes: list[tuple[int, str]], frames_between: int = 8, guidance: float = DEFAULT_SCALE,
                  sampler: str = "ddim", steps: int = 20, batch: int = 32, progress: bool = True,
                  device: str | torch.device | None = None, options: dict | None = None) -> torch.Tensor:
    """Frames (N, C, H, W) in [-1, 1] through the keyframes of a text-conditional model m (latent
    models are decoded). N = (keyframes - 1) * frames_between + 1. options: the sampler's
    (sampling.options.sampler_options)."""
    if m.conditioning != "text":
        raise UserError("a voyage needs a text-conditional model (network.text_encoder), e.g. one of ddpmkit train mnist_text")
    device = m.device if device is None else torch.device(device)
    conds = [m.encode_prompts([p]) for _, p in keyframes]
    noises = [seed_noise(s, m.data_shape) for s, _ in keyframes]
    x_T, kwargs = [], []
    for k in range(len(keyframes) - 1):
        for j in range(frames_between + (k == len(keyframes) - 2)):  # the last segment ends on its keyframe
            a = j / frames_between
            x_T.append(slerp(noises[k], noises[k + 1], a))
            kwargs.append(lerp_condition(conds[k], conds[k + 1], a))
    x_T = torch.cat(x_T)
    request = GuidanceRequest(conditions={key: torch.cat([kw[key] for kw in kwargs]) for key in kwargs[0]}, scale=guidance)
    out = []
    for start in progress_bar(range(0, len(x_T), batch), desc="voyage", leave=False, disable=not progress):
        sl = slice(start, start + batch)
        n = len(x_T[sl])
        model, cond, extra = guided_model(m, n, request.slice(start, n), sampler, device)
        # a stochastic sampler's noise is the same for every frame (the first keyframe's seed): frames differ by x_T and prompt only
        res = sample(model, x_T[sl].shape, sampler=sampler, steps=steps, x_T=x_T[sl], generator=[keyframes[0][0]] * n, device=device,
                     model_kwargs=cond, **resolve_options(m, options), **extra)
        out.append(m.decode(res.x).cpu())
    return torch.cat(out)
