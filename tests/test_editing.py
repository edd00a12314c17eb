"""Editing and interpolation with exact denoisers: SDEdit's grid, p(x_0 | x_t) for Gaussian data,
RePaint on a Gaussian mixture, slerp, and the voyage keyframe files."""
import json
import math

import numpy as np
import pytest
import torch

from ddpmkit.analytic import GaussianMixture
from ddpmkit.editing import grid_from, img2img, inpaint, interpolate_seeds, posterior_samples, slerp
from ddpmkit.errors import UserError
from ddpmkit.pipelines.voyage import read_keyframes
from ddpmkit.schedules import NoiseSchedule

S = NoiseSchedule.from_name("linear", 1000)


def test_img2img_with_a_seed_per_row_gives_each_row_what_it_gives_alone():
    """Seeds per row: the noising and the sampler's noise of row i come from seed i, whatever the batch."""
    gm = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.0]]), torch.tensor([0.2, 0.2]), torch.tensor([0.5, 0.5]))
    x0 = torch.tensor([[-1.5, 0.1], [1.4, 0.0], [0.2, -0.3]], dtype=torch.float64)
    seeds = [5, 6, 7]
    batch = img2img(gm.eps_model(S), x0, S, strength=0.6, sampler="ddpm", steps=20, generator=seeds).x
    for i, seed in enumerate(seeds):
        alone = img2img(gm.eps_model(S), x0[i:i + 1], S, strength=0.6, sampler="ddpm", steps=20, generator=[seed]).x
        assert torch.allclose(batch[i:i + 1], alone, atol=1e-12, rtol=0), i


def test_grid_from_starts_at_the_strength_and_follows_the_named_grid():
    g = grid_from(499.5, S, 10)
    assert g[0] == 499.5 and bool((g[1:] < g[:-1]).all()) and g[-1] == 0
    full = torch.linspace(999, 0, 10, dtype=torch.float64)
    assert torch.equal(g[1:], full[full < 499.5])


def test_posterior_samples_of_gaussian_data_match_the_closed_form():
    """For data N(mu, s^2 I): p(x_0 | x_t) = N(mu + sqrt(a) s^2 / v (x_t - sqrt(a) mu), s^2 (1 - a) / v), v = a s^2 + 1 - a."""
    mu, s = torch.tensor([0.5, -1.0]), 0.5
    gm = GaussianMixture.gaussian(mu, s)
    x_t, xs = posterior_samples(gm.eps_model(S), torch.tensor([[1.0, 0.0]]), t=300, n=3000, schedule=S, steps=300, seed=3)
    a = S.alpha_bar[300].item()
    v = a * s**2 + 1 - a
    mean = mu.double() + math.sqrt(a) * s**2 / v * (x_t[0].double() - math.sqrt(a) * mu.double())
    var = s**2 * (1 - a) / v
    se = math.sqrt(var / 3000)
    assert torch.allclose(xs.double().mean(0), mean, atol=4 * se)
    assert torch.allclose(xs.double().var(0), torch.full((2,), var, dtype=torch.float64), rtol=0.1)


def test_img2img_at_low_strength_stays_near_the_input_and_at_full_strength_forgets_it():
    gm = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.0]]), torch.tensor([0.2, 0.2]), torch.tensor([0.5, 0.5]))
    x0 = torch.tensor([[-1.5, 0.1]]).expand(400, 2)
    low = img2img(gm.eps_model(S), x0, S, strength=0.1, sampler="ddim", steps=50, generator=0).x
    assert (low[:, 0] < 0).float().mean() == 1.0  # keeps its mode
    full = img2img(gm.eps_model(S), x0, S, strength=1.0, sampler="ddpm", steps=100, generator=0).x
    assert 0.4 < (full[:, 0] < 0).float().mean() < 0.6  # the input is forgotten: both modes again


