"""Conditional training end to end: label dropout, text encoders and captions, cross-attention,
the noisy classifier, and the command line's --class / --prompt / --classifier."""
import os

import numpy as np
import pytest
import torch

import ddpmkit
from conftest import needs_text
from ddpmkit.analytic import GaussianMixture, nearest_component
from ddpmkit.captions import PARAPHRASES, TRAIN_TEMPLATES, digit_captions, read_caption_files
from ddpmkit.cli import main
from ddpmkit.conditioning import ConditioningError, TrainingConditions, listed_classes, prompt_encoder
from ddpmkit.config import PRESET_DIR, load_config
from ddpmkit.data import ArrayDataset, DataError, load_digits
from ddpmkit.guidance import ClassifierFreeGuidance
from ddpmkit.models import load_diffusion
from ddpmkit.nets import UNet
from ddpmkit.train import train

TINY_DIGITS = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=4",
               "train.batch_size=16", "train.sample_every=0", "train.warmup_steps=5", "train.log_every=5",
               "train.checkpoint_every=0"]


def test_label_dropout_replaces_a_share_of_labels_by_the_null_label():
    labels = torch.arange(20000) % 7
    cond = TrainingConditions("class", 0.2, labels=labels, null_label=7)
    idx = torch.randperm(20000, generator=torch.Generator().manual_seed(0))
    y = cond.batch(idx, torch.Generator().manual_seed(1))["y"]
    dropped = y == 7
    assert abs(dropped.float().mean().item() - 0.2) < 4 * (0.2 * 0.8 / 20000) ** 0.5
    assert torch.equal(y[~dropped], labels[idx][~dropped])  # the rest keep their own label


def test_listed_classes_names_the_first_and_the_last():
    assert listed_classes(("cat", "dog")) == "0 cat, 1 dog"
    names = tuple(f"c{i}" for i in range(30))
    assert listed_classes(names, most=3) == "0 c0, 1 c1, 2 c2, ... 29 c29"


def test_conditioning_needs_labels(tmp_path):
    cfg = load_config(PRESET_DIR / "toy2d.toml", ["data.name=swiss_roll", "network.num_classes=3"])
    with pytest.raises(ConditioningError, match="has no labels"):
        TrainingConditions.for_config(cfg, ArrayDataset(torch.zeros(4, 2)))
    with pytest.raises(ConditioningError, match="num_classes = 3"):
        TrainingConditions.for_config(cfg, ArrayDataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 3])))  # 3 is one past 0..2
    assert TrainingConditions.for_config(cfg, ArrayDataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 2]))).null_label == 3


@pytest.mark.slow
def test_class_conditional_toy_with_guidance_draws_the_requested_mode(tmp_path):
    """8 Gaussians with the component as label: one network, trained with label dropout, samples the
    requested mode when guided and every mode when unconditional (null label)."""
    cfg = load_config(PRESET_DIR / "toy2d.toml", [f"train.run_dir={tmp_path}", "network.num_classes=8", "train.steps=250",
                                                  "train.cond_drop_prob=0.2"])
    train(cfg, progress=False)
    m = load_diffusion(tmp_path)
    gm = GaussianMixture.ring(8, radius=2.0, std=0.1)
    y = torch.arange(800) % 8
    guided = ddpmkit.sample(ClassifierFreeGuidance(m.denoiser, 3.0, null_label=8), (800, 2), sampler="dpmpp_2m_sde",
                            steps=20, generator=0, model_kwargs={"y": y})
    assert (nearest_component(gm, guided.x) == y).float().mean() > 0.97
    uncond = ddpmkit.sample(m.network, (800, 2), m.schedule, sampler="dpmpp_2m_sde", steps=20, generator=0)
    shares = torch.bincount(nearest_component(gm, uncond.x), minlength=8) / 800.0
    assert bool((shares > 0.06).all()), shares


