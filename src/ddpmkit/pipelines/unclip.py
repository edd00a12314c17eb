"""unCLIP (DALL-E 2, Ramesh et al. 2022): text encoding ==> image encoding ==> DDPM ==> image.

    z_t = CLIP text embedding of the caption
    z_i ~ prior(z_i | caption, z_t)          the diffusion prior: a denoiser of CLIP image embeddings
    x   ~ decoder(x | z_i)                   the image denoiser conditioned on z_i
    (x  ~ super-resolution stages, optionally)

Because the decoder only sees z_i, any source of image embeddings drives it: the prior (text to
image), an image's own embedding (variations), the slerp of two images' embeddings
(interpolation), or an image's embedding moved toward a caption's direction (text diffs).
Both diffusion models sample through the one guidance door (classifier-free guidance with the
empty caption / the zero embedding as the null condition) and every sampler.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..editing import check_frames, slerp
from ..errors import UserError
from ..models import DiffusionModel
from ..nets.prior import prior_data_scale
from ..utils import cycle
from .cascade import Stage, cascade
from .generate import Generated, generate
from .guided import GuidanceRequest

DEFAULT_PRIOR_SCALE = 1.0  # classifier-free guidance of the prior (measured in docs/unclip.md)
DEFAULT_DECODER_SCALE = 3.0


class UnCLIPError(UserError):
    """A prior and decoder (or images) that do not fit together."""


def _check_kind(m: DiffusionModel, kind: str) -> None:
    if m.kind != kind:
        raise UnCLIPError(f"{m.path} is a {m.kind} (train.task = {m.kind!r}), not an unCLIP {kind} (ddpmkit train unclip_{kind})")


def check_pair(prior: DiffusionModel, decoder: DiffusionModel) -> None:
    """The prior must draw embeddings of the size (and CLIP) the decoder was trained on."""
    _check_kind(prior, "prior")
    _check_kind(decoder, "decoder")
    e_prior, e_decoder = prior.config.unclip.embed_dim, decoder.config.unclip.embed_dim
    if e_prior != e_decoder:
        raise UnCLIPError(f"the prior at {prior.path} draws {e_prior}-dim CLIP embeddings but the decoder at {decoder.path} takes "
                          f"{e_decoder}-dim ones: train both on the same CLIP (unclip.clip)")


def check_images(decoder: DiffusionModel, images: torch.Tensor) -> None:
    shape = decoder.clip.network.image_shape
    if images.ndim != 4 or tuple(images.shape[1:]) != shape:
        raise UnCLIPError(f"the decoder's CLIP embeds images of shape {shape} (C, H, W); got {tuple(images.shape[1:])}")


def best_of(candidates: torch.Tensor, text_embed: torch.Tensor) -> torch.Tensor:
    """DALL-E 2's reranking: of k candidates per caption (n, k, E), the one most similar to the
    caption's CLIP text embedding (n, E) -> (n, E)."""
    similarity = (F.normalize(candidates, dim=-1) * text_embed[:, None]).sum(-1)  # (n, k)
    return candidates[torch.arange(len(candidates)), similarity.argmax(1)]


def prior_embeddings(prior: DiffusionModel, prompts: list[str], n: int, scale: float = DEFAULT_PRIOR_SCALE, sampler: str = "ddim",
                     steps: int | None = 64, seed: int = 0, batch_size: int = 500, device: str | torch.device | None = None) -> torch.Tensor:
    """The prior's sampling path: n draws of the CLIP image embedding for the prompts (cycled), in
    CLIP units (the prior diffuses prior_data_scale(E) times the embedding), not normalised: (n, E).
    Sample k uses seed seed + k; x0 is not clipped, since the data are not bounded by [-1, 1]."""
    _check_kind(prior, "prior")
    if not prompts:
        raise UnCLIPError("give at least one prompt")
    request = GuidanceRequest(prompts=cycle(prompts, n), scale=scale)
    options = {"clip_x0": False, **({"eta": 0.0} if sampler == "ddim" else {})}
    out = generate(prior, n, request, sampler, steps, seed, options, batch_size, progress=False, device=device)
    return out.images / prior_data_scale(prior.config.unclip.embed_dim)


def text_to_embedding(prior: DiffusionModel, prompts: list[str], n: int, scale: float = DEFAULT_PRIOR_SCALE, best: int = 1,
                      sampler: str = "ddim", steps: int | None = 64, seed: int = 0, batch_size: int = 500,
                      device: str | torch.device | None = None) -> torch.Tensor:
    """n unit CLIP image embeddings for the prompts (cycled), each the best of `best` prior samples
    by CLIP similarity to its caption: (n, E). Candidate j of sample k uses seed seed * best + k * best + j."""
    if best < 1:
        raise UnCLIPError(f"best of {best}: give 1 or more candidates per sample")
    prompts = cycle(prompts, n) if prompts else []
    candidates = prior_embeddings(prior, [p for p in prompts for _ in range(best)], n * best, scale, sampler, steps, seed * best,
                                  batch_size, device).reshape(n, best, -1)
    chosen = best_of(candidates, prior.encode_prompts(prompts)["text_embed"].cpu()) if best > 1 else candidates[:, 0]
    return F.normalize(chosen, dim=-1)


