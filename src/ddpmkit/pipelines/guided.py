"""The one guidance door: from a loaded model and what the user asks for (classes, prompts,
precomputed conditions, guidance) to the three things a sampler takes: a denoiser, its model_kwargs
and extra sampler options. Every command that samples (sample, eval, img2img, inpaint, posterior,
interpolate, voyage) comes through here.

    request = GuidanceRequest(classes=[7], scale=3.0)
    denoiser, kwargs, options = guided_model(ddpmkit.load(run), n=16, request=request, sampler="unipc")
    sample(denoiser, (16, *shape), sampler="unipc", model_kwargs=kwargs, **options)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..conditioning import listed_classes
from ..errors import UserError
from ..guidance import Autoguidance, ClassifierFreeGuidance, ClassifierGuidance, CLIPGuidance, DynamicThresholding
from ..models import DiffusionModel, LoadedNetwork, load_classifier, load_clip, load_diffusion
from ..parameterization import Denoiser, DenoiserOutput, DenoiserWrapper
from ..precision import Autocast
from ..utils import cycle, side

DEFAULT_SCALE = 3.0  # classifier-free guidance scale for conditional models when none is given


@dataclass
class GuidanceRequest:
    classes: list[int | str] = field(default_factory=list)  # cycled over the samples; empty = 0, 1, 2, ...; names: class_numbers
    prompts: list[str] = field(default_factory=list)  # cycled over the samples (text-conditional models)
    conditions: dict[str, torch.Tensor] | None = None  # precomputed condition kwargs, one row per sample (e.g. interpolated prompts)
    scale: float | None = None  # classifier-free guidance; None = 3 for conditional models (0 with a classifier)
    rescale: float = 0.0  # guidance rescale phi in [0, 1]
    threshold: float = 0.0  # Imagen's dynamic thresholding percentile (e.g. 0.995); 0 = off
    classifier: str | None = None  # a noisy-classifier run folder for classifier guidance
    classifier_scale: float = 1.0
    clip: str | None = None  # a noisy-CLIP run folder (ddpmkit train clip_noisy) for CLIP guidance toward the prompts
    clip_scale: float = 100.0  # CLIP guidance scale s (the score g . h is a cosine in [-1, 1], hence the large default)
    autoguide: str | None = None  # autoguidance: a weaker model of the same kind (e.g. an early checkpoint, RUN/ckpt-0000300)
    autoguide_scale: float = 2.0  # w in D_bad + w (D_good - D_bad); 1 = the model alone
    # per-sample model inputs that are not guided, one row per sample, given to both branches of
    # classifier-free guidance: a super-resolution stage's low_res and aug_level
    extra: dict[str, torch.Tensor] | None = None
    class_offset: int = 0  # without `classes`, the first sample's class: k, k+1, ... (slice() of a longer run)

    def __post_init__(self) -> None:
        # NaN or inf would sample silently: every sample would be NaN (or the scale ignored)
        scales = {"guidance": self.scale, "guidance rescale": self.rescale, "dynamic threshold": self.threshold,
                  "classifier scale": self.classifier_scale, "CLIP scale": self.clip_scale, "autoguidance weight": self.autoguide_scale}
        for name, value in scales.items():
            if value is not None and not math.isfinite(value):
                raise UserError(f"the {name} must be a finite number, got {value}")
        if self.autoguide_scale < 0:
            raise UserError(f"the autoguidance weight w must be a finite number >= 0 (1 = the model alone, 2 a usual choice), "
                            f"got {self.autoguide_scale}")

    @property
    def cfg_scale(self) -> float:
        """The classifier-free guidance scale used: the one given, else 0 beside a classifier or CLIP, else DEFAULT_SCALE."""
        return self.scale if self.scale is not None else (0.0 if self.classifier or self.clip else DEFAULT_SCALE)

    @property
    def autoguided_networks(self) -> int:
        """Networks each guided evaluation runs for autoguidance: the model and the weaker one (Autoguidance skips the
        weaker one at w = 1), for counting network evaluations."""
        return 2 if self.autoguide and self.autoguide_scale != 1 else 1

    def slice(self, start: int, n: int) -> GuidanceRequest:
        """The request for samples start .. start+n-1 of a longer run, so that batches cycle the
        classes and prompts as one big batch would (the default classes 0, 1, 2, ... too: guided_model knows how many)."""
        def from_start(values: list) -> list:
            return [values[(start + i) % len(values)] for i in range(n)] if values else []

        def rows(values: dict | None) -> dict | None:
            return None if values is None else {k: v[start:start + n] for k, v in values.items()}

        return replace(self, classes=from_start(self.classes), prompts=from_start(self.prompts), conditions=rows(self.conditions),
                       extra=rows(self.extra), class_offset=self.class_offset + start)

    def describe(self) -> str:
        parts = []
        if self.prompts:
            parts.append(f"prompts {self.prompts}")
        if self.classes:
            parts.append(f"classes {self.classes}")
        if self.scale is not None:
            parts.append(f"guidance {self.scale:g}")
        if self.classifier:
            parts.append(f"classifier scale {self.classifier_scale:g}")
        if self.clip:
            parts.append(f"CLIP scale {self.clip_scale:g}")
        if self.autoguide:
            parts.append(f"autoguidance {self.autoguide_scale:g} by {self.autoguide}")
        return ", ".join(parts)


def _conditions(m: DiffusionModel, n: int, request: GuidanceRequest, labels: torch.Tensor, device) -> dict[str, torch.Tensor]:
    """The conditional branch's model kwargs for n samples."""
    if request.conditions is not None:
        rows = {k: v.to(device) for k, v in request.conditions.items()}
        if any(len(v) != n for v in rows.values()):
            raise UserError(f"GuidanceRequest.conditions must have one row per sample ({n})")
        return rows
    if m.conditioning == "text":
        if not request.prompts:
            raise UserError("this model is text-conditional: give `prompts` ('' for unconditional samples)")
        return m.encode_prompts(cycle(request.prompts, n), device)
    if m.conditioning == "class":
        if bool(((labels < 0) | (labels >= m.num_classes)).any()):
            raise UserError(f"`classes` must lie in 0..{m.num_classes - 1}")
        return {"y": labels}
    if m.conditioning == "embed":
        raise UserError(f"{m.path} is unCLIP's decoder, conditioned on CLIP image embeddings: draw them from a prompt with "
                        "`ddpmkit unclip PRIOR DECODER --prompt ...`, or from an image with `ddpmkit variations DECODER image.png`")
    return {}