def test_digit_captions_and_held_out_paraphrases():
    caps = digit_captions()
    assert len(caps) == 10 and all(len(row) == len(TRAIN_TEMPLATES) for row in caps)
    assert "a handwritten seven" in caps[7] and "the number 7, drawn thick" in caps[7]
    assert not set(PARAPHRASES) & set(TRAIN_TEMPLATES)


@needs_text
def test_each_digit_is_captioned_by_its_own_digits_captions():
    """A text model of digits learns digit d from d's captions only: every caption a batch draws for an example is
    one of its label's (all of its label's K, over many batches)."""
    cfg = load_config("mnist_text", ["data.name=digits", "train.cond_drop_prob=0"])
    data = load_digits()
    conditions = TrainingConditions.for_config(cfg, data)
    # each caption's encoding, fingerprinted by two random projections: (10, K, 2)
    project = torch.randn(cfg.network.text_max_tokens * cfg.network.context_dim, 2, generator=torch.Generator().manual_seed(0))
    own = torch.stack([prompt_encoder(cfg).encode(row)["context"].flatten(1) @ project for row in digit_captions()])
    idx = torch.arange(0, len(data), 3)
    seen = torch.zeros(len(idx), len(TRAIN_TEMPLATES), dtype=torch.bool)
    for seed in range(40):
        context = conditions.batch(idx, torch.Generator().manual_seed(seed))["context"].flatten(1) @ project  # (B, 2)
        match = (own[data.labels[idx].long()] - context[:, None]).abs().amax(2) < 1e-4  # (B, K)
        assert match.any(1).all(), idx[~match.any(1)]
        seen |= match
    assert seen.float().mean() > 0.9


def test_caption_files_next_to_images(tmp_path):
    (tmp_path / "a.png").touch(), (tmp_path / "b.png").touch()
    (tmp_path / "a.txt").write_text("a red circle\n")
    with pytest.raises(DataError, match="no caption file"):
        read_caption_files([tmp_path / "a.png", tmp_path / "b.png"])
    (tmp_path / "b.txt").write_text("")
    assert read_caption_files([tmp_path / "a.png", tmp_path / "b.png"]) == ["a red circle", ""]
    # a Windows editor's UTF-8 with a byte-order mark is the same caption; another encoding is one clear line
    (tmp_path / "a.txt").write_text("a caf\u00e9 sign", encoding="utf-8-sig")
    assert read_caption_files([tmp_path / "a.png"]) == ["a caf\u00e9 sign"]
    (tmp_path / "b.txt").write_text("a caf\u00e9 sign", encoding="cp1252")
    with pytest.raises(DataError, match=r".*b.txt is not UTF-8 text \(byte 0xe9 at 5\); save it as UTF-8"):
        read_caption_files([tmp_path / "a.png", tmp_path / "b.png"])


@pytest.fixture(scope="module")
def encoder():
    from ddpmkit.text import TextEncoder

    return TextEncoder("all-MiniLM-L6-v2", max_tokens=12)


@needs_text
def test_text_encoder_pads_masks_and_does_not_depend_on_the_batch(encoder):
    out = encoder.encode(["a handwritten seven", "", "a very long prompt " * 10])
    assert out["context"].shape == (3, 12, encoder.dim) and encoder.dim == 384
    assert out["context_mask"].sum(1).tolist() == [6, 2, 12]  # [CLS] tokens [SEP]; cut at 12
    assert (out["context"][0, 6:] == 0).all()
    alone = encoder.encode("a handwritten seven")
    assert torch.allclose(alone["context"][0], out["context"][0], atol=1e-5)


