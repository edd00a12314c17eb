"""Post-hoc EMA (Karras et al. 2024, "Analyzing and improving the training dynamics of diffusion
models", section 3): choose the averaging length after training.

A power-function EMA with exponent gamma updates, after the t-th optimizer step (t = 1, 2, ...),
    theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t,   beta_t = (1 - 1/t)^(gamma + 1),
so theta_hat_t = sum_{tau <= t} w(tau) theta_tau with the exact weights
    w_{t,gamma}(tau) = (tau / t)^(gamma + 1) - ((tau - 1) / t)^(gamma + 1),
a profile whose relative width is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Training
keeps two such averages (e.g. sigma_rel 0.05 and 0.10) and saves snapshots of both every few
steps. Every snapshot is linear in the weight sequence with known weights, so the average of
any other (t, sigma_rel) is approximated by the combination of snapshots whose weights are
closest to its own in least squares, with no access to the sequence itself.
"""
from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .checkpoint import atomic_folder, list_checkpoints
from .errors import Note, UserError

SNAPSHOT_RE = re.compile(r"^phema-(\d+)\.safetensors$")


def gamma_from_sigma_rel(sigma_rel: float) -> float:
    """The exponent gamma of the profile of relative width sigma_rel: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - 1/sigma_rel^2) gamma + (12 - 1/sigma_rel^2) = 0."""
    # 1/sqrt(12) is the width of the uniform profile (gamma = 0); wider ones have gamma in (-1, 0) and weigh the first
    # weights the most: an average that ought to favour the last ones has gamma > 0
    if not 0 < sigma_rel < 12**-0.5:
        raise UserError(f"sigma_rel = {sigma_rel} must lie in (0, {12**-0.5:.4f})")
    k = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def sigma_rel_from_gamma(gamma: float) -> float:
    return ((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) ** 0.5


def profile(t: int, gamma: float, length: int) -> np.ndarray:
    """w_{t,gamma}(tau) for tau = 1..length (zero beyond t): the weight of the tau-th weights in the average."""
    tau = np.arange(1, length + 1, dtype=np.float64)
    w = (np.minimum(tau, t) / t) ** (gamma + 1) - (np.minimum(tau - 1, t) / t) ** (gamma + 1)
    return w


def solve_coefficients(snapshots: list[tuple[int, float]], t: int, gamma: float) -> tuple[np.ndarray, float]:
    """Coefficients x minimising || sum_i x_i w_{t_i,gamma_i} - w_{t,gamma} ||^2 over the snapshots (t_i, gamma_i),
    and the relative error of that fit of the profile."""
    length = max(t, max(s for s, _ in snapshots))
    A = np.stack([profile(s, g, length) for s, g in snapshots], axis=1)  # (length, n)
    target = profile(t, gamma, length)
    x, *_ = np.linalg.lstsq(A, target, rcond=None)
    return x, float(np.linalg.norm(A @ x - target) / np.linalg.norm(target))


class PowerEMA:
    """The power-function averages of a model's weights for several sigma_rel (train.posthoc_ema)."""

    def __init__(self, model: nn.Module, sigma_rels: tuple[float, ...]):
        self.sigma_rels = tuple(sigma_rels)
        self.gammas = [gamma_from_sigma_rel(s) for s in self.sigma_rels]
        self.averages = [{k: v.detach().clone().float() for k, v in model.state_dict().items()} for _ in self.gammas]

    @torch.no_grad()
    def update(self, model: nn.Module, t: int) -> None:
        """Fold in the weights after the t-th optimizer step (t >= 1; a skipped step folds in unchanged weights)."""
        current = model.state_dict()
        for gamma, avg in zip(self.gammas, self.averages):
            beta = (1.0 - 1.0 / t) ** (gamma + 1)
            # one multi-tensor op per average: a per-tensor loop was a launch per tensor and average at every step on a GPU
            torch._foreach_lerp_(list(avg.values()), [current[k].float() for k in avg], 1.0 - beta)

    def to(self, device: torch.device | str) -> PowerEMA:
        self.averages = [{k: v.to(device) for k, v in avg.items()} for avg in self.averages]
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}/{k}": v.detach().contiguous().cpu() for i, avg in enumerate(self.averages) for k, v in avg.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, avg in enumerate(self.averages):
            for k, a in avg.items():
                a.copy_(state[f"{i}/{k}"])

    def save_snapshot(self, run_dir: str | Path, t: int) -> Path:
        """run_dir/posthoc/phema-{t:07d}.safetensors with every average, written through a rename."""
        folder = Path(run_dir) / "posthoc"
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"phema-{t:07d}.safetensors"
        tmp = folder / f".tmp-{final.name}"
        save_file(self.state_dict(), tmp, metadata={"t": str(t), "sigma_rels": json.dumps(self.sigma_rels)})
        tmp.replace(final)
        return final


