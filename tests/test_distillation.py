"""Progressive distillation against exact answers: Gaussian data, whose denoiser, DDIM map and
probability-flow ODE are known in closed form."""
import math

import pytest
import torch
from torch import nn

from ddpmkit.analytic import GaussianMixture
from ddpmkit.distillation import (
    ddim_from,
    ddim_step,
    progressive_loss,
    progressive_target,
    sample_uniform_ddim,
    truncated_snr_weight,
    uniform_grid,
)
from ddpmkit.parameterization import Denoiser
from ddpmkit.schedules import NoiseSchedule
from ddpmkit.train.progressive import ProgressiveTask, grid_points

S = NoiseSchedule.from_name("linear", 1000)
MU, STD = torch.tensor([0.7, -0.4]), 0.5
DATA = GaussianMixture(MU[None], torch.tensor([STD]), torch.tensor([1.0]))
TEACHER = Denoiser(DATA.eps_model(S), S, "eps")


def exact_ode(z_t: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """The probability-flow ODE of N(mu, std^2 I) from t to s: z_s - alpha_s mu = sqrt(alpha_s^2 std^2 + sigma_s^2)
    / sqrt(alpha_t^2 std^2 + sigma_t^2) (z_t - alpha_t mu)."""
    ab_t, ab_s = S.alpha_bar_at(torch.tensor(t)).item(), S.alpha_bar_at(torch.tensor(s)).item()
    scale = math.sqrt((ab_s * STD**2 + 1 - ab_s) / (ab_t * STD**2 + 1 - ab_t))
    return math.sqrt(ab_s) * MU + scale * (z_t - math.sqrt(ab_t) * MU)


def test_grids_nest_and_end_at_the_data():
    g4, g8 = uniform_grid(S, 4), uniform_grid(S, 8)
    assert g4[0] == S.T - 1 and g4[-1] == -1 and len(g4) == 5
    assert torch.equal(g8[::2], g4)  # the student's grid is every other point of its teacher's


def test_uniform_ddim_of_the_exact_denoiser_converges_to_the_ode_solution():
    z_T = torch.randn(400, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = exact_ode(z_T, S.T - 1, -1.0)
    errors = [(sample_uniform_ddim(TEACHER, z_T, k) - exact).norm(dim=1).mean().item() for k in (8, 32, 128)]
    assert errors[2] < errors[1] < errors[0] and errors[2] < 0.02, errors


def test_the_target_is_the_teachers_two_steps_in_one():
    g = torch.Generator().manual_seed(1)
    grid = uniform_grid(S, 8)
    z_t = torch.randn(6, 2, generator=g, dtype=torch.float64) * 1.3
    for i in (0, 2, 4, 6):  # every student step of a 4-step student, the last one ending at the data
        t, t_mid, t_next = (grid[i + k].expand(6) for k in range(3))
        target = progressive_target(TEACHER, z_t, t, t_mid, t_next)
        two = ddim_step(TEACHER, ddim_step(TEACHER, z_t, t, t_mid)[0], t_mid, t_next)[0]
        torch.testing.assert_close(ddim_from(S, z_t, target, t, t_next), two, rtol=1e-9, atol=1e-9)
        one = ddim_step(TEACHER, z_t, t, t_next)[0]
        assert (one - two).abs().max() > 1e-4  # one teacher step is not two: there is something to learn
    # max(SNR_t, 1), SNR_t = alpha_bar_t / (1 - alpha_bar_t): the SNR itself at small t, 1 where the SNR falls below it
    t = torch.tensor([0.0, 50.0, 200.0, 600.0, S.T - 1.0])
    ab = S.alpha_bar[t.long()]
    weight = truncated_snr_weight(S, t)
    assert torch.allclose(weight, torch.maximum(ab / (1 - ab), torch.ones(5, dtype=torch.float64)), rtol=1e-12)
    assert weight[0] > 100 and weight[-1] == 1.0


class GridAffine(nn.Module):
    """x_hat = a_j * z + b_j at grid point j of a K-step grid: the family that holds the exact student for
    Gaussian data (every DDIM map of a Gaussian's exact denoiser is affine in z)."""

    def __init__(self, steps: int):
        super().__init__()
        self.steps = steps
        self.a = nn.Parameter(torch.zeros(steps + 1, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(steps + 1, 2, dtype=torch.float64))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        j = torch.round((t.double() + 1) * self.steps / S.T).long()
        return self.a[j, None] * z + self.b[j]


def distil(teacher: Denoiser, steps: int, iters: int = 300) -> Denoiser:
    """One round: a GridAffine student of `steps` steps trained with progressive_loss on the teacher's targets."""
    student = Denoiser(GridAffine(steps), S, "x0")
    opt = torch.optim.Adam(student.model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(steps)
    for _ in range(iters):
        x0 = MU + STD * torch.randn(256, 2, generator=g, dtype=torch.float64)
        j = torch.randint(1, steps + 1, (256,), generator=g)
        loss = progressive_loss(student, teacher, x0, j, steps, torch.randn(256, 2, generator=g, dtype=torch.float64))
        opt.zero_grad()
        (loss / truncated_snr_weight(S, uniform_grid(S, steps)[steps - j])).mean().backward()  # equal steps per grid point
        opt.step()
    return student


@pytest.mark.slow
def test_two_rounds_of_distillation_reproduce_the_teacher_with_a_quarter_of_the_steps():
    """8 -> 4 -> 2 steps: each student, trained only on its teacher's targets, samples in K steps what its
    teacher sampled in 2K; the loss is 0 at the exact student and positive for the teacher standing in."""
    z_T = torch.randn(200, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    teacher8 = TEACHER
    reference = sample_uniform_ddim(teacher8, z_T, 8)
    student4 = distil(teacher8, 4)
    torch.testing.assert_close(sample_uniform_ddim(student4, z_T, 4), reference, rtol=0, atol=2e-3)
    student2 = distil(student4, 2)
    torch.testing.assert_close(sample_uniform_ddim(student2, z_T, 2), reference, rtol=0, atol=5e-3)
    one_step_error = (sample_uniform_ddim(teacher8, z_T, 2) - reference).abs().max().item()
    assert one_step_error > 0.05  # the teacher itself with 2 steps is far off: the students learned the difference
    g = torch.Generator().manual_seed(9)
    x0, noise = MU + STD * torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randn(64, 2, generator=g, dtype=torch.float64)
    j = torch.randint(1, 5, (64,), generator=g)
    assert progressive_loss(student4, teacher8, x0, j, 4, noise).max() < 1e-4
    assert progressive_loss(teacher8, teacher8, x0, j, 4, noise).mean() > 1e-3


@pytest.fixture(scope="module")
def toy_teacher(tmp_path_factory):
    """A small x0-predicting MLP denoiser of the 8-Gaussians toy, trained briefly: the teacher of the engine's tests."""
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    run = tmp_path_factory.mktemp("teacher") / "run"
    train(load_config("toy2d", ["network.mlp_hidden=64", "diffusion.prediction=x0", "train.steps=400", "train.checkpoint_every=0",
                                f"train.run_dir={run}"]), progress=False)  # x0: the consistency student needs an x0 teacher
    return run


def student_overrides(teacher, run, steps: int, train_steps: int = 600) -> list[str]:
    return ["train.task=progressive", f"distill.teacher={teacher}", f"distill.student_steps={steps}", f"train.steps={train_steps}",
            "train.lr=5e-4", "train.lr_schedule=cosine", "train.warmup_steps=10", "train.ema_decay=0", "train.checkpoint_every=0",
            f"train.run_dir={run}"]  # the cosine decay settles the noisy truncated-SNR loss: the same result with 1 or 2 threads


@pytest.mark.slow
def test_a_progressive_run_of_the_engine_samples_in_half_the_steps_what_its_teacher_did(toy_teacher, tmp_path, capsys):
    import ddpmkit
    from ddpmkit.cli import main
    from ddpmkit.config import load_config
    from ddpmkit.train import TrainingError, train

    config = str(toy_teacher / "config.json")  # the student starts from its teacher's config (and weights)
    code = main(["train", config, *student_overrides(toy_teacher, tmp_path / "pd4", 4, 300), "--quiet"])
    assert code == 0 and "sample it in its student steps: ddpmkit sample" in capsys.readouterr().out
    teacher, student = ddpmkit.load(toy_teacher), ddpmkit.load(tmp_path / "pd4")
    assert student.kind == "progressive" and student.metrics["round"] == 1 and student.metrics["student_steps"] == 4
    z_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    reference = sample_uniform_ddim(teacher.denoiser, z_T, 8)
    distilled = ddpmkit.sample(student.denoiser, z_T.shape, sampler="ddim_uniform", steps=4, x_T=z_T)
    assert distilled.nfe == 4
    # the command line samples a distilled run with its own sampler and steps when given none
    assert main(["sample", str(tmp_path / "pd4"), "--n", "3", "--no-gif", "--out", str(tmp_path / "s")]) == 0
    assert "with ddim_uniform in" in (said := capsys.readouterr().out) and "4 network evaluations" in said, said
    own = sample_uniform_ddim(teacher.denoiser, z_T, 4)
    err_student = (distilled.x - reference).norm(dim=1).mean().item()
    err_teacher = (own - reference).norm(dim=1).mean().item()
    assert err_student < 0.3 * err_teacher, (err_student, err_teacher)  # measured: 0.022x after 300 steps (0.02x after 600)
    # rounds chain: the next student takes half of this one's steps, not any other number
    with pytest.raises(TrainingError, match="its student takes half, distill.student_steps = 2"):
        train(load_config(config, student_overrides(tmp_path / "pd4", tmp_path / "bad", 3)), progress=False)
    assert ProgressiveTask(load_config(config, student_overrides(tmp_path / "pd4", tmp_path / "next", 2))).round == 2


def test_a_student_takes_at_most_half_of_t_steps_and_trains_on_every_grid_point(toy_teacher, tmp_path):
    from ddpmkit.config import load_config
    from ddpmkit.train import TrainingError

    config = str(toy_teacher / "config.json")
    T = load_config(config).diffusion.T
    with pytest.raises(TrainingError, match=rf"2 x distill.student_steps = {T + 2} steps exceed T = {T}"):
        ProgressiveTask(load_config(config, student_overrides(toy_teacher, tmp_path / "big", T // 2 + 1)))
    assert ProgressiveTask(load_config(config, student_overrides(toy_teacher, tmp_path / "ok", T // 2))).round == 1
    assert ProgressiveTask(load_config(config, student_overrides(toy_teacher, tmp_path / "one", 1))).round == 1  # a one-step student
    with pytest.raises(TrainingError, match="needs distill.student_steps >= 1"):
        ProgressiveTask(load_config(config, student_overrides(toy_teacher, tmp_path / "none", 0)))
    # a consistency student's teacher grid holds up to T points, one a timestep
    from ddpmkit.train.progressive import ConsistencyTask

    for points, taken in ((T, True), (T + 1, False)):
        cfg = load_config(config, ["train.task=consistency", f"distill.teacher={toy_teacher}", f"distill.points={points}",
                                   f"train.run_dir={tmp_path / 'cd'}"])
        if taken:
            ConsistencyTask(cfg)
        else:
            with pytest.raises(TrainingError, match=rf"distill.points = {T + 1} exceeds T = {T}"):
                ConsistencyTask(cfg)
    j = grid_points(5, 10_000, torch.Generator().manual_seed(0))
    counts = torch.bincount(j, minlength=7)  # 1..5, each about 2,000 times
    assert counts[0] == counts[6] == 0 and (counts[1:6] > 1900).all(), counts
    # a consistency step's intervals t_n < t_{n+1}: every one of the N - 1 between N grid points, the first too
    import ddpmkit.train.progressive as progressive
    from ddpmkit.train.batches import step_batch

    drawn = []
    task = ConsistencyTask(load_config(config, ["train.task=consistency", f"distill.teacher={toy_teacher}", "distill.points=4",
                                                 f"train.run_dir={tmp_path / 'cd'}"]))
    task.denoiser = task.teacher_on = lambda _: None  # the draws alone: no network runs
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(progressive, "consistency_loss", lambda student, target, teacher, x0, n, N, noise, **_: drawn.append(n))
        for step in range(20):
            task.loss(None, step_batch(0, step, 64, len(task.dataset), torch.device("cpu")))
    counts = torch.bincount(torch.cat(drawn), minlength=4)  # intervals 0, 1, 2 of 4 points, each about 427 times
    assert counts[3] == 0 and (counts[:3] > 350).all(), counts


def test_a_progressive_run_resumes_exactly(toy_teacher, tmp_path):
    """10 + 10 steps with a resume in between == 20 steps: the student's grid points and noise are functions of the step."""
    from safetensors.torch import load_file

    from ddpmkit.checkpoint import list_checkpoints
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    config = str(toy_teacher / "config.json")
    constant = ["train.lr_schedule=constant"]  # so that a first run told to stop at 10 steps follows the same learning rate
    straight = train(load_config(config, [*student_overrides(toy_teacher, tmp_path / "a", 4, 20), *constant]), progress=False)
    half = [*student_overrides(toy_teacher, tmp_path / "b", 4, 20), *constant]
    half[half.index("train.checkpoint_every=0")] = "train.checkpoint_every=10"
    cfg = load_config(config, half)
    train(load_config(config, [*half, "train.steps=10"]), progress=False)  # stopped after 10 steps...
    resumed = train(cfg, resume=True, progress=False)  # ...and resumed to 20
    a, b = (load_file(list_checkpoints(run)[-1] / "model.safetensors") for run in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_autoguided_teacher_is_distilled_at_its_fixed_weight(toy_teacher, tmp_path):
    """distill.autoguide: both kinds learn D_bad + w (D_teacher - D_bad), and the run records the guidance."""
    import dataclasses

    import ddpmkit
    from ddpmkit.config import load_config
    from ddpmkit.errors import UserError
    from ddpmkit.train import train
    from ddpmkit.train.progressive import ConsistencyTask, ProgressiveTask

    config = str(toy_teacher / "config.json")
    weak = train(load_config(config, ["train.steps=20", "train.checkpoint_every=0", f"train.run_dir={tmp_path / 'weak'}"]), progress=False)
    cfg = load_config(config, [*student_overrides(toy_teacher, tmp_path / "pd", 4, 2), f"distill.autoguide={weak}",
                               "distill.autoguide_scale=2.5"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(32, 2, generator=g), torch.randint(0, 1000, (32,), generator=g)
    good, bad = (ddpmkit.load(run).denoiser.denoise(x, t).x0 for run in (toy_teacher, weak))
    assert (good - bad).abs().mean() > 0.05  # the weak model is really weaker: the guidance does something
    for task in (ProgressiveTask(cfg), ConsistencyTask(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, task="consistency")))):
        torch.testing.assert_close(task.teacher_on(torch.device("cpu")).denoise(x, t).x0, bad + 2.5 * (good - bad))
    student = ddpmkit.load(train(cfg, progress=False))
    assert student.metrics["autoguide"] == str(weak) and student.metrics["autoguide_scale"] == 2.5
    other = train(load_config("toy2d", ["train.steps=2", "train.checkpoint_every=0", f"train.run_dir={tmp_path / 'eps'}"]), progress=False)
    with pytest.raises(UserError, match="must be a weaker model of the same kind"):
        ProgressiveTask(load_config(config, [*student_overrides(toy_teacher, tmp_path / "bad", 4), f"distill.autoguide={other}"]))


# ---- consistency distillation


def exact_consistency(z: torch.Tensor, t: torch.Tensor, **_) -> torch.Tensor:
    """f*(z_t, t): the origin of z_t's probability-flow ODE trajectory for N(mu, std^2 I), per example."""
    ab = S.alpha_bar_at(t.double().cpu()).to(z.dtype)[:, None]
    return MU.to(z.dtype) + STD / (ab * STD**2 + 1 - ab).sqrt() * (z - ab.sqrt() * MU.to(z.dtype))


F_STAR = Denoiser(exact_consistency, S, "x0")


def test_the_consistency_function_keeps_the_boundary_and_the_exact_one_is_constant_along_trajectories():
    from ddpmkit.distillation import ConsistencyFunction

    z = torch.randn(5, 2, dtype=torch.float64)
    f = ConsistencyFunction(lambda z_t, t: torch.full_like(z_t, 9.0), S)  # any network
    torch.testing.assert_close(f(z, torch.zeros(5)), z / S.alpha_bar[0].sqrt())  # f(x, t_min) = x_bar: the boundary
    assert (f(z, torch.full((5,), 999.0)) - 9.0).abs().max() < 0.01  # the network's estimate where noise dominates
    # the boundary's width is sigma_min: the student is its teacher's D a few noise levels up (half-way at 2 sigma_min)
    from ddpmkit.distillation import consistency_c_skip, sigma_of

    sigma_min = sigma_of(S, torch.zeros(1))
    t_2 = torch.tensor([float((sigma_of(S, torch.arange(S.T)) - 2 * sigma_min).abs().argmin())])
    assert abs(consistency_c_skip(S, t_2).item() - 0.5) < 0.1 and consistency_c_skip(S, torch.tensor([100.0])).item() < 0.01
    # along a trajectory of the exact teacher's ODE (many small DDIM steps), f* stays put up to the solver's error
    grid = uniform_grid(S, 400)
    zt, origins = torch.randn(300, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64), []
    for k in range(0, 400, 40):
        zt_k = zt
        origins.append(exact_consistency(zt_k, grid[k].expand(300)))
        for i in range(k, k + 40):
            zt = ddim_step(TEACHER, zt, grid[i].expand(300), grid[i + 1].expand(300))[0]
    spread = max((o - origins[0]).abs().max().item() for o in origins)
    assert spread < 0.02, spread


def test_the_consistency_target_is_the_ode_solution_and_the_loss_vanishes_at_the_exact_student():
    from ddpmkit.distillation import consistency_loss

    g = torch.Generator().manual_seed(3)
    x0, noise = MU + STD * torch.randn(512, 2, generator=g, dtype=torch.float64), torch.randn(512, 2, generator=g, dtype=torch.float64)
    losses = []
    for points in (10, 40, 160):
        n = torch.randint(0, points - 1, (512,), generator=g)
        losses.append(consistency_loss(F_STAR, F_STAR, TEACHER, x0, n, points, noise).mean().item())
    assert losses[2] < losses[1] < losses[0] and losses[2] < 1e-5, losses  # only the teacher's one-step error remains
    blurred = Denoiser(lambda z, t: exact_consistency(z, t) * 0.8, S, "x0")
    n = torch.randint(0, 39, (512,), generator=g)
    assert consistency_loss(blurred, F_STAR, TEACHER, x0, n, 40, noise).mean() > 100 * losses[1]


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_multistep_consistency_sampling_with_the_exact_function_draws_the_data(steps):
    import ddpmkit

    left: list[int] = []
    out = ddpmkit.sample(F_STAR, (6000, 2), sampler="consistency", steps=steps, generator=0, x_T=None,
                         callback=lambda info: left.append(info["i"]))
    assert out.nfe == steps and left == list(range(steps - 1, -1, -1))  # the callback counts the steps left, as every sampler's
    torch.testing.assert_close(out.x.double().mean(0), MU.double(), atol=0.03, rtol=0)
    torch.testing.assert_close(out.x.double().std(0), torch.full((2,), STD, dtype=torch.float64), atol=0.02, rtol=0)


@pytest.mark.slow
def test_a_consistency_run_of_the_engine_maps_noise_to_its_teachers_ode_solution_in_one_step(toy_teacher, tmp_path):
    import ddpmkit
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    teacher = toy_teacher
    student = train(load_config(str(teacher / "config.json"), [
        "train.task=consistency", f"distill.teacher={teacher}", "distill.points=20", "train.ema_decay=0.95", "train.steps=200",
        "train.lr=5e-4", "train.warmup_steps=10", "train.checkpoint_every=0", f"train.run_dir={tmp_path / 'cd'}"]), progress=False)
    t, s = ddpmkit.load(teacher), ddpmkit.load(student)
    assert s.kind == "consistency" and s.metrics["points"] == 20
    z_T = torch.randn(2000, 2, generator=torch.Generator().manual_seed(0))
    ode = sample_uniform_ddim(t.denoiser, z_T, 64)  # the teacher's probability-flow ODE, finely solved
    one = ddpmkit.sample(s.denoiser, z_T.shape, sampler="consistency", steps=1, x_T=z_T, generator=0)
    assert one.nfe == 1
    err_student = (one.x - ode).norm(dim=1).mean().item()
    err_teacher = (sample_uniform_ddim(t.denoiser, z_T, 1) - ode).norm(dim=1).mean().item()  # its one-step x0 estimate
    assert err_student < 0.6 * err_teacher, (err_student, err_teacher)


@pytest.mark.parametrize("preset", ["mnist_progressive", "mnist_progressive_guided", "mnist_consistency"])
def test_the_presets_distil_a_model_trained_with_the_demos_preset(preset, tmp_path):
    """`ddpmkit train mnist_progressive distill.teacher=RUN` (and consistency) on a teacher from the mnist
    preset: both shrunk alike to a few steps on 8x8 digits, the student trains, records its teacher and samples."""
    from ddpmkit.config import load_config
    from ddpmkit.models import load_diffusion
    from ddpmkit.sampling import sample
    from ddpmkit.train import train

    tiny = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=",
            "train.batch_size=8", "train.steps=2", "train.warmup_steps=0", "train.sample_every=0", "train.eval_every=0",
            "train.checkpoint_every=0", "train.keep_steps=", "train.mixed_precision=fp32"]
    teacher = train(load_config("mnist", [*tiny, f"train.run_dir={tmp_path / 'demo'}"]), progress=False)
    weaker = [f"distill.autoguide={teacher}"] if load_config(preset).distill.autoguide else []  # the tiny teacher kept no early checkpoint
    student = train(load_config(preset, [*tiny, f"distill.teacher={teacher}", *weaker, f"train.run_dir={tmp_path / 'student'}"]),
                    progress=False)
    m = load_diffusion(student)
    assert m.kind == preset.split("_")[1] and str(teacher) in m.metrics["teacher"]
    out = sample(m.denoiser, (2, 1, 8, 8), sampler=m.model_kind.sampler, steps=m.metrics["sample_steps"], generator=0)
    assert out.x.shape == (2, 1, 8, 8) and bool(torch.isfinite(out.x).all())
