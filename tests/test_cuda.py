"""On a CUDA machine: training, loading, sampling, guidance and editing run on the GPU and draw
what the CPU draws from the same seeds. Skipped without CUDA (the CI machine has none); run
`pytest tests/test_cuda.py` on a GPU. The kill/resume and every other training test also run on
the GPU there, since the engine picks it by itself."""
from __future__ import annotations

import json

import pytest
import torch

from ddpmkit.models import load_diffusion
from ddpmkit.pipelines import GuidanceRequest, generate
from ddpmkit.pipelines.edit import edit_img2img, edit_inpaint, edit_posterior, interpolation_images, interpolation_seeds
from ddpmkit.sampling.options import sampler_options

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_run_trained_on_the_gpu_computes_the_same_on_either_device(web_runs):
    """The session's tiny runs were trained here, i.e. on the GPU (the preset's mixed_precision = "auto":
    bf16); loaded on the GPU and on the CPU, the network gives the same predictions."""
    config = json.loads(next((web_runs / "class").glob("ckpt-*/config.json")).read_text())
    assert config["train"]["mixed_precision"] in ("auto", "bf16")
    cpu, gpu = load_diffusion(web_runs / "class", device="cpu"), load_diffusion(web_runs / "class", device="cuda")
    assert gpu.device.type == "cuda"
    x, t, y = torch.randn(4, *cpu.data_shape), torch.tensor([10.0, 200.0, 500.0, 900.0]), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        want = cpu.network(x, t, y=y)
        got = gpu.network(x.cuda(), t.cuda(), y=y.cuda()).cpu()
    assert (got - want).abs().max() < 1e-2 * want.abs().max()


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp_2m_sde", "ddpm"])
def test_gpu_samples_match_the_cpu_samples_of_the_same_seeds(web_runs, sampler):
    request = GuidanceRequest(classes=[3, 7], scale=2.0)
    kw = dict(request=request, sampler=sampler, steps=8, seed=5, options=sampler_options(sampler), progress=False)
    cpu = generate(load_diffusion(web_runs / "class", device="cpu"), 4, **kw).images
    gpu_model = load_diffusion(web_runs / "class", device="cuda")
    gpu = generate(gpu_model, 4, **kw).images
    assert gpu.device.type == "cpu" and torch.isfinite(gpu).all()
    # the noise is drawn on the CPU per sample; only float rounding (TF32 convolutions) differs
    assert (gpu - cpu).abs().max() < 0.05, (gpu - cpu).abs().max()
    # and the batch size does not matter on the GPU either
    one_by_one = generate(gpu_model, 4, **kw, batch_size=1).images
    assert (one_by_one - gpu).abs().max() < 1e-3


