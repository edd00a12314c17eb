"""Likelihoods against exact densities, and the sample-quality metrics against independent computations."""
import json

import numpy as np
import pytest
import scipy.linalg
import torch

from ddpmkit.analytic import GaussianMixture
from ddpmkit.errors import UserError
from ddpmkit.evaluate.inception import FIDInceptionV3, inception_features, load_fid_inception
from ddpmkit.evaluate.likelihood import dequantize, ode_nll, vlb
from ddpmkit.evaluate.metrics import FeatureStats, fid_from_features, frechet_distance, inception_score, kernel_inception_distance
from ddpmkit.schedules import NoiseSchedule

S = NoiseSchedule.from_name("linear", 1000)
MIX2 = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]), torch.tensor([0.2, 0.3, 0.15]),
                       torch.tensor([0.5, 0.3, 0.2]))


def mixture_8d() -> GaussianMixture:
    g = torch.Generator().manual_seed(0)
    return GaussianMixture(torch.rand(4, 8, generator=g, dtype=torch.float64) * 2 - 1, torch.tensor([0.1, 0.2, 0.15, 0.3]), torch.ones(4))


@pytest.mark.parametrize("gm, n", [(MIX2, 100), (mixture_8d(), 40)], ids=["2-D", "8-D"])
def test_ode_nll_equals_the_true_density(gm, n):
    x, _ = gm.sample(n, torch.Generator().manual_seed(1))
    truth = -gm.log_prob(x) / gm.dim  # nats per dimension
    t_start = S.t_at_sigma(1e-4).item()  # the exact model is defined below t = 0
    out = ode_nll(gm.eps_model(S), x, S, t_start=t_start, divergence="exact", rtol=1e-7, atol=1e-7)
    assert (out.nll - truth).abs().max().item() < 0.01
    bits = -gm.log_prob(x) / np.log(2) / gm.dim  # -log2 p(x) per dimension: what eval reports of points
    assert (out.bits_per_dim - bits).abs().max().item() < 0.01 / np.log(2)


def test_hutchinson_divergence_is_unbiased():
    gm = mixture_8d()
    x, _ = gm.sample(300, torch.Generator().manual_seed(2))
    truth = -gm.log_prob(x) / gm.dim
    t_start = S.t_at_sigma(1e-4).item()
    out = ode_nll(gm.eps_model(S), x, S, t_start=t_start, divergence="hutchinson", rtol=1e-6, atol=1e-6,
                  generator=torch.Generator().manual_seed(3))
    err = out.nll - truth
    assert abs(err.mean().item()) < 4 * err.std().item() / 300**0.5 + 1e-3


def test_vlb_is_an_upper_bound_that_tightens_with_T():
    x, _ = MIX2.sample(200, torch.Generator().manual_seed(4))
    truth = (-MIX2.log_prob(x) / 2).mean().item()
    bounds = []
    for T in (50, 200, 1000):
        s = NoiseSchedule.from_name("linear", T)
        res = vlb(MIX2.eps_model(s), x, s, decoder="gaussian", generator=torch.Generator().manual_seed(5))
        assert res.terms.shape == (200, T)
        bounds.append(res.total.mean().item())
    assert bounds[0] > bounds[1] > bounds[2] > truth, (bounds, truth)