def test_repaint_fills_in_the_conditional_of_a_gaussian_mixture():
    """Known first coordinate -1.5 singles out the component at (-1.5, 0.5), std 0.2: RePaint's
    filled-in second coordinate must follow N(0.5, 0.2^2) (a mean away from 0, so that a sign is seen)."""
    mix = GaussianMixture(torch.tensor([[-1.5, 0.5], [1.5, 1.0], [0.0, -1.0]]), torch.tensor([0.2, 0.3, 0.15]),
                          torch.tensor([0.5, 0.3, 0.2]))
    x0 = torch.tensor([[-1.5, 3.0]]).expand(600, 2)  # the 3.0 is hidden by the mask
    mask = torch.tensor([[1.0, 0.0]])
    out = inpaint(mix.eps_model(S), x0, mask, S, steps=100, resample=1, generator=0, clip_x0=False)
    assert torch.equal(out[:, 0], x0[:, 0])  # the known part is kept exactly
    filled = out[:, 1].double()
    # replacing the known part by q-samples is an approximation of conditioning: early, noisy steps
    # still mix in the other components a little (a bias of about -0.02 here, a tenth of the std)
    assert abs(filled.mean().item() - 0.5) < 0.06 and 0.18 < filled.std().item() < 0.22
    # resampling (noise back one step, denoise again) keeps the right component; with a coarse
    # respaced chain each extra pass also trims a little variance, as ancestral steps do
    again = inpaint(mix.eps_model(S), x0, mask, S, steps=100, resample=3, generator=0, clip_x0=False)[:, 1].double()
    assert abs(again.mean().item() - 0.5) < 0.06 and 0.13 < again.std().item() < 0.22


def test_slerp_keeps_the_norm_and_hits_the_endpoints():
    a, b = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)), torch.randn(3, 1000, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(dim=1), (a.norm(dim=1) + b.norm(dim=1)) / 2, rtol=0.03)  # a straight line would lose ~30%
    assert ((a + b) / 2).norm(dim=1).mean() < 0.8 * mid.norm(dim=1).mean()
    # unit vectors (unCLIP's embeddings) with a weight per row: on the sphere, the ends and the great circle's midpoint
    e0, e1 = torch.tensor([[1.0, 0.0, 0.0]]).expand(3, -1), torch.tensor([[0.0, 1.0, 0.0]]).expand(3, -1)
    out = slerp(e0, e1, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [0.5**0.5, 0.5**0.5, 0.0], [0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)
    # a vector and itself: in float32 a unit vector's dot with itself rounds above 1 for about a quarter of them
    # (arccos would be NaN); the slerp is the vector
    u = torch.nn.functional.normalize(torch.randn(1000, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert ((u * u).sum(-1) > 1).sum() > 100
    torch.testing.assert_close(slerp(u, u, torch.full((1000,), 0.3)), u, atol=1e-6, rtol=0)


def test_an_interpolation_draws_the_same_sampler_noise_for_every_frame():
    """Frames differ by their x_T only: between a seed and itself every frame of a stochastic sampler is the same sample
    (noise per frame made a flickering animation), and the frames are the samples of seed_a's noise."""
    gm = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.0]]), torch.tensor([0.2, 0.2]), torch.tensor([0.5, 0.5]))
    drawn = {}
    for sampler, options in (("ddpm", {}), ("euler_ancestral", {"eta": 1.0}), ("edm", {"churn": 10.0})):
        drawn[sampler] = same = interpolate_seeds(gm.eps_model(S), 7, 7, 4, (2,), S, sampler=sampler, steps=10, **options)
        assert torch.equal(same, same[:1].expand(4, 2)), sampler
        other = interpolate_seeds(gm.eps_model(S), 8, 8, 4, (2,), S, sampler=sampler, steps=10, **options)
        assert not torch.allclose(same[0], other[0]), sampler  # another seed: another x_T and other noise
    ode = interpolate_seeds(gm.eps_model(S), 7, 7, 2, (2,), S, sampler="euler_ancestral", steps=10, eta=0.0)
    assert torch.equal(ode, interpolate_seeds(gm.eps_model(S), 7, 7, 2, (2,), S, sampler="euler", steps=10))
    assert not torch.allclose(ode[0], drawn["euler_ancestral"][0])  # eta reached the sampler