def test_every_edit_on_the_gpu_matches_the_cpu(web_runs):
    cpu, gpu = load_diffusion(web_runs / "uncond", device="cpu"), load_diffusion(web_runs / "uncond", device="cuda")
    image = torch.rand(1, *cpu.data_shape) * 2 - 1  # on the CPU, as a loaded picture is
    mask = torch.ones(1, 1, *cpu.data_shape[1:])
    mask[..., :, cpu.data_shape[-1] // 2:] = 0
    edits = {
        "img2img": lambda m: edit_img2img(m, image, n=2, strength=0.5, steps=4),
        "inpaint": lambda m: edit_inpaint(m, image, mask, n=2, steps=4, resample=2),
        "posterior": lambda m: edit_posterior(m, image, t=300, n=2, steps=4)[1],
        "seeds": lambda m: interpolation_seeds(m, 0, 1, n=3, steps=4),
        "images": lambda m: interpolation_images(m, image, -image, t=300, n=3, steps=4),
    }
    for name, edit in edits.items():
        want, got = edit(cpu), edit(gpu).cpu()
        assert got.shape == want.shape and (got - want).abs().max() < 0.05, name  # same seeds, TF32 rounding only
    filled = edit_inpaint(gpu, image, mask, n=2, steps=4, resample=2).cpu()
    kept = mask.bool().expand_as(filled)
    assert torch.equal(filled[kept], image.expand_as(filled)[kept])  # the kept half is the input, exactly


def test_every_face_runs_on_the_gpu_by_default(web_runs, tmp_path, capsys):
    """No --device: each command loads its model on the GPU (the rule) and finishes; the demo's grid too."""
    from ddpmkit.cli import main
    from ddpmkit.cli.train import draw_demo
    from ddpmkit.web.shelf import Shelf

    run, cls = str(web_runs / "uncond"), str(web_runs / "class")
    assert Shelf([run]).get(run).device.type == "cuda"
    for argv in (["sample", cls, "--n", "3", "--steps", "3", "--class", "2", "--guidance", "2", "--no-gif", "--out", str(tmp_path / "s")],
                 ["img2img", run, "digits:0", "--n", "2", "--steps", "3", "--out", str(tmp_path / "e")],
                 ["inpaint", run, "digits:0", "--n", "2", "--steps", "3", "--resample", "1", "--out", str(tmp_path / "e")],
                 ["posterior", run, "digits:0", "--n", "2", "--steps", "3", "--out", str(tmp_path / "e")],
                 ["interpolate", run, "--seeds", "0,1", "--n", "3", "--steps", "3", "--out", str(tmp_path / "e")],
                 ["tune-grid", run, "--steps", "3", "--n", "2", "--evals", "4", "--out", str(tmp_path / "g.json")]):
        assert main(argv) == 0, (argv, capsys.readouterr().err)
    draw_demo(web_runs / "uncond", (), 4, "ddim_uniform", 3, 1.0)


def train_strictly(cfg, first_strict: int = 2) -> None:
    """train(cfg) with torch.cuda.set_sync_debug_mode("error") in every step from first_strict on (after the first steps'
    one-off work: allocations, cuDNN's choices, a capture): any synchronizing call in a step raises."""
    from ddpmkit.train import engine, train

    train_step = engine.Trainer.train_step

    def strict(self, batch):
        if self.state.step >= first_strict:
            torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(self, batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    engine.Trainer.train_step = strict
    try:
        train(cfg, progress=False)
    finally:
        engine.Trainer.train_step = train_step


QUIET_RUN = ["train.steps=6", "train.log_every=3", "train.sample_every=0", "train.eval_every=0", "train.checkpoint_every=0", "train.keep_steps="]


@pytest.mark.parametrize("compile_mode", ["no", "cuda-graph"])
def test_a_training_step_on_the_gpu_reads_nothing_back(tmp_path, compile_mode):
    """On the GPU itself: torch.cuda.set_sync_debug_mode("error") raises at any synchronizing call in a step; also when
    the step's network runs as captured CUDA graphs (after the capture, which synchronizes once)."""
    from ddpmkit.config import load_config

    cfg = load_config("mnist", [f"train.run_dir={tmp_path}", *QUIET_RUN, "train.batch_size=8", f"train.compile={compile_mode}"])
    train_strictly(cfg, 2 if compile_mode == "no" else 3)  # the graphs are captured in the third step


# the other kinds' steps at toy size (tests/test_train.py counts their reads on the CPU; here the GPU's own sync check):
# class labels, CPU-made super-resolution inputs with v-prediction, the classifier's augmentation
OTHER_KINDS = {"mnist_class": [], "mnist_classifier": ["network.attention_resolutions="],
               "imagen_sr": ["network.text_encoder=", "superres.low_res=4", "superres.blur_prob=0.5"]}


@pytest.mark.parametrize("preset", sorted(OTHER_KINDS))
def test_every_kinds_training_step_on_the_gpu_reads_nothing_back(tmp_path, preset):
    from ddpmkit.config import load_config

    train_strictly(load_config(preset, ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "train.batch_size=8",
                                        "network.attention_resolutions=4", *OTHER_KINDS[preset], f"train.run_dir={tmp_path}", *QUIET_RUN,
                                        "train.max_minutes=0"]))


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_a_training_run_through_cuda_graphs_follows_the_eager_one(tmp_path, precision, monkeypatch):
    """train.compile = "cuda-graph": the demo's network captured once (forward and backward) and replayed; the same kernels
    as eager, so the same losses and weights within rounding, and checkpoints with the plain module's keys. With dropout
    (mnist_gpu has 0.1): each step's masks come from the step's seed in the graph as eagerly."""
    from safetensors.torch import load_file

    from ddpmkit import graphs
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    made, capture = [], graphs.make_graphed
    monkeypatch.setattr(graphs, "make_graphed", lambda one, tensors: made.append(len(tensors)) or capture(one, tensors))
    losses, weights = {}, {}
    for mode in ("no", "cuda-graph"):
        run = tmp_path / mode
        cfg = load_config("mnist", [f"train.run_dir={run}", "train.steps=10", "train.log_every=1", "train.sample_every=0",
                                    "train.eval_every=0", "train.keep_steps=", "train.batch_size=16", "network.dropout=0.1",
                                    f"train.mixed_precision={precision}", f"train.compile={mode}"])
        train(cfg, progress=False)
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        losses[mode] = [e["loss"] for e in log if "loss" in e]
        weights[mode] = load_file(next(run.glob("ckpt-*/model.safetensors")))
        calls = log[-1].get("cuda_graph")  # the run's own count of the network's calls
        assert calls == ({"eager": 2, "captured": 1, "replayed": 8} if mode == "cuda-graph" else None), calls
    assert made == [2]  # x_t and t: one signature, captured once
    assert len(losses["no"]) == len(losses["cuda-graph"]) == 10
    tolerance = 1e-5 if precision == "fp32" else 1e-3
    assert all(abs(a - b) <= tolerance * abs(a) for a, b in zip(losses["no"], losses["cuda-graph"])), losses
    assert set(weights["no"]) == set(weights["cuda-graph"])
    for k, w in weights["no"].items():
        assert (w - weights["cuda-graph"][k]).abs().max() <= tolerance * (1 + w.abs().max()), k


def test_under_cuda_bf16_autocast_the_norms_keep_bf16_and_the_network_computes_what_fp32_does():
    """layers.GroupNorm: CUDA autocast would hand back fp32 from every norm; ddpmkit's keeps the activations in bf16."""
    from ddpmkit.nets.layers import GroupNorm
    from ddpmkit.nets.unet import UNet

    torch.manual_seed(0)
    net = UNet(3, None, 16, 32, (1, 2), 1, (8,), num_heads=1).cuda().eval()  # eval: no dropout masks to differ
    with torch.no_grad():  # the zero-initialised closing layers would make the output trivial
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    seen = []
    for m in net.modules():
        if isinstance(m, GroupNorm):
            m.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    x, t = torch.randn(4, 3, 16, 16, device="cuda"), torch.rand(4, device="cuda") * 999
    fp32 = net(x, t)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = net(x, t)
    assert seen and set(seen) == {torch.bfloat16}
    assert (bf16.float() - fp32).abs().max() <= 0.05 * fp32.abs().max()


@pytest.mark.parametrize("sampler", ["ddpm", "dpmpp_2m", "dpmpp_2m_sde"])
def test_a_sampler_step_on_the_gpu_waits_for_nothing(web_runs, sampler):
    """After the first step (the schedule's tables go to the GPU once) no step synchronizes: the per-sample noise comes
    in blocks from pinned memory, queued (tests/test_host_waits.py checks the same on the meta device)."""
    m = load_diffusion(web_runs / "uncond", device="cuda")

    def strict_after_first(info: dict) -> None:
        torch.cuda.set_sync_debug_mode("error" if info["i"] > 0 else 0)  # the last step's result is read back after it

    try:
        out = generate(m, 4, sampler=sampler, steps=12, seed=3, progress=False, callback=strict_after_first).images
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_sampling_through_captured_cuda_graphs_gives_the_eager_samples(web_runs, precision):
    """--compile cuda-graph: one graph per call signature, replayed; the multistep solver keeps earlier outputs, which a
    replay must not overwrite (each call returns a copy)."""
    kw = dict(sampler="dpmpp_2m", steps=10, seed=4, progress=False, precision=precision)
    eager = generate(load_diffusion(web_runs / "class", device="cuda"), 6, GuidanceRequest(classes=[1, 2], scale=2.0), **kw).images
    m = load_diffusion(web_runs / "class", device="cuda").compile("cuda-graph")
    graphed = generate(m, 6, GuidanceRequest(classes=[1, 2], scale=2.0), **kw).images
    assert len([g for g in m.network.graphs.values() if g is not None]) == 1  # one signature: captured once, replayed
    tolerance = 1e-3 if precision == "fp32" else 2e-2  # the same kernels; bf16's rounding over 10 steps if any differ
    assert (graphed - eager).abs().max() < tolerance, (graphed - eager).abs().max()
    again = generate(m, 6, GuidanceRequest(classes=[1, 2], scale=2.0), **kw).images  # replays only, from the first step
    assert (again - graphed).abs().max() < tolerance


def test_a_chunk_the_gpu_has_no_memory_for_is_drawn_in_halves_with_the_same_samples(web_runs, capsys):
    """A GPU really out of memory: the caching allocator is allowed 32 MB more than it holds, so generate's own chunk
    (all 2,000 digits at once) does not fit; it is drawn again in halves until one fits, with the samples of the same
    seeds, and a chunk size the caller gave stays an OutOfMemoryError."""
    m = load_diffusion(web_runs / "uncond", device="cuda")
    kw = dict(sampler="ddim", steps=4, seed=1, progress=False)
    want = generate(m, 2000, batch_size=100, **kw).images
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 32 * 2**20) / total)
    try:
        got = generate(m, 2000, **kw).images
        with pytest.raises(torch.OutOfMemoryError):
            generate(m, 2000, batch_size=2000, **kw)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "had no memory for 2000 samples at once; drawing chunks of 1000" in capsys.readouterr().err
    assert (got - want).abs().max() < 1e-3
