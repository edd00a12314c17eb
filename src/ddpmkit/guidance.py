"""Guidance as denoiser wrappers: each takes a Denoiser and is one (it keeps the schedule, prediction and
variance of the one it wraps), so every sampler works with every kind of guidance and wrappers compose.
They act on the denoiser's (eps, x0), never on a raw network output, so one wrapper serves eps, x0, v and
mu models alike and nothing is told the parameterization twice.

Classifier-free guidance (Ho & Salimans 2022):
    eps_guided = eps(x_t | null) + s * (eps(x_t | c) - eps(x_t | null))
s = 0 is the unconditional model, s = 1 the conditional one, s > 1 trades diversity for
fidelity to c. Both branches run in one batched call. At fixed x_t and t, eps and x0 are affine
in each other (x_t = sqrt(a) x0 + sqrt(1 - a) eps), so the same combination of both stays
consistent; with a learned variance only the mean is guided and the conditional variance kept (GLIDE).

Classifier guidance (Dhariwal & Nichol 2021) with a classifier p_phi(y | x_t) trained on noisy data:
    Algorithm 1 (ancestral): mean <- mean + s * Sigma * grad_x log p_phi(y | x_t)
    Algorithm 2 (DDIM, any ODE/SDE solver): eps <- eps - sqrt(1 - alpha_bar_t) * s * grad_x log p_phi(y | x_t)
With s = 1 and the exact classifier, Algorithm 2 turns the exact unconditional eps into the exact
conditional one, since grad log q(x_t | y) = grad log q(x_t) + grad log q(y | x_t).

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself"):
    D_guided = D_bad + w * (D_good - D_bad)
with D_bad a weaker model of the same data (fewer training steps, or fewer parameters). Like CFG it
pushes samples away from what the weak model gets wrong, but it needs no condition, so it guides
unconditional models too, and it sharpens without the loss of variety that CFG brings.

CLIP guidance replaces log p_phi(y | x_t) by g(x_t, t) . h(c), the dot product of a noisy CLIP's
image embedding and the caption's text embedding (GLIDE, Nichol et al. 2022).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import UserError
from .parameterization import Denoiser, DenoiserOutput, DenoiserWrapper
from .utils import append_dims

Condition = dict[str, torch.Tensor]


def _combine(base: DenoiserOutput, other: DenoiserOutput, w: float) -> DenoiserOutput:
    """base + w (other - base) of eps and x0 (weights summing to 1 keep x_t = sqrt(a) x0 + sqrt(1 - a) eps);
    the variance is other's (the conditional / good branch)."""
    return DenoiserOutput(eps=base.eps + w * (other.eps - base.eps), x0=base.x0 + w * (other.x0 - base.x0), var_frac=other.var_frac)


def _std(x: torch.Tensor) -> torch.Tensor:
    """Per-example standard deviation over all but the batch dimension, broadcastable to x."""
    return append_dims(x.reshape(x.shape[0], -1).std(dim=1), x.ndim)


def _halves(out: DenoiserOutput) -> tuple[DenoiserOutput, DenoiserOutput]:
    """The first and second half of a batched output (the conditional and unconditional branch)."""
    def half(v: torch.Tensor | None, i: int) -> torch.Tensor | None:
        return None if v is None else v.chunk(2)[i]
    return DenoiserOutput(*(half(v, 0) for v in out)), DenoiserOutput(*(half(v, 1) for v in out))


