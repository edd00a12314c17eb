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


def test_the_engine_trains_on_the_gpu_in_bf16(web_runs):
    """The session's tiny runs were trained here, i.e. on the GPU, with the preset's mixed_precision = "auto"."""
    config = json.loads(next((web_runs / "class").glob("ckpt-*/config.json")).read_text())
    assert config["train"]["mixed_precision"] in ("auto", "bf16")
    m = load_diffusion(web_runs / "class", device="cuda")
    assert m.device.type == "cuda"


@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp_2m_sde", "ddpm"])
def test_gpu_samples_match_the_cpu_samples_of_the_same_seeds(web_runs, sampler):
    request = GuidanceRequest(classes=[3, 7], scale=2.0)
    kw = dict(request=request, sampler=sampler, steps=8, seed=5, options=sampler_options(sampler), progress=False)
    cpu = generate(load_diffusion(web_runs / "class"), 4, **kw).images
    gpu_model = load_diffusion(web_runs / "class", device="cuda")
    gpu = generate(gpu_model, 4, **kw).images
    assert gpu.device.type == "cpu" and torch.isfinite(gpu).all()
    # the noise is drawn on the CPU per sample; only float rounding (TF32 convolutions) differs
    assert (gpu - cpu).abs().max() < 0.05, (gpu - cpu).abs().max()
    # and the batch size does not matter on the GPU either
    one_by_one = generate(gpu_model, 4, **kw, batch_size=1).images
    assert (one_by_one - gpu).abs().max() < 1e-3


def test_every_edit_runs_on_the_gpu(web_runs):
    m = load_diffusion(web_runs / "uncond", device="cuda")
    image = torch.rand(1, *m.data_shape) * 2 - 1  # on the CPU, as a loaded picture is
    mask = torch.ones(1, 1, *m.data_shape[1:])
    mask[..., :, m.data_shape[-1] // 2:] = 0
    assert edit_img2img(m, image, n=2, strength=0.5, steps=4).shape == (2, *m.data_shape)
    filled = edit_inpaint(m, image, mask, n=2, steps=4, resample=2)
    kept = mask.bool().expand_as(filled)
    assert torch.equal(filled.cpu()[kept], image.expand_as(filled)[kept])  # the kept half is the input, exactly
    shown, samples = edit_posterior(m, image, t=300, n=2, steps=4)
    assert samples.shape == (2, *m.data_shape)
    assert interpolation_seeds(m, 0, 1, n=3, steps=4).shape == (3, *m.data_shape)
    assert interpolation_images(m, image, -image, t=300, n=3, steps=4).shape == (3, *m.data_shape)