@needs_text
def test_the_bundled_encoders_embeddings_are_cached_on_disk_and_equal_the_encoders(tmp_path, monkeypatch):
    """A second process (a fresh TextEncoder) whose prompts are cached never loads sentence-transformers, and gets
    the very tensors the encoder computes."""
    from ddpmkit.text import TextEncoder

    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path))
    prompts = ["a handwritten seven", "", "a handwritten one"]
    first = TextEncoder("all-MiniLM-L6-v2", max_tokens=10)
    computed = first._encode(prompts, 256)
    cached_once = first.encode(prompts)
    again = TextEncoder("all-MiniLM-L6-v2", max_tokens=10)
    from_disk = again.encode(list(reversed(prompts)))
    assert "model" not in again.__dict__ and again.dim == 384  # nothing loaded
    for key in ("context", "context_mask"):
        assert torch.equal(cached_once[key], computed[key]) and torch.equal(from_disk[key], computed[key].flip(0))
    assert list(tmp_path.glob("text/*.safetensors")) and TextEncoder("all-MiniLM-L6-v2", 11).encode("x")["context"].shape == (1, 11, 384)


@needs_text
def test_an_encoder_from_a_folder_is_not_cached_and_encodes_in_batches_as_the_bundled_one(encoder, tmp_path, monkeypatch):
    """Any encoder but the bundled one (here the bundled one's weights saved to a folder) has no embedding cache: it
    loads at once and encodes every call, in batches of batch_size, the bundled encoder's tensors."""
    from ddpmkit.text import TextEncoder

    monkeypatch.setenv("DDPMKIT_CACHE", str(tmp_path / "cache"))
    encoder.model.save(str(tmp_path / "minilm"))
    folder = TextEncoder(str(tmp_path / "minilm"), max_tokens=12)
    assert folder.cache_file is None and "model" in folder.__dict__
    prompts = ["a handwritten seven", "", "a very long prompt " * 10]
    want, got = encoder.encode(prompts), folder.encode(prompts, batch_size=2)
    assert not (tmp_path / "cache").exists() and got["context_mask"].sum(1).tolist() == [6, 2, 12]
    assert torch.allclose(got["context"], want["context"], atol=1e-5) and torch.equal(got["context_mask"], want["context_mask"])


@needs_text
def test_the_bundled_encoder_loads_from_its_package_with_the_hub_offline(monkeypatch):
    """The bundled weights are a local folder; loading them also turns the hub off for the process (a run must never
    wait on the network), unless the user set HF_HUB_OFFLINE themselves."""
    from ddpmkit import text

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = text._load.__wrapped__("all-MiniLM-L6-v2", "cpu")  # not the cached load: this one runs
    assert os.environ["HF_HUB_OFFLINE"] == "1" and model.get_sentence_embedding_dimension() == 384
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    text._load.__wrapped__("all-MiniLM-L6-v2", "cpu")
    assert os.environ["HF_HUB_OFFLINE"] == "0"


@needs_text
def test_unknown_text_encoder_is_one_clear_error():
    from ddpmkit.text import TextEncoder, TextEncoderError

    with pytest.raises(TextEncoderError, match="all-MiniLM-L6-v2"):
        TextEncoder("/nonexistent/encoder")


def test_cross_attention_unet_ignores_padding_and_listens_to_the_prompt():
    torch.manual_seed(0)
    net = UNet(1, image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,), context_dim=6, dropout=0.0)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    net.double()  # float64: masked-out tokens must change nothing, not just little
    x, t = torch.randn(2, 1, 8, 8, dtype=torch.float64), torch.full((2,), 10.0)
    ctx, mask = torch.randn(2, 5, 6, dtype=torch.float64), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = net(x, t, context=ctx, context_mask=mask)
    changed = ctx.clone()
    changed[0, 3:] = 100.0  # padding positions of example 0
    assert (net(x, t, context=changed, context_mask=mask) - out).abs().max() < 1e-12
    changed[0, 1] = -ctx[0, 1] * 5  # a real token
    assert (net(x, t, context=changed, context_mask=mask)[0] - out[0]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="text-conditional"):
        net(x, t)


