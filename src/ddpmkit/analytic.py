"""Data with known distributions and their exact denoisers.

For Gaussian-mixture data the noisy marginal q(x_t) is again a Gaussian mixture, so the optimal
denoiser E[eps | x_t] (and the score) is known in closed form. Plugging it into a sampler or a
likelihood tests the sampler or likelihood alone, with no training in the way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import UserError
from .schedules import NoiseSchedule
from .superres import aug_timestep


@dataclass
class GaussianMixture:
    """p(x) = sum_k w_k N(x; mu_k, s_k^2 I) in D dimensions.

    means: (K, D), stds: (K,), weights: (K,) summing to 1. A single component is plain Gaussian data.
    """

    means: torch.Tensor
    stds: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        if self.means.ndim != 2:
            raise UserError(f"means must be (K, D), got shape {tuple(self.means.shape)}")
        K = self.means.shape[0]
        self.stds = torch.as_tensor(self.stds, dtype=torch.float64).expand(K).clone()
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64).expand(K).clone()
        self.weights = self.weights / self.weights.sum()

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @classmethod
    def gaussian(cls, mean: torch.Tensor, std: float) -> GaussianMixture:
        return cls(torch.as_tensor(mean, dtype=torch.float64)[None], torch.tensor([std], dtype=torch.float64), torch.tensor([1.0]))

    @classmethod
    def ring(cls, n: int = 8, radius: float = 2.0, std: float = 0.1, weights: torch.Tensor | None = None) -> GaussianMixture:
        """n equal Gaussians on a circle (the "8 Gaussians" toy when n = 8)."""
        angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        # float64 stds: a float32 0.1 is 0.10000000149, an error every exact test downstream would inherit
        return cls(means, torch.full((n,), std, dtype=torch.float64), torch.ones(n) if weights is None else weights)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n samples (n, D) float64 and their component labels (n,)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[k] + self.stds[k, None] * z, k

    def _noisy(self, alpha_bar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Component means sqrt(a) mu_k: (B, K, D) and variances a s_k^2 + 1 - a: (B, K) of q(x_t)."""
        a = alpha_bar.to(torch.float64)[:, None]
        var = a * self.stds[None] ** 2 + (1 - a)
        return a.sqrt()[..., None] * self.means[None], var

    def log_prob_noisy(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """log q(x_t) for x_t: (B, D) at alpha_bar: (B,); alpha_bar = 1 gives log p(x)."""
        x = x.to(torch.float64)
        means, var = self._noisy(alpha_bar)
        sq = ((x[:, None] - means) ** 2).sum(-1)  # (B, K)
        comp = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(comp + self.weights.log()[None], dim=1)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob_noisy(x, torch.ones(x.shape[0], dtype=torch.float64))

    def log_joint_noisy(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x_t; sqrt(a) mu_k, (a s_k^2 + 1 - a) I) up to a constant: (B, K);
        its softmax over k is q(k | x_t). Differentiable in x."""
        x = x.to(torch.float64)
        means, var = self._noisy(alpha_bar)
        sq = ((x[:, None] - means) ** 2).sum(-1)
        return -0.5 * sq / var - 0.5 * self.dim * torch.log(var) + self.weights.log()[None]

    def responsibilities(self, x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """q(k | x_t): (B, K)."""
        return torch.softmax(self.log_joint_noisy(x, alpha_bar), dim=1)

    def noisy_classifier(self, schedule: NoiseSchedule):
        """The exact time-conditioned classifier of classifier guidance, classes = components:
        classifier(x_t, t) -> logits (B, K) whose log-softmax is log q(y | x_t)."""

        def classifier(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            ab = schedule.alpha_bar_at(t.detach(), check=False).to(x_t.device)
            return self.log_joint_noisy(x_t.reshape(x_t.shape[0], -1), ab)

        return classifier

    def eps_star(self, x_t: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
        """The optimal noise prediction E[eps | x_t] for x_t: (B, D) at alpha_bar: (B,).

        Per component, E[eps | x_t, k] = sqrt(1 - a) / (a s_k^2 + 1 - a) (x_t - sqrt(a) mu_k);
        the mixture weights each by q(k | x_t).
        """
        x = x_t.to(torch.float64)
        a = alpha_bar.to(torch.float64)
        means, var = self._noisy(a)
        r = self.responsibilities(x, a)  # (B, K)
        per_k = (1 - a)[:, None, None].sqrt() / var[..., None] * (x[:, None] - means)  # (B, K, D)
        return (r[..., None] * per_k).sum(1).to(x_t.dtype)

    def eps_model(self, schedule: NoiseSchedule):
        """The exact denoiser as a ddpmkit model: model(x_t: (B, ...), t: (B,)) -> eps."""

        def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            ab = schedule.alpha_bar_at(t.detach(), check=False).to(x_t.device)
            flat = x_t.reshape(x_t.shape[0], -1)
            return self.eps_star(flat, ab).reshape(x_t.shape)

        return model

    def conditional_eps_model(self, schedule: NoiseSchedule):
        """The exact class-conditional denoiser, classes = components: model(x_t, t, y) returns
        E[eps | x_t, k = y] for y in 0..K-1 and the unconditional E[eps | x_t] for y = K (null)."""
        K = self.means.shape[0]
        parts = [GaussianMixture(self.means[k:k + 1], self.stds[k:k + 1], torch.ones(1)) for k in range(K)]

        def model(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            ab = schedule.alpha_bar_at(t.detach(), check=False).to(x_t.device)
            flat = x_t.reshape(x_t.shape[0], -1)
            y = torch.full((x_t.shape[0],), K) if y is None else torch.as_tensor(y).long().cpu().expand(x_t.shape[0])
            out = self.eps_star(flat, ab)
            for k in range(K):
                rows = y == k
                if bool(rows.any()):
                    out[rows] = parts[k].eps_star(flat[rows], ab[rows])
            return out.reshape(x_t.shape)

        return model

    def covariance(self) -> torch.Tensor:
        """Cov[x] of the mixture: (D, D)."""
        mean = (self.weights[:, None] * self.means).sum(0)
        centered = self.means - mean
        between = (self.weights[:, None, None] * centered[:, :, None] * centered[:, None, :]).sum(0)
        within = (self.weights * self.stds**2).sum() * torch.eye(self.dim, dtype=torch.float64)
        return between + within

    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)


@dataclass
class GaussianSuperRes:
    """Gaussian high-res data x ~ N(mean, cov) (D = C*H*W) and its low-res version z = A x, for
    super-resolution stages. Given the augmented z_s = a z + sigma_s xi (a = sqrt(alpha_bar(s)),
    sigma_s^2 = 1 - a^2), x is again Gaussian (Gaussian conditioning):

        K = cov A^T a (a^2 A cov A^T + sigma_s^2 I)^-1,   x | z_s ~ N(mean + K (z_s - a A mean), cov - a K A cov)

    so E[eps | x_t, z_s] is a Gaussian denoiser's, in closed form.

    mean: (D,), cov: (D, D), A: (d, D) the downsampling as a matrix; image_shape: (C, H, W) of x.
    """

    mean: torch.Tensor
    cov: torch.Tensor
    A: torch.Tensor
    image_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.mean, self.cov, self.A = (torch.as_tensor(v, dtype=torch.float64) for v in (self.mean, self.cov, self.A))

    def _gain(self, level: float, schedule: NoiseSchedule) -> tuple[torch.Tensor, float]:
        a2 = 1.0 if level == 0 else float(schedule.alpha_bar_at(aug_timestep(torch.tensor(level), schedule)))
        a = math.sqrt(a2)
        low_cov = self.A @ self.cov @ self.A.T
        K = a * self.cov @ self.A.T @ torch.linalg.inv(a2 * low_cov + (1 - a2) * torch.eye(len(self.A), dtype=torch.float64))
        return K, a

    def conditional(self, z_s: torch.Tensor, level: float, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, D) and covariance (D, D) of x | z_s, for z_s: (B, d) augmented at `level`."""
        K, a = self._gain(level, schedule)
        return self.mean + (z_s.to(torch.float64) - a * self.A @ self.mean) @ K.T, self.cov - a * K @ self.A @ self.cov

    def output_moments(self, z: torch.Tensor, level: float, schedule: NoiseSchedule) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (D,) and covariance (D, D) of exact super-resolution samples of one clean low-res z
        (d,), over the augmentation noise as well: N(E[m(z_s)], S + sigma_s^2 K K^T)."""
        K, a = self._gain(level, schedule)
        mean, S = self.conditional(a * z.to(torch.float64)[None], level, schedule)
        return mean[0], S + (1 - a * a) * K @ K.T

    def eps_model(self, schedule: NoiseSchedule):
        """model(x_t (B, C, H, W), t, low_res (B, c, h, w), aug_level (B,)) -> E[eps | x_t, z_s], the
        exact super-resolution denoiser (one augmentation level per batch)."""

        def model(x_t: torch.Tensor, t: torch.Tensor, low_res: torch.Tensor, aug_level: torch.Tensor, **_) -> torch.Tensor:
            level = float(aug_level.reshape(-1)[0])
            m, S = self.conditional(low_res.reshape(len(low_res), -1), level, schedule)
            c2 = schedule.alpha_bar_at(t.detach(), check=False)[:, None, None]  # (B, 1, 1)
            x = x_t.reshape(len(x_t), -1).to(torch.float64)
            # x_t ~ N(c m, c^2 S + (1 - c^2) I): E[x0 | x_t] = m + c S (c^2 S + (1 - c^2) I)^-1 (x_t - c m)
            eye = torch.eye(len(S), dtype=torch.float64)
            gain = c2.sqrt() * S @ torch.linalg.inv(c2 * S + (1 - c2) * eye)  # (B, D, D)
            x0 = m + (gain @ (x - c2[:, 0].sqrt() * m)[..., None])[..., 0]
            eps = (x - c2[:, 0].sqrt() * x0) / (1 - c2[:, 0]).sqrt()
            return eps.reshape(x_t.shape).to(x_t.dtype)

        return model


def nearest_component(gm: GaussianMixture, x: torch.Tensor) -> torch.Tensor:
    """Index of the most likely component of each clean sample x: (B, D) -> (B,)."""
    return gm.responsibilities(x, torch.ones(x.shape[0], dtype=torch.float64)).argmax(1)


__all__ = ["GaussianMixture", "GaussianSuperRes", "nearest_component"]