def test_with_the_true_reverse_kernels_the_bound_is_the_true_nll_plus_the_decoders_kl():
    """The bound's exact answer. For Gaussian data N(0, s^2 I) every reverse kernel q(x_{t-1} | x_t) is Gaussian: its mean
    is the posterior mean at E[x_0 | x_t] (the exact eps model), its variance v_{t-1} - alpha_t v_{t-1}^2 / v_t (v_t the
    variance of x_t), which a learned variance can hold exactly. The model is then the forward chain run backwards but
    for its decoder (variance beta-tilde_1, where q(x_0 | x_1)'s is another) and its prior (N(0, I), where x_T's variance
    is v_T), so -ELBO averaged over the data = the true NLL + E KL(decoder) + KL(prior): every KL term's coefficients,
    the learned variance's interpolation and the Gaussian decoder enter it (the upper-bound test above only orders them)."""
    s = 0.5
    gm = GaussianMixture.gaussian(torch.zeros(2), s)
    sched = NoiseSchedule.from_name("linear", 100)
    ab = sched.alpha_bar
    v = ab * s**2 + 1 - ab  # Var(x_t) per coordinate
    v_prev = torch.cat([torch.tensor([s**2], dtype=torch.float64), v[:-1]])
    true_var = v_prev - sched.alphas * v_prev**2 / v  # Var(x_{t-1} | x_t); row 0: Var(x_0 | x_1)
    log_small = sched.posterior_log_variance_clipped
    log_large = torch.cat([log_small[1:2], sched.betas[1:].log()])
    frac = (true_var.log() - log_small) / (log_large - log_small)  # log-space interpolation (Nichol & Dhariwal eq. 15)
    frac[0] = 0.0  # the decoder's variance is beta-tilde_1 whatever the network says
    eps = gm.eps_model(sched)

    def true_kernels(x_t, t):  # eps and v in [-1, 1]: the 2C channels of a learned-variance network
        return torch.cat([eps(x_t, t), (2 * frac[t.round().long()] - 1)[:, None].expand_as(x_t)], 1)

    x, _ = gm.sample(20000, torch.Generator().manual_seed(1))
    nll = -gm.log_prob(x) / gm.dim
    bound = vlb(true_kernels, x, sched, learned_variance=True, variance="learned", decoder="gaussian",
                generator=torch.Generator().manual_seed(2)).total
    decoder_var = log_small[0].exp()
    kl_decoder = 0.5 * (decoder_var.log() - true_var[0].log() + true_var[0] / decoder_var - 1)
    kl_prior = 0.5 * (v[-1] - 1 - v[-1].log())
    gap = (bound - nll).mean().item()
    se = (bound - nll).std().item() / len(x) ** 0.5
    # measured: 0.0190 against 0.0221, se 0.0063; a decoder 5% off, or the variance interpolation reversed, fails it
    assert abs(gap - (kl_decoder + kl_prior).item()) < 4 * se, (gap, kl_decoder.item(), se)
    # beta-tilde_t, DDPM's fixed small variance, is no reverse kernel: its bound lies far above
    assert vlb(eps, x[:2000], sched, decoder="gaussian").total.mean() > nll[:2000].mean() + 1.0


def test_vlb_with_clip_x0_clips_the_prediction_to_the_data_range():
    """Data N(0, 0.1^2): E[x_0 | x_t] has a std of at most 0.1 at every t, so clipping to [-1, 1] never bites and the
    bound is the unclipped one; data N(0, 2^2) leaves the range, and the clipped bound differs."""
    s = NoiseSchedule.from_name("linear", 20)
    for sd, same in ((0.1, True), (2.0, False)):
        data = GaussianMixture.gaussian(torch.zeros(3, dtype=torch.float64), sd)
        x = data.sample(16, generator=torch.Generator().manual_seed(1))[0]
        kw = dict(decoder="gaussian")
        plain = vlb(data.eps_model(s), x, s, generator=torch.Generator().manual_seed(2), **kw).total
        clipped = vlb(data.eps_model(s), x, s, generator=torch.Generator().manual_seed(2), clip_x0=True, **kw).total
        assert torch.equal(plain, clipped) == same, sd


def test_vlb_terms_are_the_loss_terms():
    """Column t of the breakdown is the training loss's vlb_term at t; the prior is L_T."""
    from ddpmkit.losses import training_losses
    from ddpmkit.process import prior_kl

    s = NoiseSchedule.from_name("linear", 20)
    x = torch.rand(8, 1, 4, 4) * 2 - 1
    model = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    res = vlb(model, x, s, generator=torch.Generator().manual_seed(0))
    for t in (0, 7, 19):
        g = torch.Generator().manual_seed(0)
        # vlb draws one noise tensor per step from t = T-1 down: replay the stream up to t
        for _ in range(s.T - 1 - t):
            torch.randn(x.shape, generator=g)
        noise = torch.randn(x.shape, generator=g)
        terms = training_losses(model, x, torch.full((8,), t), s, noise=noise, loss_type="vlb")
        assert torch.allclose(res.terms[:, t].float(), terms["vlb"], atol=1e-5)
    assert torch.allclose(res.prior.float(), prior_kl(x, s))


