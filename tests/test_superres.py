"""Super-resolution stages and cascades: the low-res maths, the exact conditional denoiser
through the stage's sampling contract, the network's inputs, and clear errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import needs_text
from ddpmkit.analytic import GaussianSuperRes
from ddpmkit.config import Config, SuperResConfig, TrainConfig, load_config
from ddpmkit.models import DiffusionModel, load_diffusion
from ddpmkit.nets import UNet
from ddpmkit.pipelines.cascade import CascadeError, Stage, cascade, check_cascade, stage_request, super_resolve
from ddpmkit.pipelines.guided import GuidanceRequest, guided_model
from ddpmkit.schedules import NoiseSchedule
from ddpmkit.superres import augment, downsample, gaussian_blur, stage_inputs, upsample
from ddpmkit.train.batches import step_batch
from ddpmkit.train.superres import SuperResTask


def test_area_downsampling_is_the_mean_of_each_block():
    x = torch.randn(2, 3, 6, 6)
    blocks = x.reshape(2, 3, 3, 2, 3, 2).mean(dim=(3, 5))
    torch.testing.assert_close(downsample(x, 3), blocks)
    assert upsample(downsample(x, 3), 6, "nearest").shape == x.shape


def test_augmentation_is_the_forward_process_at_level_s():
    schedule = NoiseSchedule.from_name("linear", 1000)
    z, xi = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    level = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    out = augment(z, level, schedule, xi)
    ab = schedule.alpha_bar[torch.tensor([0, 0, 999])].float()  # 0.25 * 999 = 249.75: between the table's 249 and 250
    ab[0] = 1.0
    ab[1] = float(schedule.alpha_bar_at(249.75))
    torch.testing.assert_close(out, ab.sqrt()[:, None, None, None] * z + (1 - ab).sqrt()[:, None, None, None] * xi)
    for bad in (1.5, float("nan")):  # NaN passed the check and drew NaN low-res inputs
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            augment(z, torch.tensor([0.0, 0.5, bad]), schedule, xi)


def test_blur_keeps_constants_and_means_and_sigma_zero_is_the_identity():
    z = torch.randn(2, 1, 8, 8)
    out = gaussian_blur(z, torch.tensor([0.0, 0.6]))
    torch.testing.assert_close(out[0], z[0])
    assert not torch.allclose(out[1], z[1]) and out[1].std() < z[1].std()
    torch.testing.assert_close(gaussian_blur(torch.full((1, 2, 5, 5), 0.3), torch.tensor([1.0])), torch.full((1, 2, 5, 5), 0.3))


def test_blur_of_an_impulse_is_the_normalised_gaussian_kernel():
    z = torch.zeros(1, 1, 11, 11)
    z[..., 5, 5] = 1.0
    out = gaussian_blur(z, torch.tensor([1.0]))[0, 0].double()
    d = torch.arange(-5, 6, dtype=torch.float64)
    g = torch.exp(-0.5 * d**2)
    g = torch.where(d.abs() <= 3, g, 0.0)  # the kernel reaches 3 sigma
    torch.testing.assert_close(out, torch.outer(g, g) / g.sum() ** 2, atol=1e-6, rtol=1e-5)
    # the trainer's bound on sigma sets the kernel's reach (no read of sigma): 3 x 1.5 pixels, 4.5 -> 5
    wide = gaussian_blur(z, torch.tensor([1.0]), max_sigma=1.5)[0, 0].double()
    g = torch.exp(-0.5 * d**2)
    torch.testing.assert_close(wide, torch.outer(g, g) / g.sum() ** 2, atol=1e-6, rtol=1e-5)


def test_stage_inputs_do_not_depend_on_the_batch():
    schedule = NoiseSchedule.from_name("linear", 1000)
    z = torch.randn(4, 1, 3, 3)
    whole = stage_inputs(z, 0.2, schedule, [10, 11, 12, 13])
    part = stage_inputs(z[2:], 0.2, schedule, [12, 13])
    torch.testing.assert_close(whole["low_res"][2:], part["low_res"])
    assert torch.equal(stage_inputs(z, 0.0, schedule, [0, 1, 2, 3])["low_res"], z)
    # sample k's augmentation noise is its own stream, seed k + AUG_SEED_OFFSET (torch keeps a seed mod 2**32): in a
    # cascade of up to 4 stages, stage i samples from k + i STAGE_SEED_OFFSET and augments from that + AUG_SEED_OFFSET,
    # and no two of these streams meet in a run of fewer than 10**8 samples
    from ddpmkit.pipelines.cascade import STAGE_SEED_OFFSET
    from ddpmkit.superres import AUG_SEED_OFFSET

    xi = torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(AUG_SEED_OFFSET + 12))
    torch.testing.assert_close(part["low_res"][0], augment(z[2:3], torch.tensor([0.2], dtype=torch.float64), schedule, xi[None])[0])
    starts = [i * STAGE_SEED_OFFSET % 2**32 for i in range(4)] + [(i * STAGE_SEED_OFFSET + AUG_SEED_OFFSET) % 2**32 for i in range(1, 4)]
    assert min((a - b) % 2**32 for a in starts for b in starts if a != b) >= 10**8


def _gaussian_super_res() -> GaussianSuperRes:
    """4x4 grey images with smooth, correlated pixels; low-res = their 2x2 area means."""
    yy, xx = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1).double()
    # pixel values mostly inside [-1, 1], as a cascade's images are (it clamps between stages)
    cov = 0.06 * torch.exp(-torch.cdist(pos, pos) ** 2 / 4.0) + 0.006 * torch.eye(16, dtype=torch.float64)
    mean = torch.linspace(-0.3, 0.3, 16, dtype=torch.float64)
    A = downsample(torch.eye(16).reshape(16, 1, 4, 4), 2).reshape(16, 4).T  # (4, 16): row i averages block i
    return GaussianSuperRes(mean, cov, A, (1, 4, 4))


def _stage(model, schedule_T: int = 1000, level: float = 0.0) -> DiffusionModel:
    cfg = Config(train=TrainConfig(task="superres"), superres=SuperResConfig(low_res=2, aug_level=level))
    return DiffusionModel(network=model, config=cfg, data_shape=(1, 4, 4), step=0, path=Path("analytic/sr"))


@pytest.mark.parametrize("level", [0.0, 0.08])
def test_exact_super_resolution_reproduces_the_conditional_gaussian(level):
    """With E[eps | x_t, z_s] in closed form, super_resolve (augmentation + sampler + contract)
    must give x | z: the conditional mean and covariance of Gaussian data, within sampling error.
    At level > 0 the augmentation noise widens it by sigma_s^2 K K^T, which the test predicts too."""
    gsr = _gaussian_super_res()
    schedule = NoiseSchedule.from_name("linear", 1000)
    stage = _stage(gsr.eps_model(schedule), level=level)
    z = torch.tensor([0.4, -0.3, 0.05, 0.2]).reshape(1, 1, 2, 2)
    n = 3000
    out = super_resolve(stage, z.expand(n, 1, 2, 2), sampler="dpmpp_2m", steps=30, seed=0, progress=False,
                        batch_size=n).images.reshape(n, 16).double()
    mean, cov = gsr.output_moments(z.flatten(), level, schedule)
    std = cov.diagonal().sqrt()
    assert ((out.mean(0) - mean).abs() / (std / n**0.5)).max() < 4.5  # every pixel's mean within 4.5 standard errors
    emp = torch.cov(out.T)
    assert (emp - cov).norm() / cov.norm() < 0.08
    # what a stage that ignored the low-res image (level 0), or skipped the augmentation it claims
    # (level > 0), would give: far off
    wrong = gsr.cov if level == 0 else gsr.conditional(z.reshape(1, 4), level, schedule)[1]
    assert (emp - wrong).norm() / cov.norm() > 0.3
    if level == 0:  # the low-res part is pinned: every sample averages back to z
        torch.testing.assert_close(downsample(out.reshape(n, 1, 4, 4).float(), 2), z.expand(n, 1, 2, 2), atol=0.02, rtol=0)


def test_training_blurs_each_low_res_input_by_a_sigma_drawn_uniformly_between_lo_and_hi():
    """With blur_prob 1 and no noise augmentation, each training input is the downsampled image blurred by its own
    sigma ~ U(lo, hi): recovered here by fitting sigma per image."""
    cfg = load_config("imagen_sr", ["data.name=digits", "superres.low_res=4", "superres.aug_max=0", "superres.blur_prob=1",
                                    "superres.blur_sigma=0.5,1.5", "network.text_encoder="])
    task = SuperResTask(cfg)
    batch = step_batch(0, 1, 64, task.num_examples, torch.device("cpu"))
    x0 = task.examples(batch.indices, batch.device)
    low_res = task.stage_inputs(x0, batch)["low_res"]
    z = downsample(x0, 4)

    def misfit(s: torch.Tensor) -> torch.Tensor:
        return (gaussian_blur(z, s, max_sigma=1.5) - low_res).flatten(1).norm(dim=1)

    a, b = torch.full((64,), 1e-3), torch.full((64,), 1.5)
    for _ in range(40):  # a ternary search per image: the misfit has one minimum in sigma
        m1, m2 = a + (b - a) / 3, b - (b - a) / 3
        closer = misfit(m1) < misfit(m2)
        a, b = torch.where(closer, a, m1), torch.where(closer, m2, b)
    fitted = (a + b) / 2
    assert misfit(fitted).max() < 1e-4 and fitted.min() >= 0.499, fitted
    assert fitted.min() < 0.6 and fitted.max() > 1.4 and 0.85 < fitted.mean() < 1.15, fitted
    # with blur_prob 1/2, about half the inputs are blurred and the others are the plain downsampled images, exactly
    half = SuperResTask(load_config("imagen_sr", ["data.name=digits", "superres.low_res=4", "superres.aug_max=0", "superres.blur_prob=0.5",
                                                  "superres.blur_sigma=0.5,1.5", "network.text_encoder="]))
    plain = (half.stage_inputs(x0, batch)["low_res"] == z).flatten(1).all(1)
    assert 16 < int(plain.sum()) < 48, plain


def test_guidance_gives_both_branches_the_low_res_image():
    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(), num_classes=3,
               low_res_channels=1).eval()
    for p in net.out_conv.parameters():
        torch.nn.init.normal_(p, std=0.1)
    cfg = Config(train=TrainConfig(task="superres"), superres=SuperResConfig(low_res=4))
    cfg = Config(network=cfg.network.__class__(num_classes=3), train=cfg.train, superres=cfg.superres)
    m = DiffusionModel(network=net, config=cfg, data_shape=(1, 8, 8), step=0, path=Path("tiny/sr"))
    low, x, t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 8, 8), torch.tensor([300.0, 700.0])
    extra = {"low_res": low, "aug_level": torch.tensor([0.1, 0.1])}
    model, kwargs, _ = guided_model(m, 2, GuidanceRequest(classes=[1, 2], scale=2.5, extra=extra))
    with torch.no_grad():
        cond = net(x, t, y=torch.tensor([1, 2]), **extra)
        uncond = net(x, t, y=torch.tensor([3, 3]), **extra)
        torch.testing.assert_close(model(x, t, **kwargs).eps, uncond + 2.5 * (cond - uncond))  # an eps model
        other = net(x, t, y=torch.tensor([1, 2]), low_res=low.flip(0), aug_level=extra["aug_level"])
        assert not torch.allclose(cond, other)  # the network does look at the low-res image
    with pytest.raises(ValueError, match="super-resolution stage .*upscale"):
        guided_model(m, 2, GuidanceRequest(classes=[1, 2]))
    # guidance rescale is for classifier-free guidance: taken at 2.5, refused where none runs (it was ignored)
    rescaled, _, _ = guided_model(m, 2, GuidanceRequest(classes=[1, 2], scale=2.5, rescale=0.7, extra=extra))
    assert rescaled.rescale == 0.7
    with pytest.raises(ValueError, match=r"guidance rescale \(phi 0.7\) rescales classifier-free guidance, which scale 1 does not use"):
        guided_model(m, 2, GuidanceRequest(classes=[1, 2], scale=1.0, rescale=0.7, extra=extra))
    # a cascade's rescale goes to the stages that guide so (the default scale is 3) and not to the others
    assert stage_request(Stage(m), GuidanceRequest(rescale=0.7)).rescale == 0.7
    assert stage_request(Stage(m, scale=0.0), GuidanceRequest(rescale=0.7)).rescale == 0.0


def test_the_unet_checks_its_low_res_input():
    sr = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(), low_res_channels=1)
    plain = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="super-resolution stage: pass low_res"):
        sr(x, t)
    with pytest.raises(ValueError, match=r"low_res must have shape \(B=2, C=1"):
        sr(x, t, low_res=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="not a super-resolution stage"):
        plain(x, t, low_res=torch.randn(2, 1, 4, 4))
    assert sr(x, t, low_res=torch.randn(2, 1, 4, 4), aug_level=torch.zeros(2)).shape == x.shape


def test_wrong_low_res_images_and_stages_that_do_not_chain_fail_with_one_clear_message():
    gsr = _gaussian_super_res()
    schedule = NoiseSchedule.from_name("linear", 1000)
    stage = _stage(gsr.eps_model(schedule))
    with pytest.raises(CascadeError, match=r"low-res images: shape \(1, 3, 3\).*upsamples 1-channel 2x2 images to 4x4; resize"):
        super_resolve(stage, torch.zeros(2, 1, 3, 3), progress=False)
    with pytest.raises(CascadeError, match=r"shape \(3, 2, 2\)"):
        super_resolve(stage, torch.zeros(2, 3, 2, 2), progress=False)
    base8 = DiffusionModel(network=None, config=Config(), data_shape=(1, 8, 8), step=0, path=Path("base8/run"))
    base_rgb = DiffusionModel(network=None, config=Config(), data_shape=(3, 2, 2), step=0, path=Path("rgb/run"))
    with pytest.raises(CascadeError, match="makes 1-channel 8x8 images, but the next stage .* takes 1-channel 2x2"):
        check_cascade([Stage(base8), Stage(stage)])
    with pytest.raises(CascadeError, match="makes 3-channel 2x2 images"):
        check_cascade([Stage(base_rgb), Stage(stage)])
    with pytest.raises(CascadeError, match="start with a base model"):
        check_cascade([Stage(stage)])
    with pytest.raises(CascadeError, match="not a super-resolution stage"):
        check_cascade([Stage(base8), Stage(base8)])


def test_a_cascade_chains_a_base_and_a_stage_exactly():
    """The base draws the low-res Gaussian (its exact denoiser), the stage the high-res given it:
    the cascade's output has the data's full covariance."""
    gsr = _gaussian_super_res()
    schedule = NoiseSchedule.from_name("linear", 1000)
    low_mean, low_cov = gsr.A @ gsr.mean, gsr.A @ gsr.cov @ gsr.A.T
    evals, evecs = torch.linalg.eigh(low_cov)
    base_fn = _rotated_gaussian(low_mean, evecs, evals, schedule)
    base = DiffusionModel(network=base_fn, config=Config(), data_shape=(1, 2, 2), step=0, path=Path("analytic/base"))
    n = 3000
    outs = cascade([Stage(base, "dpmpp_2m", 30), Stage(_stage(gsr.eps_model(schedule)), "dpmpp_2m", 30)],
                   n, seed=0, batch_size=n, progress=False)
    assert [tuple(o.images.shape) for o in outs] == [(n, 1, 2, 2), (n, 1, 4, 4)]
    x = outs[-1].images.reshape(n, 16).double()
    assert (torch.cov(x.T) - gsr.cov).norm() / gsr.cov.norm() < 0.1


def _rotated_gaussian(mean, evecs, evals, schedule):
    """The exact denoiser of N(mean, V diag(evals) V^T), in the eigenbasis: independent 1-D Gaussians."""

    def model(x_t, t, **_):
        ab = schedule.alpha_bar_at(t.double().cpu())[:, None]
        x = x_t.reshape(len(x_t), -1).double()
        u = (x - ab.sqrt() * mean) @ evecs  # coordinates of x_t - sqrt(ab) mean
        eps_u = (1 - ab).sqrt() * u / (ab * evals + 1 - ab)
        return (eps_u @ evecs.T).reshape(x_t.shape).to(x_t.dtype)

    return model


# ---- the command line, on tiny trained stages (digits: an 8x8 class-conditional stage from 4x4, a 4x4 base) ------------------

TINY_UNET = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=", "diffusion.T=100",
             "train.batch_size=8", "train.sample_every=0", "train.steps=3", "train.max_minutes=0", "train.mixed_precision=no"]


@pytest.fixture(scope="module")
def tiny_cascade(tmp_path_factory):
    """(base run, class-conditional super-resolution run, a second stage 8 -> 8 that cannot follow it)."""
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    root = tmp_path_factory.mktemp("cascade")
    base = train(load_config("mnist", [*TINY_UNET, "data.resize=4", f"train.run_dir={root / 'base'}"]), progress=False)
    sr = train(load_config("imagen_sr", [*TINY_UNET, "network.text_encoder=", "network.num_classes=10", "superres.low_res=4",
                                         "superres.blur_prob=0.5", f"train.run_dir={root / 'sr'}", "train.sample_every=3",
                                         "train.sample_steps=2"]), progress=False)
    return base, sr


def _cli(capsys, *argv):
    from ddpmkit.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_super_resolution_run_trains_previews_and_loads(tiny_cascade):
    import ddpmkit

    _, sr = tiny_cascade
    m = ddpmkit.load(sr)
    assert m.is_super_resolution and m.low_res_shape == (1, 4, 4) and m.data_shape == (1, 8, 8) and m.conditioning == "class"
    assert (sr / "samples" / "step-0000003.png").is_file()  # (low-res | super-resolved | original) triples
    # a triple a held-out image: its low-res input (nearest-upsampled), the stage's sample, the image itself
    task = SuperResTask(m.config)
    rows = task.preview(m.network, sr / "preview.png")
    x = task.held_out[:len(rows) // 3]
    assert len(x) >= 2 and torch.equal(rows[2::3], x) and torch.equal(rows[0::3], upsample(downsample(x, 4), 8, "nearest"))
    assert not torch.equal(rows[1::3], x) and rows[1::3].abs().max() <= 1
    log = [json.loads(line) for line in (sr / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["done"] and log[-1]["elapsed_s"] > 0


def test_cascade_and_upscale_from_the_command_line(tiny_cascade, tmp_path, capsys, monkeypatch):
    base, sr = tiny_cascade
    code, out, err = _cli(capsys, "sample", base, "--then", f"{sr},sampler=dpmpp_2m,steps=3,aug=0.2,guidance=2", "--steps", "4",
                          "--n", "3", "--class", "7", "--out", tmp_path / "c")
    assert code == 0, err
    assert "stage 1: 8x8 super-resolution (sr), dpmpp_2m 3 steps, guidance 2.0, aug 0.2" in out and "3 samples through 2 stages" in out
    names = {p.name for p in (tmp_path / "c").iterdir()}
    assert {"stage0_4x4.png", "stage1_8x8.png", "cascade.png", "grid.png", "reverse_process.gif", "samples"} <= names
    assert torch.load(tmp_path / "c" / "samples.pt").shape == (3, 1, 8, 8)
    # the same seeds give the same cascade, whatever the batch size
    code, _, err = _cli(capsys, "sample", base, "--then", f"{sr},sampler=dpmpp_2m,steps=3,aug=0.2,guidance=2", "--steps", "4",
                        "--n", "3", "--class", "7", "--batch-size", "2", "--no-gif", "--out", tmp_path / "c2")
    assert code == 0, err
    torch.testing.assert_close(torch.load(tmp_path / "c2" / "samples.pt"), torch.load(tmp_path / "c" / "samples.pt"))
    # --precision and --compile reach the stages (a cascade took both and ignored them): bf16 moves the samples a little
    code, _, err = _cli(capsys, "sample", base, "--then", f"{sr},sampler=dpmpp_2m,steps=3,aug=0.2,guidance=2", "--steps", "4",
                        "--n", "3", "--class", "7", "--precision", "bf16", "--no-gif", "--out", tmp_path / "c3")
    assert code == 0, err
    bf16, fp32 = torch.load(tmp_path / "c3" / "samples.pt"), torch.load(tmp_path / "c" / "samples.pt")
    assert not torch.equal(bf16, fp32) and (bf16 - fp32).abs().max() < 0.2, (bf16 - fp32).abs().max()
    code, _, err = _cli(capsys, "sample", base, "--then", sr, "--compile", "cuda-graph", "--device", "cpu", "--out", tmp_path / "c4")
    assert code == 2 and "--compile cuda-graph needs a CUDA GPU" in err

    from ddpmkit import viz

    labelled_rows, drawn = viz.labelled_rows, {}  # upscale.png's rows, as the command hands them to viz (which draws them, as it does)
    monkeypatch.setattr(viz, "labelled_rows", lambda rows, path, **kw: drawn.update(rows=rows) or labelled_rows(rows, path, **kw))
    code, out, err = _cli(capsys, "upscale", sr, "digits:3", "digits:5", "--fit", "--n", "2", "--steps", "3", "--class", "3,3,5,5",
                          "--out", tmp_path / "u")
    assert code == 0, err
    assert "2 image(s) x 2 upscaled 4x4 -> 8x8" in out and (tmp_path / "u" / "upscale.png").is_file()
    samples = torch.load(tmp_path / "u" / "samples.pt")
    assert samples.shape == (4, 1, 8, 8)
    from ddpmkit.images import load_image

    inputs = torch.cat([downsample(load_image(s, channels=1), 4) for s in ("digits:3", "digits:5")])  # --fit: 8x8 digits to 4x4
    (l0, x0), (l1, x1), (l2, x2), (l3, x3) = drawn["rows"]  # the inputs, their bicubic upsampling, sample 1, sample 2
    assert (l0, l1, l2, l3) == ("input 4x4", "bicubic", "sample 1", "sample 2") and torch.equal(x0, inputs)
    assert torch.equal(x1, upsample(inputs, 8, "bicubic").clamp(-1, 1)) and x1.std() > 0.1
    assert torch.equal(x2, samples[[0, 2]]) and torch.equal(x3, samples[[1, 3]])
    # the command the training run ends with (it lacked --fit, so it failed on the 28x28 built-in digit)
    from ddpmkit.kinds import kind_of

    hint = kind_of("superres").next_step.format(run=sr).split(": ", 1)[1].split(", or ")[0]
    assert hint == f"ddpmkit upscale {sr} mnist5k:7 --fit"
    code, out, err = _cli(capsys, *hint.split()[1:], "--steps", "2", "--out", tmp_path / "hint")
    assert code == 0 and "1 image(s) x 1 upscaled 4x4 -> 8x8" in out, err
    # --fit also enlarges an image smaller than the stage's input (bicubic, clamped to [-1, 1])
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).save(tmp_path / "tiny.png")
    code, out, err = _cli(capsys, "upscale", sr, tmp_path / "tiny.png", "--fit", "--steps", "2", "--class", "1", "--out", tmp_path / "up")
    assert code == 0 and "1 image(s) x 1 upscaled 4x4 -> 8x8" in out, err
    assert torch.equal(drawn["rows"][0][1], upsample(load_image(str(tmp_path / "tiny.png"), channels=1), 4, "bicubic").clamp(-1, 1))
    # the reverse process is recorded every record_every steps, as asked (10 steps, every 5: 2 frames)
    recorded = super_resolve(load_diffusion(sr), inputs, GuidanceRequest(classes=["3", "5"]), sampler="ddim", steps=10, record_every=5,
                             progress=False)
    assert len(recorded.xs) == len(recorded.x0s) == 2


@pytest.mark.parametrize("argv,message", [
    (["upscale", "{sr}", "digits:3"], "digits:3: shape (1, 8, 8) (C, H, W), but the stage"),
    (["upscale", "{base}", "digits:3"], "is not a super-resolution stage"),
    (["sample", "{sr}"], "is a super-resolution stage (4x4 -> 8x8): give it low-res images"),
    (["sample", "{base}", "--then", "{base}"], "is not a super-resolution stage"),
    (["sample", "{sr}", "--then", "{sr}"], "start with a base model"),
    (["sample", "{base}", "--then", "{sr},steps=2,speed=3"], "stage option 'speed=3' must be key=value with key one of"),
    (["sample", "{base}", "--then", "{sr},steps=two"], "stage option steps='two' must be a int"),
    (["sample", "{base}", "--then", "{sr},sampler=ddpn"], "unknown sampler 'ddpn'"),
])
def test_bad_cascades_give_one_clear_line(tiny_cascade, capsys, argv, message):
    base, sr = tiny_cascade
    code, _, err = _cli(capsys, *[a.format(base=base, sr=sr) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_a_stage_that_does_not_fit_the_base_is_refused(tiny_cascade, tmp_path, capsys):
    base, _ = tiny_cascade
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    wide = train(load_config("imagen_sr", [*TINY_UNET, "network.text_encoder=", "superres.low_res=2", "train.steps=1",
                                           f"train.run_dir={tmp_path / 'wide'}"]), progress=False)
    code, _, err = _cli(capsys, "sample", base, "--then", wide)
    assert code == 2 and "makes 1-channel 4x4 images, but the next stage" in err and "takes 1-channel 2x2 ones" in err


def test_a_latent_base_model_feeds_its_decoded_images_to_the_stage(tiny_cascade, capsys):
    """A latent base samples latents; the cascade hands the stage the decoded 4x4 images."""
    import ddpmkit
    from ddpmkit.config import AutoencoderConfig
    from ddpmkit.nets import Autoencoder

    _, sr = tiny_cascade
    torch.manual_seed(0)
    ae = Autoencoder((1, 4, 4), AutoencoderConfig(z_channels=2, base_channels=8, channel_mult=(1, 2), pad_to=0)).eval()
    latent = tuple(ae.latent_shape)
    net = UNet(in_channels=latent[0], image_size=latent[-1], base_channels=8, channel_mult=(1,), attention_resolutions=()).eval()
    base = DiffusionModel(network=net, config=Config(), data_shape=latent, step=0, path=Path("latent/base"), autoencoder=ae)
    assert base.image_shape == (1, 4, 4) and latent != (1, 4, 4)
    with torch.no_grad():
        outs = cascade([Stage(base, "ddim", 3), Stage(ddpmkit.load(sr), "ddim", 3, scale=0.0)], 2, progress=False)
    assert outs[0].images.shape == (2, 1, 4, 4) and outs[1].images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="guidance rescale .* no stage of this cascade uses"):
        cascade([Stage(base, "ddim", 3), Stage(ddpmkit.load(sr), "ddim", 3, scale=0.0)], 2, GuidanceRequest(rescale=0.5), progress=False)


@needs_text
def test_the_imagen_presets_train_on_a_captioned_image_folder(tmp_path, capsys):
    """Both Imagen stages on any folder of images with a caption .txt beside each, then a prompt
    through the whole cascade."""
    pytest.importorskip("sentence_transformers")

    from ddpmkit.config import load_config
    from ddpmkit.train import train

    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red square", "a blue circle", "a green line", "a dark sky"]):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(caption)
    data = ["data.name=folder", f"data.path={folder}", "data.image_size=8", "data.channels=3", "network.text_max_tokens=8",
            "network.base_channels=8", "network.channel_mult=1,2", "train.batch_size=4",
            "train.steps=2", "train.max_minutes=0", "train.sample_every=0", "train.mixed_precision=no"]
    base = train(load_config("imagen_base", [*data, "data.resize=4", "network.attention_resolutions=2", f"train.run_dir={tmp_path / 'base'}"]),
                 progress=False)
    sr = train(load_config("imagen_sr", [*data, "superres.low_res=4", "network.attention_resolutions=4", f"train.run_dir={tmp_path / 'sr'}"]),
               progress=False)
    code, out, err = _cli(capsys, "sample", base, "--then", f"{sr},steps=2", "--steps", "2", "--n", "2", "--prompt", "a blue circle",
                          "--guidance", "5", "--dynamic-threshold", "0.995", "--no-gif", "--out", tmp_path / "out")
    assert code == 0, err
    assert torch.load(tmp_path / "out" / "samples.pt").shape == (2, 3, 8, 8) and "threshold 0.995" in out
