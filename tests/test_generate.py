"""generate(): chunks drawn side by side by threads, and the network in bf16 with float32 sampler arithmetic."""
import dataclasses

import numpy as np
import pytest
import torch

from ddpmkit.errors import UserError
from ddpmkit.models import load_diffusion
from ddpmkit.pipelines.generate import auto_batch_size, auto_streams, equal_chunks, generate
from ddpmkit.pipelines.guided import GuidanceRequest, weaker_model
from ddpmkit.precision import Autocast, resolve_precision


@pytest.fixture(scope="module")
def model(web_runs):
    return load_diffusion(str(web_runs / "uncond"))


def test_chunks_drawn_side_by_side_are_the_chunks_drawn_one_at_a_time(model, capsys):
    threads = torch.get_num_threads()
    kw = dict(sampler="dpmpp_2m_sde", steps=4, seed=5, batch_size=3)
    one = generate(model, 8, **kw, streams=1, progress=False).images
    two = generate(model, 8, **kw, streams=2).images
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # one bar over the chunks' steps
    assert bar.startswith("dpmpp_2m_sde (3 chunks, 2 at once): 100%") and "| 12/12 [" in bar
    assert torch.allclose(one, two, atol=1e-5) and torch.get_num_threads() == threads  # torch's threads restored
    assert auto_streams(model, torch.device("cpu"), 3) == min(2, threads) and auto_streams(model, torch.device("cpu"), 1) == 1
    try:  # two threads are enough for two streams (a pytest-xdist worker may have one)
        for n_threads, streams in ((2, 2), (1, 1)):
            torch.set_num_threads(n_threads)
            assert auto_streams(model, torch.device("cpu"), 3) == streams
    finally:
        torch.set_num_threads(threads)
    assert auto_streams(model, torch.device("cuda"), 3) == 1


def test_a_chunk_that_fails_stops_generate_with_its_own_error(model):
    class Cancelled(Exception):
        pass

    def cancel_second_chunk(info: dict) -> None:
        if info["start"] == 3 and info["i"] <= 3:
            raise Cancelled()

    threads = torch.get_num_threads()
    with pytest.raises(Cancelled):
        generate(model, 6, sampler="ddim", steps=6, batch_size=3, streams=2, callback=cancel_second_chunk, progress=False)
    assert torch.get_num_threads() == threads  # restored after the failure too


def test_bf16_runs_the_network_in_bf16_and_hands_back_float32(model):
    seen = []
    conv = next(m for m in model.network.modules() if isinstance(m, torch.nn.Conv2d))
    hook = conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    x, t = torch.randn(2, *model.data_shape), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        exact, mixed = model.network(x, t), Autocast(model.network)(x, t)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16] and mixed.dtype == torch.float32
    assert (mixed - exact).abs().max() < 0.05 * exact.abs().max()
    kw = dict(sampler="ddim", steps=5, seed=1, batch_size=2, progress=False)
    fp32 = generate(model, 4, **kw).images
    bf16 = generate(model, 4, **kw, precision="bf16").images
    bf16_two_streams = generate(model, 4, **kw, precision="bf16", streams=2).images  # autocast is per thread: entered in forward
    assert bf16.dtype == torch.float32 and 0 < (bf16 - fp32).abs().max() < 0.1
    assert torch.allclose(bf16, bf16_two_streams, atol=1e-5)
    assert resolve_precision("fp32") == "no" and resolve_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match=r"precision 'fp64': choose from \['fp32', 'bf16', 'fp16', 'auto'\]"):
        generate(model, 1, **kw, precision="fp64")
    from ddpmkit.precision import canonical, dtype_of  # one vocabulary for training, sampling and weights
    assert [canonical(p) for p in ("no", "float32", "bfloat16", "float16", "auto")] == ["fp32", "fp32", "bf16", "fp16", "auto"]
    assert dtype_of("bfloat16") is dtype_of("bf16") is torch.bfloat16 and resolve_precision("no") == "no"
    mixed_model = dataclasses.replace(model, network=Autocast(model.network))
    assert isinstance(weaker_model(mixed_model, str(model.path), "cpu").model, Autocast)  # autoguidance's bad model in the same precision


@pytest.mark.parametrize("kwargs, message", [({"n": -3}, "n = -3 must be >= 1"), ({"n": 2, "batch_size": 0}, "batch_size = 0 must be >= 1")])
def test_bad_counts_name_only_what_the_caller_gave(model, kwargs, message):
    from ddpmkit.errors import UserError

    with pytest.raises(UserError) as e:
        generate(model, **kwargs, steps=2, progress=False)
    assert str(e.value) == message  # not the automatic chunk size, which the caller never gave


