"""Sample-quality metrics on feature vectors: Frechet distance (FID), KID and Inception Score.

They are computed from features of any network: the standard FID Inception (inception.py),
comparable with papers, or a classifier trained on the dataset (features.py), which is not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError


@dataclass
class FeatureStats:
    """Mean and covariance of a set of feature vectors (what FID needs of the reference set)."""

    mu: np.ndarray  # (d,)
    sigma: np.ndarray  # (d, d)
    n: int

    @classmethod
    def of(cls, features: torch.Tensor | np.ndarray) -> FeatureStats:
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[0] < 2:
            raise UserError(f"features must be (n >= 2, d), got shape {f.shape}")
        return cls(mu=f.mean(0), sigma=np.cov(f, rowvar=False), n=f.shape[0])

    def save(self, path) -> None:
        np.savez(path, mu=self.mu, sigma=self.sigma, n=self.n)

    @classmethod
    def load(cls, path) -> FeatureStats:
        with np.load(path) as z:
            return cls(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^{1/2}) between two Gaussians (Heusel et al. 2017).

    tr((S1 S2)^{1/2}) is computed as the sum of square roots of the eigenvalues of the symmetric
    matrix S1^{1/2} S2 S1^{1/2}, which has the same spectrum as S1 S2 and avoids a non-symmetric
    matrix square root (whose round-off pytorch-fid has to patch with an epsilon).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise UserError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, covariances {s1.shape} vs {s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def fid_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray | FeatureStats) -> float:
    sa = FeatureStats.of(a)
    sb = b if isinstance(b, FeatureStats) else FeatureStats.of(b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


def kernel_inception_distance(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, subsets: int = 50,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the kernel (x.y / d + 1)^3, averaged over
    random subsets; returns (mean, std over subsets)."""
    fa, fb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    d = fa.shape[1]
    m = min(subset_size, fa.shape[0], fb.shape[0])
    if m < 2:
        raise UserError("KID needs at least 2 samples in each set")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = fa[rng.choice(fa.shape[0], m, replace=False)]
        y = fb[rng.choice(fb.shape[0], m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
        values.append(mmd)
    return float(np.mean(values)), float(np.std(values))


def inception_score(probs: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """IS (Salimans et al. 2016) = exp(E_x KL(p(y|x) || p(y))), mean and std over `splits` splits (at most one per
    sample: an empty split would make the score NaN)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or len(p) == 0 or not np.allclose(p.sum(1), 1, atol=1e-4):
        raise UserError("inception_score needs class probabilities (n, classes), n >= 1, whose rows sum to 1")
    scores = []
    for part in np.array_split(p, min(splits, len(p))):
        py = part.mean(0, keepdims=True)
        kl = (part * (np.log(np.clip(part, 1e-12, None)) - np.log(np.clip(py, 1e-12, None)))).sum(1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio of images in [-1, 1] (peak-to-peak 2), per example, dB."""
    mse = ((x - y) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))