def class_numbers(m: LoadedNetwork, classes: list[int | str]) -> list[int]:
    """Each class as its number, from a number or text: a class's name where the classes of m (a class-conditional
    model, or the classifier that guides one) have names (an image folder's subfolders or an .npz's `names`,
    checkpoint.CheckpointInfo.class_names), first, so that subfolders named 0..9 are meant by their names; else a
    whole number."""
    numbers = []
    for c in classes:
        text = str(c).strip()
        if text in m.class_names:
            numbers.append(m.class_names.index(text))
        elif text.lstrip("-").isdigit():
            numbers.append(int(text))
        else:
            raise UserError(f"no class {text!r} in {m.path}: " + (f"its classes are {listed_classes(m.class_names)}" if m.class_names
                                                                   else "its classes have no names; give class numbers, e.g. 7 or 0,1,2"))
    return numbers


def applies_cfg(m: DiffusionModel, scale: float) -> bool:
    """Whether guided_model guides m by classifier-free guidance at this scale (0 and 1 are one branch alone)."""
    return m.conditioning != "none" and scale not in (0.0, 1.0)


def _is_null(condition: dict[str, torch.Tensor], null: dict[str, torch.Tensor]) -> bool:
    """Whether every sample's condition is the null one (e.g. `--prompt ''`, the documented way to unconditional samples
    of a text model): then eps_u + s (eps_c - eps_u) = eps_u for every s, and one network call a step gives it, not two.
    One comparison before sampling; SDXL's null is zeros, not the empty prompt's encoding, so its '' is still guided."""
    return set(condition) == set(null) and all(condition[k].shape[1:] == null[k].shape[1:]
                                               and torch.equal(condition[k], null[k].expand_as(condition[k])) for k in null)


