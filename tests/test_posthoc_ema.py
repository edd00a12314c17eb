"""Post-hoc EMA: the power-function profiles, and reconstructions against averages tracked directly."""
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ddpmkit
from ddpmkit.checkpoint import list_checkpoints
from ddpmkit.cli import main
from ddpmkit.config import load_config
from ddpmkit.errors import Note
from ddpmkit.models import load_diffusion
from ddpmkit.posthoc_ema import (
    POOR_FIT,
    PowerEMA,
    gamma_from_sigma_rel,
    list_snapshots,
    profile,
    reconstruct,
    sigma_rel_from_gamma,
    solve_coefficients,
)
from ddpmkit.train import train


class Weights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(5))


def trajectory(n: int) -> torch.Tensor:
    """The first n of a training-like weight sequence: drift plus oscillation plus noise, (n, 5)."""
    g = torch.Generator().manual_seed(0)
    tau = torch.arange(1, 1001, dtype=torch.float64)[:, None]
    theta = (tau / 1000) ** 0.5 * torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0]) + 0.3 * torch.sin(tau / 37 + torch.arange(5)) \
        + 0.05 * torch.randn(1000, 5, generator=g, dtype=torch.float64)
    return theta[:n]


def run(sigma_rels, n: int, every: int, run_dir=None):
    m, ema = Weights(), None
    for t, theta in enumerate(trajectory(n), start=1):
        m.w.data.copy_(theta)
        if ema is None:
            ema = PowerEMA(m, sigma_rels)
        ema.update(m, t)
        if run_dir is not None and t % every == 0:
            ema.save_snapshot(run_dir, t)
    return ema


def test_sigma_rel_and_gamma_invert_each_other():
    for sr in (0.01, 0.05, 0.1, 0.2):
        assert sigma_rel_from_gamma(gamma_from_sigma_rel(sr)) == pytest.approx(sr, rel=1e-10)
    # sigma_rel is the profile's standard deviation relative to its length t
    t, gamma = 2000, gamma_from_sigma_rel(0.1)
    w = profile(t, gamma, t)
    tau = np.arange(1, t + 1)
    mean = (w * tau).sum()
    assert math.sqrt((w * (tau - mean) ** 2).sum()) / t == pytest.approx(0.1, rel=0.01)
    for sr in (0.5, 12**-0.5, 0.0):  # 1/sqrt(12) is the uniform profile, gamma = 0: the range is open at both ends
        with pytest.raises(ValueError, match=rf"sigma_rel = {sr} must lie in \(0, 0.2887\)"):
            gamma_from_sigma_rel(sr)
    assert sigma_rel_from_gamma(0.0) == pytest.approx(12**-0.5, rel=1e-12) and gamma_from_sigma_rel(0.2886) > 0


def test_tracked_average_has_the_profile_weights():
    n, sr = 300, 0.1
    ema = run((sr,), n, every=n)
    want = torch.from_numpy(profile(n, gamma_from_sigma_rel(sr), n)) @ trajectory(n)
    assert torch.allclose(ema.averages[0]["w"].double(), want, atol=1e-5)


def test_reconstruction_of_a_tracked_length_is_that_average(tmp_path):
    n = 400
    run((0.05, 0.10), n, every=50, run_dir=tmp_path)
    direct = run((0.05,), n, every=n).averages[0]["w"]
    state, info = reconstruct(tmp_path, 0.05)
    assert info["t"] == n and info["snapshots"] == 8 and info["profile_error"] < 1e-8
    assert torch.allclose(state["w"], direct, atol=1e-5)


def test_reconstruction_of_another_length_and_an_earlier_step(tmp_path):
    n = 1000
    run((0.05, 0.10), n, every=50, run_dir=tmp_path)
    assert len(list_snapshots(tmp_path)) == 20
    for sr, t in ((0.075, n), (0.15, n), (0.075, 600)):
        state, info = reconstruct(tmp_path, sr, t)
        direct = run((sr,), t, every=t).averages[0]["w"]
        naive = run((0.05,), t, every=t).averages[0]["w"]  # the nearest tracked average, for scale
        err, scale = (state["w"] - direct).abs().max().item(), (naive - direct).abs().max().item()
        assert err < 0.05 * scale, (sr, t, err, scale)
        assert info["profile_error"] < 0.05
    # a width far from the tracked ones is made only roughly: a note says so (the CLI printed the error in passing)
    with pytest.warns(Note, match=r"sigma_rel 0.002: the snapshots' averages \(widths 0.05, 0.1, 20 snapshots\) make this width only "
                                  r"roughly \(profile fit error \d+%\)"):
        assert reconstruct(tmp_path, 0.002)[1]["profile_error"] > POOR_FIT
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and none for a width it makes well
        reconstruct(tmp_path, 0.075)
    # past the last snapshot the weights were never kept: before, a "reconstruction" with a 100% profile error was written
    with pytest.raises(ValueError, match=r"step 1001 is after the last post-hoc EMA snapshot \(step 1000\); choose a step <= 1000"):
        reconstruct(tmp_path, 0.075, n + 1)


def test_no_snapshots_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.posthoc_ema"):
        reconstruct(tmp_path, 0.1)


TOY = ["train.steps=12", "train.log_every=1", "train.checkpoint_every=4", "train.sample_every=0", "train.keep_checkpoints=0",
       "train.posthoc_ema=[0.05,0.1]", "train.posthoc_every=4", "train.mixed_precision=no",
       "diffusion.precondition=edm", "diffusion.prediction=x0", "diffusion.loss_weighting=edm", "diffusion.timestep_sampling=log_normal"]