class ClassifierFreeGuidance(DenoiserWrapper):
    """The guided denoiser; pass it to any sampler with model_kwargs=condition, e.g. {'y': labels} or
    TextEncoder.encode(prompts).

    null: the null condition, {'y': tensor(K)} for a K-class model (or null_label=K), or the empty
        prompt's encoding; tensors with batch 1 are expanded. Keys in the condition but not in
        `null` go to both branches unchanged.
    rescale: guidance rescale phi (Lin et al. 2024, "Common diffusion noise schedules and sample
        steps are flawed", eq. 15-16): the guided x0 is rescaled to the conditional x0's standard
        deviation and mixed, phi * rescaled + (1 - phi) * guided; fights over-saturation at large s.
    """

    def __init__(self, denoiser: Denoiser, scale: float, null_label: int | None = None, *, null: Condition | None = None,
                 rescale: float = 0.0):
        super().__init__(denoiser)
        if (null is None) == (null_label is None):
            raise UserError("give the null condition once: null_label=K for a class-conditional model, or null={...}")
        if not math.isfinite(scale):
            raise UserError(f"the classifier-free guidance scale must be a finite number (0 = unconditional, 1 = conditional), got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise UserError(f"guidance rescale must lie in [0, 1], got {rescale}")
        self.scale = float(scale)
        self.null = {"y": torch.tensor([int(null_label)])} if null is None else dict(null)
        self.rescale = float(rescale)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **condition) -> DenoiserOutput:
        B = x_t.shape[0]
        missing = sorted(set(self.null) - set(condition))
        if missing:
            raise UserError(f"classifier-free guidance needs the condition {missing} in model_kwargs (e.g. model_kwargs={{'y': labels}})")
        both = {}
        for key, value in condition.items():
            value = torch.as_tensor(value, device=x_t.device)
            value = value.expand(B, *value.shape[1:]) if value.shape[:1] in ((), (1,)) else value
            if value.ndim == 0:
                value = value.expand(B)
            null = self.null.get(key)
            null = value if null is None else null.to(x_t.device).expand(B, *null.shape[1:]).to(value.dtype)
            both[key] = torch.cat([value, null])
        cond, uncond = _halves(self.inner.denoise(torch.cat([x_t, x_t]), torch.cat([t, t]), **both))
        guided = _combine(uncond, cond, self.scale)
        if self.rescale == 0:
            return guided
        rescaled = guided.x0 * _std(cond.x0) / _std(guided.x0).clamp(min=1e-12)
        return self.with_x0(x_t, t, self.rescale * rescaled + (1 - self.rescale) * guided.x0, guided.var_frac)


class Autoguidance(DenoiserWrapper):
    """D_bad + w * (D_good - D_bad) of two denoisers of the same data, schedule and variance (at fixed x_t
    and t this is the same guidance of x_0 and of eps). w = 1 is the good model alone; with a learned
    variance only the mean is guided and the good model's variance is kept."""

    def __init__(self, good: Denoiser, bad: Denoiser, scale: float):
        super().__init__(good)
        if not isinstance(bad, Denoiser):
            raise TypeError(f"the weaker model of autoguidance must be a Denoiser too, got {type(bad).__name__}")
        if not bad.schedule.same_as(good.schedule):
            raise UserError("autoguidance needs two models of the same schedule: the weaker model's differs")
        if not 0.0 <= scale < float("inf"):
            raise UserError(f"the autoguidance weight w must be a finite number >= 0 (1 = the model alone, 2 a usual choice), got {scale}")
        self.bad = bad
        self.scale = float(scale)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **condition) -> DenoiserOutput:
        good = self.inner.denoise(x_t, t, **condition)
        if self.scale == 1.0:
            return good
        return _combine(self.bad.denoise(x_t, t, **condition), good, self.scale)


class DynamicThresholding(DenoiserWrapper):
    """Imagen's dynamic thresholding (Saharia et al. 2022, section 2.3): at each step s = max(1, the
    `percentile` quantile of |x0_hat|) per sample, and x0_hat <- clip(x0_hat, -s, s) / s. Samples stay
    in [-1, 1] even at large guidance scales; s = 1 is static clipping. It acts on the denoiser's x0,
    whatever the network predicts."""

    def __init__(self, denoiser: Denoiser, percentile: float = 0.995):
        super().__init__(denoiser)
        if not 0.0 < percentile <= 1.0:
            raise UserError(f"percentile must lie in (0, 1], got {percentile}")
        self.percentile = percentile

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **extra) -> DenoiserOutput:
        out = self.inner.denoise(x_t, t, **extra)
        x0 = out.x0
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), self.percentile, dim=1).clamp(min=1.0)
        s = append_dims(s, x0.ndim).to(x0.dtype)
        return self.with_x0(x_t, t, torch.maximum(torch.minimum(x0, s), -s) / s, out.var_frac)


