"""unCLIP and CLIP guidance: the InfoNCE loss, the CLIP-guidance correction, the prior's sampling
path on Gaussian embeddings (exact), and the whole system on tiny trained runs."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ddpmkit.config import Config, DiffusionConfig, NetworkConfig, TrainConfig, UnCLIPConfig
from ddpmkit.guidance import CLIPGuidance
from ddpmkit.images import load_image
from ddpmkit.losses import info_nce
from ddpmkit.models import DiffusionModel
from ddpmkit.nets.classifier import NoisyClassifier
from ddpmkit.nets.clip import CLIP
from ddpmkit.nets.prior import PriorTransformer, prior_data_scale
from ddpmkit.pipelines import unclip
from ddpmkit.schedules import NoiseSchedule


def test_info_nce_matches_a_brute_force_sum():
    g = torch.Generator().manual_seed(0)
    B, E, scale = 6, 5, 7.5
    u = F.normalize(torch.randn(B, E, generator=g), dim=-1)
    v = F.normalize(torch.randn(B, E, generator=g), dim=-1)
    expected = []
    for i in range(B):
        logit = lambda a, b: scale * sum(u[a, k].item() * v[b, k].item() for k in range(E))
        image_to_text = -logit(i, i) + math.log(sum(math.exp(logit(i, j)) for j in range(B)))
        text_to_image = -logit(i, i) + math.log(sum(math.exp(logit(j, i)) for j in range(B)))
        expected.append((image_to_text + text_to_image) / 2)
    expected = torch.tensor(expected)
    torch.testing.assert_close(info_nce(u, v, scale), expected.float(), rtol=1e-5, atol=1e-5)
    # a process's rows of the global batch: the same values
    torch.testing.assert_close(info_nce(u, v, scale, slice(2, 4)), expected[2:4].float(), rtol=1e-5, atol=1e-5)
    # swapping the towers swaps the two directions, whose mean is the same
    torch.testing.assert_close(info_nce(v, u, scale), expected.float(), rtol=1e-5, atol=1e-5)


def _tiny_clip(noisy: bool = True, embed_dim: int = 6) -> CLIP:
    torch.manual_seed(0)
    tower = NoisyClassifier(1, 8, embed_dim, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=())
    return CLIP(tower, (1, 8, 8), context_dim=12, embed_dim=embed_dim, noisy=noisy).eval()


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_clip_guidance_is_the_gradient_of_the_embeddings_dot_product(prediction):
    """Algorithm 2 with CLIP: eps_hat = eps - sqrt(1 - alpha_bar_t) * s * grad_x (g(x_t, t) . h(c)),
    checked against autograd of the dot product written out here."""
    from ddpmkit.parameterization import Denoiser, from_x0, to_x0_eps

    S = NoiseSchedule.from_name("linear", 1000)
    clip = _tiny_clip()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 8, 8, generator=g)
    t = torch.tensor([10.0, 300.0, 600.0, 900.0])
    h = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    eps_true = 0.3 * x

    def model(x_t, tt):  # eps(x_t) = 0.3 x_t, in the prediction's terms
        return from_x0(prediction, to_x0_eps("eps", 0.3 * x_t, x_t, tt, S)[0], x_t, tt, S)

    s = 40.0
    cg = CLIPGuidance(Denoiser(model, S, prediction), clip, s)

    xr = x.clone().requires_grad_(True)
    dot = (F.normalize(clip.image_tower(xr, t), dim=-1) * h).sum()
    grad = torch.autograd.grad(dot, xr)[0]
    torch.testing.assert_close(cg.cond_fn(x, t, text_embed=h), s * grad, rtol=1e-4, atol=1e-6)

    alpha_bar = S.alpha_bar_at(t.double()).float().reshape(-1, 1, 1, 1)
    eps_guided = cg(x, t, text_embed=h).eps
    torch.testing.assert_close(eps_guided, eps_true - (1 - alpha_bar).sqrt() * s * grad, rtol=1e-4, atol=1e-5)
    # scale 0 is the model itself; the model never sees text_embed
    torch.testing.assert_close(CLIPGuidance(Denoiser(model, S, prediction), clip, 0.0)(x, t, text_embed=h).x0,
                               to_x0_eps(prediction, model(x, t), x, t, S)[0])
    with pytest.raises(ValueError, match="text embeddings"):
        cg(x, t)


class _GaussianPrior(torch.nn.Module):
    """The exact x0 denoiser of sqrt(E) z with z | caption ~ N(mu(h), Sigma), mu(h) = M h + m0, for the
    prior's conditioning (text_embed h = the caption's CLIP text embedding)."""

    def __init__(self, M, m0, Sigma, schedule):
        super().__init__()
        self.M, self.m0, self.Sigma, self.schedule = M, m0, Sigma, schedule
        self.scale = prior_data_scale(len(m0))
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # a device for DiffusionModel

    def forward(self, x_t, t, text_embed=None, context=None, context_mask=None):
        E = x_t.shape[1]
        a = self.schedule.alpha_bar_at(t.double().cpu()).sqrt()[:, None, None]  # (B, 1, 1)
        mean = self.scale * (text_embed.double() @ self.M.T + self.m0)  # (B, E)
        C = self.scale**2 * self.Sigma
        K = a * C @ torch.linalg.inv(a**2 * C + (1 - a**2) * torch.eye(E, dtype=torch.float64))  # (B, E, E)
        return (mean + (K @ (x_t.double() - a[:, 0] * mean)[..., None])[..., 0]).float()


class _PriorWithTable(DiffusionModel):
    """A prior whose caption encoding is a fixed table (the text encoder is not what this tests)."""

    table: dict = None

    def encode_prompts(self, prompts, device="cpu"):
        h = torch.stack([self.table[p] for p in prompts])
        return {"text_embed": h, "context": torch.zeros(len(prompts), 2, 3), "context_mask": torch.ones(len(prompts), 2, dtype=torch.bool)}


def _gaussian_prior(schedule: NoiseSchedule) -> tuple[_PriorWithTable, torch.Tensor, torch.Tensor, torch.Tensor]:
    E = 4
    g = torch.Generator().manual_seed(0)
    M = 0.4 * torch.randn(E, E, generator=g, dtype=torch.float64)
    m0 = torch.tensor([0.1, -0.2, 0.05, 0.3], dtype=torch.float64)
    A = 0.15 * torch.randn(E, E, generator=g, dtype=torch.float64)
    Sigma = A @ A.T + 0.01 * torch.eye(E, dtype=torch.float64)
    cfg = Config(diffusion=DiffusionConfig(schedule="cosine", prediction="x0"), network=NetworkConfig(text_encoder="table"),
                 train=TrainConfig(task="prior"), unclip=UnCLIPConfig(embed_dim=E))
    prior = _PriorWithTable(network=_GaussianPrior(M, m0, Sigma, schedule), config=cfg, data_shape=(E,), step=0, path=Path("analytic/prior"))
    prior.table = {"": torch.zeros(E), "a seven": F.normalize(torch.tensor([1.0, 0.0, 1.0, 0.0]), dim=0),
                   "a one": F.normalize(torch.tensor([0.0, -1.0, 0.0, 1.0]), dim=0)}
    return prior, M, m0, Sigma


@pytest.mark.parametrize("sampler,steps", [("ddim", 100), ("dpmpp_2m", 50)])
def test_the_prior_sampling_path_reproduces_gaussian_embeddings(sampler, steps):
    """With the exact denoiser of Gaussian embeddings, prior_embeddings (guidance door, sampler,
    data scale) must return z | caption ~ N(M h + m0, Sigma) for each caption: mean and covariance."""
    schedule = NoiseSchedule.from_name("cosine", 1000)
    prior, M, m0, Sigma = _gaussian_prior(schedule)
    n = 6000
    z = unclip.prior_embeddings(prior, ["a seven", "a one"], n, scale=1.0, sampler=sampler, steps=steps, seed=0).double()
    assert z.shape == (n, 4)
    for k, caption in enumerate(["a seven", "a one"]):
        zk = z[k::2]
        mean = M @ prior.table[caption].double() + m0
        std = Sigma.diagonal().sqrt()
        assert ((zk.mean(0) - mean).abs() / (std / len(zk) ** 0.5)).max() < 4.5
        assert (torch.cov(zk.T) - Sigma).norm() / Sigma.norm() < 0.1
    # the other caption's mean is far from this one's samples: the condition reaches the denoiser
    assert (z[0::2].mean(0) - (M @ prior.table["a one"].double() + m0)).norm() > 0.3


def test_best_of_keeps_the_candidate_closest_to_the_caption():
    text = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    candidates = torch.tensor([[[0.0, 3.0], [2.0, 0.1], [1.0, 1.0]], [[5.0, 0.0], [0.5, 0.4], [0.0, 0.2]]])
    torch.testing.assert_close(unclip.best_of(candidates, text), torch.tensor([[2.0, 0.1], [0.0, 0.2]]))


def test_text_diffs_move_the_image_embedding_toward_target_minus_source():
    """theta = 0 is the image's embedding, theta = 1 the direction normalise(z_t(target) - z_t(source));
    in between, the embedding turns monotonically toward that direction (a swapped sign turns away)."""
    g = torch.Generator().manual_seed(0)
    z_i, z_src, z_tgt = F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    out = unclip.text_diff_embeddings(z_i, z_src, z_tgt, [0.0, 0.3, 0.6, 1.0])
    z_d = F.normalize(z_tgt - z_src, dim=-1)
    torch.testing.assert_close(out[0], z_i)
    torch.testing.assert_close(out[-1], z_d, atol=1e-6, rtol=0)
    toward = out @ z_d
    assert bool((toward[1:] > toward[:-1]).all()), toward


def test_the_prior_diffuses_embeddings_at_unit_variance_per_coordinate():
    """sqrt(E) x a unit vector: mean square 1 per coordinate, the scale the schedules assume."""
    z = F.normalize(torch.randn(1000, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert prior_data_scale(64) == 8.0
    torch.testing.assert_close((prior_data_scale(64) * z).pow(2).mean(), torch.tensor(1.0))


def test_the_prior_without_a_context_mask_attends_to_every_caption_token():
    torch.manual_seed(0)
    prior = PriorTransformer(embed_dim=6, context_dim=5, width=16, layers=1, heads=2).eval()
    B, L = 2, 3  # unequal: a (L, B) mask would not fit
    x, t, h, context = torch.randn(B, 6), torch.tensor([10.0, 500.0]), torch.randn(B, 6), torch.randn(B, L, 5)
    every = torch.ones(B, L, dtype=torch.bool)
    torch.testing.assert_close(prior(x, t, h, context), prior(x, t, h, context, every), rtol=0, atol=0)
    assert not torch.allclose(prior(x, t, h, context), prior(x, t, h, context, torch.tensor([[1, 0, 0], [1, 1, 0]]).bool()))


def test_the_prior_written_out_from_its_parts():
    """DALL-E 2's prior: a transformer over [caption tokens, text embedding, time, noisy x, a learned query], each projected
    to the width, plus learned positions, padding masked; the output is the query's token, normalised and projected back.
    The time token is Linear -> SiLU -> Linear of the sinusoidal embedding."""
    from ddpmkit.nets.layers import timestep_embedding

    torch.manual_seed(0)
    prior = PriorTransformer(embed_dim=6, context_dim=5, width=16, layers=1, heads=2).eval()
    B, L = 2, 3
    x, t, h, context = torch.randn(B, 6), torch.tensor([10.0, 500.0]), torch.randn(B, 6), torch.randn(B, L, 5)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    first, act, second = prior.time_mlp
    assert isinstance(act, torch.nn.SiLU)
    time = second(F.silu(first(timestep_embedding(t, 16))))
    tokens = torch.cat([prior.context_proj(context), prior.text_embed_proj(h)[:, None], time[:, None], prior.x_proj(x)[:, None],
                        prior.query.expand(B, 1, 16)], dim=1) + prior.position[:L + 4]
    ignore = torch.cat([~mask, torch.zeros(B, 4, dtype=torch.bool)], dim=1)
    expected = prior.out(prior.out_norm(prior.transformer(tokens, src_key_padding_mask=ignore)[:, -1]))
    torch.testing.assert_close(prior(x, t, h, context, mask), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(prior.train()(x, t, h, context, mask), expected, rtol=1e-5, atol=1e-6)  # no dropout in training


def test_the_decoder_unet_takes_the_embedding_as_time_embedding_and_tokens():
    from ddpmkit.nets import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,), image_embed_dim=6,
               embed_tokens=3).eval()
    for p in net.parameters():  # the zero-initialised layers (ADM) would hide every input at first
        if not p.any():
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 500.0])
    e = F.normalize(torch.randn(2, 6), dim=-1)
    out = net(x, t, image_embed=e)
    assert out.shape == x.shape
    assert (out - net(x, t, image_embed=torch.zeros(2, 6))).abs().max() > 1e-4  # the embedding changes the output
    torch.testing.assert_close(net(x[:1], t[:1], image_embed=e[:1]), out[:1], rtol=1e-4, atol=1e-5)  # per example
    with pytest.raises(ValueError, match=r"image_embed= of shape \(B=2, E=6\)"):
        net(x, t)
    with pytest.raises(ValueError, match=r"image_embed= of shape"):
        net(x, t, image_embed=torch.zeros(2, 5))


# ---- the system on tiny trained runs (digits, 8x8) -----------------------------------------------------------------------

TINY = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=4",
        "train.batch_size=16", "train.sample_every=0", "train.max_minutes=0", "train.mixed_precision=no", "train.log_every=1"]


@pytest.fixture(scope="module")
def tiny_unclip(tmp_path_factory):
    """CLIP, noisy CLIP, prior, decoder and an unconditional denoiser, a few steps each."""
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    root = tmp_path_factory.mktemp("unclip")
    runs = {}
    runs["clip"] = train(load_config("clip", [*TINY, "clip.embed_dim=8", "train.steps=4", "train.eval_every=4",
                                              f"train.run_dir={root / 'clip'}"]), progress=False)
    runs["noisy"] = train(load_config("clip_noisy", [*TINY, "clip.embed_dim=8", "train.steps=2", f"train.run_dir={root / 'noisy'}"]),
                          progress=False)
    runs["prior"] = train(load_config("unclip_prior", [*TINY[:1], *TINY[4:], f"unclip.clip={runs['clip']}", "unclip.embed_dim=8",
                                                       "unclip.prior_width=16", "unclip.prior_layers=1", "train.steps=3", "diffusion.T=50",
                                                       f"train.run_dir={root / 'prior'}"]), progress=False)
    runs["decoder"] = train(load_config("unclip_decoder", [*TINY, f"unclip.clip={runs['clip']}", "unclip.embed_dim=8", "diffusion.T=100",
                                                           "train.steps=3", "train.sample_every=3", "train.sample_steps=2",
                                                           f"train.run_dir={root / 'decoder'}"]), progress=False)
    runs["denoiser"] = train(load_config("mnist", [*TINY, "train.steps=2", f"train.run_dir={root / 'denoiser'}"]), progress=False)
    return runs


def _cli(capsys, *argv):
    from ddpmkit.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_clip_trains_on_every_images_caption_whatever_the_drop_probability():
    """CLIP has no unconditional branch: the task keeps every caption (train.cond_drop_prob is for denoisers), and each
    image's is one of its digit's captions."""
    from ddpmkit.config import load_config
    from ddpmkit.train.clip import CLIPTask

    task = CLIPTask(load_config("clip", [*TINY, "train.cond_drop_prob=0.5"]))
    indices = torch.arange(64)
    text = task.captions.batch(indices, torch.Generator().manual_seed(0))
    captions = task.captions.table["context"][task.captions.caption_ids[indices]]  # (B, templates, L, D): each image's
    assert all(any(torch.equal(row, c) for c in own) for row, own in zip(text["context"], captions, strict=True))


def test_the_unclip_runs_train_through_the_engine_and_load(tiny_unclip):
    import ddpmkit

    clip = ddpmkit.load(tiny_unclip["clip"])
    assert clip.kind == "clip" and clip.network.embed_dim == 8 and not clip.network.noisy
    log = [json.loads(line) for line in (tiny_unclip["clip"] / "train_log.jsonl").read_text().splitlines()]
    assert 0.0 <= log[-1]["zero_shot"] <= 1.0  # zero-shot accuracy on held-out digits
    assert log[-1]["temperature"] == pytest.approx(1 / float(clip.network.scale), rel=1e-5)  # of the saved (EMA) weights
    noisy_log = [json.loads(line) for line in (tiny_unclip["noisy"] / "train_log.jsonl").read_text().splitlines()]
    assert {"zero_shot_t0", "zero_shot_t750"} <= set(noisy_log[-1])
    prior, decoder = ddpmkit.load(tiny_unclip["prior"]), ddpmkit.load(tiny_unclip["decoder"])
    assert prior.data_shape == (8,) and prior.conditioning == "text" and prior.prediction == "x0"
    assert decoder.data_shape == (1, 8, 8) and decoder.conditioning == "embed"
    assert set(prior.encode_prompts(["a seven"])) == {"context", "context_mask", "text_embed"}
    assert (tiny_unclip["decoder"] / "samples" / "step-0000003.png").is_file()


def test_text_to_image_variations_interpolation_and_text_diffs_from_the_command_line(tiny_unclip, tmp_path, capsys):
    p, d = tiny_unclip["prior"], tiny_unclip["decoder"]
    code, out, err = _cli(capsys, "unclip", p, d, "--prompt", "a handwritten seven", "--prompt", "a one", "--n", "4", "--steps", "3",
                          "--prior-steps", "3", "--best-of", "2", "--out", tmp_path / "u")
    assert code == 0, err
    assert (tmp_path / "u" / "unclip.png").is_file() and torch.load(tmp_path / "u" / "samples.pt").shape == (4, 1, 8, 8)
    embeds = torch.load(tmp_path / "u" / "image_embeds.pt")
    torch.testing.assert_close(embeds.norm(dim=-1), torch.ones(4))
    # the command's samples are the library's text_to_image with the command's prompts, counts, guidance, best-of and prior
    # steps, in that order (best-of 2 and 3 prior steps: a swap of the two differs), and its reverse process is recorded
    # at each of the decoder's 3 steps
    import ddpmkit
    from ddpmkit.cli import build_parser
    from ddpmkit.cli.unclip import _decode_kwargs
    from ddpmkit.pipelines import unclip

    args = build_parser().parse_args(["unclip", str(p), str(d), "--prompt", "a handwritten seven", "--prompt", "a one", "--n", "4",
                                      "--steps", "3", "--prior-steps", "3", "--best-of", "2"])
    prior, decoder = ddpmkit.load(p), ddpmkit.load(d)
    expected = unclip.text_to_image(prior, decoder, args.prompt, 4, args.prior_guidance, 2, 3, seed=0, progress=False,
                                    **_decode_kwargs(args, decoder))
    torch.testing.assert_close(torch.load(tmp_path / "u" / "samples.pt"), expected.images, rtol=0, atol=0)
    with Image.open(tmp_path / "u" / "reverse_process.gif") as gif:
        assert gif.n_frames == 3, gif.n_frames
    # a command's own --prior-steps (64) yield to a prior of T = 50 ("--prior-steps 64: the prior has T = 50" named a flag not
    # given), and the decoder's 100 ancestral steps (all its T) are recorded every 2 for the GIF, not every 1000 // 50
    code, out, err = _cli(capsys, "unclip", p, d, "--prompt", "a one", "--n", "1", "--out", tmp_path / "all")
    assert code == 0, err
    with Image.open(tmp_path / "all" / "reverse_process.gif") as gif:
        assert gif.n_frames == 50, gif.n_frames
    code, out, err = _cli(capsys, "variations", d, "digits:3", "digits:7", "--n", "3", "--steps", "3", "--out", tmp_path / "v")
    assert code == 0, err
    assert torch.load(tmp_path / "v" / "samples.pt").shape == (6, 1, 8, 8) and (tmp_path / "v" / "variations.png").is_file()
    # the command a decoder run ends with: --fit fits a built-in digit of another size as it fits a file (it was "the
    # model makes images of shape (1, 8, 8), the image has (1, 28, 28)")
    from ddpmkit.kinds import kind_of

    hint = kind_of("decoder").next_step.format(run=d).split(": ", 1)[1].split(";")[0]
    assert hint == f"ddpmkit variations {d} mnist5k:7 --fit"
    code, out, err = _cli(capsys, *hint.split()[1:], "--n", "1", "--steps", "2", "--no-gif", "--out", tmp_path / "f")
    assert code == 0 and torch.load(tmp_path / "f" / "samples.pt").shape == (1, 1, 8, 8), err
    code, out, err = _cli(capsys, "unclip-interpolate", d, "digits:3", "digits:7", "--frames", "4", "--steps", "3", "--out", tmp_path / "i")
    assert code == 0, err
    assert (tmp_path / "i" / "interpolation.png").is_file()
    with pytest.raises(SystemExit):  # it writes one picture and no GIF: its --no-gif was taken and changed nothing
        _cli(capsys, "unclip-interpolate", d, "digits:3", "digits:7", "--no-gif")
    assert "unrecognized arguments: --no-gif" in capsys.readouterr().err
    code, out, err = _cli(capsys, "text-diff", d, "digits:3", "--from", "a three", "--to", "an eight", "--amounts", "0,0.5",
                          "--steps", "3", "--out", tmp_path / "t")
    assert code == 0, err
    assert torch.load(tmp_path / "t" / "samples.pt").shape == (2, 1, 8, 8)
    # one caption twice has no direction (the "moves" went toward the zero vector), an interpolation of one frame is none,
    # and more prior steps than its T named no flag
    for argv, message in ((["text-diff", d, "digits:3", "--from", "a three", "--to", "a three"], "--from 'a three' and --to 'a three' "
                            "have the same CLIP text embedding: there is no direction"),
                          (["unclip-interpolate", d, "digits:3", "digits:7", "--frames", "1"], "an interpolation needs at least 2 frames"),
                          (["unclip", p, d, "--prompt", "a one", "--prior-steps", "5000"], "--prior-steps 5000: the prior has T = ")):
        code, out, err = _cli(capsys, *argv, "--steps", "2", "--out", tmp_path / "bad")
        assert code == 2 and message in err, err


def test_unclip_samples_do_not_depend_on_the_batch_size(tiny_unclip):
    import ddpmkit

    prior, decoder = ddpmkit.load(tiny_unclip["prior"]), ddpmkit.load(tiny_unclip["decoder"])
    kw = dict(prior_steps=4, steps=3, sampler="ddpm", best=2, progress=False)
    a = unclip.text_to_image(prior, decoder, ["a seven", "a two"], 5, batch_size=5, **kw)
    b = unclip.text_to_image(prior, decoder, ["a seven", "a two"], 5, batch_size=2, **kw)
    torch.testing.assert_close(a.embeds, b.embeds)
    torch.testing.assert_close(a.images, b.images)
    # interpolation frames share the noise: with two equal images every frame is the same
    image = load_image("digits:5")
    frames = unclip.interpolate(decoder, image, image, frames=3, steps=3, progress=False).images
    torch.testing.assert_close(frames[0], frames[2])


def test_variations_keep_the_embedding_and_guidance_scale_one_is_the_conditional_decoder(tiny_unclip):
    import ddpmkit
    from ddpmkit.parameterization import to_x0_eps
    from ddpmkit.pipelines.guided import GuidanceRequest, guided_model

    decoder = ddpmkit.load(tiny_unclip["decoder"])
    e = decoder.clip.network.embed_images(load_image("digits:4"))
    model, kwargs, _ = guided_model(decoder, 1, GuidanceRequest(conditions={"image_embed": e}, scale=1.0))
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([50.0])
    x0 = lambda out: to_x0_eps(decoder.prediction, out, x, t, decoder.schedule)[0]  # noqa: E731 -- a network output's x_0
    torch.testing.assert_close(model(x, t, **kwargs).x0, x0(decoder.network(x, t, image_embed=e)))
    guided, kwargs, _ = guided_model(decoder, 1, GuidanceRequest(conditions={"image_embed": e}, scale=3.0))
    cond, uncond = decoder.network(x, t, image_embed=e), decoder.network(x, t, image_embed=torch.zeros_like(e))
    torch.testing.assert_close(guided(x, t, **kwargs).x0, x0(uncond + 3.0 * (cond - uncond)), rtol=1e-4, atol=1e-5)


def test_clip_guidance_from_the_command_line(tiny_unclip, tmp_path, capsys):
    den, noisy, clean = tiny_unclip["denoiser"], tiny_unclip["noisy"], tiny_unclip["clip"]
    for sampler in ("ddpm", "ddim"):
        code, out, err = _cli(capsys, "sample", den, "--clip", noisy, "--prompt", "a handwritten seven", "--clip-scale", "50",
                              "--sampler", sampler, "--steps", "3", "--n", "2", "--no-gif", "--out", tmp_path / sampler)
        assert code == 0, err
        assert "CLIP scale 50" in out
    code, out, err = _cli(capsys, "sample", den, "--clip", clean, "--prompt", "a seven", "--steps", "2", "--out", tmp_path / "x")
    assert code == 2 and "needs a noisy CLIP" in err and err.count("\n") == 1
    code, out, err = _cli(capsys, "sample", den, "--clip", noisy, "--steps", "2", "--out", tmp_path / "x")
    assert code == 2 and "give --prompt" in err


def test_the_prior_and_decoder_in_the_faces_made_for_denoisers(tiny_unclip, tmp_path, capsys):
    """`sample PRIOR` ended in matplotlib's traceback (a 2-D scatter of 8-D embeddings), `eval PRIOR` in a shape error
    deep in the network, `eval DECODER` after its bits/dim; `serve` offered the decoder, whose every draw failed."""
    from ddpmkit.web.shelf import find_runs

    p, d = tiny_unclip["prior"], tiny_unclip["decoder"]
    code, out, err = _cli(capsys, "sample", p, "--prompt", "a seven", "--n", "3", "--steps", "2", "--out", tmp_path / "s")
    assert code == 0, err
    assert sorted(f.name for f in (tmp_path / "s").iterdir()) == ["samples.pt"] and torch.load(tmp_path / "s" / "samples.pt").shape == (3, 8)
    assert f"they are 8-D vectors, in {tmp_path / 's' / 'samples.pt'} (torch.load); text to image: ddpmkit unclip {p} DECODER" in out
    for run, takes in ((p, "a prompt's CLIP text embedding"), (d, "a CLIP image embedding")):
        code, out, err = _cli(capsys, "eval", run, "--n", "4", "--n-bpd", "2")
        assert code == 2 and f"is a {run.name} run (its network takes {takes}): eval measures denoisers of images or points; " in err, err
        assert err.count("\n") == 1
    skipped: list[str] = []
    assert find_runs([p.parent], skipped) == [str(tiny_unclip["denoiser"])]
    assert [why.split(" (")[0] for why in skipped] == [str(d), str(p)]
    assert f"(a decoder run, whose network takes a CLIP image embedding: image variations: ddpmkit variations {d} " in skipped[0]


@pytest.mark.parametrize("argv,message", [
    (["variations", "{decoder}", "{image}"], "is a 3-channel 12x12 image; the decoder's CLIP embeds 1-channel 8x8 images (add --fit"),
    (["variations", "{decoder}", "mnist5k:3"], "mnist5k:3 is a 1-channel 28x28 image; the decoder's CLIP embeds 1-channel 8x8"),
    (["unclip", "{decoder}", "{decoder}", "--prompt", "x"], "is a decoder (train.task = 'decoder'), not an unCLIP prior"),
    (["sample", "{decoder}", "--steps", "2"], "conditioned on CLIP image embeddings"),
    (["text-diff", "{decoder}", "digits:1", "--from", "a", "--to", "b", "--amounts", "x"], "--amounts takes numbers"),
])
def test_bad_unclip_input_gives_one_clear_line(tiny_unclip, tmp_path, capsys, argv, message):
    from PIL import Image

    image = tmp_path / "rgb.png"
    Image.new("RGB", (12, 12), (200, 10, 10)).save(image)
    argv = [a.format(decoder=tiny_unclip["decoder"], image=image) for a in argv]
    code, out, err = _cli(capsys, *argv, "--out", tmp_path / "o")
    assert code == 2 and message in err, err
    assert err.count("\n") == 1


def test_a_prior_and_decoder_of_different_embedding_sizes_or_no_prompts_are_refused(tiny_unclip):
    import ddpmkit

    prior, decoder = ddpmkit.load(tiny_unclip["prior"]), ddpmkit.load(tiny_unclip["decoder"])
    other = dataclasses.replace(decoder, config=dataclasses.replace(decoder.config, unclip=UnCLIPConfig(embed_dim=16)))
    with pytest.raises(unclip.UnCLIPError, match="draws 8-dim CLIP embeddings but the decoder .* takes 16-dim ones"):
        unclip.check_pair(prior, other)
    with pytest.raises(unclip.UnCLIPError, match="give at least one prompt"):
        unclip.text_to_embedding(prior, [], 2)
    with pytest.raises(unclip.UnCLIPError, match="takes 8-dim CLIP image embeddings"):
        unclip.decode(decoder, torch.zeros(2, 5), steps=2, progress=False)


def test_a_decoder_on_a_clip_of_another_size_is_refused_before_training(tiny_unclip, tmp_path):
    from ddpmkit.config import ConfigError, load_config
    from ddpmkit.train import train

    cfg = load_config("unclip_decoder", [*TINY, f"unclip.clip={tiny_unclip['clip']}", "unclip.embed_dim=64", "train.steps=1",
                                         f"train.run_dir={tmp_path / 'd'}"])
    with pytest.raises(ConfigError, match="embeds into 8 dimensions but unclip.embed_dim = 64; set unclip.embed_dim=8"):
        train(cfg, progress=False)