def test_dequantize_stays_in_the_bins():
    k = torch.randint(0, 256, (100,)).float()
    x = k / 127.5 - 1
    d = dequantize(x, torch.Generator().manual_seed(0))
    assert bool(((d + 1) * 128 >= k).all()) and bool(((d + 1) * 128 < k + 1).all())


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 20)), rng.normal(size=(300, 20)) @ rng.normal(size=(20, 20)) * 0.3 + 0.5
    s1, s2 = FeatureStats.of(a), FeatureStats.of(b)
    covmean = scipy.linalg.sqrtm(s1.sigma @ s2.sigma).real
    ref = ((s1.mu - s2.mu) ** 2).sum() + np.trace(s1.sigma + s2.sigma - 2 * covmean)
    assert frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma) == pytest.approx(ref, abs=1e-6)
    assert abs(fid_from_features(a, a)) < 1e-6


def test_fid_and_kid_grow_as_noise_replaces_samples():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(1000, 16)) * np.linspace(0.5, 2, 16)
    ref = FeatureStats.of(real)
    other = rng.normal(size=(1000, 16)) * np.linspace(0.5, 2, 16)
    fids, kids = [], []
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        fake = other.copy()
        k = int(frac * 1000)
        fake[:k] = rng.normal(size=(k, 16)) * 3 + 1
        fids.append(fid_from_features(fake, ref))
        kids.append(kernel_inception_distance(fake, real, subsets=10, subset_size=500)[0])
    assert fids[0] < 0.5 and all(a < b for a, b in zip(fids, fids[1:])), fids
    assert abs(kids[0]) < 0.01 and all(a < b for a, b in zip(kids, kids[1:])), kids


def test_inception_score_limits():
    confident = np.eye(10)[np.arange(1000) % 10] * 0.999 + 0.0001
    assert inception_score(confident)[0] == pytest.approx(10, rel=0.02)
    assert inception_score(np.full((1000, 10), 0.1))[0] == pytest.approx(1.0)
    # fewer samples than splits: one split per sample (a split of one sample scores exactly 1), never NaN
    assert inception_score(confident[:6]) == inception_score(confident[:6], splits=6) == (pytest.approx(1.0), 0.0)
    assert inception_score(confident[:3], splits=1)[0] == pytest.approx(3, rel=0.02)
    with pytest.raises(UserError, match="n >= 1"):
        inception_score(np.zeros((0, 10)))


def test_the_fid_inception_has_the_published_networks_parameters():
    """The weights file fixes every tensor's shape; without it (no download here), the count pins them: torchvision
    documents 27,161,264 parameters for Inception-v3, of which the auxiliary classifier (1x1 768->128, 5x5 128->768,
    each with batch-norm scale and shift, and a 768->1000 linear layer) holds 3,326,696; the FID network has no auxiliary
    head and 1,008 classes, 8 more than torchvision's 1,000 (8 x 2,048 weights and 8 biases)."""
    aux = 768 * 128 + 2 * 128 + 128 * 768 * 5 * 5 + 2 * 768 + 768 * 1000 + 1000
    assert aux == 3_326_696
    net = FIDInceptionV3()
    assert sum(p.numel() for p in net.parameters()) == 27_161_264 - aux + 8 * 2048 + 8 == 23_850_960
    assert net.fc.weight.shape == (1008, 2048) and net.Conv2d_1a_3x3.conv.weight.shape == (32, 3, 3, 3)


def test_inception_network_loads_weights_from_a_file_and_computes_features(tmp_path):
    torch.manual_seed(0)
    net = FIDInceptionV3().eval()
    for m in net.modules():  # non-trivial batch-norm statistics, as in the real checkpoint
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    loaded = load_fid_inception(path)
    images = torch.rand(2, 1, 28, 28) * 2 - 1
    feats, probs = inception_features(loaded, images)
    assert feats.shape == (2, 2048) and probs.shape == (2, 1008)
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(feats, net(images)[0], atol=1e-5)
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not the FID Inception"):
        load_fid_inception(bad)
    with pytest.raises(FileNotFoundError):
        load_fid_inception(tmp_path / "missing.pth")
    (tmp_path / "cut.pth").write_bytes(path.read_bytes()[:1000])  # a download cut short: one line, not torch's dozen
    with pytest.raises(ValueError) as cut:
        load_fid_inception(tmp_path / "cut.pth")
    assert "\n" not in str(cut.value) and str(cut.value).startswith(f"cannot read Inception weights {tmp_path / 'cut.pth'} (")
    assert str(cut.value).endswith("is it pt_inception-2015-12-05-6726825d.pth (about 91 MB), whole?")


