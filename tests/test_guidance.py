"""Guidance wrappers (classifier-free, classifier, autoguidance, rescale, thresholding) over the one
denoiser object, and class-conditional networks."""
import pytest
import torch

import ddpmkit
from ddpmkit.analytic import GaussianMixture, nearest_component
from ddpmkit.guidance import ClassifierFreeGuidance
from ddpmkit.nets import MLPDenoiser, UNet
from ddpmkit.parameterization import Denoiser, from_x0, to_x0_eps
from ddpmkit.schedules import NoiseSchedule

S = NoiseSchedule.from_name("linear", 1000)
MIX = GaussianMixture(torch.tensor([[-1.5, 0.0], [1.5, 0.5], [0.0, -1.5]]), torch.tensor([0.2, 0.3, 0.15]),
                      torch.tensor([0.5, 0.3, 0.2]))
NULL = 3


def D(model, prediction="eps", learned_variance=False) -> Denoiser:
    return Denoiser(model, S, prediction, learned_variance)


def in_parameterization(prediction, eps_model):
    """The same exact model, predicting `prediction` instead of eps."""
    def model(x, t, **kw):
        return from_x0(prediction, to_x0_eps("eps", eps_model(x, t, **kw), x, t, S)[0], x, t, S)
    return model


class Counting:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "unipc", "dpmpp_2m_sde"])
def test_scale_one_is_the_conditional_and_zero_the_unconditional_model(sampler):
    cond = MIX.conditional_eps_model(S)
    y = torch.tensor([0, 1, 2, 1, 0, 2])
    kw = dict(sampler=sampler, steps=15, generator=4)
    for scale, reference in ((1.0, dict(model=cond, model_kwargs={"y": y})),
                             (0.0, dict(model=MIX.eps_model(S), model_kwargs=None))):
        counted = Counting(cond)
        guided = ddpmkit.sample(ClassifierFreeGuidance(D(counted), scale, NULL), (6, 2), model_kwargs={"y": y}, **kw)
        plain = ddpmkit.sample(reference["model"], (6, 2), S, model_kwargs=reference["model_kwargs"], **kw)
        assert torch.allclose(guided.x, plain.x, atol=1e-6)
        assert counted.calls == guided.nfe  # both branches in one batched call


def test_guidance_is_linear_in_the_scale():
    cond = MIX.conditional_eps_model(S)
    x, t, y = torch.randn(5, 2), torch.full((5,), 300.0), torch.tensor([0, 1, 2, 0, 1])
    e_c, e_u = cond(x, t, y), cond(x, t, torch.full((5,), NULL))
    assert torch.allclose(ClassifierFreeGuidance(D(cond), 3.0, NULL)(x, t, y=y).eps, e_u + 3.0 * (e_c - e_u), atol=1e-6)


def test_large_scale_concentrates_samples_on_the_requested_class():
    cond = MIX.conditional_eps_model(S)
    y = torch.full((400,), 2)
    out = ddpmkit.sample(ClassifierFreeGuidance(D(cond), 3.0, NULL), (400, 2), sampler="dpmpp_2m_sde", steps=30,
                         generator=torch.Generator().manual_seed(0), model_kwargs={"y": y})
    assert (nearest_component(MIX, out.x) == 2).float().mean() > 0.99


def test_learned_variance_channels_are_not_guided():
    def model(x, t, y):
        return torch.cat([x * (y[:, None].float() + 1), y[:, None].float().expand_as(x)], dim=1)

    x, t, y = torch.randn(4, 2), torch.zeros(4), torch.tensor([0, 1, 2, 1])
    out = ClassifierFreeGuidance(D(model, learned_variance=True), 2.0, NULL)(x, t, y=y)
    assert torch.allclose(out.var_frac, (y[:, None].float().expand(4, 2) + 1) / 2)  # the conditional branch's


@pytest.mark.parametrize("net", [UNet(1, image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,),
                                      num_classes=10, dropout=0.0),
                                 MLPDenoiser(2, hidden=32, num_layers=2, num_classes=10)])