def test_a_folder_holds_one_calls_samples_and_nothing_of_the_call_before(model, tmp_path):
    """64 samples of one model, then 16 of another into the same --out: before, samples 16..63 of the first stayed beside
    the second's, and a GIF of a call that recorded none was the earlier call's."""
    from ddpmkit.pipelines.generate import save_generated

    out = tmp_path / "samples"
    save_generated(generate(model, 6, sampler="ddim", steps=2, seed=10, record_every=1, progress=False), out, seed=10)
    (out / "mine.txt").write_text("kept")
    assert sorted(f.name for f in (out / "samples").iterdir()) == [f"{s:06d}.png" for s in range(10, 16)]
    assert (out / "reverse_process.gif").is_file()
    second = generate(model, 2, sampler="ddim", steps=2, seed=3_000_000, progress=False)  # seven-digit names, no GIF recorded
    save_generated(second, out, seed=3_000_000, gif=False)
    assert sorted(f.name for f in (out / "samples").iterdir()) == ["3000000.png", "3000001.png"]
    assert not (out / "reverse_process.gif").exists() and not (out / "predicted_x0.gif").exists()
    assert torch.equal(torch.load(out / "samples.pt"), second.images) and (out / "mine.txt").read_text() == "kept"
    # negative seeds name their files -000002.png: they stayed beside the next call's samples
    save_generated(generate(model, 2, sampler="ddim", steps=2, seed=-2, progress=False), out, seed=-2, gif=False)
    assert sorted(f.name for f in (out / "samples").iterdir()) == ["-00001.png", "-00002.png"]
    save_generated(second, out, seed=3_000_000, gif=False)
    assert sorted(f.name for f in (out / "samples").iterdir()) == ["3000000.png", "3000001.png"]