def test_inception_weights_that_cannot_be_downloaded_are_one_line_in_the_faces_words(tmp_path, monkeypatch, capsys):
    """No weights anywhere and no way to download them (here a real refusal: a loopback port nothing listens on) is one
    line that says where to put them and how to go on offline (it was three lines with a library name in backticks)."""
    from ddpmkit.cli import main
    from ddpmkit.evaluate import inception

    monkeypatch.setattr(inception, "WEIGHTS_URL", "http://127.0.0.1:9/pt_inception.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DDPMKIT_INCEPTION", raising=False)
    with pytest.raises(FileNotFoundError, match=r"could not be downloaded \(URLError\): download http://127.0.0.1:9/pt_inception.pth "):
        inception.find_weights()
    assert main(["eval", "/no/run", "--features", "inception", "--metrics", "fd"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith("give its path (--inception or DDPMKIT_INCEPTION); offline, use the classifier-feature "
                                            "metrics instead (--features classifier)"), err


def test_vlb_estimate_is_unbiased():
    from ddpmkit.evaluate.likelihood import vlb_estimate

    s = NoiseSchedule.from_name("linear", 50)
    x, _ = MIX2.sample(64, torch.Generator().manual_seed(6))
    full = vlb(MIX2.eps_model(s), x, s, decoder="gaussian", generator=torch.Generator().manual_seed(7)).total.mean().item()
    est = [vlb_estimate(MIX2.eps_model(s), x, s, draws=8, decoder="gaussian", generator=torch.Generator().manual_seed(k)).mean().item()
           for k in range(40)]
    assert np.mean(est) == pytest.approx(full, abs=4 * np.std(est) / 40**0.5 + 0.01)


def test_training_logs_the_held_out_bits_per_dim(tmp_path):
    import json

    from ddpmkit.config import PRESET_DIR, load_config
    from ddpmkit.train import train

    cfg = load_config(PRESET_DIR / "toy2d.toml", [f"train.run_dir={tmp_path}", "train.steps=20", "train.eval_every=10",
                                                  "train.checkpoint_every=1000"])
    train(cfg, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    bpd = [r["bpd_vlb_estimate"] for r in logged if "bpd_vlb_estimate" in r]
    assert len(bpd) == 2 and all(np.isfinite(bpd))
    # an image run's: the discretised decoder's bound with clipped x_0, of the EMA weights on the first 64 held-out
    # digits, with the noise of train.seed's generator (the same every time), in bits
    from conftest import TINY_DIGITS_RUN
    from ddpmkit.data import load_dataset
    from ddpmkit.evaluate.likelihood import vlb_estimate
    from ddpmkit.models import load_diffusion

    run = tmp_path / "digits"
    train(load_config(PRESET_DIR / "mnist.toml", [*TINY_DIGITS_RUN, "train.steps=2", "train.eval_every=2", "train.seed=5",
                                                  f"train.run_dir={run}"]), progress=False)
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    bpd = [r["bpd_vlb_estimate"] for r in logged if "bpd_vlb_estimate" in r]
    x0 = load_dataset("digits", split="test").get_batch(torch.arange(64))
    nats = vlb_estimate(load_diffusion(run).denoiser, x0, draws=8, decoder="discretized", clip_x0=True,
                        generator=torch.Generator().manual_seed(5))
    assert bpd == [pytest.approx(nats.mean().item() / np.log(2), rel=1e-5)]


def test_uniform_data_is_exactly_8_bits_per_dim():
    """Data uniform on [-1, 1) has density 1/2 per dimension; its 8-bit version is uniform over 256
    levels, 8 bits/dim, which the dequantised bound must give exactly (-log p = log 2 nats/dim)."""
    from ddpmkit.evaluate.likelihood import dequantized_bits_per_dim

    assert dequantized_bits_per_dim(torch.tensor([np.log(2.0)])).item() == pytest.approx(8.0, abs=1e-9)


def test_a_noisy_classifiers_accuracy_by_t_is_measured_on_x_t_drawn_by_the_forward_process():
    """accuracy_by_t (the classifier run's accuracy_tN metrics): at each t, x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) z
    with z drawn from `seed` in the order of the timesteps, given to the network with t; the share it labels right."""
    from ddpmkit.evaluate.judge import accuracy_by_t
    from ddpmkit.schedules import NoiseSchedule

    schedule = NoiseSchedule.from_name("linear", 1000)
    x0, labels = torch.rand(6, 1, 2, 2) * 2 - 1, torch.tensor([0, 1, 0, 1, 0, 1])
    seen = []

    class Recorder(torch.nn.Module):
        """Labels x_t by the sign of its first pixel until t = 500, and every x_t 0 after."""

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, t):
            seen.append((x, t))
            by_sign = (x[:, 0, 0, 0] > 0).long()
            return torch.nn.functional.one_hot(torch.where(t < 500, by_sign, 0), 2).float()

    x0[:, 0, 0, 0] = torch.tensor([-0.9, 0.9, -0.8, 0.7, 0.6, -0.5])  # the last two are labelled against their sign
    got = accuracy_by_t(Recorder(), x0, labels, schedule, timesteps=(0, 900), seed=4)
    g = torch.Generator().manual_seed(4)
    for (x, t), step in zip(seen, (0, 900)):
        ab = schedule.alpha_bar[step].float()
        torch.testing.assert_close(x, ab.sqrt() * x0 + (1 - ab).sqrt() * torch.randn(x0.shape, generator=g))
        assert torch.equal(t, torch.full((6,), float(step)))
    assert got == {0: pytest.approx(4 / 6), 900: pytest.approx(3 / 6)}


def test_the_judge_trains_through_the_engine_into_the_cache_folder_once(tmp_path, monkeypatch, capsys):
    from ddpmkit.evaluate.cached_judge import judge_dir, load_judge
    from ddpmkit.evaluate.judge import judge
    from ddpmkit.train.judge import ensure_judge

    cache, work = tmp_path / "cache", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("DDPMKIT_CACHE", str(cache))
    monkeypatch.chdir(work)
    with pytest.raises(FileNotFoundError, match="no judge for digits.*trains one on first use"):
        load_judge("digits")  # evaluation reads the judge, it never trains one
    assert ensure_judge("digits", progress=False, overrides=["train.steps=250", "train.warmup_steps=30"]) == judge_dir("digits")
    net, acc = load_judge("digits")  # 8x8: a short run
    assert "training the judge on digits into" in capsys.readouterr().err
    assert judge_dir("digits") == cache / "judge" / "digits" and (cache / "judge" / "digits" / "config.json").is_file()
    assert acc > 0.9  # 8x8 digits, 30 held out per class
    assert list(work.iterdir()) == []  # nothing in the working directory
    ensure_judge("digits", progress=False)
    again, acc2 = load_judge("digits")
    assert "training" not in capsys.readouterr().err and acc2 == acc
    from ddpmkit.data import load_dataset

    held_out = load_dataset("digits", split="test")
    verdict = judge(again, held_out.x)
    assert verdict.n == len(held_out) and abs(sum(verdict.class_shares) - 1) < 1e-6


def test_the_digit_scorer_gives_the_held_out_digits_their_own_verdict(tmp_path, monkeypatch):
    """The benches' DigitScorer on mnist5k's 500 held-out digits, the set its judge-FD compares with: an FD of 0, the
    judge's own held-out accuracy against their labels, and `judge`'s share at p >= 0.9; mirrored, the FD of their
    features to the held-out digits'. A 40-step judge (68% accurate; 3.4% of the digits at p >= 0.9, 7.8% at 0.8)."""
    from ddpmkit.data import load_dataset
    from ddpmkit.evaluate.cached_judge import load_judge
    from ddpmkit.evaluate.judge import judge
    from ddpmkit.evaluate.report import DigitScorer
    from ddpmkit.train.judge import ensure_judge

    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path))
    ensure_judge("mnist5k", progress=False, overrides=["train.steps=40", "train.warmup_steps=1", "train.log_every=40"])
    net, acc = load_judge("mnist5k")
    held_out = load_dataset("mnist5k", split="test")
    x = held_out.get_batch(torch.arange(len(held_out)))
    scorer = DigitScorer()
    verdict = scorer(x, held_out.labels)
    assert verdict["fd"] == pytest.approx(0, abs=1e-8) and verdict["accuracy"] == pytest.approx(acc, abs=1e-9) and 0.5 < acc < 1
    assert verdict["confident"] == pytest.approx(judge(net, x).confident_fraction, abs=1e-9) and 0 < verdict["confident"] < 0.5
    mirrored = scorer(x.flip(-1))
    want = fid_from_features(scorer.features(x.flip(-1))[0], scorer.features(x)[0])
    assert set(mirrored) == {"fd", "confident"} and mirrored["fd"] == pytest.approx(want, rel=1e-6)