def guided_model(m: DiffusionModel, n: int, request: GuidanceRequest | None = None, sampler: str = "ddpm",
                 device: str | torch.device | None = None) -> tuple[Denoiser, dict, dict]:
    """(denoiser, model_kwargs, sampler options) for n samples of the loaded model as requested.

    Classifier-free guidance: scale 0 is the unconditional branch alone, 1 the conditional model
    alone, anything else eps_u + s (eps_c - eps_u) in one batched call (the network alone where every sample's condition
    is the null one: _is_null)."""
    request = request or GuidanceRequest()
    device = m.device if device is None else torch.device(device)  # conditions go where the network is
    if request.clip and not request.prompts:
        raise UserError("CLIP guidance steers toward prompts: give `prompts` with `clip`")
    if request.prompts and m.conditioning != "text" and not request.clip:
        raise UserError("giving `prompts` needs a text-conditional model (network.text_encoder); this one is "
                        + ("class-conditional: use `classes`" if m.conditioning == "class" else "unconditional"))
    if request.classifier and request.clip:
        raise UserError("use one of classifier guidance (`classifier`) and CLIP guidance (`clip`), not both")
    if request.classes and not (m.conditioning == "class" or request.classifier):
        raise UserError("giving `classes` needs a class-conditional model (network.num_classes > 0) or `classifier` for classifier guidance")
    if m.conditioning == "none" and request.scale not in (None, 0.0, 1.0):  # 0 and 1 are the unguided model itself
        raise UserError(f"classifier-free guidance (scale {request.scale:g}) needs a class- or text-conditional model; this one is "
                        "unconditional: leave the scale out, or guide it with `autoguide` or `classifier`/`clip` and their own scales")
    scale = request.cfg_scale
    if request.rescale and not applies_cfg(m, scale):  # else taken and ignored
        raise UserError(f"guidance rescale (phi {request.rescale:g}) rescales classifier-free guidance, which "
                        + ("this unconditional model does not use" if m.conditioning == "none" else f"scale {scale:g} does not use")
                        + ": leave it out" + ("" if m.conditioning == "none" else ", or give a guidance scale other than 0 and 1"))
    clf = load_classifier(request.classifier, device=device) if request.classifier else None
    named = clf if clf is not None and m.conditioning != "class" else m  # whose classes the names (and the default ones) are
    classes = class_numbers(named, request.classes)
    if not classes:  # the default: every class in turn, the classifier's where it guides an unconditional model
        count = max(1, clf.config.network.num_classes if named is clf else m.num_classes)
        classes = [(request.class_offset + i) % count for i in range(n)]
    labels = torch.tensor(cycle(classes, n), device=device)
    model: Denoiser = m.denoiser
    kwargs: dict = {}
    options: dict = {}
    if m.conditioning != "none":
        if scale == 0.0:
            if m.conditioning == "class":
                _conditions(m, n, request, labels, device)  # still reject labels outside 0..num_classes-1
            kwargs = m.null_condition(n, device)  # the unconditional branch alone: one network call, not two
        else:
            kwargs = _conditions(m, n, request, labels, device)
        null = m.null_condition(1, device) if applies_cfg(m, scale) else {}
        if null and not _is_null(kwargs, null):
            model = ClassifierFreeGuidance(model, scale, null_label=m.num_classes if m.conditioning == "class" else None,
                                           null=null if m.conditioning != "class" else None, rescale=request.rescale)
    if m.is_super_resolution and not (request.extra and "low_res" in request.extra):
        raise UserError(f"{m.path} is a super-resolution stage ({side(m.low_res_shape)} -> {side(m.data_shape)}): give it low-res images "
                        "with `ddpmkit upscale STAGE image.png`, or put it after a base model: `ddpmkit sample BASE --then STAGE`")
    if request.extra:
        if any(len(v) != n for v in request.extra.values()):
            raise UserError(f"GuidanceRequest.extra must have one row per sample ({n})")
        kwargs = {**kwargs, **{k: v.to(device) for k, v in request.extra.items()}}
    if request.autoguide:
        if m.conditioning != "none" and scale not in (0.0, 1.0):
            raise UserError(f"autoguidance guides one branch: with `autoguide` give `scale` 1 (the conditional model) or 0 "
                            f"(the unconditional one), not {scale:g}")
        model = Autoguidance(model, weaker_model(m, request.autoguide, device), request.autoguide_scale)
    if request.threshold:
        if not m.bounded_x0:  # it would rescale latents or points into [-1, 1]
            raise UserError(f"dynamic thresholding (percentile {request.threshold:g}) keeps pixels in [-1, 1]; this model's x_0 is "
                            + ("a latent" if m.autoencoder is not None else f"a vector of {m.data_shape[0]} numbers, not an image")
                            + ": leave it out")
        model = DynamicThresholding(model, request.threshold)
    if clf is not None:
        model, kwargs, options = _gradient_guided(m, clf, ClassifierGuidance(_Bound(model, kwargs), clf.network, request.classifier_scale),
                                             labels, sampler)
    if request.clip:
        clip = load_clip(request.clip, device=device)
        if not clip.network.noisy:
            raise UserError(f"CLIP guidance needs a noisy CLIP, whose image tower sees x_t (ddpmkit train clip_noisy); {request.clip} "
                            "was trained on clean images")
        target = clip.embed_texts(cycle(request.prompts, n)).to(device)
        model, kwargs, options = _gradient_guided(m, clip, CLIPGuidance(_Bound(model, kwargs), clip.network, request.clip_scale),
                                             target, sampler)
    return model, kwargs, options


