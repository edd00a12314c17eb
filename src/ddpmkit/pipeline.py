"""From a trained checkpoint and what the user asks for (classes, prompts, guidance) to the three
things a sampler takes: a model, its model_kwargs and extra sampler options.

    request = GuidanceRequest(classes=[7], scale=3.0)
    model, kwargs, options = guided_model(load_model(ckpt), n=16, request=request, sampler="unipc")
    sample(model, (16, *shape), schedule, sampler="unipc", model_kwargs=kwargs, **options)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .checkpoint import LoadedModel
from .guidance import ClassifierFreeGuidance, ClassifierGuidance, DynamicThresholding
from .parameterization import ModelFn


@dataclass
class GuidanceRequest:
    classes: list[int] = field(default_factory=list)  # cycled over the samples; empty = 0, 1, 2, ...
    prompts: list[str] = field(default_factory=list)  # cycled over the samples (text-conditional models)
    scale: float | None = None  # classifier-free guidance; None = 3 for conditional models (0 with a classifier)
    rescale: float = 0.0  # guidance rescale phi in [0, 1]
    threshold: float = 0.0  # Imagen's dynamic thresholding percentile (e.g. 0.995); 0 = off
    classifier: str | None = None  # a train-classifier folder for classifier guidance
    classifier_scale: float = 1.0

    def slice(self, start: int, n: int, num_classes: int = 0) -> "GuidanceRequest":
        """The request for samples start .. start+n-1 of a longer run, so that batches cycle the
        classes and prompts as one big batch would. num_classes: the model's (0 = unconditional)."""
        def cycle(values: list) -> list:
            return [values[(start + i) % len(values)] for i in range(n)] if values else []

        classes = self.classes
        if not classes and (num_classes > 0 or self.classifier):
            classes = list(range(num_classes or 10))  # the default: 0, 1, 2, ... in turn
        return replace(self, classes=cycle(classes), prompts=cycle(self.prompts))

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
        return ", ".join(parts)


def _cycle(values: list, n: int) -> list:
    return [values[i % len(values)] for i in range(n)]


def guided_model(m: LoadedModel, n: int, request: GuidanceRequest | None = None, sampler: str = "ddpm",
                 device: str | torch.device = "cpu") -> tuple[ModelFn, dict, dict]:
    """(model, model_kwargs, sampler options) for n samples of the loaded model as requested."""
    request = request or GuidanceRequest()
    net_cfg, d = m.config.network, m.config.diffusion
    model: ModelFn = m.network
    kwargs: dict = {}
    options: dict = {}
    text, classes = bool(net_cfg.text_encoder), net_cfg.num_classes > 0
    if request.prompts and not text:
        raise ValueError("--prompt needs a text-conditional model (network.text_encoder); this one is "
                         + ("class-conditional: use --class" if classes else "unconditional"))
    if request.classes and not (classes or request.classifier):
        raise ValueError("--class needs a class-conditional model (network.num_classes > 0) or --classifier for classifier guidance")
    scale = request.scale if request.scale is not None else (0.0 if request.classifier else 3.0)
    labels = torch.tensor(_cycle(request.classes or list(range(max(net_cfg.num_classes, 10))), n), device=device)

    if text:
        from .text import TextEncoder

        if not request.prompts:
            raise ValueError("this model is text-conditional: give --prompt \"...\" ('' for unconditional samples)")
        encoder = TextEncoder(net_cfg.text_encoder, net_cfg.text_max_tokens)
        kwargs = {k: v.to(device) for k, v in encoder.encode(_cycle(request.prompts, n)).items()}
        if scale != 1.0:
            model = ClassifierFreeGuidance(model, scale, null={k: v.to(device) for k, v in encoder.encode([""]).items()},
                                           learned_variance=d.learned_variance, rescale=request.rescale,
                                           schedule=m.schedule, prediction=d.prediction)
    elif classes:
        if bool(((labels < 0) | (labels >= net_cfg.num_classes)).any()):
            raise ValueError(f"--class must lie in 0..{net_cfg.num_classes - 1}")
        if scale == 0.0:
            kwargs = {"y": torch.full_like(labels, net_cfg.num_classes)}  # the unconditional branch alone
        else:
            kwargs = {"y": labels}
            if scale != 1.0:
                model = ClassifierFreeGuidance(model, scale, null_label=net_cfg.num_classes, learned_variance=d.learned_variance,
                                               rescale=request.rescale, schedule=m.schedule, prediction=d.prediction)
    if request.threshold:
        model = DynamicThresholding(model, m.schedule, d.prediction, request.threshold, d.learned_variance)
    if request.classifier:
        from .noisy_classifier import load_noisy_classifier

        clf = load_noisy_classifier(request.classifier)
        c = clf.config.diffusion
        if (c.schedule, c.T, c.zero_terminal_snr) != (d.schedule, d.T, d.zero_terminal_snr):
            raise ValueError(f"the classifier was trained with the {clf.config.diffusion.schedule} schedule, T={clf.config.diffusion.T}; "
                             f"the model uses {d.schedule}, T={d.T}")
        base, base_kwargs = model, dict(kwargs)
        kwargs = {"y": labels}

        def unguided(x_t, t, y=None, **extra):
            return base(x_t, t, **base_kwargs)

        cg = ClassifierGuidance(unguided, clf.network.to(device), request.classifier_scale, m.schedule, d.prediction,
                                d.learned_variance)
        if sampler == "ddpm":  # Algorithm 1: shift the mean by s * Sigma * grad log p(y | x_t)
            model, options = cg.unguided, {"cond_fn": cg.cond_fn}
        else:  # Algorithm 2: the eps correction, for every other sampler
            model = cg
    return model, kwargs, options


def null_condition(m: LoadedModel, n: int, device: str | torch.device = "cpu") -> dict:
    """Model kwargs of the unconditional branch for n examples: the null label or the empty prompt
    ({} for unconditional models)."""
    net_cfg = m.config.network
    if net_cfg.text_encoder:
        from .text import TextEncoder

        null = TextEncoder(net_cfg.text_encoder, net_cfg.text_max_tokens).encode([""])
        return {k: v.expand(n, *v.shape[1:]).to(device) for k, v in null.items()}
    if net_cfg.num_classes > 0:
        return {"y": torch.full((n,), net_cfg.num_classes, device=device)}
    return {}