def test_a_copy_is_a_sample_much_nearer_its_nearest_training_image_than_the_second():
    """The ratio test ||x - n1|| / ||x - n2|| < 1/3 on training images 10 e_k (all sqrt(200) apart), with distances
    worked out by hand."""
    from ddpmkit.evaluate.copies import copies

    e = torch.eye(100, dtype=torch.float64)
    train = (10 * e[:20]).reshape(20, 1, 10, 10)
    x = torch.stack([10 * e[3],  # a training image itself: ratio 0
                     10 * e[4] + 2 * e[50],  # 2 / sqrt(204) = 0.140: a copy
                     5 * e[0] + 5 * e[1],  # halfway between two: ratio 1
                     10 * e[7] + 6 * e[50],  # 6 / sqrt(236) = 0.391, not a copy (its squared ratio, 0.153, would be)
                     10 * e[9] + 4.5 * e[50]]).reshape(5, 1, 10, 10)  # 4.5 / sqrt(220.25) = 0.303: a copy
    c = copies(x, train)
    want = torch.tensor([0, 2 / 204 ** 0.5, 1, 6 / 236 ** 0.5, 4.5 / 220.25 ** 0.5], dtype=torch.float64)
    assert torch.allclose(c.ratio.double(), want, atol=1e-6)
    assert c.fraction == pytest.approx(0.6) and c.n == 5
    assert c.nearest[[0, 1, 3, 4]].tolist() == [3, 4, 7, 9] and c.nearest[2].item() in (0, 1)
    assert torch.allclose(c.distance.double(), torch.tensor([0, 2, 50 ** 0.5, 6, 4.5], dtype=torch.float64), atol=1e-6)
    small = copies(x, train, chunk=3)  # the training images in chunks: the same nearest two
    assert torch.equal(small.ratio, c.ratio) and torch.equal(small.nearest[[0, 1, 3, 4]], c.nearest[[0, 1, 3, 4]])
    from ddpmkit.data import ArrayDataset

    read = copies(x, ArrayDataset(train.float()), chunk=7)  # a Dataset (e.g. a folder of images), read 7 at a time
    assert torch.equal(read.ratio, c.ratio) and read.fraction == c.fraction
    with pytest.raises(UserError, match="shape"):
        copies(x.reshape(5, 100), train)
    with pytest.raises(UserError, match="at least 2"):
        copies(x, train[:1])