def decode(decoder: DiffusionModel, embeds: torch.Tensor, scale: float = DEFAULT_DECODER_SCALE, sampler: str = "ddpm",
           steps: int | None = None, seed: int = 0, options: dict | None = None, batch_size: int | None = None, record_every: int = 0,
           progress: bool = True, seeds: list[int] | None = None, device: str | torch.device | None = None) -> Generated:
    """Images from CLIP image embeddings (n, E), one each; classifier-free guidance at `scale`."""
    _check_kind(decoder, "decoder")
    E = decoder.config.unclip.embed_dim
    if embeds.ndim != 2 or embeds.shape[1] != E:
        raise UnCLIPError(f"the decoder at {decoder.path} takes {E}-dim CLIP image embeddings (n, {E}); got {tuple(embeds.shape)}")
    request = GuidanceRequest(conditions={"image_embed": embeds.float()}, scale=scale)
    return generate(decoder, len(embeds), request, sampler, steps, seed, options, batch_size, record_every, progress, device, seeds)


@dataclass
class UnCLIPResult:
    embeds: torch.Tensor  # (n, E) the CLIP image embeddings the decoder was given
    stages: list[Generated]  # the decoder's samples, then each super-resolution stage's

    @property
    def images(self) -> torch.Tensor:
        return self.stages[-1].images


def text_to_image(prior: DiffusionModel, decoder: DiffusionModel, prompts: list[str], n: int, prior_scale: float = DEFAULT_PRIOR_SCALE,
                  best: int = 1, prior_steps: int | None = 64, scale: float = DEFAULT_DECODER_SCALE, sampler: str = "ddpm",
                  steps: int | None = None, options: dict | None = None, then: list[Stage] | None = None, seed: int = 0,
                  batch_size: int | None = None, record_every: int = 0, progress: bool = True,
                  device: str | torch.device | None = None) -> UnCLIPResult:
    """prompt -> prior -> decoder (-> the super-resolution stages in `then`, which get the prompts
    when they are text-conditional). Sample k of stage i uses seed seed + k + i * 2^32."""
    check_pair(prior, decoder)
    embeds = text_to_embedding(prior, prompts, n, prior_scale, best, steps=prior_steps, seed=seed, device=device)
    request = GuidanceRequest(prompts=list(prompts), conditions={"image_embed": embeds})
    base = Stage(decoder, sampler, steps, scale, options=options or {})
    outs = cascade([base, *(then or [])], n, request, seed, batch_size, record_every, progress, device)
    return UnCLIPResult(embeds, outs)


def variations(decoder: DiffusionModel, images: torch.Tensor, per_image: int = 4, seed: int = 0, **decode_kwargs) -> Generated:
    """per_image decodings of each image's CLIP embedding: (len(images) * per_image, ...), image-major."""
    check_images(decoder, images)
    if per_image < 1:
        raise UnCLIPError(f"per_image = {per_image} must be >= 1")
    embeds = decoder.clip.network.embed_images(images.float()).repeat_interleave(per_image, dim=0)
    return decode(decoder, embeds, seed=seed, **decode_kwargs)


def interpolate(decoder: DiffusionModel, a: torch.Tensor, b: torch.Tensor, frames: int = 8, seed: int = 0, **decode_kwargs) -> Generated:
    """Decodings of the slerp between images a and b's embeddings (1, C, H, W) each, at `frames`
    weights from 0 to 1, all with the same noise (seed), so only the embedding changes."""
    check_images(decoder, a)
    check_images(decoder, b)
    check_frames(frames)
    za, zb = decoder.clip.network.embed_images(torch.cat([a[:1], b[:1]]).float())
    w = torch.linspace(0, 1, frames)
    embeds = F.normalize(slerp(za.expand(frames, -1), zb.expand(frames, -1), w), dim=-1)
    return decode(decoder, embeds, seeds=[seed] * frames, **decode_kwargs)


def text_diff_embeddings(z_i: torch.Tensor, z_src: torch.Tensor, z_tgt: torch.Tensor, amounts: list[float]) -> torch.Tensor:
    """DALL-E 2's text diff of an image embedding z_i (E,): slerp(z_i, z_d, theta) with the text
    direction z_d = normalise(z_t(target) - z_t(source)), one unit vector per theta: (k, E)."""
    z_d = F.normalize(z_tgt - z_src, dim=-1)
    k = len(amounts)
    return F.normalize(slerp(z_i.expand(k, -1), z_d.expand(k, -1), torch.tensor(amounts, dtype=z_i.dtype)), dim=-1)


def text_diff(decoder: DiffusionModel, image: torch.Tensor, source: str, target: str, amounts: list[float], seed: int = 0,
              **decode_kwargs) -> Generated:
    """DALL-E 2's text diffs: move the image's embedding z_i toward the text direction
    z_d = normalise(z_t(target) - z_t(source)) by slerp(z_i, z_d, theta) for each theta in amounts
    (0 = the image's own embedding), decoded with the same noise."""
    check_images(decoder, image)
    if not amounts:
        raise UnCLIPError("give at least one amount theta in [0, 1]")
    z_src, z_tgt = decoder.clip.embed_texts([source, target])
    if float((z_tgt - z_src).norm()) < 1e-6:  # normalise(0) is 0: the "moves" were toward nothing
        raise UnCLIPError(f"`source` {source!r} and `target` {target!r} have the same CLIP text embedding: there is no direction to "
                          "move the image along; give two different captions")
    embeds = text_diff_embeddings(decoder.clip.network.embed_images(image[:1].float())[0], z_src, z_tgt, amounts)
    return decode(decoder, embeds, seeds=[seed] * len(amounts), **decode_kwargs)