@pytest.fixture(scope="module")
def tiny_text_run(tmp_path_factory):
    """A text-conditional UNet on the 8x8 digits, trained for a few steps."""
    pytest.importorskip("sentence_transformers")
    run = tmp_path_factory.mktemp("text") / "run"
    overrides = [*TINY_DIGITS, f"train.run_dir={run}", "train.steps=6", "network.text_encoder=all-MiniLM-L6-v2",
                 "network.text_max_tokens=8"]
    cfg = load_config(PRESET_DIR / "mnist.toml", overrides)
    cond = TrainingConditions.for_config(cfg, ddpmkit.data.load_dataset("digits"))
    kw = cond.batch(torch.arange(64), torch.Generator().manual_seed(0))
    assert kw["context"].shape == (64, 8, 384) and kw["context_mask"].shape == (64, 8)
    train(cfg, progress=False)
    return run


@needs_text
def test_text_conditional_training_on_digits_and_prompted_sampling(tiny_text_run, tmp_path, capsys):
    run, out = tiny_text_run, tmp_path / "samples"
    code = main(["sample", str(run), "--n", "4", "--steps", "5", "--sampler", "ddim", "--prompt", "a handwritten three",
                 "--guidance", "4", "--no-gif", "--out", str(out)])
    assert code == 0 and (out / "grid.png").is_file()
    assert "guidance 4" in capsys.readouterr().out
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--no-gif", "--out", str(out), "--class", "3"]) == 2
    assert "--class needs" in capsys.readouterr().err
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--no-gif", "--out", str(out)]) == 2
    assert "give --prompt" in capsys.readouterr().err


@needs_text
def test_voyage_renders_the_same_gif_bytes_twice(tiny_text_run, tmp_path, capsys):
    keyframes = tmp_path / "keys.py"
    keyframes.write_text("seed_and_prompt_sequence = [\n" + "".join(
        f"  {seed}, 'a handwritten {word}',\n" for seed, word in zip([3764, 1537, 6573, 1791, 9973, 736],
                                                                     ["one", "two", "three", "four", "five", "six"])) + "]\n")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        code = main(["voyage", str(keyframes), "--model", str(tiny_text_run), "--frames", "3", "--steps", "3",
                     "--out", str(out)])
        assert code == 0, capsys.readouterr().err
    gifs = [(out / "voyage.gif").read_bytes() for out in outs]
    assert gifs[0] == gifs[1]
    from PIL import Image

    with Image.open(outs[0] / "voyage.gif") as im:
        assert im.n_frames == 5 * 3 + 1  # 6 keyframes, 3 frames per segment, and the last keyframe
    code = main(["interpolate", str(tiny_text_run), "--prompts", "a handwritten one", "a handwritten two", "--n", "4",
                 "--steps", "3", "--out", str(tmp_path / "prompts")])
    assert code == 0 and (tmp_path / "prompts" / "interpolate_prompts.png").is_file()
    from ddpmkit.pipelines.edit import interpolation_prompts
    from ddpmkit.viz import make_grid

    frames = interpolation_prompts(load_diffusion(tiny_text_run), "a handwritten one", "a handwritten two", 4, steps=3)  # seed 0, ddim
    with Image.open(tmp_path / "prompts" / "interpolate_prompts.png") as im:  # the library's frames, first prompt first
        assert (np.asarray(im) == make_grid(frames, nrow=4, upscale=2)[..., 0]).all()
    # a stochastic sampler draws the same noise for every frame (between a keyframe and itself every frame is one
    # sample; noise per frame flickered), and its options reach it (eta 0 is Euler's ODE)
    from ddpmkit.pipelines.voyage import render_voyage

    m, still = load_diffusion(tiny_text_run), [(3, "a handwritten one"), (3, "a handwritten one")]
    frames = render_voyage(m, still, frames_between=3, sampler="euler_ancestral", steps=3, progress=False)
    assert torch.allclose(frames, frames[:1].expand_as(frames), atol=1e-5)  # slerp(a, a, w) is a to round-off; per-frame noise: 0.6 apart
    ode = render_voyage(m, still, frames_between=1, sampler="euler_ancestral", steps=3, progress=False, options={"eta": 0.0})
    assert torch.equal(ode, render_voyage(m, still, frames_between=1, sampler="euler", steps=3, progress=False))
    assert not torch.allclose(ode[0], frames[0])


