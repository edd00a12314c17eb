"""What the web page's buttons do, without a browser (web/actions.py, limits.py, shelf.py; no
gradio needed): bounds, the reading of the class/prompt box, the reproducing command, streaming
previews, cancelling, the light lane, edits and interpolations on tiny runs."""
from __future__ import annotations

import os
import shlex
import signal
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import in_a_thread
from ddpmkit.cli import build_parser
from ddpmkit.cli.common import guidance_request, options_from
from ddpmkit.pipelines.edit import interpolation_seeds
from ddpmkit.pipelines.generate import generate
from ddpmkit.pipelines.guided import class_numbers
from ddpmkit.web.actions import Actions, Cancelled, picture
from ddpmkit.web.limits import Limits
from ddpmkit.web.shelf import Shelf, find_runs


@pytest.fixture(scope="module")
def actions(web_runs, tmp_path_factory):
    return Actions(Shelf(find_runs([web_runs])), Limits(max_steps=100, max_images=8), tmp_path_factory.mktemp("work"))


def test_find_runs_lists_diffusion_runs_and_the_shelf_serves_only_those(web_runs, tmp_path):
    assert find_runs([web_runs]) == [str(web_runs / "class"), str(web_runs / "consistency"), str(web_runs / "uncond")]
    assert find_runs([web_runs / "uncond", web_runs]) == [str(web_runs / "uncond"), str(web_runs / "class"), str(web_runs / "consistency")]
    assert find_runs([tmp_path, tmp_path / "missing"]) == []
    shelf = Shelf(find_runs([web_runs]))
    with pytest.raises(ValueError, match=r"unknown run '/etc'; this page serves \["):
        shelf.get("/etc")
    assert shelf.get(str(web_runs / "uncond")) is shelf.get(str(web_runs / "uncond"))  # loaded once