def test_real_held_out_digits_are_not_copies_and_noisy_training_digits_are():
    from ddpmkit.data import load_dataset
    from ddpmkit.evaluate.copies import copies

    train, held_out = load_dataset("mnist5k", split="train").x, load_dataset("mnist5k", split="test").x
    assert copies(held_out, train).fraction == 0.0  # the 500 held-out digits: the smallest ratio is 0.59
    noisy = train[:300] + 0.01 * torch.randn(300, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert copies(noisy, train).fraction > 0.97
    assert copies((train[:300] + train[300:600]) / 2, train).fraction == 0.0  # two digits' average: equally near both


def test_eval_by_default_runs_the_metrics_that_apply_to_the_samples(tmp_path, capsys):
    """`ddpmkit eval RUN` without --metrics ran bpd,fd,kid,is,copies for every run, so a 2-D toy run ended in "fd/kid/is/copies
    are defined for image data" (and a latent run in "bits/dim of a latent diffusion model..."); the default is now what
    applies, and a metric asked for that does not apply is still refused."""
    from ddpmkit.cli import main
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    toy = train(load_config("toy2d", [f"train.run_dir={tmp_path / 'toy'}", "train.steps=2"]), progress=False)
    assert main(["eval", str(toy), "--n-bpd", "8", "--out", str(tmp_path / "r.json")]) == 0
    assert set(json.loads((tmp_path / "r.json").read_text())["metrics"]) == {"bpd_vlb", "bpd_ode"}
    capsys.readouterr()
    assert main(["eval", str(toy), "--metrics", "fd", "--out", str(tmp_path / "r.json")]) == 2
    assert capsys.readouterr().err.strip().endswith("fd is defined for images; these samples are 2-D points (--metrics bpd: bits/dim)")
    # and the edits, which work on images, say so (a toy run's edits failed in an image's reshaping, interpolate with a traceback)
    for argv in (["img2img", str(toy), "mnist5k:0"], ["interpolate", str(toy), "--seeds", "1,2"]):
        assert main([*argv, "--steps", "2", "--out", str(tmp_path / "e")]) == 2
        assert capsys.readouterr().err.strip() == (f"ddpmkit {argv[0]}: error: {toy} makes 2-D points, not images, and `ddpmkit {argv[0]}` "
                                                   f"edits images; ddpmkit sample {toy} draws the points")


def test_eval_measures_a_distilled_run_in_its_own_few_steps(web_runs, tmp_path, capsys):
    """`ddpmkit eval` of a consistency (or progressive) run drew its samples with 1,000 ancestral steps: not the
    few-step model that was distilled, at hundreds of times the work. It now samples as `ddpmkit sample` does."""
    import ddpmkit
    from ddpmkit.cli import main

    run, report = web_runs / "consistency", tmp_path / "r.json"
    assert main(["eval", str(run), "--metrics", "copies", "--n", "4", "--out", str(report)]) == 0
    sampling = json.loads(report.read_text())["sampling"]
    assert sampling["sampler"] == "consistency" and sampling["nfe"] == ddpmkit.load(run).metrics["sample_steps"] <= 4, sampling
    assert main(["eval", str(run), "--metrics", "copies", "--n", "4", "--sampler", "ddim", "--steps", "3", "--out", str(report)]) == 0
    assert json.loads(report.read_text())["sampling"] | {"seconds": 0} == {**sampling, "sampler": "ddim", "nfe": 3, "seconds": 0}


def test_bits_per_dim_of_a_class_conditional_model_are_those_of_its_unconditional_branch(tmp_path):
    """evaluate_checkpoint's bits/dim of a conditional model run its null label (its docstring's promise): the same
    bound at the same draws with the null label, and not with a class's."""
    from conftest import TINY_DIGITS_RUN
    from ddpmkit.config import load_config
    from ddpmkit.data import dataset_for
    from ddpmkit.evaluate.report import evaluate_checkpoint
    from ddpmkit.models import load_diffusion
    from ddpmkit.train import train

    run = train(load_config("mnist_class", [*TINY_DIGITS_RUN, "train.steps=2", "diffusion.T=20", f"train.run_dir={tmp_path}"]), progress=False)
    m = load_diffusion(run, device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():  # a 2-step run barely reads its label (its zero-initialised layers hide it): every weight moved
        for w in m.network.parameters():
            w += 0.1 * torch.randn_like(w)
    report = evaluate_checkpoint(m, ["bpd_vlb"], n_bpd=3, seed=5)
    x = dataset_for(m.config.data, "test").get_batch(torch.arange(3))

    def bound(y: int) -> float:
        labels = {"y": torch.full((3,), y)}
        return vlb(m.denoiser, x, clip_x0=True, generator=torch.Generator().manual_seed(5), model_kwargs=labels).bits_per_dim.mean().item()

    assert report["metrics"]["bpd_vlb"]["value"] == pytest.approx(bound(m.num_classes), rel=1e-6)  # the null label
    assert abs(bound(3) - bound(m.num_classes)) > 1e-2  # a class's branch is another bound: the test tells them apart


def test_the_copy_test_takes_two_training_images_and_refuses_one():
    """Its ratio needs a nearest and a second-nearest training image: two are enough (read together or one at a time),
    one is refused in one line."""
    from ddpmkit.evaluate.copies import nearest_two

    train, x = torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    for chunk in (4096, 1):
        d, nearest = nearest_two(x, train, chunk)
        assert d.tolist() == [[1.0, pytest.approx(18**0.5, rel=1e-12)]] and nearest.tolist() == [1]
    with pytest.raises(UserError, match="the copy test needs at least 2 training images, got 1"):
        nearest_two(x, train[:1])