def test_noisy_classifier_and_classifier_guidance_from_the_command_line(tmp_path, capsys):
    clf_run, model_run = tmp_path / "clf", tmp_path / "model"
    code = main(["train-classifier", str(PRESET_DIR / "mnist_classifier.toml"), "data.name=digits", "network.base_channels=8",
                 "network.channel_mult=1,2", "network.attention_resolutions=4", "train.steps=30", "train.batch_size=32",
                 "train.warmup_steps=5", f"train.run_dir={clf_run}", "--quiet"])
    assert code == 0, capsys.readouterr().err
    from ddpmkit.models import load_classifier

    clf = load_classifier(clf_run)
    assert set(clf.metrics) == {f"accuracy_t{t}" for t in (0, 250, 500, 750, 900)}
    assert clf.network(torch.randn(3, 1, 8, 8), torch.full((3,), 5.0)).shape == (3, 10)
    cfg = load_config(PRESET_DIR / "mnist.toml", [*TINY_DIGITS, f"train.run_dir={model_run}", "train.steps=4"])
    train(cfg, progress=False)
    for sampler in ("ddpm", "ddim"):  # Algorithm 1 and Algorithm 2
        out = tmp_path / sampler
        code = main(["sample", str(model_run), "--n", "3", "--steps", "4", "--sampler", sampler, "--classifier", str(clf_run),
                     "--class", "0,9", "--classifier-scale", "2", "--no-gif", "--out", str(out)])  # its first and last
        assert code == 0, capsys.readouterr().err
        assert torch.load(out / "samples.pt").isfinite().all()
    code = main(["sample", str(model_run), "--n", "2", "--steps", "2", "--classifier", str(tmp_path / "nothing"), "--class", "1",
                 "--no-gif", "--out", str(tmp_path / "x")])
    assert code == 2 and "no checkpoint at" in capsys.readouterr().err
    code = main(["sample", str(model_run), "--n", "2", "--steps", "2", "--classifier", str(model_run), "--class", "1",
                 "--no-gif", "--out", str(tmp_path / "x")])
    assert code == 2 and "holds a denoiser" in capsys.readouterr().err
    # a class the classifier has not, and a classifier of another image size: index and shape errors deep in the guidance
    # (a traceback), or guidance of 28x28 digits by an 8x8 classifier without a word
    code = main(["sample", str(model_run), "--n", "2", "--steps", "2", "--classifier", str(clf_run), "--class", "10", "--out", str(tmp_path / "x")])
    assert code == 2 and f"--class must lie in 0..9, the classes of the classifier at {clf_run}/ckpt-" in capsys.readouterr().err
    big = train(load_config(PRESET_DIR / "mnist.toml", [*TINY_DIGITS, "data.resize=4", f"train.run_dir={tmp_path / 'big'}", "train.steps=1"]),
                progress=False)
    code = main(["sample", str(big), "--n", "2", "--steps", "2", "--classifier", str(clf_run), "--class", "1", "--out", str(tmp_path / "x")])
    assert code == 2 and "sees x_t of shape (1, 8, 8); the model's x_t has shape (1, 4, 4)" in capsys.readouterr().err