@pytest.mark.parametrize("call, message", [
    (lambda L: L.steps(0), "steps must lie in 1..100, got 0"),
    (lambda L: L.steps(2.5), "steps must be a whole number in 1..100, got 2.5"),
    (lambda L: L.steps(float("inf")), "steps must be a whole number"),
    (lambda L: L.steps(None), "steps must be a whole number"),
    (lambda L: L.images(9), "number of images must lie in 1..8, got 9"),
    (lambda L: L.frames(1), "frames must lie in 2..32"),
    (lambda L: L.seed(-2), "seed must lie in 0..2147483647"),
    (lambda L: L.noise(-0.5, "eta", L.max_eta), "eta must lie in 0..10 (empty = the sampler's default), got -0.5"),
    (lambda L: L.noise(float("nan"), "churn", L.max_churn), "churn must lie in 0..1000 (empty = the sampler's default), got nan"),
    (lambda L: L.noise("lots", "eta", L.max_eta), "eta must be a number in 0..10, or empty for the sampler's default; got 'lots'"),
    (lambda L: L.prompt("x" * 201), "the prompt has 201 characters; at most 200"),
])
def test_limits_name_the_value_and_the_bound(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call(Limits(max_steps=100, max_images=8))


def test_random_seed_and_upload_checks(tmp_path):
    limits = Limits(max_upload_bytes=2000, max_upload_pixels=64 * 64)
    seeds = {limits.seed(-1) for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s <= limits.max_seed for s in seeds) and limits.seed(7) == 7
    small = {Limits(max_seed=1).seed(-1) for _ in range(64)}  # drawn from 0..max_seed, the range a typed seed may take
    assert small == {0, 1} and Limits(max_seed=1).seed(1) == 1
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "ok.png")
    assert limits.upload(tmp_path / "ok.png") == tmp_path / "ok.png"
    # an upload of exactly the bytes and the pixels allowed is taken; one byte or one pixel more is not
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "edge.png")
    edge = (tmp_path / "edge.png").stat().st_size
    assert Limits(max_upload_bytes=edge, max_upload_pixels=64 * 64).upload(tmp_path / "edge.png") == tmp_path / "edge.png"
    with pytest.raises(ValueError, match="MB; at most"):
        Limits(max_upload_bytes=edge - 1).upload(tmp_path / "edge.png")
    with pytest.raises(ValueError, match="64x64 pixels; at most 4095"):
        Limits(max_upload_pixels=64 * 64 - 1).upload(tmp_path / "edge.png")
    Image.fromarray(np.zeros((65, 64), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match="64x65 pixels; at most 4096"):
        limits.upload(tmp_path / "wide.png")
    (tmp_path / "big.png").write_bytes(b"\0" * 3000)
    with pytest.raises(ValueError, match="MB; at most"):
        limits.upload(tmp_path / "big.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        limits.upload(tmp_path / "bad.png")


def test_the_class_or_prompt_box_is_read_as_the_model_takes_it(actions, web_runs):
    cls, unc = actions.shelf.get(str(web_runs / "class")), actions.shelf.get(str(web_runs / "uncond"))
    request, flags = actions.request(cls, " 1, 7 ", 2.5)
    assert request.classes == [1, 7] and request.scale == 2.5 and flags == ["--class", "1,7", "--guidance", "2.5"]
    assert actions.request(cls, "", 3.0)[0].classes == []  # all classes in turn, as the CLI without --class
    with pytest.raises(ValueError, match=r"takes class numbers 0..9 \(e.g. 7 or 0,1,2\), not a prompt: 'a seven'"):
        actions.request(cls, "a seven", 3.0)
    assert actions.request(cls, "0,9", 0.0)[0].classes == [0, 9] and actions.request(cls, "1", 30.0)[0].scale == 30.0  # the ends
    for typed in ("12", "10", "-1"):
        with pytest.raises(ValueError, match=rf"classes \[{typed}\] are not among this model's 0..9"):
            actions.request(cls, typed, 3.0)
    for scale in (31.0, 30.5, -0.5):
        with pytest.raises(ValueError, match="guidance scale must lie in 0..30"):
            actions.request(cls, "1", scale)
    assert actions.request(unc, "", 3.0) == (type(request)(), [])
    with pytest.raises(ValueError, match="this model is unconditional"):
        actions.request(unc, "7", 3.0)
    assert "class-conditional (10 classes)" in actions.describe(str(web_runs / "class"))[0]


def test_the_command_under_the_result_asks_the_cli_for_the_same_thing(actions, web_runs):
    _, s = actions.settings(str(web_runs / "class"), "3,4", "unipc", 12, "karras", 1.5, 42, 5)
    args = build_parser().parse_args(shlex.split(s.command())[1:])
    assert (args.checkpoint, args.n, args.sampler, args.steps, args.seed, args.grid) == (s.run, 5, "unipc", 12, 42, "karras")
    cli = guidance_request(args)  # its classes as typed, read against the model as the sampler reads them
    assert (class_numbers(actions.shelf.get(s.run), cli.classes), cli.prompts, cli.scale) == (s.request.classes, s.request.prompts, s.request.scale)
    assert options_from(args) == {"grid": "karras", "clip_x0": True}
    for sampler, eta, churn, flags in (("euler_ancestral", 0.3, None, "--eta 0.3"), ("edm", None, 12.5, "--churn 12.5"),
                                       ("dpmpp_2m_sde", 1 / 3, None, f"--eta {1 / 3!r}")):  # every digit the sampler used
        boxes = ["" if v is None else str(v) for v in (eta, churn)]  # the page's text boxes: empty is the sampler's default
        _, s = actions.settings(str(web_runs / "uncond"), "", sampler, 6, "default", 0.0, 1, 2, *boxes)
        assert flags in s.command()
        args = build_parser().parse_args(shlex.split(s.command())[1:])
        asked = {k: v for k, v in (("eta", eta), ("churn", churn)) if v is not None}
        assert {k: v for k, v in options_from(args).items() if k in ("eta", "churn")} == asked
    with pytest.raises(ValueError, match=r"unknown grid 'wavy'; choose one of \['default'"):
        actions.settings(str(web_runs / "class"), "", "unipc", 12, "wavy", 1.5, 42, 5)
    with pytest.raises(ValueError, match="unknown sampler 'fast'"):
        actions.settings(str(web_runs / "class"), "", "fast", 12, "default", 1.5, 42, 5)


def test_generate_streams_previews_then_the_result_of_the_library(actions, web_runs):
    m, s = actions.settings(str(web_runs / "uncond"), "", "ddim", 8, "default", 3.0, 5, 3)
    updates = list(actions.generate(s, preview_every_s=0.0))
    steps = [u["progress"] for u in updates if "progress" in u]
    assert steps == [(k, 8) for k in range(1, 9)]  # every step previewed, in order
    final = updates[-1]
    assert final["seed"] == 5 and final["command"] == s.command() and len(final["files"]) == 3
    expected = generate(m, 3, s.request, "ddim", 8, 5, {"clip_x0": True}, progress=False).images
    assert np.array_equal(final["result"], picture(expected, nrow=2))
    assert updates[-2]["x0"].shape == final["result"].shape
    # previews at most every preview_every_s: of a fast run, its first step and its last
    steps = [u["progress"] for u in actions.generate(s, preview_every_s=3600.0) if "progress" in u]
    assert steps == [(1, 8), (8, 8)]


def test_cancel_stops_the_sampler_between_steps(actions, web_runs):
    _, s = actions.settings(str(web_runs / "uncond"), "", "ddpm", 100, "default", 3.0, 0, 1)
    cancel = threading.Event()
    seen = 0
    with pytest.raises(Cancelled):
        for _update in actions.generate(s, cancel, preview_every_s=0.0):
            seen += 1
            if seen == 3:
                cancel.set()
    assert seen < 10


def test_a_request_the_page_stops_reading_stops_its_sampler(actions, web_runs, monkeypatch):
    """A visitor who leaves closes the request's generator at a preview: its worker thread sampled on to the end for
    nobody (and, in the tests, into the next test's). Now it stops at its next step."""
    steps, pause = [], actions.yield_to_light
    monkeypatch.setattr(actions, "yield_to_light", lambda *a, **k: (steps.append(1), pause(*a, **k)))  # counts the worker's steps
    _, s = actions.settings(str(web_runs / "uncond"), "", "ddpm", 100, "default", 3.0, 0, 1)
    updates = actions.generate(s, preview_every_s=0.0)
    next(updates)
    with actions.light():  # the worker waits at its next step while the page goes away
        updates.close()  # what gradio does when the client goes away
    workers = lambda: [t for t in threading.enumerate() if t.name == "ddpmkit-generate"]  # noqa: E731
    deadline = time.monotonic() + 30
    while workers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not workers() and len(steps) < 50, len(steps)  # it ran on for all 100 steps


def test_samplers_pause_while_a_light_request_runs(actions):
    order = []
    with actions.light():
        waiter = threading.Thread(target=lambda: (actions.yield_to_light(timeout_s=5), order.append("sampler")))
        waiter.start()
        time.sleep(0.3)
        order.append("light")
    waiter.join(5)
    assert order == ["light", "sampler"]
    t0 = time.perf_counter()
    actions.yield_to_light()  # nothing light runs: no wait (its timeout is 2 s; a loaded machine may still take a while)
    assert time.perf_counter() - t0 < 1.0


def test_forward_tab_shows_q_sample_of_the_digit(actions):
    x0, x_t, spectrum, caption = actions.forward(None, 3, "cosine", 0)
    assert x0.shape == x_t.shape == (28 * 8 + 4, 28 * 8 + 4) and spectrum.ndim == 3 and "t = 0, cosine" in caption
    assert np.abs(x0.astype(int) - x_t.astype(int)).mean() < 4  # sqrt(1 - alpha_bar_0) is tiny
    _, far, _, _ = actions.forward(None, 3, "cosine", 999)
    assert np.corrcoef(far.ravel(), x0.ravel())[0, 1] < 0.2
    with pytest.raises(ValueError, match="t must lie in 0..999"):
        actions.forward(None, 3, "linear", 1000)
    with pytest.raises(ValueError, match="digit index must lie in 0..4999"):
        actions.forward(None, 5000, "linear", 10)


def test_edits_return_the_input_beside_its_edits(actions, web_runs):
    run = str(web_runs / "uncond")
    strip, command = actions.edit(run, None, 3, "img2img", 0.3, 500, "right", None, "", 3.0, "ddim", 10, 0, 2)
    side = 8 * 4  # 8x8 digits shown 4x
    assert strip.shape == (side + 4, 3 * (side + 2) + 2) and command.startswith(f"ddpmkit img2img {run} mnist5k:3 --strength 0.3")
    strip, _ = actions.edit(run, None, 3, "posterior", 0.3, 300, "right", None, "", 3.0, "ddim", 5, 0, 2)
    assert strip.shape[1] == 4 * (side + 2) + 2  # input, x_t, 2 samples
    # the posterior's t runs over 1..T - 1 (T = 1000): its ends are taken, one past either is refused before any work
    for t in (1, 999):
        assert actions.edit(run, None, 3, "posterior", 0.3, t, "right", None, "", 3.0, "ddim", 2, 0, 1)[0].shape[1] == 3 * (side + 2) + 2
    for t in (0, 1000):
        with pytest.raises(ValueError, match=f"t must lie in 1..999, got {t}"):
            actions.edit(run, None, 3, "posterior", 0.3, t, "right", None, "", 3.0, "ddim", 2, 0, 1)
    drawn = np.zeros((256, 256, 4), np.uint8)
    drawn[:, 128:, 3] = 255  # the right half painted over
    strip, command = actions.edit(run, None, 3, "inpaint", 0.3, 300, "drawn", drawn, "", 3.0, "ddim", 5, 0, 1)
    assert "--mask mask.png" in command
    keep = Actions.mask("drawn", drawn, (1, 1, 8, 8))
    assert keep[0, 0, :, :4].eq(1).all() and keep[0, 0, :, 4:].eq(0).all()
    with pytest.raises(ValueError, match="paint over the part to fill"):
        Actions.mask("drawn", np.zeros((256, 256, 4), np.uint8), (1, 1, 8, 8))
    with pytest.raises(ValueError, match="choose img2img, inpaint or posterior"):
        actions.edit(run, None, 3, "blur", 0.3, 300, "right", None, "", 3.0, "ddim", 5, 0, 1)
    # img2img's sampler takes its eta and churn as the command line does: without noise euler_ancestral is euler
    strips = {name: actions.edit(run, None, 3, "img2img", 0.5, 300, "right", None, "", 3.0, sampler, 4, 0, 2, eta, "")
              for name, sampler, eta in (("ea0", "euler_ancestral", "0"), ("ea", "euler_ancestral", ""), ("euler", "euler", ""))}
    assert np.array_equal(strips["ea0"][0], strips["euler"][0]) and not np.array_equal(strips["ea"][0], strips["euler"][0])
    assert "--sampler euler_ancestral --eta 0 --n 2" in strips["ea0"][1]
    with pytest.raises(ValueError, match=r"eta and churn are the sampler's of img2img; this one runs Algorithm 2 \(ddpm\)"):
        actions.edit(run, None, 3, "posterior", 0.3, 300, "right", None, "", 3.0, "ddim", 5, 0, 1, "", "10")


def test_interpolations_render_a_gif_and_a_strip(actions, web_runs):
    run = str(web_runs / "uncond")
    gif, strip = actions.interpolate(run, "seeds", 3, 14, 0, 1, 500, "", "", [], 5, "", 3.0, "ddim", 5)
    with Image.open(gif) as im:
        assert im.n_frames == 5
    # from seed a's sample to seed b's, as the library draws them
    assert np.array_equal(strip, picture(interpolation_seeds(actions.shelf.get(run), 3, 14, 5, None, "ddim", 5, {"clip_x0": True}), 2, 5))
    _, strip = actions.interpolate(run, "images", 3, 14, 0, 1, 300, "", "", [], 4, "", 3.0, "ddim", 5)
    assert strip.shape[1] == 4 * (16 + 2) + 2  # four 8x8 frames shown 2x
    assert actions.interpolate(run, "images", 3, 14, 0, 1, 999, "", "", [], 2, "", 3.0, "ddim", 2)[1].shape[1] == 2 * (16 + 2) + 2
    for t in (0, 1000):  # the images' t runs over 1..T - 1 as the posterior's does
        with pytest.raises(ValueError, match=f"t must lie in 1..999, got {t}"):
            actions.interpolate(run, "images", 3, 14, 0, 1, t, "", "", [], 2, "", 3.0, "ddim", 2)
    with pytest.raises(ValueError, match="needs a text-conditional model"):
        actions.interpolate(run, "prompts", 3, 14, 0, 1, 300, "a one", "a two", [], 4, "", 3.0, "ddim", 5)
    assert actions.interpolations(run) == ["seeds", "images"]  # what the page offers this model: no prompts, no voyage
    with pytest.raises(ValueError, match=r"a voyage needs 2..12 keyframes \(seed, prompt\), got 1"):
        actions.interpolate(run, "voyage", 3, 14, 0, 1, 300, "", "", [[0, "a one"], [1, ""]], 4, "", 3.0, "ddim", 5)
    with pytest.raises(ValueError, match="frames must lie in 2..32"):
        actions.interpolate(run, "seeds", 3, 14, 0, 1, 300, "", "", [], 40, "", 3.0, "ddim", 5)
    # a stochastic sampler with its eta: the frames between a seed and itself are one sample (the same noise for all)
    _, still = actions.interpolate(run, "seeds", 3, 3, 0, 1, 300, "", "", [], 3, "", 3.0, "euler_ancestral", 5, "0.7", "")
    frame = still.shape[1] // 3
    assert np.array_equal(still[:, :frame], still[:, frame:2 * frame])
    _, ode = actions.interpolate(run, "seeds", 3, 3, 0, 1, 300, "", "", [], 3, "", 3.0, "euler_ancestral", 5, "0", "")
    assert not np.array_equal(ode, still)  # eta reached the sampler
    with pytest.raises(ValueError, match="eta and churn are the sampler's of seeds, prompts and voyages"):
        actions.interpolate(run, "images", 3, 14, 0, 1, 300, "", "", [], 4, "", 3.0, "ddim", 5, "0.5", "")


@pytest.fixture(scope="module")
def text_actions(tmp_path_factory):
    """A tiny text-conditional run on the 8x8 digits, on a shelf of its own."""
    pytest.importorskip("sentence_transformers")
    from conftest import TINY_DIGITS_RUN
    from ddpmkit.config import PRESET_DIR, load_config
    from ddpmkit.train import train

    run = tmp_path_factory.mktemp("text") / "run"
    train(load_config(PRESET_DIR / "mnist.toml", [*TINY_DIGITS_RUN, f"train.run_dir={run}", "network.text_encoder=all-MiniLM-L6-v2",
                                                   "network.text_max_tokens=8"]), progress=False)
    return Actions(Shelf([str(run)]), Limits(), run.parent / "work"), str(run)


def test_prompts_and_the_voyage_on_a_text_model(text_actions):
    actions, run = text_actions
    about, label, _ = actions.describe(run)
    assert about.endswith("T = 1000; text-conditional") and label == "prompt"
    assert actions.interpolations(run) == ["seeds", "images", "prompts", "voyage"]
    m, s = actions.settings(run, "a handwritten three", "ddim", 4, "default", 2.0, 0, 2)
    assert s.request.prompts == ["a handwritten three"] and "--prompt 'a handwritten three' --guidance 2" in s.command()
    with pytest.raises(ValueError, match="text-conditional: type a prompt"):
        actions.settings(run, "", "ddim", 4, "default", 2.0, 0, 2)
    gif, strip = actions.interpolate(run, "prompts", 3, 14, 0, 1, 300, "a one", "a two", [], 4, "", 3.0, "ddim", 3)
    assert strip.shape[1] == 4 * (16 + 2) + 2
    keys = [[0, "a handwritten zero"], [1.0, "a handwritten one"], ["", ""], [2, "a handwritten two"]]  # empty rows are skipped
    gif, strip = actions.interpolate(run, "voyage", 0, 0, 0, 1, 300, "", "", keys, 3, "", 3.0, "ddim", 3)
    with Image.open(gif) as im:
        assert im.n_frames == (3 - 1) * 3 + 1  # frames between keyframes, ending on the last
    with pytest.raises(ValueError, match="each keyframe is a seed"):
        actions.interpolate(run, "voyage", 0, 0, 0, 1, 300, "", "", [["x", "a one"], [1, "a two"]], 3, "", 3.0, "ddim", 3)


def test_interpolations_run_from_their_first_end_to_their_second(text_actions):
    """The first frame of an interpolation is its first end's, the last its second's: prompts (one seed's x_T) and a
    voyage's keyframes are what `generate` draws for that seed and prompt (ddim: no noise but x_T), and an image
    interpolation's first frame does not depend on the second image nor its last on the first. The posterior edit shows
    its x_t, the image noised with the seed, clamped to [-1, 1]."""
    from ddpmkit.editing import noised
    from ddpmkit.pipelines.edit import edit_posterior, interpolation_images, interpolation_prompts
    from ddpmkit.pipelines.guided import GuidanceRequest
    from ddpmkit.pipelines.voyage import render_voyage

    actions, run = text_actions
    m = actions.shelf.get(run)

    def alone(prompt: str, seed: int) -> torch.Tensor:
        return generate(m, 1, GuidanceRequest(prompts=[prompt]), "ddim", 3, seed=seed, progress=False).images[0]

    frames = interpolation_prompts(m, "a one", "a two", 3, seed=4, steps=3)
    assert torch.allclose(frames[0], alone("a one", 4), atol=1e-6) and torch.allclose(frames[-1], alone("a two", 4), atol=1e-6)
    assert not torch.allclose(frames[0], frames[-1], atol=1e-4)  # the prompts are told apart (2.7e-3 for this tiny model)
    keys = [(3, "a one"), (5, "a two"), (9, "a six")]
    voyage = render_voyage(m, keys, frames_between=2, steps=3, progress=False)
    for frame, (seed, prompt) in zip(voyage[::2], keys, strict=True):
        assert torch.allclose(frame, alone(prompt, seed), atol=1e-6)
    ramp = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    a, b, c, prompt = ramp, -ramp, 0.3 * ramp, GuidanceRequest(prompts=["a one"])
    ab, ac, cb = (interpolation_images(m, x, y, 300, 3, prompt, steps=4) for x, y in ((a, b), (a, c), (c, b)))
    assert torch.equal(ab[0], ac[0]) and torch.equal(ab[-1], cb[-1])
    assert not torch.allclose(ab[0], cb[0], atol=0.1) and not torch.allclose(ab[-1], ac[-1], atol=0.1)
    shown, _ = edit_posterior(m, a, 900, 2, prompt, steps=3, seed=6)
    assert torch.equal(shown, noised(a, 900, m.schedule, [6]).clamp(-1, 1)) and shown.min() == -1 and shown.max() == 1


def test_generate_chunks_by_cache_size_and_the_result_does_not_depend_on_the_chunk(actions, web_runs):
    from ddpmkit.pipelines.generate import auto_batch_size

    assert auto_batch_size((1, 28, 28)) == 128 and auto_batch_size((4, 64, 64)) == 6 and auto_batch_size((3, 4096, 4096)) == 1
    assert auto_batch_size((1, 28, 28), "cuda") == 64 * 128
    m = actions.shelf.get(str(web_runs / "class"))
    request = actions.request(m, "2,5", 3.0)[0]
    whole = generate(m, 7, request, "dpmpp_2m_sde", 5, seed=3, progress=False).images  # 8x8: one chunk of 7
    chunked = generate(m, 7, request, "dpmpp_2m_sde", 5, seed=3, batch_size=3, progress=False).images
    assert torch.allclose(whole, chunked, atol=1e-5)


@pytest.mark.slow
@pytest.mark.xdist_group(name="compile")  # with the training compile of test_train: one process warms inductor for both
def test_compiled_network_samples_the_same(tmp_path):
    from ddpmkit.config import PRESET_DIR, load_config
    from ddpmkit.models import load_diffusion
    from ddpmkit.train import train

    # the 2-D toy's MLP: the smallest graph that goes through compile_for_sampling (a cold inductor compiles it
    # in half the time of the tiny UNet, on the fresh machine every CI run is)
    train(load_config(PRESET_DIR / "toy2d.toml", [f"train.run_dir={tmp_path}", "train.steps=5", "train.checkpoint_every=0"]), progress=False)
    m = load_diffusion(str(tmp_path))
    eager = generate(m, 2, None, "ddim", 3, seed=4, progress=False).images
    compiled = generate(m.compile(), 2, None, "ddim", 3, seed=4, progress=False).images
    assert m.compile().network is m.network  # compiled once
    assert torch.allclose(eager, compiled, atol=1e-4)


def test_latent_mask_keeps_a_latent_pixel_only_where_all_its_pixels_are_kept():
    from ddpmkit.pipelines.edit import latent_mask

    mask = torch.ones(1, 1, 16, 16)
    mask[..., :, :7] = 0  # fill columns 0..6: latent column 3 covers pixels 6 and 7, one of them to fill
    keep = latent_mask(mask, (8, 8))
    assert keep.shape == (1, 1, 8, 8)
    assert keep[0, 0, :, :4].eq(0).all() and keep[0, 0, :, 4:].eq(1).all()


def test_a_served_lora_is_merged_and_named_in_the_command(web_runs, tmp_path):
    """`ddpmkit serve RUN --lora SPEC`: the page samples the model with the LoRA merged, as the CLI command it shows does."""
    pytest.importorskip("peft")
    import torch

    from ddpmkit.config import load_config
    from ddpmkit.models import load_diffusion
    from ddpmkit.train import train

    base = web_runs / "uncond"
    lora = train(load_config(str(base / "config.json"), [f"train.init_from={base}", "train.lora_rank=4", "train.lr=5e-2", "train.steps=5",
                                                         "train.checkpoint_every=0", f"train.run_dir={tmp_path / 'lora'}"]), progress=False)
    spec = f"{lora}:0.5"
    served = Actions(Shelf([str(base)], [spec]), Limits(max_steps=100, max_images=8), tmp_path / "work")
    m, s = served.settings(str(base), "", "ddim", 6, "default", 3.0, 5, 4)
    assert f"--lora {spec}" in s.command()
    final = list(served.generate(s, preview_every_s=0.0))[-1]
    expected = generate(load_diffusion(base, loras=[spec]), 4, s.request, "ddim", 6, 5, {"clip_x0": True}, progress=False).images
    plain = generate(load_diffusion(base), 4, s.request, "ddim", 6, 5, {"clip_x0": True}, progress=False).images
    assert np.array_equal(final["result"], picture(expected, nrow=2)) and not torch.equal(expected, plain)


def test_request_folders_older_than_the_limit_go_and_the_page_removes_only_the_folder_it_made(web_runs, tmp_path):
    """A page serving for weeks must not fill the disk: a request's files stay `keep_files_s`, then go at the next request;
    `close()` (what `ddpmkit serve` calls when it stops) removes the work folder the page made, never one it was given."""
    shelf = Shelf(find_runs([web_runs]))
    own = Actions(shelf, Limits(keep_files_s=60))
    old, fresh = own._folder("generate"), own._folder("edit")
    (old / "grid.png").write_bytes(b"x")
    now = time.time()
    os.utime(old, (now - 61, now - 61))
    os.utime(fresh, (now - 59, now - 59))
    newest = own._folder("generate")  # prunes first
    assert not old.exists() and fresh.is_dir() and newest.is_dir()
    assert sorted(own.prune(now=now + 120)) == sorted([fresh, newest])  # both older than 60 s two minutes on
    assert list(own.work_dir.iterdir()) == []
    own.close()
    assert not own.work_dir.exists()
    given = Actions(shelf, Limits(), tmp_path / "work")
    given._folder("generate")
    given.close()
    assert (tmp_path / "work").is_dir() and len(list((tmp_path / "work").iterdir())) == 1


def test_a_device_without_memory_for_a_request_is_the_pages_message_and_a_bug_stays_a_traceback():
    """A request the device has no memory for (a real CPU allocator refusal here) was gradio's bare "Error" with a
    traceback in the server's log; now the page says what to do. A user error keeps its own message, and any other
    RuntimeError (a bug) is raised as it is."""
    import gradio as gr

    from ddpmkit.errors import UserError
    from ddpmkit.web.app import page_error, shown_errors

    with pytest.raises(gr.Error, match="the device had no memory for this request: ask for fewer images"):
        in_a_thread(shown_errors(lambda: torch.empty(10**14, dtype=torch.uint8)))
    assert page_error(UserError("seed must be a whole number")).message == "seed must be a whole number"
    bug = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    assert page_error(bug) is bug
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        shown_errors(lambda: torch.zeros(2, 3) @ torch.zeros(2, 3))()


def test_runs_of_points_are_not_served_and_the_page_says_which(tmp_path, capsys):
    """A 2-D toy run was listed on the page, and its generate crashed in the grid's permute with a traceback; the page
    draws images, so such runs are left out, by name, with the command that draws them."""
    from ddpmkit.cli import main
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    toy = train(load_config("toy2d", [f"train.run_dir={tmp_path / 'toy'}", "train.steps=2"]), progress=False)
    skipped: list[str] = []
    assert find_runs([tmp_path], skipped) == []
    assert skipped == [f"{toy} (its samples are 2-D points, not images: ddpmkit sample {toy} draws them)"]
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["serve", str(toy)]) == 2
    assert signal.getsignal(signal.SIGTERM) is handler  # serve's own `kill` handler ends with it
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("ddpmkit serve: error: no diffusion runs of images in or under") and f"not served: {toy} (" in err


def test_the_pages_other_limits_take_their_ends(actions, web_runs):
    """Each bound of the page at its ends: the prompt's length, eta's and churn's largest values, steps up to the
    model's T (the limits allow more), img2img's strength 1, a voyage's 12 keyframes (rows without a prompt skipped),
    and a mask pixel painted over by exactly a quarter (filled in: 'kept' needs less than a quarter)."""
    limits = Limits()
    assert limits.prompt("x" * 200) == "x" * 200 and limits.noise(10.0, "eta", limits.max_eta) == 10.0
    assert limits.noise("1000", "churn", limits.max_churn) == 1000.0 and limits.noise(0.0, "eta", limits.max_eta) == 0.0
    with pytest.raises(ValueError, match="the prompt has 201 characters; at most 200 are allowed"):
        limits.prompt("x" * 201)
    run = str(web_runs / "uncond")
    wide = Actions(actions.shelf, Limits(max_steps=2000), actions.work_dir)
    assert wide.settings(run, "", "ddim", 1000, "default", None, 0, 1)[1].steps == 1000  # built, not sampled
    with pytest.raises(ValueError, match="this model has T = 1000 steps; steps must lie in 1..1000"):
        wide.settings(run, "", "ddim", 1001, "default", None, 0, 1)
    strip, command = actions.edit(run, None, 3, "img2img", 1.0, 500, "right", None, "", 3.0, "ddim", 2, 0, 1)
    assert "--strength 1 " in command
    with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\], got 0.0"):
        actions.edit(run, None, 3, "img2img", 0.0, 500, "right", None, "", 3.0, "ddim", 2, 0, 1)
    # keyframe counts are checked before the model is: 12 reach the model's own refusal (no prompts), 13 do not
    rows = [[k, f"a {k}"] for k in range(12)] + [[5], ["", "a prompt without a seed"]]
    with pytest.raises(ValueError, match="text-conditional"):
        actions.interpolate(run, "voyage", 0, 0, 0, 1, 300, "", "", rows, 3, "", 3.0, "ddim", 3)
    with pytest.raises(ValueError, match="a voyage needs 2..12 keyframes"):
        actions.interpolate(run, "voyage", 0, 0, 0, 1, 300, "", "", rows + [[12, "a 12"]], 3, "", 3.0, "ddim", 3)
    drawn = np.zeros((256, 256, 4), np.uint8)
    drawn[:16, :16, 3] = 255  # a quarter of the top-left 32x32 cell of an 8x8 image
    drawn[:15, 32:48, 3] = 255  # a little less of the next one
    keep = Actions.mask("drawn", drawn, (1, 1, 8, 8))[0, 0]
    assert keep[0, 0] == 0 and keep[0, 1] == 1 and keep.sum() == 63


def test_the_inpainting_canvas_is_the_image_enlarged_in_rgb():
    """The canvas the page paints a mask on: a grey digit becomes three equal channels (the brush is red), an RGB
    image stays itself; both enlarged by whole pixels to about 256 (8 x 32)."""
    grey, rgb = torch.rand(1, 1, 8, 8) * 2 - 1, torch.rand(1, 3, 8, 8) * 2 - 1
    canvas = Actions.canvas(grey)
    assert canvas.shape[-1] == 3 and np.array_equal(canvas, np.repeat(picture(grey, upscale=32, nrow=1)[..., None], 3, axis=-1))
    assert np.array_equal(Actions.canvas(rgb), picture(rgb, upscale=32, nrow=1)) and Actions.canvas(rgb).shape[-1] == 3


def test_warm_up_loads_the_first_model_and_the_built_in_digits(web_runs, tmp_path):
    """`ddpmkit serve` warms up before the first visitor: the first run's model is loaded, and the forward tab's default
    request (digit 0, linear schedule, t = 0) runs."""
    shelf = Shelf(find_runs([web_runs]))
    Actions(shelf, Limits(), tmp_path).warm_up()
    assert list(shelf._models) == [shelf.runs[0]]