def test_class_conditional_networks(net):
    torch.manual_seed(0)
    for p in net.parameters():  # the UNet's output layer starts at zero; give it weights
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 1, 8, 8) if isinstance(net, UNet) else torch.randn(3, 2)
    t = torch.full((3,), 10.0)
    a, b = net(x, t, y=torch.tensor([1, 1, 1])), net(x, t, y=torch.tensor([2, 2, 2]))
    assert not torch.allclose(a, b)
    assert torch.equal(net(x, t), net(x, t, y=torch.full((3,), 10)))  # None is the null label
    with pytest.raises(ValueError, match="class labels"):
        net(x, t, y=torch.tensor([11, 0, 0]))


# ---- classifier guidance, guidance rescale, dynamic thresholding


def test_classifier_guidance_at_scale_one_with_the_exact_classifier_is_the_conditional_model():
    from ddpmkit.guidance import ClassifierGuidance

    cond = MIX.conditional_eps_model(S)
    cg = ClassifierGuidance(D(MIX.eps_model(S)), MIX.noisy_classifier(S), 1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, generator=g, dtype=torch.float64)
    t, y = torch.tensor([10., 100., 300., 500., 700., 900., 999., 50., 400.]), torch.tensor([0, 1, 2] * 3)
    assert torch.allclose(cg(x, t, y=y).eps, cond(x, t, y), atol=1e-9)
    # scale 2 moves twice as far from the unconditional model
    cg2 = ClassifierGuidance(D(MIX.eps_model(S)), MIX.noisy_classifier(S), 2.0)
    uncond = MIX.eps_model(S)(x, t)
    assert torch.allclose(cg2(x, t, y=y).eps - uncond, 2 * (cond(x, t, y) - uncond), atol=1e-9)


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_classifier_guidance_of_any_parameterization_is_the_conditional_model(prediction):
    from ddpmkit.guidance import ClassifierGuidance

    x, t, y = torch.randn(6, 2, dtype=torch.float64), torch.tensor([20., 200., 400., 600., 800., 950.]), torch.tensor([2, 1, 0, 0, 1, 2])
    guided = ClassifierGuidance(D(in_parameterization(prediction, MIX.eps_model(S)), prediction), MIX.noisy_classifier(S), 1.0)(x, t, y=y)
    cond = MIX.conditional_eps_model(S)(x, t, y)
    assert torch.allclose(guided.eps, cond, atol=1e-8)
    assert torch.allclose(guided.x0, to_x0_eps("eps", cond, x, t, S)[0], atol=1e-8)


def test_classifier_guidance_algorithm_1_mean_shift_samples_the_requested_class():
    """Ancestral sampling with mean + Sigma * grad log p(y | x_t) (Dhariwal & Nichol Algorithm 1) from
    the exact unconditional model and classifier reproduces the requested component: its share and spread."""
    from ddpmkit.guidance import ClassifierGuidance

    cg = ClassifierGuidance(D(MIX.eps_model(S)), MIX.noisy_classifier(S), 1.0)
    y = torch.full((400,), 2)
    out = ddpmkit.sample(cg.unguided, (400, 2), sampler="ddpm", generator=0, model_kwargs={"y": y}, cond_fn=cg.cond_fn)
    assert (nearest_component(MIX, out.x) == 2).float().mean() > 0.98
    spread = (out.x.double() - MIX.means[2]).std(0)
    assert torch.allclose(spread, MIX.stds[2].expand(2), rtol=0.15)