def test_without_classes_every_class_of_the_model_or_of_its_classifier_comes_in_turn(tmp_path, capsys):
    """Three classes (an .npz's): a class-conditional model's samples, and an unconditional model's guided by a
    three-class classifier, take 0, 1, 2, 0, ... from the first sample on, in chunks as in one batch (the classifier's
    default was 0..9, which failed past its third class: "`classes` must lie in 0..2")."""
    from ddpmkit.pipelines.guided import GuidanceRequest, guided_model

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "three.npz", x=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8), y=np.arange(24) % 3)
    data = ["data.name=npz", f"data.path={tmp_path / 'three.npz'}", "network.num_classes=3", *TINY_DIGITS[1:]]
    runs = {}
    for name, preset, extra in (("clf", "mnist_classifier", []), ("cond", "mnist", []), ("uncond", "mnist", ["network.num_classes=0"])):
        runs[name] = train(load_config(PRESET_DIR / f"{preset}.toml", [*data, *extra, "train.steps=1", f"train.run_dir={tmp_path / name}"]),
                           progress=False)
    cond, uncond = load_diffusion(runs["cond"]), load_diffusion(runs["uncond"])
    _, kwargs, _ = guided_model(cond, 5, GuidanceRequest(scale=1.0))
    assert kwargs["y"].tolist() == [0, 1, 2, 0, 1]
    _, kwargs, _ = guided_model(cond, 3, GuidanceRequest(scale=1.0).slice(4, 3))  # samples 4..6 of a longer run
    assert kwargs["y"].tolist() == [1, 2, 0]
    _, kwargs, _ = guided_model(uncond, 4, GuidanceRequest(classifier=str(runs["clf"])).slice(2, 4), sampler="ddim")
    assert kwargs["y"].tolist() == [2, 0, 1, 2]
    code = main(["sample", str(runs["uncond"]), "--n", "5", "--batch-size", "2", "--steps", "2", "--sampler", "ddim", "--classifier",
                 str(runs["clf"]), "--no-gif", "--out", str(tmp_path / "guided")])
    assert code == 0, capsys.readouterr().err


def test_the_guidance_door_means_what_it_says_for_every_scale(tiny_text_run):
    """Scale 0 is the unconditional branch alone (the raw network on the empty prompt), 1 the
    conditional model alone, s the CFG mix eps_u + s (eps_c - eps_u); precomputed conditions
    (interpolated prompts) go through the same door."""
    from ddpmkit.parameterization import to_x0_eps
    from ddpmkit.pipelines.guided import GuidanceRequest, guided_model

    m = load_diffusion(tiny_text_run)
    x, t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((3,), 500.0)
    cond, null = m.encode_prompts(["a handwritten one"] * 3), m.null_condition(3)
    with torch.no_grad():
        eps_c, eps_u = m.network(x, t, **cond), m.network(x, t, **null)  # the network's outputs, in its prediction
        x0_of = lambda out: to_x0_eps(m.prediction, out, x, t, m.schedule)[0]  # noqa: E731
        for scale, expected in ((0.0, eps_u), (1.0, eps_c), (2.5, eps_u + 2.5 * (eps_c - eps_u))):
            model, kwargs, _ = guided_model(m, 3, GuidanceRequest(prompts=["a handwritten one"], scale=scale))
            assert torch.allclose(model(x, t, **kwargs).x0, x0_of(expected), atol=1e-5), scale
        model, kwargs, _ = guided_model(m, 3, GuidanceRequest(conditions=cond, scale=0.0))
        assert torch.allclose(model(x, t, **kwargs).x0, x0_of(eps_u), atol=1e-5)  # --guidance 0 means 0, also for interpolate --prompts
        # the empty prompt is the null condition: eps_u + s (eps_u - eps_u) = eps_u, from one network call instead of two
        model, kwargs, _ = guided_model(m, 3, GuidanceRequest(prompts=[""], scale=2.5))
        assert not isinstance(model, ClassifierFreeGuidance) and torch.allclose(model(x, t, **kwargs).x0, x0_of(eps_u), atol=1e-5)
        model, kwargs, _ = guided_model(m, 3, GuidanceRequest(prompts=["", "a handwritten one"], scale=2.5))  # not all null: guided
        prompted = torch.tensor([False, True, False]).view(3, 1, 1, 1)  # the prompts cycle: '', one, ''
        expected = torch.where(prompted, eps_u + 2.5 * (eps_c - eps_u), eps_u)
        assert isinstance(model, ClassifierFreeGuidance) and torch.allclose(model(x, t, **kwargs).x0, x0_of(expected), atol=1e-5)
    with pytest.raises(ValueError, match="class-conditional model"):
        guided_model(m, 3, GuidanceRequest(classes=[1]))