def test_chunks_split_n_as_equally_as_the_batch_size_allows_and_a_gpu_takes_64_cpu_chunks():
    for n, b in ((10, 4), (12, 3), (7, 7), (129, 128), (1, 5)):
        sizes = equal_chunks(n, b)
        assert sum(sizes) == n and max(sizes) <= b and max(sizes) - min(sizes) <= 1 and len(sizes) == -(-n // b), (n, b, sizes)
    assert auto_batch_size((1, 28, 28)) == 128 and auto_batch_size((1, 28, 28), "cuda") == 64 * 128
    assert auto_batch_size((3, 32, 32), "cpu") == 128 * 28 * 28 // (3 * 32 * 32)


def test_a_chunk_the_device_has_no_memory_for_is_drawn_again_in_halves_with_the_same_samples(model, capsys):
    """Where generate chose the chunk size (the caller gave none), a chunk the device has no memory for is drawn again in
    halves until it fits, and the samples are those of that chunk size from the start (each sample has its own seed); a
    chunk size the caller gave is theirs: the error stays. The network here raises what CUDA's allocator raises past
    5 samples at once; tests/test_cuda.py makes a GPU really run out."""
    def no_memory_past_5(module, args):
        if args[0].shape[0] > 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB")

    kw = dict(sampler="ddim", steps=3, seed=2, progress=False, streams=1)
    fits = generate(model, 12, batch_size=3, **kw).images
    hook = model.network.register_forward_pre_hook(no_memory_past_5)
    try:
        halved = generate(model, 12, **kw).images  # 12 at once (the CPU's chunk holds 128), then 6, then 3
        with pytest.raises(torch.OutOfMemoryError):
            generate(model, 12, batch_size=6, **kw)
    finally:
        hook.remove()
    assert torch.equal(halved, fits)
    err = capsys.readouterr().err
    assert "cpu had no memory for 12 samples at once; drawing chunks of 6" in err and "no memory for 6 samples at once; drawing chunks of 3" in err
    # a later chunk that does not fit: the samples left after the chunks drawn are split in halves
    c, calls = auto_batch_size(model.data_shape), []

    def no_memory_for_a_second_full_chunk(module, args):
        calls.append(args[0].shape[0])
        if args[0].shape[0] > c // 2 and len(calls) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    hook = model.network.register_forward_pre_hook(no_memory_for_a_second_full_chunk)
    try:
        late = generate(model, 2 * c, **kw).images  # two chunks of c; the second one in halves
    finally:
        hook.remove()
    assert calls == [c] * 4 + [c // 2] * 6 and torch.equal(late, generate(model, 2 * c, batch_size=c // 2, **kw).images)
    assert f"cpu had no memory for {c} samples at once; drawing chunks of {c // 2}" in capsys.readouterr().err
    # no memory even for one sample at once: the error, after halving down to 1 (not the same chunk of 1 again and again)
    sizes = []

    def no_memory_at_all(module, args):
        sizes.append(args[0].shape[0])
        if len(sizes) > 10:  # a loop, failed here rather than hung
            raise AssertionError(f"chunks of {sizes}")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")

    hook = model.network.register_forward_pre_hook(no_memory_at_all)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            generate(model, 4, **kw)
    finally:
        hook.remove()
    assert sizes == [4, 2, 1]


def test_vector_samples_are_not_clipped_to_the_pixel_range(tmp_path):
    """The predicted x_0 is clipped to [-1, 1] only where it is pixels: a 2-D toy lies in [-3, 3], and `ddpmkit sample`
    of a toy run (clip_x0 on by default, as for images) drew every point inside the square [-1, 1]^2."""
    from ddpmkit.config import load_config
    from ddpmkit.pipelines.generate import resolve_options
    from ddpmkit.sampling.options import sampler_options
    from ddpmkit.train import train

    run = train(load_config("toy2d", [f"train.run_dir={tmp_path}", "train.steps=300", "train.checkpoint_every=0"]), progress=False)
    m = load_diffusion(str(run))
    options = sampler_options("ddpm")  # what the command line and the web page ask for: clip_x0=True
    assert options["clip_x0"] and not resolve_options(m, options)["clip_x0"]
    x = generate(m, 500, None, "ddpm", 50, 0, options, progress=False).images
    assert x.abs().max() > 1.5, x.abs().max()  # the data's own range, not the square
    # `ddpmkit sample` of it draws the points over the data they were trained on (grey), as the trainer's previews do
    from PIL import Image

    from ddpmkit.cli import main

    assert main(["sample", str(run), "--n", "50", "--steps", "5", "--out", str(tmp_path / "s")]) == 0
    pixels = np.asarray(Image.open(tmp_path / "s" / "scatter.png").convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - 191).max(1) <= 2).sum() > 1000  # the data's grey (matplotlib's "0.75"): 4,656 pixels, 33 without it
    # nor does dynamic thresholding rescale the points into the square: refused (it was taken)
    with pytest.raises(UserError, match=r"dynamic thresholding \(percentile 0.995\) keeps pixels in \[-1, 1\]; this model's x_0 is a vector of 2"):
        generate(m, 5, GuidanceRequest(threshold=0.995), "ddpm", 50, 0, options, progress=False)


def test_the_gifs_record_the_first_samples_only(model):
    """Every sample's x_t and x_0 at every recorded step stayed in memory for the GIFs (memory growing with n, for a GIF
    of a 45 x 45 grid at 2,000 digits); the GIFs now show the first GIF_SAMPLES, and the samples are the same."""
    from ddpmkit.pipelines.generate import GIF_SAMPLES

    n, kw = GIF_SAMPLES + 6, dict(sampler="ddim", steps=4, seed=3, batch_size=GIF_SAMPLES // 2 + 1, progress=False)  # 3 chunks
    recorded = generate(model, n, record_every=1, **kw)
    assert len(recorded.xs) == len(recorded.x0s) == 4 and {tuple(x.shape) for x in recorded.xs + recorded.x0s} == {(GIF_SAMPLES, *model.data_shape)}
    plain = generate(model, n, **kw)
    assert not plain.xs and torch.equal(recorded.images, plain.images)
    assert torch.allclose(recorded.xs[-1].cpu(), recorded.images[:GIF_SAMPLES], atol=1e-6)  # the last frame: those samples


def test_a_slice_of_a_request_cycles_its_classes_and_prompts_as_the_whole_batch_does():
    """Chunks of a long run take samples start..start+n-1 of the one big batch: classes and prompts in turn, rows of
    per-sample conditions as they are."""
    request = GuidanceRequest(classes=[0, 1, 2], prompts=["a", "b"], conditions={"c": torch.arange(10)})
    part = request.slice(5, 4)
    assert part.classes == [2, 0, 1, 2] and part.prompts == ["b", "a", "b", "a"] and part.conditions["c"].tolist() == [5, 6, 7, 8]
    # without classes, the default 0, 1, 2, ... in turn starts at the slice's first sample (guided_model knows how many
    # classes there are: test_conditioning's three-class test)
    assert GuidanceRequest().slice(5, 3).classes == [] and GuidanceRequest().slice(5, 3).slice(2, 1).class_offset == 7


def test_only_pixel_models_clip_their_x0_prediction(tmp_path):
    """x_0 is clipped to [-1, 1] for images in pixels only: not for latents (decoded later), not for points (the 2-D toys
    lie in [-3, 3])."""
    from ddpmkit.config import load_config
    from ddpmkit.models import DiffusionModel
    from ddpmkit.pipelines.generate import resolve_options

    net, cfg = torch.nn.Identity(), load_config("mnist")
    pixels = DiffusionModel(net, cfg, (1, 28, 28), 0, tmp_path)
    latents = DiffusionModel(net, cfg, (4, 8, 8), 0, tmp_path, autoencoder=torch.nn.Identity())
    points = DiffusionModel(net, cfg, (2,), 0, tmp_path)
    assert pixels.bounded_x0 and not latents.bounded_x0 and not points.bounded_x0
    assert resolve_options(pixels, {"clip_x0": True}) == {"clip_x0": True}
    assert resolve_options(latents, {"clip_x0": True}) == resolve_options(points, {"clip_x0": True}) == {"clip_x0": False}