def test_guidance_rescale_matches_the_conditional_std_of_x0():
    cond = MIX.conditional_eps_model(S)
    x, t, y = torch.randn(5, 2, dtype=torch.float64) * 3, torch.full((5,), 600.0), torch.tensor([0, 1, 2, 0, 1])
    plain = ClassifierFreeGuidance(D(cond), 4.0, NULL)(x, t, y=y)
    assert torch.allclose(ClassifierFreeGuidance(D(cond), 4.0, NULL, rescale=0.0)(x, t, y=y).x0, plain.x0)
    full = ClassifierFreeGuidance(D(cond), 4.0, NULL, rescale=1.0)(x, t, y=y)
    x0_cond = to_x0_eps("eps", cond(x, t, y), x, t, S)[0]
    assert torch.allclose(full.x0.std(1), x0_cond.std(1), rtol=1e-9)
    assert torch.allclose(full.x0 / plain.x0, (x0_cond.std(1) / plain.x0.std(1))[:, None].expand(5, 2), rtol=1e-9)  # same direction
    half = ClassifierFreeGuidance(D(cond), 4.0, NULL, rescale=0.5)(x, t, y=y)
    assert torch.allclose(half.x0, 0.5 * full.x0 + 0.5 * plain.x0, atol=1e-9)
    assert torch.allclose(half.eps, to_x0_eps("x0", half.x0, x, t, S)[1], atol=1e-9)  # eps follows the rescaled x0


def test_dynamic_thresholding():
    from ddpmkit.guidance import DynamicThresholding

    x0 = torch.tensor([[0.5, -0.2, 0.9, 0.1], [3.0, -1.0, 0.5, 2.0]], dtype=torch.float64)
    x_t, t = torch.randn(2, 4, dtype=torch.float64), torch.full((2,), 500.0)
    out = DynamicThresholding(D(lambda x, t: x0, "x0"), percentile=0.75)(x_t, t)
    assert torch.equal(out.x0[0], x0[0])  # inside [-1, 1]: s = max(quantile, 1) = 1 leaves it alone
    s = torch.quantile(x0[1].abs(), 0.75)  # 2.25
    assert torch.allclose(out.x0[1], x0[1].clamp(-s, s) / s)
    assert out.x0.abs().max() <= 1.0
    assert torch.allclose(out.eps, to_x0_eps("x0", out.x0, x_t, t, S)[1])  # eps of the thresholded x0


@pytest.mark.parametrize("wrap", ["threshold", "rescale"])
def test_x0_wrappers_act_on_x0_whatever_the_model_predicts(wrap):
    """The same exact model predicting eps, x0 or v: thresholding and guidance rescale give the same x0 and eps
    (a wrapper told the wrong parameterization would threshold eps as if it were x0)."""
    from ddpmkit.guidance import DynamicThresholding

    cond = MIX.conditional_eps_model(S)
    x, y = torch.randn(6, 2, dtype=torch.float64) * 2, torch.tensor([0, 1, 2, 2, 1, 0])
    t = torch.tensor([50., 200., 400., 600., 800., 990.], dtype=torch.float64)
    outs = {}
    for prediction in ("eps", "x0", "v"):
        d = D(in_parameterization(prediction, cond), prediction)
        wrapped = DynamicThresholding(d, percentile=0.6) if wrap == "threshold" else ClassifierFreeGuidance(d, 5.0, NULL, rescale=0.7)
        outs[prediction] = wrapped(x, t, y=y)
    for prediction in ("x0", "v"):
        assert torch.allclose(outs[prediction].x0, outs["eps"].x0, atol=1e-8)
        assert torch.allclose(outs[prediction].eps, outs["eps"].eps, atol=1e-8)
    plain = D(cond)(x, t, y=y)
    assert not torch.allclose(outs["eps"].x0, plain.x0)  # the wrapper did change x0 here


def test_wrappers_take_a_denoiser_and_know_its_schedule():
    from ddpmkit.guidance import DynamicThresholding

    with pytest.raises(TypeError, match="wraps a Denoiser"):
        DynamicThresholding(lambda x, t: x, percentile=0.9)
    d = ClassifierFreeGuidance(D(MIX.conditional_eps_model(S), "eps"), 2.0, NULL)
    assert d.schedule is S and d.prediction == "eps"
    with pytest.raises(ValueError, match="carries its own schedule"):
        ddpmkit.sample(d, (2, 2), S, prediction="x0", model_kwargs={"y": torch.tensor([0, 1])})