def list_snapshots(run_dir: str | Path) -> list[tuple[int, Path]]:
    folder = Path(run_dir) / "posthoc"
    found = [(int(m.group(1)), p) for p in folder.glob("phema-*.safetensors") if (m := SNAPSHOT_RE.match(p.name))]
    return sorted(found)


POOR_FIT = 0.1  # a relative profile error above which the reconstruction is a note's worth off


def reconstruct(run_dir: str | Path, sigma_rel: float, t: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The weights averaged with profile (t, sigma_rel), from the run's snapshots taken at or
    before t (default: the last snapshot's t). Returns (state_dict, info: t, sigma_rel, the number of
    snapshots used and the relative least-squares error of the profile)."""
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise FileNotFoundError(f"no post-hoc EMA snapshots in {Path(run_dir) / 'posthoc'}: train with train.posthoc_ema set")
    last = snaps[-1][0]
    t = last if t is None else t
    if t > last:  # the weights after the last snapshot were never kept: no profile ending later can be fitted
        raise UserError(f"step {t} is after the last post-hoc EMA snapshot (step {last}); choose a step <= {last}")
    snaps = [(s, p) for s, p in snaps if s <= t]
    if not snaps:
        raise UserError(f"no snapshot at or before step {t}")
    columns, tracked = [], set()  # (t_i, gamma_i) of every average in every snapshot, in file order; their widths
    for s, path in snaps:
        with safe_open(str(path), "pt") as f:
            widths = json.loads(f.metadata()["sigma_rels"])
            columns += [(s, gamma_from_sigma_rel(sr)) for sr in widths]
            tracked.update(widths)
    x, error = solve_coefficients(columns, t, gamma_from_sigma_rel(sigma_rel))
    if error > POOR_FIT:  # the weights are then an average of another shape than asked (a 62% error for 0.001 from 0.05 and 0.1)
        warnings.warn(f"sigma_rel {sigma_rel:g}: the snapshots' averages (widths {', '.join(f'{w:g}' for w in sorted(tracked))}, "
                      f"{len(snaps)} snapshots) make this width only roughly (profile fit error {error:.0%}); choose one nearer them, "
                      "or train with it in train.posthoc_ema", Note, stacklevel=2)
    out: dict[str, torch.Tensor] = {}
    coefs = iter(x)
    for _, path in snaps:
        with safe_open(str(path), "pt") as f:
            names = list(f.keys())
            for i in range(len({k.split("/", 1)[0] for k in names})):
                coef = float(next(coefs))
                for key in (k for k in names if k.startswith(f"{i}/")):
                    name = key.split("/", 1)[1]
                    out[name] = out.get(name, 0) + coef * f.get_tensor(key).double()
    info = {"t": t, "sigma_rel": sigma_rel, "snapshots": len(snaps), "profile_error": error}
    return {k: v.float() for k, v in out.items()}, info


def write_checkpoint(run_dir: str | Path, sigma_rel: float, t: int | None = None, out: str | Path | None = None) -> Path:
    """A run folder (default run_dir/posthoc-ema-{sigma_rel}) holding one checkpoint: the run's
    newest checkpoint at or before t with its EMA weights replaced by the reconstruction, so every
    command that takes a run samples with it. Returns the checkpoint folder."""
    state, info = reconstruct(run_dir, sigma_rel, t)
    found = [c for c in list_checkpoints(run_dir) if int(c.name.split("-")[1]) <= info["t"]]
    if not found:
        raise FileNotFoundError(f"no checkpoint of {run_dir} at or before step {info['t']}")
    source = found[-1]
    out = Path(out) if out is not None else Path(run_dir) / f"posthoc-ema-{sigma_rel:g}"
    trained = [c for c in list_checkpoints(out) if "posthoc_ema" not in json.loads((c / "config.json").read_text()).get("metrics", {})]
    if trained:  # its step's checkpoint would be replaced (`--out RUN`: the run's own weights)
        raise UserError(f"{out} holds a trained run (checkpoint {trained[-1].name}); give an --out of its own for the post-hoc EMA")
    final = out / f"ckpt-{info['t']:07d}"
    with atomic_folder(final) as tmp:
        meta = json.loads((source / "config.json").read_text())
        meta.update(step=info["t"], metrics={**meta.get("metrics", {}), "posthoc_ema": info})
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        shutil.copy(source / "model.safetensors", tmp / "model.safetensors")
        save_file(state, tmp / "ema.safetensors")
    return final