def test_image_interpolation_decodes_the_mixture_of_both_images_noised_alike_and_prompts_mix_linearly():
    """DDPM's section 4.3: frame k decodes (1 - lam_k) x_t(a) + lam_k x_t(b), both noised by q with the same eps
    (editing.noised with the seed), by ancestral steps from t with the same reverse noise (seed + 1) for every frame."""
    import ddpmkit
    from ddpmkit.editing import grid_from, interpolate_images, lerp_condition, noised

    gm = GaussianMixture(torch.tensor([[-1.5, 0.5], [1.5, -0.5]]), torch.tensor([0.2, 0.3]), torch.tensor([0.5, 0.5]))
    xa, xb = torch.tensor([[-1.4, 0.6]]), torch.tensor([[1.6, -0.3]])
    frames = interpolate_images(gm.eps_model(S), xa, xb, t=400, n=3, schedule=S, seed=5, steps=40)
    lam = torch.tensor([0.0, 0.5, 1.0])[:, None]
    x_t = (1 - lam) * noised(xa, 400, S, generator=[5]) + lam * noised(xb, 400, S, generator=[5])
    expected = ddpmkit.sample(gm.eps_model(S), x_t.shape, S, sampler="ddpm", generator=[6] * 3, x_T=x_t, grid=grid_from(400.0, S, 40)).x
    assert torch.allclose(frames, expected, atol=1e-6)
    # two prompt encodings: the tokens mix linearly, the mask keeps a token either prompt has
    a = {"context": torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]), "context_mask": torch.tensor([[True, False]])}
    b = {"context": torch.tensor([[[3.0, -2.0], [4.0, 8.0]]]), "context_mask": torch.tensor([[True, True]])}
    mixed = lerp_condition(a, b, 0.25)
    assert torch.allclose(mixed["context"], torch.tensor([[[1.5, 1.0], [1.0, 2.0]]])) and mixed["context_mask"].tolist() == [[True, True]]


