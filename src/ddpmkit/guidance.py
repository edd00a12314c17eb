"""Guidance as model wrappers: each takes a model and returns a model with the same contract,
so every sampler works with every kind of guidance (and wrappers compose).

Classifier-free guidance (Ho & Salimans 2022):
    eps_guided = eps(x_t | null) + s * (eps(x_t | c) - eps(x_t | null))
s = 0 is the unconditional model, s = 1 the conditional one, s > 1 trades diversity for
fidelity to c. Both branches run in one batched call. Every parameterization (eps, x0, v) is
affine in the network output at fixed x_t and t, so guiding the raw output is the same as
guiding eps; with a learned variance only the mean channels are guided (GLIDE).

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

from .parameterization import ModelFn, Prediction, from_x0, to_x0_eps
from .schedules import NoiseSchedule
from .utils import append_dims

Condition = dict[str, torch.Tensor]


def _split_variance(out: torch.Tensor, learned_variance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    return out.chunk(2, dim=1) if learned_variance else (out, None)


def _join_variance(mean: torch.Tensor, var: torch.Tensor | None) -> torch.Tensor:
    return mean if var is None else torch.cat([mean, var], dim=1)


def _std(x: torch.Tensor) -> torch.Tensor:
    """Per-example standard deviation over all but the batch dimension, broadcastable to x."""
    return append_dims(x.reshape(x.shape[0], -1).std(dim=1), x.ndim)


class ClassifierFreeGuidance:
    """model(x_t, t, **condition) -> the guided output. Pass it to any sampler with
    model_kwargs=condition, e.g. {'y': labels} or TextEncoder.encode(prompts).

    null: the null condition, {'y': tensor(K)} for a K-class model (or null_label=K), or the empty
        prompt's encoding; tensors with batch 1 are expanded. Keys in the condition but not in
        `null` go to both branches unchanged.
    rescale: guidance rescale phi (Lin et al. 2024, "Common diffusion noise schedules and sample
        steps are flawed", eq. 15-16): the guided x0 is rescaled to the conditional x0's standard
        deviation and mixed, phi * rescaled + (1 - phi) * guided; fights over-saturation at large
        s. Needs schedule and prediction, because it acts on x0.
    """

    def __init__(self, model: ModelFn, scale: float, null_label: int | None = None, *, null: Condition | None = None,
                 learned_variance: bool = False, rescale: float = 0.0, schedule: NoiseSchedule | None = None,
                 prediction: Prediction = "eps"):
        if (null is None) == (null_label is None):
            raise ValueError("give the null condition once: null_label=K for a class-conditional model, or null={...}")
        if not math.isfinite(scale):
            raise ValueError(f"the classifier-free guidance scale must be a finite number (0 = unconditional, 1 = conditional), got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
        if rescale > 0 and schedule is None:
            raise ValueError("guidance rescale acts on x0 and needs the model's schedule (and prediction)")
        self.model = model
        self.scale = float(scale)
        self.null = {"y": torch.tensor([int(null_label)])} if null is None else dict(null)
        self.learned_variance = learned_variance
        self.rescale = float(rescale)
        self.schedule = schedule
        self.prediction = prediction

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **condition) -> torch.Tensor:
        B = x_t.shape[0]
        missing = sorted(set(self.null) - set(condition))
        if missing:
            raise ValueError(f"classifier-free guidance needs the condition {missing} in model_kwargs (e.g. model_kwargs={{'y': labels}})")
        both = {}
        for key, value in condition.items():
            value = torch.as_tensor(value, device=x_t.device)
            value = value.expand(B, *value.shape[1:]) if value.shape[:1] in ((), (1,)) else value
            if value.ndim == 0:
                value = value.expand(B)
            null = self.null.get(key)
            null = value if null is None else null.to(x_t.device).expand(B, *null.shape[1:]).to(value.dtype)
            both[key] = torch.cat([value, null])
        out = self.model(torch.cat([x_t, x_t]), torch.cat([t, t]), **both)
        (cond, cond_var), (uncond, _) = (_split_variance(o, self.learned_variance) for o in out.chunk(2))
        guided = uncond + self.scale * (cond - uncond)
        if self.rescale > 0:
            guided = self._rescaled(guided, cond, x_t, t)
        return _join_variance(guided, cond_var)

    def _rescaled(self, guided: torch.Tensor, cond: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0_guided = to_x0_eps(self.prediction, guided, x_t, t, self.schedule)[0]
        x0_cond = to_x0_eps(self.prediction, cond, x_t, t, self.schedule)[0]
        rescaled = x0_guided * _std(x0_cond) / _std(x0_guided).clamp(min=1e-12)
        x0 = self.rescale * rescaled + (1 - self.rescale) * x0_guided
        return from_x0(self.prediction, x0, x_t, t, self.schedule)


class Autoguidance:
    """model(x_t, t, **kw) -> bad + w * (good - bad) of the two networks' outputs (D_good, D_bad of
    the same prediction and schedule: every parameterization is affine in the output at fixed x_t
    and t, so this is the same guidance of x_0 and of eps). w = 1 is the good model alone; with a
    learned variance only the mean channels are guided and the good model's variance is kept."""

    def __init__(self, good: ModelFn, bad: ModelFn, scale: float, learned_variance: bool = False):
        if not 0.0 <= scale < float("inf"):
            raise ValueError(f"the autoguidance weight w must be a finite number >= 0 (1 = the model alone, 2 a usual choice), got {scale}")
        self.good, self.bad = good, bad
        self.scale = float(scale)
        self.learned_variance = learned_variance

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **condition) -> torch.Tensor:
        good, var = _split_variance(self.good(x_t, t, **condition), self.learned_variance)
        if self.scale == 1.0:
            return _join_variance(good, var)
        bad = _split_variance(self.bad(x_t, t, **condition), self.learned_variance)[0]
        return _join_variance(bad + self.scale * (good - bad), var)