def test_training_keeps_snapshots_resumes_exactly_and_posthoc_ema_samples(tmp_path):
    """An EDM-preconditioned toy trained with post-hoc EMA: the snapshots and the running averages of
    a run killed after step 4 and resumed equal a straight run's; `ddpmkit posthoc-ema` writes a run
    whose EMA is the reconstruction, and it samples."""
    straight, resumed = tmp_path / "a", tmp_path / "b"
    train(load_config("toy2d", [f"train.run_dir={straight}", *TOY]), progress=False)
    train(load_config("toy2d", [f"train.run_dir={resumed}", *TOY]), progress=False)
    for later in list_checkpoints(resumed)[1:]:
        shutil.rmtree(later)
    for snap in ("phema-0000008.safetensors", "phema-0000012.safetensors"):
        (resumed / "posthoc" / snap).unlink()
    train(load_config("toy2d", [f"train.run_dir={resumed}", *TOY]), resume=True, progress=False)
    assert [p.name for _, p in list_snapshots(straight)] == ["phema-0000004.safetensors", "phema-0000008.safetensors", "phema-0000012.safetensors"]
    for (_, a), (_, b) in zip(list_snapshots(straight), list_snapshots(resumed)):
        ta, tb = load_file(a), load_file(b)
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
    last = lambda run: load_file(list_checkpoints(run)[-1] / "power_ema.safetensors")
    assert all(torch.equal(last(straight)[k], last(resumed)[k]) for k in last(straight))

    assert main(["posthoc-ema", str(straight), "--sigma-rel", "0.05,0.1", "--out", str(tmp_path / "x")]) == 2  # --out names one run
    assert not (tmp_path / "x").exists()
    assert main(["posthoc-ema", str(straight), "--sigma-rel", "0.07", "--out", str(tmp_path / "one")]) == 0  # one width: its --out
    assert [p.name for p in list_checkpoints(tmp_path / "one")] == ["ckpt-0000012"]
    with pytest.raises(SystemExit):
        main(["posthoc-ema", str(straight), "--sigma-rel", "wide"])
    assert main(["posthoc-ema", str(straight), "--sigma-rel", "0.1"]) == 0
    assert main(["posthoc-ema", str(straight), "--sigma-rel", "0.1"]) == 0  # again: it replaces its own output
    # an --out that holds a trained run (the run itself) is refused: its step-12 checkpoint would have been replaced
    before = (list_checkpoints(straight)[-1] / "ema.safetensors").read_bytes()
    for out in (straight, resumed):
        assert main(["posthoc-ema", str(straight), "--sigma-rel", "0.07", "--out", str(out)]) == 2
        assert (list_checkpoints(out)[-1] / "ema.safetensors").read_bytes() == before
    m = load_diffusion(straight / "posthoc-ema-0.1")
    tracked = load_file(list_checkpoints(straight)[-1] / "power_ema.safetensors")
    state = m.network.state_dict()
    assert all(torch.allclose(state[k], tracked[f"1/{k}"], atol=1e-5) for k in state)  # 0.1 is the second tracked width
    assert m.step == 12 and m.config.diffusion.precondition == "edm"
    # the rest is the newest checkpoint at or before the snapshot's step: here step 12's own
    assert (list_checkpoints(straight / "posthoc-ema-0.1")[-1] / "model.safetensors").read_bytes() == \
        (list_checkpoints(straight)[-1] / "model.safetensors").read_bytes() and list_checkpoints(straight)[-1].name == "ckpt-0000012"
    x = ddpmkit.sample(m.network, (16, 2), m.schedule, sampler="ddim", steps=5, prediction="x0", generator=0).x
    assert x.shape == (16, 2) and torch.isfinite(x).all()


def test_folding_in_a_step_is_one_multi_tensor_op_per_average():
    """On a GPU every op is a launch: the averages' update is one _foreach_lerp_ each, not one lerp per tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    power = PowerEMA(model, (0.05, 0.1))
    with Ops() as ops:
        power.update(model, 3)
    assert [n for n in ops.names if "lerp" in n] == ["_foreach_lerp_", "_foreach_lerp_"]
    beta = (1 - 1 / 3) ** (gamma_from_sigma_rel(0.1) + 1)  # and the arithmetic is the per-tensor lerp's
    expected = torch.lerp(torch.zeros(()), model[0].weight.detach(), 1 - beta)
    fresh = PowerEMA(model, (0.1,))
    for a in fresh.averages[0].values():
        a.zero_()
    fresh.update(model, 3)
    assert torch.equal(fresh.averages[0]["0.weight"], expected.expand_as(model[0].weight))


def test_fitting_one_snapshot_is_a_projection_whose_relative_error_is_the_sine_of_the_angle():
    """The least-squares fit of a profile w by one snapshot's p is the projection x = p.w / p.p, and its relative error
    |x p - w| / |w| is the sine of the angle between them (what `posthoc-ema` prints as the profile fit error)."""
    p, w = profile(100, 8.0, 120), profile(120, 5.0, 120)
    x, error = solve_coefficients([(100, 8.0)], 120, 5.0)
    cos = p @ w / (np.linalg.norm(p) * np.linalg.norm(w))
    assert x[0] == pytest.approx(p @ w / (p @ p), rel=1e-9)
    assert error == pytest.approx(math.sqrt(1 - cos**2), rel=1e-9) and 0.01 < error < 1