class _Unguided(DenoiserWrapper):
    """The wrapped denoiser with the guidance target removed from its kwargs (it never sees it)."""

    def __init__(self, denoiser: Denoiser, key: str):
        super().__init__(denoiser)
        self.key = key

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> DenoiserOutput:
        kwargs.pop(self.key, None)
        return self.inner.denoise(x_t, t, **kwargs)


class ClassifierGuidance(DenoiserWrapper):
    """Guide an (unconditional) denoiser with a noisy classifier; model_kwargs={'y': labels}.

    Called as a denoiser, it applies Algorithm 2 (the eps correction) and works with every sampler.
    For Algorithm 1 on ancestral sampling pass the unguided denoiser and the mean shift instead:
        sample(cg.unguided, ..., sampler='ddpm', cond_fn=cg.cond_fn, model_kwargs={'y': y})
    classifier(x_t, t) -> logits (B, num_classes). y is not passed on to the model.

    Subclasses guide by another differentiable score of x_t (CLIPGuidance): they set `key`, the
    model kwarg that carries what to guide toward, and `score`.
    """

    key = "y"  # the model kwarg that names the target; the wrapped model never sees it
    what = "class labels: model_kwargs={'y': labels}"

    def __init__(self, denoiser: Denoiser, classifier, scale: float):
        super().__init__(denoiser)
        if not math.isfinite(scale):
            raise UserError(f"the {type(self).__name__} scale must be a finite number, got {scale}")
        self.classifier = classifier
        self.scale = float(scale)
        self.unguided = _Unguided(denoiser, self.key)

    def score(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p_phi(y | x_t) of each example: (B,)."""
        y = torch.as_tensor(target, device=x_t.device).long().expand(x_t.shape[0])
        return F.log_softmax(self.classifier(x_t, t), dim=-1).gather(1, y[:, None])[:, 0]

    def grad_score(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """grad_x score(x_t): (B, ...). Each example's score depends on its own x only, so the
        gradient of the sum is every example's gradient."""
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            return torch.autograd.grad(self.score(x, t, target).sum(), x)[0].to(x_t.dtype)

    def _target(self, kwargs: dict) -> torch.Tensor:
        target = kwargs.pop(self.key, None)
        if target is None:
            raise UserError(f"{type(self).__name__} needs {self.what}")
        return target

    def cond_fn(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """s * grad score: the ancestral sampler adds Sigma times this to the mean (Algorithm 1)."""
        return self.scale * self.grad_score(x_t, t, self._target(kwargs))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> DenoiserOutput:
        g = self.cond_fn(x_t, t, **kwargs)
        out = self.unguided.denoise(x_t, t, **kwargs)
        alpha_bar = append_dims(self.schedule.alpha_bar_at(t.detach(), check=False).to(x_t.device), x_t.ndim)
        return self.with_eps(x_t, t, out.eps - (1 - alpha_bar).sqrt().to(x_t.dtype) * g, out.var_frac)


class CLIPGuidance(ClassifierGuidance):
    """CLIP guidance (GLIDE; the lectures' "classifier guidance with CLIP"): the score is the dot
    product of the noisy image embedding g(x_t, t) and the caption's text embedding h(c),
        Algorithm 1:  mu_hat(x_t | c) = mu(x_t) + s * Sigma * grad_x (g(x_t, t) . h(c))
        Algorithm 2:  eps_hat = eps - sqrt(1 - alpha_bar_t) * s * grad_x (g(x_t, t) . h(c))
    clip: a noisy CLIP (clip.noisy) whose encode_image(x_t, t) gives unit vectors;
    model_kwargs={'text_embed': h} with h = clip.encode_text(...) of the prompts: (B, E) or (1, E)."""

    key = "text_embed"
    what = "the prompts' CLIP text embeddings: model_kwargs={'text_embed': clip.encode_text(...)}"

    def __init__(self, denoiser: Denoiser, clip, scale: float):
        super().__init__(denoiser, clip, scale)
        self.clip = clip

    def score(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """g(x_t, t) . h(c): (B,)."""
        return (self.clip.encode_image(x_t, t) * target.to(x_t.device).float()).sum(-1)