def weaker_model(m: DiffusionModel, path: str, device) -> Denoiser:
    """The bad model of autoguidance: it must denoise the same data in the same way as m."""
    bad = load_diffusion(path, device=device)
    mine, its = m.config.diffusion, bad.config.diffusion
    schedules = ((mine.schedule, mine.T), (its.schedule, its.T)) if not m.schedule.same_as(bad.schedule) else (None, None)
    same = {"data shape": (m.data_shape, bad.data_shape), "schedule": schedules,
            "prediction": (m.prediction, bad.prediction), "conditioning": (m.conditioning, bad.conditioning),
            "learned variance": (m.learned_variance, bad.learned_variance), "autoencoder": (m.config.data.autoencoder, bad.config.data.autoencoder)}
    differ = [f"{what} {a} vs {b}" for what, (a, b) in same.items() if a != b]
    if differ:
        raise UserError(f"the autoguiding model {path} must be a weaker model of the same kind as {m.path}; they differ in: "
                        + "; ".join(differ))
    network = Autocast(bad.network, m.network.dtype) if isinstance(m.network, Autocast) else bad.network  # in m's precision
    return Denoiser(network, m.schedule, bad.prediction, bad.learned_variance)


class _Bound(DenoiserWrapper):
    """The denoiser with its model kwargs fixed: gradient guidance passes only its own target through."""

    def __init__(self, denoiser: Denoiser, kwargs: dict):
        super().__init__(denoiser)
        self.kwargs = dict(kwargs)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **_) -> DenoiserOutput:
        return self.inner.denoise(x_t, t, **self.kwargs)


def _gradient_guided(m: DiffusionModel, guide: LoadedNetwork, guidance: ClassifierGuidance, target: torch.Tensor,
                     sampler: str) -> tuple[Denoiser, dict, dict]:
    """Classifier or CLIP guidance (of a model with its kwargs bound) toward target, as the sampler takes it."""
    what = {"clip": "CLIP"}.get(guide.kind, guide.kind)
    if not guide.schedule.same_as(m.schedule):  # the real schedules (a diffusers pipeline's comes from its scheduler config)
        c, d = guide.config.diffusion, m.config.diffusion
        raise UserError(f"the {what} at {guide.path} was trained with the {c.schedule} schedule, T={c.T}; "
                        f"the model uses {d.schedule}, T={d.T}")
    if tuple(guide.data_shape) != tuple(m.data_shape):  # it ran on any size (convolutions), guiding toward nothing it learned
        raise UserError(f"the {what} at {guide.path} sees x_t of shape {tuple(guide.data_shape)}; the model's x_t has shape "
                        f"{tuple(m.data_shape)}")
    classes = guide.config.network.num_classes
    if guide.kind == "classifier" and bool(((target < 0) | (target >= classes)).any()):  # else an index error deep in the loss
        raise UserError(f"`classes` must lie in 0..{classes - 1}, the classes of the classifier at {guide.path}")
    if sampler == "ddpm":  # Algorithm 1: shift the mean by s * Sigma * grad score
        return guidance.unguided, {guidance.key: target}, {"cond_fn": guidance.cond_fn}
    return guidance, {guidance.key: target}, {}  # Algorithm 2: the eps correction, for every other sampler