def test_classifier_free_guidance_with_a_text_like_condition():
    """Any condition dict: the null entry is broadcast over the batch, other entries go to both branches."""
    def model(x, t, context, context_mask, extra):
        return x * context.sum((1, 2))[:, None] + extra[:, None]

    x, t = torch.randn(3, 2), torch.zeros(3)
    ctx = {"context": torch.randn(3, 4, 5), "context_mask": torch.ones(3, 4, dtype=torch.bool)}
    null = {"context": torch.zeros(1, 4, 5), "context_mask": torch.ones(1, 4, dtype=torch.bool)}
    extra = torch.tensor([1.0, 2.0, 3.0])
    out = ClassifierFreeGuidance(D(model), 2.5, null=null)(x, t, extra=extra, **ctx)
    e_c, e_u = model(x, t, extra=extra, **ctx), model(x, t, null["context"].expand(3, 4, 5), ctx["context_mask"], extra)
    assert torch.allclose(out.eps, e_u + 2.5 * (e_c - e_u), atol=1e-5)
    # a condition given once, with a batch axis of 1, is the same condition for every row
    one = {"context": ctx["context"][:1], "context_mask": ctx["context_mask"][:1]}
    once = ClassifierFreeGuidance(D(model), 2.5, null=null)(x, t, extra=extra, **one)
    rows = {key: value.expand(3, *value.shape[1:]) for key, value in one.items()}
    assert torch.equal(once.eps, ClassifierFreeGuidance(D(model), 2.5, null=null)(x, t, extra=extra, **rows).eps)
    with pytest.raises(ValueError, match="needs the condition"):
        ClassifierFreeGuidance(D(model), 2.5, null=null)(x, t, extra=extra)


WIDE = GaussianMixture(MIX.means, MIX.stds * 2.5, MIX.weights)  # a "bad" model of MIX: right modes, blurred


def test_autoguidance_is_bad_plus_w_times_good_minus_bad_in_every_parameterization():
    from ddpmkit.guidance import Autoguidance

    good, bad = MIX.eps_model(S), WIDE.eps_model(S)
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.full((6,), 250.0)
    e_g, e_b = good(x, t), bad(x, t)
    assert torch.allclose(Autoguidance(D(good), D(bad), 2.5)(x, t).eps, e_b + 2.5 * (e_g - e_b), atol=1e-12)
    assert torch.allclose(Autoguidance(D(good), D(bad), 0.0)(x, t).eps, e_b, atol=1e-12)
    # guiding x0-predictions is the same guidance: affine maps commute with the combination
    guided_x0 = Autoguidance(D(in_parameterization("x0", good), "x0"), D(in_parameterization("x0", bad), "x0"), 2.5)(x, t)
    assert torch.allclose(guided_x0.eps, e_b + 2.5 * (e_g - e_b), atol=1e-9)
    # scale 1: the good model alone, without calling the bad one; the request counts its networks the same way
    from ddpmkit.pipelines.guided import GuidanceRequest

    for w, networks in ((1.0, 1), (2.5, 2)):
        counted = Counting(bad)
        Autoguidance(D(good), D(counted), w)(x, t)
        assert 1 + counted.calls == networks == GuidanceRequest(autoguide="RUN/ckpt-0000250", autoguide_scale=w).autoguided_networks
    assert torch.equal(Autoguidance(D(good), D(Counting(bad)), 1.0)(x, t).eps, e_g)
    assert GuidanceRequest().autoguided_networks == 1
    for w in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            Autoguidance(D(good), D(bad), w)
    with pytest.raises(ValueError, match="same schedule"):
        Autoguidance(D(good), Denoiser(bad, NoiseSchedule.from_name("cosine", 1000)), 2.0)


def test_autoguidance_guides_only_the_mean_channels():
    from ddpmkit.guidance import Autoguidance

    x, t = torch.randn(4, 2), torch.zeros(4)
    good = lambda x_t, tt: torch.cat([x_t, torch.full_like(x_t, 7.0)], dim=1)  # noqa: E731
    bad = lambda x_t, tt: torch.cat([2 * x_t, torch.full_like(x_t, -3.0)], dim=1)  # noqa: E731
    out = Autoguidance(D(good, learned_variance=True), D(bad, learned_variance=True), 3.0)(x, t)
    assert torch.allclose(out.eps, 2 * x + 3.0 * (x - 2 * x)) and torch.equal(out.var_frac, torch.full_like(x, 4.0))  # (7 + 1) / 2