def test_a_masks_half_is_exactly_the_half_it_names_filled():
    """0 = fill: `left` fills columns 0..W//2-1 and keeps the rest, and so on (an odd side's middle line is in the second half)."""
    from ddpmkit.images import make_mask

    H, W = 5, 4
    rows, cols = torch.arange(H)[:, None].expand(H, W), torch.arange(W)[None].expand(H, W)
    for spec, filled in (("left", cols < W // 2), ("right", cols >= W // 2), ("top", rows < H // 2), ("bottom", rows >= H // 2)):
        assert torch.equal(make_mask(spec, (1, 3, H, W))[0, 0], (~filled).float()), spec


def test_keyframe_files(tmp_path):
    lecture = tmp_path / "seq.py"
    lecture.write_text("seed_and_prompt_sequence = [  \n  3764, 'in the beginning there was nothing',  \n  1537, 'the big bang',\n]\n")
    assert read_keyframes(lecture) == [(3764, "in the beginning there was nothing"), (1537, "the big bang")]
    lecture.write_text("seed_and_prompt_sequence = [(3764, 'in the beginning'), (1537, 'the big bang')]\n")  # pairs (were refused)
    assert read_keyframes(lecture) == [(3764, "in the beginning"), (1537, "the big bang")]
    lines = tmp_path / "seq.txt"
    lines.write_text("# keyframes\n3 a handwritten three\n\n7 'a seven'\n")
    assert read_keyframes(lines) == [(3, "a handwritten three"), (7, "a seven")]
    lines.write_text("3 a caf\u00e9\n7 a seven\n", encoding="utf-8-sig")  # a Windows editor's byte-order mark: not in the seed
    assert read_keyframes(lines) == [(3, "a caf\u00e9"), (7, "a seven")]
    lines.write_text("3 a caf\u00e9\n7 a seven\n", encoding="cp1252")
    with pytest.raises(UserError, match=r"seq.txt is not UTF-8 text \(byte 0xe9 at 7\); save it as UTF-8"):
        read_keyframes(lines)
    for bad, message in (("[3, 'a', 'b']", "alternate"), ("[(3, 'a'), ('b', 4)]", "alternate"),
                         ("3 a\nx b\n", r"bad.txt:2: expected 'SEED PROMPT', got 'x b'"),
                         ("3 only one\n", "at least 2")):
        (tmp_path / "bad.txt").write_text(bad)
        with pytest.raises(ValueError, match=message):
            read_keyframes(tmp_path / "bad.txt")


def test_editing_commands(tmp_path, capsys):
    from ddpmkit.cli import main
    from ddpmkit.config import PRESET_DIR, load_config
    from ddpmkit.train import train

    run = tmp_path / "run"
    cfg = load_config(PRESET_DIR / "mnist.toml", ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2",
                                                  "network.attention_resolutions=4", "train.batch_size=16", "train.steps=3",
                                                  "train.sample_every=0", "train.eval_every=0", f"train.run_dir={run}"])
    train(cfg, progress=False)
    out = tmp_path / "edits"
    for argv, made in ((["img2img", str(run), "digits:3", "--strength", "0.3", "--steps", "10"], "img2img.png"),
                       (["inpaint", str(run), "digits:3", "--mask", "left", "--steps", "5", "--resample", "2"], "inpaint.png"),
                       (["posterior", str(run), "digits:3", "--t", "300", "--steps", "5"], "posterior_t300.png"),
                       (["interpolate", str(run), "--seeds", "3,14", "--steps", "5"], "interpolate_seeds_3_14.png"),
                       (["interpolate", str(run), "--images", "digits:0,digits:1", "--t", "300", "--steps", "5"],
                        "interpolate_images_t300.png")):
        assert main([*argv, "--n", "3", "--out", str(out)]) == 0, capsys.readouterr().err
        assert (out / made).is_file(), made
    # the strips are the library's edits, in the order given (seed 3 first, digits:0 first)
    from PIL import Image

    from ddpmkit.images import load_image_as, make_mask
    from ddpmkit.models import load_diffusion
    from ddpmkit.pipelines.edit import edit_inpaint, interpolation_images, interpolation_seeds
    from ddpmkit.viz import make_grid

    m = load_diffusion(str(run))
    three = load_image_as("digits:3", m.image_shape)
    left = make_mask("left", three.shape)
    filled = edit_inpaint(m, three, left, 3, steps=5, resample=2)  # the image, what is kept, the completions
    with Image.open(out / "inpaint.png") as im:
        assert (np.asarray(im) == make_grid(torch.cat([three, three * left, filled]), nrow=5, upscale=2)[..., 0]).all()
    a, b = (load_image_as(name, m.image_shape) for name in ("digits:0", "digits:1"))
    for made, x in (("interpolate_seeds_3_14.png", interpolation_seeds(m, 3, 14, 3, steps=5)),
                    ("interpolate_images_t300.png", interpolation_images(m, a, b, 300, 3, steps=5))):
        with Image.open(out / made) as im:
            assert (np.asarray(im) == make_grid(x, nrow=3, upscale=2)[..., 0]).all(), made
    # the solver options reach img2img, interpolate and voyage (test_conditioning): without noise edm is heun and
    # euler_ancestral is euler, with it they differ
    strips = {}
    for name, argv in (("edm0", ["img2img", "--sampler", "edm", "--churn", "0"]), ("edm10", ["img2img", "--sampler", "edm", "--churn", "10"]),
                       ("heun", ["img2img", "--sampler", "heun"]), ("ea0", ["interpolate", "--sampler", "euler_ancestral", "--eta", "0"]),
                       ("ea1", ["interpolate", "--sampler", "euler_ancestral"]), ("euler", ["interpolate", "--sampler", "euler"])):
        image = ["digits:3", "--strength", "0.5"] if argv[0] == "img2img" else ["--seeds", "3,14"]
        assert main([argv[0], str(run), *image, *argv[1:], "--steps", "4", "--n", "3", "--out", str(tmp_path / name)]) == 0, \
            capsys.readouterr().err
        strips[name] = next((tmp_path / name).glob("*.png")).read_bytes()
    assert strips["edm0"] == strips["heun"] != strips["edm10"] and strips["ea0"] == strips["euler"] != strips["ea1"]
    # a grid file spans the whole trajectory, img2img starts partway; RePaint's steps are Algorithm 2's
    (tmp_path / "grid.json").write_text('{"timesteps": [999, 500, 100, 0]}')
    assert main(["img2img", str(run), "digits:3", "--grid", str(tmp_path / "grid.json"), "--out", str(out)]) == 2
    assert "a tuned grid file spans the whole trajectory: give a grid name" in capsys.readouterr().err
    for grid in ("karras", "uniform"):  # a grid's name reaches img2img: its part below strength * T differs
        assert main(["img2img", str(run), "digits:3", "--grid", grid, "--steps", "4", "--n", "2", "--out", str(tmp_path / grid)]) == 0
    assert (tmp_path / "karras" / "img2img.png").read_bytes() != (tmp_path / "uniform" / "img2img.png").read_bytes()
    assert main(["inpaint", str(run), "digits:3", "--sampler", "ddim", "--out", str(out)]) == 2
    assert "RePaint inpaints with Algorithm 2 (ddpm)" in capsys.readouterr().err
    # of the solver's options RePaint reads --no-clip (the library's clip_x0=False); the others choose a 9-channel
    # inpainting UNet's sampler and are refused here, not taken and ignored
    assert main(["inpaint", str(run), "digits:3", "--eta", "0.5", "--grid", "karras", "--out", str(out)]) == 2
    assert ("RePaint's respaced Algorithm 2 takes no sampler options but clipping (got grid=karras, eta=0.5)"
            in capsys.readouterr().err)
    unclipped = edit_inpaint(m, three, left, 3, steps=5, resample=2, options={"clip_x0": False})
    assert not torch.equal(unclipped, filled)
    assert main(["inpaint", str(run), "digits:3", "--mask", "left", "--steps", "5", "--resample", "2", "--no-clip", "--n", "3",
                 "--out", str(tmp_path / "noclip")]) == 0
    with Image.open(tmp_path / "noclip" / "inpaint.png") as im:
        assert (np.asarray(im) == make_grid(torch.cat([three, three * left, unclipped]), nrow=5, upscale=2)[..., 0]).all()
    assert main(["inpaint", str(run), "digits:3", "--mask", "middle", "--out", str(out)]) == 2
    assert "--mask must be one of" in capsys.readouterr().err
    for t in ("0", "1000"):  # posterior refused them; interpolate mixed the images at t = 0, and failed past T
        assert main(["interpolate", str(run), "--images", "digits:0,digits:1", "--t", t, "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip().endswith(f"error: t must lie in 1..999, got {t}")
    # a mask PNG: what it fills is said (a mask drawn the other way round shows there); one that keeps every pixel has
    # nothing to fill (the "inpainting" returned the image), one that fills every pixel gets a note
    from PIL import Image

    for value, name in ((255, "white"), (0, "black")):
        Image.new("L", (20, 20), value).save(tmp_path / f"{name}.png")
    left = np.full((20, 20), 255, np.uint8)
    left[:, :10] = 0
    Image.fromarray(left).save(tmp_path / "left.png")
    assert main(["inpaint", str(run), "digits:3", "--mask", str(tmp_path / "white.png"), "--out", str(out)]) == 2
    assert f"the mask {tmp_path / 'white.png'} keeps every pixel (white = keep, black = fill): nothing to fill" in capsys.readouterr().err
    assert main(["inpaint", str(run), "digits:3", "--mask", str(tmp_path / "black.png"), "--steps", "2", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "note: the mask" in said.err and "fills every pixel" in said.err and "filled 100% of the image" in said.out
    assert main(["inpaint", str(run), "digits:3", "--mask", str(tmp_path / "left.png"), "--steps", "2", "--out", str(out)]) == 0
    assert "filled 50% of the image (the mask's black part; white keeps)" in capsys.readouterr().out


def test_a_commands_own_defaults_fit_a_model_of_few_timesteps(tmp_path, capsys):
    """The edit commands' defaults were numbers for T = 1000: on a model of T = 8, `posterior` and `interpolate
    --images` ended in "t must lie in 1..7, got 500" and `inpaint` in "steps must lie in [1, 8], got 100", though the
    user gave neither. Now --t defaults to T/2 and a command's own --steps to T at most; a --steps the user gave is
    still checked against T."""
    from conftest import TINY_DIGITS_RUN
    from ddpmkit.cli import main
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    run = tmp_path / "run"
    train(load_config("mnist", [*TINY_DIGITS_RUN, "train.steps=2", "diffusion.T=8", f"train.run_dir={run}"]), progress=False)
    out = tmp_path / "edits"
    for argv, made, evaluations in ((["posterior", str(run), "digits:3"], "posterior_t4.png", None),
                                    (["interpolate", str(run), "--images", "digits:0,digits:1"], "interpolate_images_t4.png", None),
                                    (["inpaint", str(run), "digits:3", "--resample", "1"], "inpaint.png", None),
                                    (["img2img", str(run), "digits:3"], "img2img.png", None),
                                    (["sample", str(run), "--sampler", "ddim", "--no-gif"], "grid.png", "8 network evaluations")):
        code = main([*argv, "--n", "2", "--out", str(out)])
        std = capsys.readouterr()
        assert code == 0 and (out / made).is_file(), (argv, std.err)
        assert evaluations is None or evaluations in std.out, std.out
    grid = tmp_path / "grid.json"
    assert main(["tune-grid", str(run), "--n", "2", "--evals", "2", "--out", str(grid)]) == 0, capsys.readouterr().err
    assert len(json.loads(grid.read_text())["timesteps"]) == 8  # its default 10 steps, the model's 8 at most
    assert main(["posterior", str(run), "digits:3", "--steps", "60", "--n", "1", "--out", str(out)]) == 2
    assert "steps must lie in [1, 8], got 60" in capsys.readouterr().err