class DynamicThresholding:
    """Imagen's dynamic thresholding (Saharia et al. 2022, section 2.3) as a model wrapper: at each
    step s = max(1, the `percentile` quantile of |x0_hat|) per sample, and x0_hat <- clip(x0_hat, -s, s) / s.
    Samples stay in [-1, 1] even at large guidance scales; s = 1 is static clipping."""

    def __init__(self, model: ModelFn, schedule: NoiseSchedule, prediction: Prediction = "eps", percentile: float = 0.995,
                 learned_variance: bool = False):
        if not 0.0 < percentile <= 1.0:
            raise ValueError(f"percentile must lie in (0, 1], got {percentile}")
        self.model, self.schedule, self.prediction = model, schedule, prediction
        self.percentile = percentile
        self.learned_variance = learned_variance

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **extra) -> torch.Tensor:
        out, var = _split_variance(self.model(x_t, t, **extra), self.learned_variance)
        x0 = to_x0_eps(self.prediction, out, x_t, t, self.schedule)[0]
        s = torch.quantile(x0.reshape(x0.shape[0], -1).abs().float(), self.percentile, dim=1).clamp(min=1.0)
        s = append_dims(s, x0.ndim).to(x0.dtype)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
        return _join_variance(from_x0(self.prediction, x0, x_t, t, self.schedule), var)


class ClassifierGuidance:
    """Guide an (unconditional) model with a noisy classifier; model_kwargs={'y': labels}.

    Called as a model, it applies Algorithm 2 (the eps correction) and works with every sampler.
    For Algorithm 1 on ancestral sampling pass the unguided model and the mean shift instead:
        sample(cg.unguided, ..., sampler='ddpm', cond_fn=cg.cond_fn, model_kwargs={'y': y})
    classifier(x_t, t) -> logits (B, num_classes). y is not passed on to the model.

    Subclasses guide by another differentiable score of x_t (CLIPGuidance): they set `key`, the
    model kwarg that carries what to guide toward, and `score`.
    """

    key = "y"  # the model kwarg that names the target; the wrapped model never sees it
    what = "class labels: model_kwargs={'y': labels}"

    def __init__(self, model: ModelFn, classifier, scale: float, schedule: NoiseSchedule, prediction: Prediction = "eps",
                 learned_variance: bool = False):
        if not math.isfinite(scale):
            raise ValueError(f"the {type(self).__name__} scale must be a finite number, got {scale}")
        self.model, self.classifier = model, classifier
        self.scale = float(scale)
        self.schedule, self.prediction = schedule, prediction
        self.learned_variance = learned_variance

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

    def grad_log_prob(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """grad_x log p_phi(y | x_t): (B, ...)."""
        return self.grad_score(x_t, t, y)

    def _target(self, kwargs: dict) -> torch.Tensor:
        target = kwargs.pop(self.key, None)
        if target is None:
            raise ValueError(f"{type(self).__name__} needs {self.what}")
        return target

    def cond_fn(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """s * grad score: the ancestral sampler adds Sigma times this to the mean (Algorithm 1)."""
        return self.scale * self.grad_score(x_t, t, self._target(kwargs))

    def unguided(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        """The model without guidance (it never sees the target)."""
        kwargs.pop(self.key, None)
        return self.model(x_t, t, **kwargs)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
        g = self.cond_fn(x_t, t, **kwargs)
        out, var = _split_variance(self.unguided(x_t, t, **kwargs), self.learned_variance)
        x0, eps = to_x0_eps(self.prediction, out, x_t, t, self.schedule)
        alpha_bar = append_dims(self.schedule.alpha_bar_at(t.detach().to(torch.float64).cpu()).to(x_t.device), x_t.ndim)
        eps = eps - (1 - alpha_bar).sqrt().to(x_t.dtype) * g
        x0 = (x_t - (1 - alpha_bar).sqrt().to(x_t.dtype) * eps) / alpha_bar.sqrt().to(x_t.dtype)
        return _join_variance(from_x0(self.prediction, x0, x_t, t, self.schedule), var)


class CLIPGuidance(ClassifierGuidance):
    """CLIP guidance (GLIDE; the lectures' "classifier guidance with CLIP"): the score is the dot
    product of the noisy image embedding g(x_t, t) and the caption's text embedding h(c),
        Algorithm 1:  mu_hat(x_t | c) = mu(x_t) + s * Sigma * grad_x (g(x_t, t) . h(c))
        Algorithm 2:  eps_hat = eps - sqrt(1 - alpha_bar_t) * s * grad_x (g(x_t, t) . h(c))
    clip: a noisy CLIP (clip.noisy) whose encode_image(x_t, t) gives unit vectors;
    model_kwargs={'text_embed': h} with h = clip.encode_text(...) of the prompts: (B, E) or (1, E)."""

    key = "text_embed"
    what = "the prompts' CLIP text embeddings: model_kwargs={'text_embed': clip.encode_text(...)}"

    def __init__(self, model: ModelFn, clip, scale: float, schedule: NoiseSchedule, prediction: Prediction = "eps",
                 learned_variance: bool = False):
        super().__init__(model, clip, scale, schedule, prediction, learned_variance)
        self.clip = clip

    def score(self, x_t: torch.Tensor, t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """g(x_t, t) . h(c): (B,)."""
        return (self.clip.encode_image(x_t, t) * target.to(x_t.device).float()).sum(-1)