def _spread(x: torch.Tensor) -> float:
    """Mean distance of samples to their nearest mode, in units of that mode's std."""
    k = nearest_component(MIX, x)
    return ((x - MIX.means[k]).norm(dim=1) / MIX.stds[k]).mean().item()


def test_autoguidance_by_a_blurred_model_pulls_samples_onto_the_modes():
    """w > 1 moves away from what the bad model believes (mass between the modes), w < 1 toward it."""
    from ddpmkit.guidance import Autoguidance

    spreads = {}
    for w in (0.5, 1.0, 2.0):
        model = Autoguidance(D(MIX.eps_model(S)), D(WIDE.eps_model(S)), w)
        out = ddpmkit.sample(model, (600, 2), sampler="ddim", steps=100, generator=torch.Generator().manual_seed(0))
        spreads[w] = _spread(out.x)
    # the exact denoiser alone reproduces the data's spread: E|z| = sqrt(pi / 2) for a 2-D standard normal z
    assert abs(spreads[1.0] - (torch.pi / 2) ** 0.5) < 0.05
    assert spreads[2.0] < 0.85 * spreads[1.0] < 0.85 * 0.85 * spreads[0.5], spreads


def test_autoguidance_through_the_guidance_door(web_runs):
    from ddpmkit.models import load_diffusion
    from ddpmkit.pipelines import generate
    from ddpmkit.pipelines.guided import GuidanceRequest

    m = load_diffusion(web_runs / "uncond")
    plain = generate(m, 3, sampler="ddim", steps=4, progress=False).images
    for w in (1.0, 2.0):  # the same model as its own bad model: bad + w (good - bad) = good
        request = GuidanceRequest(autoguide=str(web_runs / "uncond"), autoguide_scale=w)
        assert torch.allclose(generate(m, 3, request, sampler="ddim", steps=4, progress=False).images, plain, atol=1e-6)
    with pytest.raises(ValueError, match="weaker model of the same kind.*conditioning none vs class"):
        generate(m, 3, GuidanceRequest(autoguide=str(web_runs / "class")), sampler="ddim", steps=4, progress=False)
    for s in (0.0, 1.0):  # the unguided model itself, which cascades ask of their unconditional stages
        assert torch.equal(generate(m, 3, GuidanceRequest(scale=s), sampler="ddim", steps=4, progress=False).images, plain)
    with pytest.raises(ValueError, match=r"classifier-free guidance \(scale 3\) needs a class- or text-conditional model; this one is unc"):
        generate(m, 3, GuidanceRequest(scale=3.0), sampler="ddim", steps=4, progress=False)  # was ignored without a word
    c = load_diffusion(web_runs / "class")
    with pytest.raises(ValueError, match="autoguidance guides one branch"):
        generate(c, 3, GuidanceRequest(autoguide=str(web_runs / "class"), scale=3.0), sampler="ddim", steps=4, progress=False)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_guidance_scales_must_be_finite(scale):
    """A NaN or infinite scale would sample NaN silently (or ignore the scale): one clear error instead."""
    from ddpmkit.guidance import ClassifierFreeGuidance, ClassifierGuidance

    model = D(lambda x_t, tt, **kw: x_t)
    with pytest.raises(ValueError, match="classifier-free guidance scale must be a finite number"):
        ClassifierFreeGuidance(model, scale, null_label=3)
    with pytest.raises(ValueError, match="ClassifierGuidance scale must be a finite number"):
        ClassifierGuidance(model, lambda x_t, tt: x_t, scale)
    assert ClassifierFreeGuidance(model, 0.0, null_label=3).scale == 0.0  # 0 = unconditional stays valid
