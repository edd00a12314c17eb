"""Diffusers pipeline folders run with ddpmkit (diffusers_bridge.py, models.load): tiny randomly
initialised pipelines built from configs and saved with save_pretrained, as diffusers' own tests
do (the CLIP tokenizer from a byte-level vocabulary written here: nothing is downloaded). ddpmkit's
samplers reproduce diffusers' pipelines step for step; the command line runs on the folders."""
from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import ddpmkit
from ddpmkit.checkpoint import CheckpointError
from ddpmkit.cli import main
from ddpmkit.diffusers_bridge import DiffusersError, schedule_from_config
from ddpmkit.editing import seed_noise
from ddpmkit.pipelines.generate import generate
from ddpmkit.pipelines.guided import GuidanceRequest, guided_model
from ddpmkit.schedules import NoiseSchedule

PROMPT = "a red circle"  # under the tiny tokenizer's 16 tokens
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                    steps_offset=1)  # Stable Diffusion 1.x's scheduler config


def byte_level_tokenizer(folder, max_length: int = 16):
    """A CLIP tokenizer with no merges: one token per byte, as CLIP's byte-level BPE would start."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = [chr(b) for b in printable] + [chr(256 + k) for k in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 2 * len(chars), "<|endoftext|>": 2 * len(chars) + 1})
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def _tiny_unet(in_channels: int = 4, cross_attention_dim: int = 16, **extra):
    return diffusers.UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
                                          block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
                                          attention_head_dim=2, norm_num_groups=4, **extra)


def _tiny_vae():
    return diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                   up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4,
                                   norm_num_groups=4, sample_size=16)


def _tiny_text_encoders(root, hidden: int = 16, projection: int = 0):
    """The byte-level tokenizer and a 2-layer CLIP text config of width `hidden`."""
    tokenizer = byte_level_tokenizer(root)
    config = transformers.CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=hidden,
                                         intermediate_size=32, num_attention_heads=2, num_hidden_layers=2, max_position_embeddings=16,
                                         projection_dim=projection or hidden)
    return tokenizer, config


def _tiny_sd_folder(root, unet, pipeline=None):
    torch.manual_seed(0)
    tokenizer, config = _tiny_text_encoders(root)
    pipe = (pipeline or diffusers.StableDiffusionPipeline)(
        vae=_tiny_vae(), text_encoder=transformers.CLIPTextModel(config), tokenizer=tokenizer, unet=unet,
        scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion folder: 8x8x4 latents, 16x16 RGB images, a 2-layer CLIP text encoder."""
    torch.manual_seed(0)
    return _tiny_sd_folder(tmp_path_factory.mktemp("sd"), _tiny_unet())


@pytest.fixture(scope="module")
def tiny_ddpm(tmp_path_factory):
    """A tiny unconditional pipeline laid out as google/ddpm-cifar10-32: UNet2DModel + DDPMScheduler."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4)
    folder = tmp_path_factory.mktemp("ddpm") / "pipeline"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(beta_schedule="linear")).save_pretrained(folder)
    return folder


def _diffusers_pipe(folder, scheduler: str, **config):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config, **config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# DDIM: with set_alpha_to_one=False (SD's config) diffusers' last DDIM step lands on alpha_bar_0,
# not on x_0, so the parity test sets it True; everywhere else the grids and the math are the same.
@pytest.mark.parametrize("scheduler, sampler, config, variant", [
    ("DDIMScheduler", "ddim", {"set_alpha_to_one": True}, {}),
    ("EulerDiscreteScheduler", "euler", {}, {}),
    ("DPMSolverMultistepScheduler", "dpmpp_2m", {}, {"solver_type": "midpoint"}),  # diffusers' default 2M is the midpoint form
    # 3M: diffusers lowers the last steps' order below 15 steps only (ddpmkit always): at 10 steps both do
    ("DPMSolverMultistepScheduler", "dpmpp_3m", {"solver_order": 3}, {"solver_type": "midpoint"}),
    ("UniPCMultistepScheduler", "unipc", {}, {}),  # bh2, order 2, the corrector on
    ("UniPCMultistepScheduler", "unipc", {"solver_order": 3}, {"order": 3}),
    ("HeunDiscreteScheduler", "heun", {}, {}),  # its timesteps name each point twice (2N - 1 calls): the grid is each once
])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_ddpmkit_samplers_reproduce_the_diffusers_pipeline(tiny_sd, scheduler, sampler, config, variant, guidance):
    pipe = _diffusers_pipe(tiny_sd, scheduler, **config)
    noise = seed_noise(7, (4, 8, 8))
    ref = pipe(PROMPT, num_inference_steps=10, guidance_scale=guidance, latents=noise.clone(), output_type="latent").images
    grid = pipe.scheduler.timesteps.to(torch.float64).unique_consecutive()  # the timesteps diffusers visited: ddpmkit's grid
    m = ddpmkit.load(tiny_sd)
    model, kwargs, options = guided_model(m, 1, GuidanceRequest(prompts=[PROMPT], scale=guidance), sampler)
    x = ddpmkit.sample(model, (1, 4, 8, 8), sampler=sampler, steps=10, x_T=noise, grid=grid, clip_x0=False,
                       model_kwargs=kwargs, **options, **variant).x
    assert ref.abs().max() > 0.1 and (x - ref).abs().max() < 1e-4 * ref.abs().max()
    # the user's path: generate() with seed 7 starts from the same noise and decodes with the VAE
    out = generate(m, 1, GuidanceRequest(prompts=[PROMPT], scale=guidance), sampler, 10, seed=7, options={"grid": grid, **variant},
                   progress=False)
    images = pipe(PROMPT, num_inference_steps=10, guidance_scale=guidance, latents=noise.clone(), output_type="pt").images
    assert (images - (out.images + 1) / 2).abs().max() < 1e-4


# diffusers' (0.42) third-order multistep step for the SDE (sde-dpmsolver++, solver_order=3) weighs D2 by
# alpha_t ((1 - e^{-2h} - 2h) / (2h)^2 - 0.5), which tends to -alpha_t as h -> 0: a D2 term of the second order, not the
# third. The step's own ODE form (h for 2h) gives + 0.5: alpha_t h / 3 + O(h^2), k-diffusion's phi_3 with h_eta = 2h.
SDE_3M_D2 = "((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2"


def test_dpmpp_3m_sde_is_diffusers_3m_sde_with_the_sign_of_its_d2_weight_corrected(tiny_sd, monkeypatch):
    """Noise for noise, as the 2M SDE: where diffusers' source still has the -0.5 above, its 3M SDE differs from
    ddpmkit's by more than 5% of the latents, and the same step with +0.5 is ddpmkit's to 1e-4; where it is fixed,
    diffusers' own step is."""
    import inspect
    import textwrap

    from diffusers.schedulers import scheduling_dpmsolver_multistep as module

    def latents() -> tuple[torch.Tensor, torch.Tensor]:
        pipe = _diffusers_pipe(tiny_sd, "DPMSolverMultistepScheduler", solver_order=3, algorithm_type="sde-dpmsolver++", solver_type="midpoint")
        ref = pipe(PROMPT, num_inference_steps=10, guidance_scale=3.0, latents=seed_noise(7, (4, 8, 8)), output_type="latent",
                   generator=torch.Generator().manual_seed(11)).images
        model, kwargs, options = guided_model(ddpmkit.load(tiny_sd), 1, GuidanceRequest(prompts=[PROMPT], scale=3.0), "dpmpp_3m_sde")
        x = ddpmkit.sample(model, (1, 4, 8, 8), sampler="dpmpp_3m_sde", steps=10, x_T=seed_noise(7, (4, 8, 8)), clip_x0=False,
                           grid=pipe.scheduler.timesteps.to(torch.float64), generator=11, model_kwargs=kwargs, solver_type="midpoint", **options).x
        return x, ref
    step = textwrap.dedent(inspect.getsource(module.DPMSolverMultistepScheduler.multistep_dpm_solver_third_order_update))
    if SDE_3M_D2 in step:
        x, ref = latents()
        assert (x - ref).abs().max() > 0.05 * ref.abs().max()
        namespace = dict(vars(module))
        exec(step.replace(SDE_3M_D2, SDE_3M_D2.replace("- 0.5", "+ 0.5")), namespace)
        monkeypatch.setattr(module.DPMSolverMultistepScheduler, "multistep_dpm_solver_third_order_update",
                            namespace["multistep_dpm_solver_third_order_update"])
    x, ref = latents()
    assert ref.abs().max() > 0.1 and (x - ref).abs().max() < 1e-4 * ref.abs().max(), (x - ref).abs().max()


@pytest.mark.parametrize("scheduler, sampler, config, variant", [
    ("DDPMScheduler", "ddpm", {}, {}),  # "fixed_small": beta-tilde
    ("DDIMScheduler", "ddim", {"set_alpha_to_one": True}, {"eta": 1.0}),
    ("DDIMScheduler", "ddim", {"set_alpha_to_one": True}, {"eta": 0.5}),
    ("EulerAncestralDiscreteScheduler", "euler_ancestral", {}, {}),
    ("DPMSolverMultistepScheduler", "dpmpp_2m_sde", {"algorithm_type": "sde-dpmsolver++", "solver_type": "midpoint"}, {"solver_type": "midpoint"}),
    ("DPMSolverMultistepScheduler", "dpmpp_2m_sde", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}, {}),
])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_stochastic_samplers_reproduce_diffusers_noise_for_noise(tiny_sd, scheduler, sampler, config, variant, guidance):
    """Ancestral DDPM, DDIM with eta > 0, Stable Diffusion's "Euler a" and DPM-Solver++(2M) SDE: diffusers draws each
    step's noise from the generator it is given, as ddpmkit draws sample 0's from the generator of its seed (one
    (4, 8, 8) draw a step), so the same seed gives the same latents (the SDE's 2M in either second-order weight)."""
    pipe = _diffusers_pipe(tiny_sd, scheduler, **config)
    noise = seed_noise(7, (4, 8, 8))
    ref = pipe(PROMPT, num_inference_steps=10, guidance_scale=guidance, latents=noise.clone(), output_type="latent",
               generator=torch.Generator().manual_seed(11), **({"eta": variant["eta"]} if "eta" in variant else {})).images
    grid = pipe.scheduler.timesteps.to(torch.float64)
    m = ddpmkit.load(tiny_sd)
    model, kwargs, options = guided_model(m, 1, GuidanceRequest(prompts=[PROMPT], scale=guidance), sampler)
    x = ddpmkit.sample(model, (1, 4, 8, 8), sampler=sampler, steps=10, x_T=noise, grid=grid, clip_x0=False, generator=11,
                       model_kwargs=kwargs, **options, **variant).x
    assert ref.abs().max() > 0.1 and (x - ref).abs().max() < 1e-4 * ref.abs().max(), (x - ref).abs().max()


def test_ddpm_with_beta_is_diffusers_fixed_large_but_for_the_noise_diffusers_adds_to_x_0(tiny_sd):
    """sigma_t^2 = beta_t (diffusers' "fixed_large"): step for step diffusers' latents, up to the last step, where
    diffusers adds noise of variance beta (1 - alpha_bar_1 respaced, 0.0017) to the sample it returns and ddpmkit, as
    improved-diffusion, takes beta-tilde there (0: x_0 itself). The difference is that noise: diffusers' tenth draw."""
    pipe = _diffusers_pipe(tiny_sd, "DDPMScheduler", variance_type="fixed_large")
    theirs, ours = [], []

    def keep(pipe, i, t, tensors):
        theirs.append(tensors["latents"].clone())
        return tensors
    ref = pipe(PROMPT, num_inference_steps=10, guidance_scale=3.0, latents=seed_noise(7, (4, 8, 8)), output_type="latent",
               generator=torch.Generator().manual_seed(11), callback_on_step_end=keep).images
    model, kwargs, options = guided_model(ddpmkit.load(tiny_sd), 1, GuidanceRequest(prompts=[PROMPT], scale=3.0), "ddpm")
    x = ddpmkit.sample(model, (1, 4, 8, 8), sampler="ddpm", steps=10, x_T=seed_noise(7, (4, 8, 8)), clip_x0=False, variance="beta",
                       grid=pipe.scheduler.timesteps.to(torch.float64), generator=11, model_kwargs=kwargs,
                       callback=lambda info: ours.append(info["x"].clone()), **options).x
    scale = ref.abs().max()
    assert len(theirs) == len(ours) == 10 and all((a - b).abs().max() < 1e-4 * scale for a, b in zip(theirs[:-1], ours[:-1]))
    g = torch.Generator().manual_seed(11)
    last = [torch.randn((1, 4, 8, 8), generator=g) for _ in range(10)][-1]
    beta = 1 - pipe.scheduler.alphas_cumprod[pipe.scheduler.timesteps[-1]]
    assert 1e-3 < beta < 3e-3 and (ref - x - beta.sqrt() * last).abs().max() < 1e-4 * scale < (ref - x).abs().max()


def test_the_unconditional_pipeline_matches_diffusers_ddim(tiny_ddpm):
    pipe = diffusers.DDIMPipeline.from_pretrained(tiny_ddpm)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # ddpmkit's clipped DDIM recomputes eps from the clipped x_0 (improved-diffusion's way), which is
    # diffusers' use_clipped_model_output=True; with its default (False) the two part on clipped steps
    ref = pipe(generator=torch.Generator().manual_seed(3), num_inference_steps=8, eta=0.0, output_type="np",
               use_clipped_model_output=True).images  # (1, 8, 8, 3)
    m = ddpmkit.load(tiny_ddpm)
    assert (m.conditioning, m.data_shape, m.prediction, m.autoencoder) == ("none", (3, 8, 8), "eps", None)
    out = generate(m, 1, None, "ddim", 8, seed=3, options={"grid": pipe.scheduler.timesteps.double(), "clip_x0": True}, progress=False)
    assert (torch.from_numpy(ref).permute(0, 3, 1, 2) - (out.images + 1) / 2).abs().max() < 1e-4


@pytest.mark.parametrize("config", [
    dict(beta_schedule="linear", beta_start=2e-4, beta_end=0.03, num_train_timesteps=500),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
    dict(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
])
def test_schedule_from_the_scheduler_config_is_diffusers_own(config):
    scheduler = diffusers.DDPMScheduler(**config)
    schedule, prediction, learned = schedule_from_config(dict(scheduler.config))
    assert torch.allclose(schedule.alpha_bar, scheduler.alphas_cumprod.double(), rtol=1e-5, atol=1e-9)
    assert prediction == {"epsilon": "eps", "v_prediction": "v"}[scheduler.config.prediction_type] and not learned
    assert isinstance(schedule, NoiseSchedule) and schedule.T == scheduler.config.num_train_timesteps


@pytest.mark.parametrize("config, message", [
    ({"beta_schedule": "exponential"}, "unsupported beta_schedule 'exponential' in the scheduler config; "
     "ddpmkit reads ['linear', 'scaled_linear', 'squaredcos_cap_v2']"),
    ({"prediction_type": "flow"}, "unsupported prediction_type 'flow'; ddpmkit reads ['epsilon', 'v_prediction', 'sample']"),
    ({"variance_type": "learned"}, "unsupported variance_type 'learned'"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr = true with prediction_type = 'epsilon'"),
])
def test_unsupported_scheduler_configs_name_what_is_supported(config, message):
    with pytest.raises(DiffusersError, match=message.replace("[", r"\[").replace("]", r"\]")):
        schedule_from_config(config)


def test_bad_folders_say_what_is_missing(tiny_sd, tmp_path, monkeypatch):
    import shutil

    assert main(["sample", str(tmp_path), "--n", "1"]) == 2  # neither a run nor a pipeline
    broken = tmp_path / "no_vae"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(DiffusersError, match=r"has a text-conditional UNet but no \['vae'\]"):
        ddpmkit.load(broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(DiffusersError, match="without a 'scheduler' component"):
        ddpmkit.load(broken)
    with pytest.raises(DiffusersError, match="ddpmkit downloads nothing.*huggingface-cli download someone/no-such-model"):
        ddpmkit.load("someone/no-such-model")
    with pytest.raises(CheckpointError, match=r"is a diffusers pipeline \(a denoiser\), not an autoencoder model$"):
        ddpmkit.load(tiny_sd, kind="autoencoder")
    # a run not trained yet (the DreamBooth preset's train.init_from before `ddpmkit train mnist_text`) is no hub id
    with pytest.raises(CheckpointError, match=r"^no checkpoint at runs/mnist_text \(expected a ckpt-XXXXXXX folder"):
        ddpmkit.load("runs/mnist_text")
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(CheckpointError, match=rf"^no checkpoint at {tmp_path.name}/no_run "):
        ddpmkit.load(f"{tmp_path.name}/no_run")  # its first folder is one here
    with pytest.raises(ValueError, match="precision 'int8': choose from"):
        ddpmkit.load(tiny_sd, dtype="int8")


def test_command_line_on_a_stable_diffusion_folder(tiny_sd, tmp_path, capsys):
    out = tmp_path / "samples"
    assert main(["sample", str(tiny_sd), "--prompt", PROMPT, "--sampler", "unipc", "--steps", "10", "--n", "2", "--guidance", "4",
                 "--guidance-rescale", "0.5", "--out", str(out)]) == 0
    assert (out / "grid.png").is_file() and (out / "reverse_process.gif").is_file()
    assert torch.load(out / "samples.pt").shape == (2, 3, 16, 16)
    keys = tmp_path / "keyframes.txt"
    keys.write_text("3 a red circle\n14 a blue square\n")
    gifs = []
    for k in range(2):
        assert main(["voyage", str(keys), "--model", str(tiny_sd), "--frames", "3", "--steps", "4", "--out", str(tmp_path / f"v{k}")]) == 0
        gifs.append((tmp_path / f"v{k}" / "voyage.gif").read_bytes())
    assert gifs[0] == gifs[1]  # the same bytes twice
    from PIL import Image

    Image.new("RGB", (24, 24), (200, 30, 30)).save(tmp_path / "image.png")
    assert main(["img2img", str(tiny_sd), str(tmp_path / "image.png"), "--prompt", PROMPT, "--steps", "5", "--n", "2",
                 "--out", str(tmp_path / "edits")]) == 0
    assert (tmp_path / "edits" / "img2img.png").is_file()
    assert main(["inpaint", str(tiny_sd), str(tmp_path / "image.png"), "--prompt", PROMPT, "--steps", "4", "--resample", "2", "--n", "1",
                 "--mask", "left", "--out", str(tmp_path / "edits")]) == 0  # in latent space, the mask downsampled
    assert main(["interpolate", str(tiny_sd), "--seeds", "3,14", "--prompt", PROMPT, "--steps", "4", "--n", "3",
                 "--out", str(tmp_path / "edits")]) == 0
    assert (tmp_path / "edits" / "inpaint.png").is_file() and (tmp_path / "edits" / "interpolate_seeds_3_14.png").is_file()


def test_half_precision_weights_sample_close_to_float32(tiny_sd):
    request = GuidanceRequest(prompts=[PROMPT], scale=3.0)
    full = generate(ddpmkit.load(tiny_sd), 1, request, "dpmpp_2m", 4, seed=1, progress=False).images
    m = ddpmkit.load(tiny_sd, dtype="bfloat16")
    assert m.network.unet.dtype == torch.bfloat16 and m.autoencoder.vae.dtype == torch.bfloat16
    half = generate(m, 1, request, "dpmpp_2m", 4, seed=1, progress=False).images
    assert half.dtype == torch.float32 and 0 < (half - full).abs().mean() < 0.1  # bf16 rounding, not another image


def test_tune_grid_on_stable_diffusion_writes_a_grid_sample_accepts(tiny_sd, tmp_path, capsys):
    grid = tmp_path / "grid.json"
    assert main(["tune-grid", str(tiny_sd), "--prompt", PROMPT, "--steps", "4", "--n", "2", "--evals", "12", "--out", str(grid)]) == 0
    use = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("use it with: ")
    argv = shlex.split(use)[1:] + ["--prompt", PROMPT, "--n", "1", "--out", str(tmp_path / "s")]
    assert main(argv) == 0 and (tmp_path / "s" / "grid.png").is_file()
    ts = json.loads(grid.read_text())["timesteps"]
    assert len(ts) == 4 and ts == sorted(ts, reverse=True)


def test_the_web_page_serves_a_pipeline_folder(tiny_sd, tiny_ddpm, tmp_path):
    from ddpmkit.web.actions import Actions
    from ddpmkit.web.shelf import Shelf, find_runs

    runs = find_runs([tiny_sd, tiny_ddpm.parent])
    assert runs == [str(tiny_sd), str(tiny_ddpm)]
    actions = Actions(Shelf(runs), work_dir=tmp_path / "work")
    assert "text-conditional" in actions.describe(str(tiny_sd))[0]
    _, settings = actions.settings(str(tiny_sd), PROMPT, "dpmpp_2m", 4, "default", 3.0, 5, 2)
    final = list(actions.generate(settings))[-1]
    assert final["result"].shape == (16 * 4 + 4, 2 * (16 * 4 + 2) + 2, 3)  # two 16x16 RGB images side by side, shown 4x
    assert final["command"] == f"ddpmkit sample {tiny_sd} --n 2 --sampler dpmpp_2m --steps 4 --seed 5 --prompt '{PROMPT}' --guidance 3 --out samples"


def test_eval_of_a_pipeline_against_a_folder_of_real_images(tiny_sd, tmp_path, capsys):
    from PIL import Image

    from ddpmkit.evaluate.inception import FIDInceptionV3

    torch.manual_seed(0)
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(FIDInceptionV3().eval().state_dict(), weights)  # the real network, random weights: offline
    real = tmp_path / "real"
    real.mkdir()
    for k in range(6):
        Image.new("RGB", (16, 16), (40 * k, 255 - 40 * k, 128)).save(real / f"{k}.png")
    argv = ["eval", str(tiny_sd), "--metrics", "fd,kid,is", "--features", "inception", "--inception", str(weights), "--n", "6",
            "--sampler", "dpmpp_2m", "--steps", "3", "--prompt", PROMPT, "--out", str(tmp_path / "report.json")]
    assert main(argv) == 2 and "give --reference, a folder of real images" in capsys.readouterr().err
    assert main([*argv[:2], "--metrics", "fd,kid,is,copies", *argv[4:], "--reference", str(real)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["metrics"]) == {"fd", "kid", "is", "copies"} and report["metrics"]["fd"]["value"] > 0
    assert report["sampling"]["reference"] == f"{real} (6 images)"
    copied = report["metrics"]["copies"]  # against the folder's images, read as a Dataset; a folder has no held-out split
    assert 0 <= copied["value"] <= 1 and "real" not in copied and f"one of the 6 images of {real} " in copied["unit"]


@pytest.mark.parametrize("changes", [{"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"},
                                     {"beta_schedule": "squaredcos_cap_v2"}])
def test_a_pipelines_config_describes_its_real_schedule(tiny_sd, tmp_path, changes):
    """The loaded pipeline's ddpmkit config names the schedule its scheduler config gives (zero terminal SNR
    included), so every check that reads the config reads the truth."""
    import json
    import shutil

    folder = tmp_path / "pipe"
    shutil.copytree(tiny_sd, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    m = ddpmkit.load(folder)
    assert m.config.diffusion.noise_schedule().same_as(m.schedule)
    assert m.config.diffusion.zero_terminal_snr == bool(changes.get("rescale_betas_zero_snr"))


@pytest.fixture(scope="module")
def diffusers_lora(tiny_sd, tmp_path_factory):
    """A LoRA file made by diffusers itself (peft adapters on the UNet's attention and the text encoder's
    projections, random A and B so that it changes the output; saved with save_lora_weights)."""
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_sd)
    torch.manual_seed(1)
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    # peft's own injection: transformers' add_adapter asks for a newer peft than the registry has
    peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                                 pipe.text_encoder)
    folder = tmp_path_factory.mktemp("lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
                                                        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder))
    return folder / "pytorch_lora_weights.safetensors"


def test_a_diffusers_lora_merged_at_a_scale_samples_as_diffusers_does_and_unmerges(tiny_sd, diffusers_lora):
    from ddpmkit.loras import LoRA

    noise = seed_noise(7, (4, 8, 8))
    pipe = _diffusers_pipe(tiny_sd, "DDIMScheduler", set_alpha_to_one=True)
    plain = pipe(PROMPT, num_inference_steps=6, guidance_scale=3.0, latents=noise.clone(), output_type="latent").images
    pipe.load_lora_weights(diffusers_lora, adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    ref = pipe(PROMPT, num_inference_steps=6, guidance_scale=3.0, latents=noise.clone(), output_type="latent").images
    grid = pipe.scheduler.timesteps.to(torch.float64)
    m = ddpmkit.load(tiny_sd, loras=[LoRA(str(diffusers_lora), 0.7)])
    base_weight = ddpmkit.load(tiny_sd).network.unet.state_dict()
    model, kwargs, options = guided_model(m, 1, GuidanceRequest(prompts=[PROMPT], scale=3.0), "ddim")
    x = ddpmkit.sample(model, (1, 4, 8, 8), sampler="ddim", steps=6, x_T=noise, grid=grid, clip_x0=False, model_kwargs=kwargs, **options).x
    assert (ref - plain).abs().max() > 0.05, "the LoRA changes the samples"
    assert (x - ref).abs().max() < 1e-4 * ref.abs().max()  # UNet and text-encoder adapters, at scale 0.7, as diffusers applies them
    m.loras.unmerge()
    state = m.network.unet.state_dict()
    assert all((state[k] - v).abs().max() < 1e-6 for k, v in base_weight.items())  # the base weights back (float rounding)


def test_lora_on_the_command_line_and_its_errors(tiny_sd, diffusers_lora, tmp_path, capsys):
    from PIL import Image

    assert main(["sample", str(tiny_sd), "--prompt", PROMPT, "--sampler", "ddim", "--steps", "3", "--n", "1", "--no-gif",
                 "--lora", f"{diffusers_lora}:0.8", "--lora", str(diffusers_lora.parent), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "grid.png").is_file()
    assert main(["sample", str(tiny_sd), "--prompt", PROMPT, "--sampler", "ddim", "--steps", "3", "--n", "1", "--no-gif",
                 "--lora", str(diffusers_lora.parent), "--out", str(tmp_path / "s_folder")]) == 0
    grids = {"folder": np.asarray(Image.open(tmp_path / "s_folder" / "grid.png"))}
    for spec, message in [(f"{tmp_path}/missing.safetensors:0.5", "no such file"), (f"{diffusers_lora}:nan", "finite number")]:
        assert main(["sample", str(tiny_sd), "--prompt", PROMPT, "--steps", "2", "--lora", spec, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    assert main(["sample", str(tiny_sd), "--prompt", PROMPT, "--steps", "2", "--lora", str(tmp_path / "junk.safetensors"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "is not a LoRA for this pipeline" in capsys.readouterr().err
    # a ddpmkit checkpoint folder: an SD LoRA run's holds diffusers' file and merges (as the folder alone does); another
    # run's (no such file) merges into the run it fine-tuned, not into a pipeline folder
    import shutil

    shutil.copytree(diffusers_lora.parent, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    for name in ("ckpt", "run"):
        code = main(["sample", str(tiny_sd), "--prompt", PROMPT, "--sampler", "ddim", "--steps", "3", "--n", "1", "--no-gif",
                     "--lora", str(tmp_path / name), "--out", str(tmp_path / f"s_{name}")])
        grids[name] = code == 0 and np.asarray(Image.open(tmp_path / f"s_{name}" / "grid.png"))
    assert (grids["ckpt"] == grids["folder"]).all() and grids["run"] is False
    assert f"--lora {tmp_path / 'run'} is a ddpmkit run: a ddpmkit LoRA run merges into the run it fine-tuned" in capsys.readouterr().err
    # the editing commands merge LoRAs (and take --dtype) as sample does: at scale 0 the edit is the folder's own
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tmp_path / "image.png")
    strips = {}
    for name, lora in (("plain", []), ("zero", ["--lora", f"{diffusers_lora}:0"]), ("style", ["--lora", f"{diffusers_lora}:0.8"])):
        assert main(["img2img", str(tiny_sd), str(tmp_path / "image.png"), "--prompt", PROMPT, "--steps", "3", "--n", "1", *lora,
                     "--out", str(tmp_path / name)]) == 0, capsys.readouterr().err
        strips[name] = (tmp_path / name / "img2img.png").read_bytes()
    assert strips["zero"] == strips["plain"] != strips["style"]


@pytest.fixture(scope="module")
def captioned_images(tmp_path_factory):
    """Eight 16x16 pictures with a caption each: red squares on blue, the fine-tuning set."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("captioned")
    for k in range(8):
        img = Image.new("RGB", (16, 16), (20, 40, 200))
        img.paste((230, 30, 30), (2 + k % 4, 3, 10 + k % 4, 11))
        img.save(folder / f"{k}.png")
        (folder / f"{k}.txt").write_text("a red square")
    return folder


def sd_lora(tiny_sd, images, run, *extra: str, lora: bool = True) -> list[str]:
    """The overrides of a tiny sd_lora run; lora=False: every weight trains (train.lora_alpha would be refused unread)."""
    adapters = ["train.lora_rank=4", "train.lora_alpha=8"] if lora else ["train.lora_rank=0"]
    return [f"train.init_from={tiny_sd}", f"data.path={images}", "data.image_size=16", "data.hflip=false", "train.batch_size=4",
            *adapters, "train.lr=1e-2", "train.mixed_precision=fp32", "train.log_every=5", f"train.run_dir={run}", *extra]


def test_an_unconditional_pipeline_fine_tunes_unconditionally_in_pixels(tiny_ddpm, captioned_images, tmp_path):
    """A folder with no text encoder (google/ddpm-cifar10-32's layout) fine-tunes as what it is: no prompts and no classes
    (the images' captions unused, their folder needs no class subfolders), in pixel space, with the folder's schedule."""
    from safetensors.torch import load_file

    from ddpmkit.checkpoint import list_checkpoints
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    run = train(load_config("sd_lora", [f"train.init_from={tiny_ddpm}", f"data.path={captioned_images}", "data.image_size=8", "train.steps=2",
                                        "train.batch_size=4", "train.lora_rank=4", "train.checkpoint_every=0", "train.mixed_precision=fp32",
                                        f"train.run_dir={tmp_path / 'run'}"]), progress=False)
    tuned = ddpmkit.load(run)
    assert (tuned.conditioning, tuned.config.network.num_classes, tuned.config.network.text_encoder) == ("none", 0, "")
    assert tuned.autoencoder is None and tuned.image_shape == (3, 8, 8) and tuned.config.diffusion.schedule == "linear"
    assert all("lora_" in k for k in load_file(list_checkpoints(run)[-1] / "ema.safetensors"))
    assert ddpmkit.generate(tuned, 2, steps=3, seed=0, progress=False).images.shape == (2, 3, 8, 8)


def test_a_lora_fine_tune_of_a_stable_diffusion_folder_learns_saves_for_diffusers_and_resumes(tiny_sd, captioned_images, tmp_path):
    from safetensors.torch import load_file

    from ddpmkit.checkpoint import list_checkpoints
    from ddpmkit.config import load_config
    from ddpmkit.losses import training_losses
    from ddpmkit.train import train

    run = train(load_config("sd_lora", sd_lora(tiny_sd, captioned_images, tmp_path / "lora", "train.steps=40", "train.checkpoint_every=0")),
                progress=False)
    ckpt = list_checkpoints(run)[-1]
    assert all("lora_" in k for k in load_file(ckpt / "ema.safetensors")), "only the adapters are saved"
    base, tuned = ddpmkit.load(tiny_sd), ddpmkit.load(run)
    assert tuned.config.network.kind == "diffusers" and tuned.config.diffusion.schedule == "scaled_linear"

    def loss(m) -> float:  # L_simple on the fine-tuning set's latents and captions, fixed t and noise
        from ddpmkit.images import load_image

        x = torch.cat([load_image(str(captioned_images / f"{k}.png"), 16, 3) for k in range(8)])
        z = base.encode(x)
        g = torch.Generator().manual_seed(0)
        t, noise = torch.randint(0, 1000, (8,), generator=g), torch.randn(z.shape, generator=g)
        with torch.no_grad():
            return training_losses(m.network, z, t, m.schedule, noise, prediction=m.prediction,
                                   model_kwargs=m.encode_prompts(["a red square"] * 8))["loss"].mean().item()
    assert loss(tuned) < 0.9 * loss(base), (loss(base), loss(tuned))

    # diffusers reads the checkpoint's LoRA file and samples what ddpmkit samples with the run
    noise = seed_noise(7, (4, 8, 8))
    pipe = _diffusers_pipe(tiny_sd, "DDIMScheduler", set_alpha_to_one=True)
    pipe.load_lora_weights(ckpt)
    ref = pipe(PROMPT, num_inference_steps=6, guidance_scale=3.0, latents=noise.clone(), output_type="latent").images
    model, kwargs, options = guided_model(tuned, 1, GuidanceRequest(prompts=[PROMPT], scale=3.0), "ddim")
    x = ddpmkit.sample(model, (1, 4, 8, 8), sampler="ddim", steps=6, x_T=noise, grid=pipe.scheduler.timesteps.to(torch.float64),
                       clip_x0=False, model_kwargs=kwargs, **options).x
    assert (x - ref).abs().max() < 1e-4 * ref.abs().max()

    # exact resume: stopped after the half-way checkpoint, the run continues as if never stopped
    import shutil

    straight = train(load_config("sd_lora", sd_lora(tiny_sd, captioned_images, tmp_path / "straight", "train.steps=6",
                                                    "train.checkpoint_every=0")), progress=False)
    half = sd_lora(tiny_sd, captioned_images, tmp_path / "halves", "train.checkpoint_every=3")
    train(load_config("sd_lora", [*half, "train.steps=6"]), progress=False)
    for later in list_checkpoints(tmp_path / "halves")[1:]:
        shutil.rmtree(later)
    resumed = train(load_config("sd_lora", [*half, "train.steps=6"]), resume=True, progress=False)
    a, b = (load_file(list_checkpoints(r)[-1] / "model.safetensors") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)



@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory):
    """A tiny Stable Diffusion inpainting folder: its UNet takes 9 channels (latents, mask, masked-image latents)."""
    torch.manual_seed(0)
    return _tiny_sd_folder(tmp_path_factory.mktemp("sd_inpaint"), _tiny_unet(in_channels=9), diffusers.StableDiffusionInpaintPipeline)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL folder: two text encoders (the second with a projection: the pooled embedding), time ids."""
    root = tmp_path_factory.mktemp("sdxl")
    torch.manual_seed(0)
    unet = _tiny_unet(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + 16)  # 6 time ids of 8 features, the 16-dim pooled embedding
    tokenizer, config = _tiny_text_encoders(root, hidden=16, projection=16)
    pipe = diffusers.StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=transformers.CLIPTextModel(config),
                                               text_encoder_2=transformers.CLIPTextModelWithProjection(config), tokenizer=tokenizer,
                                               tokenizer_2=tokenizer, unet=unet, scheduler=diffusers.EulerDiscreteScheduler(
                                                   beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1))
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_sdxl_folders_sample_as_diffusers_pipeline_does(tiny_sdxl, guidance):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    noise = seed_noise(7, (4, 8, 8))
    ref = pipe(PROMPT, num_inference_steps=8, guidance_scale=guidance, latents=noise.clone(), output_type="latent").images
    grid = pipe.scheduler.timesteps.to(torch.float64)
    m = ddpmkit.load(tiny_sdxl)
    assert m.data_shape == (4, 8, 8) and m.image_shape == (3, 16, 16)
    model, kwargs, options = guided_model(m, 1, GuidanceRequest(prompts=[PROMPT], scale=guidance), "dpmpp_2m")
    assert kwargs["context"].shape == (1, 16, 32) and kwargs["pooled"].shape == (1, 16) and kwargs["time_ids"].tolist() == [[16, 16, 0, 0, 16, 16]]
    x = ddpmkit.sample(model, (1, 4, 8, 8), sampler="dpmpp_2m", steps=8, x_T=noise, grid=grid, clip_x0=False, model_kwargs=kwargs,
                       solver_type="midpoint", **options).x
    assert ref.abs().max() > 0.1 and (x - ref).abs().max() < 1e-4 * ref.abs().max()


def test_a_9_channel_inpainting_folder_inpaints_as_diffusers_pipeline_does(tiny_inpainting, tmp_path, capsys):
    from ddpmkit.images import make_mask
    from ddpmkit.pipelines.edit import edit_inpaint

    image01 = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    keep = make_mask("right", (16, 16))  # 1 = keep: the right half is filled in
    m = ddpmkit.load(tiny_inpainting)
    assert m.inpainting and m.data_shape == (4, 8, 8)
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(tiny_inpainting)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True)
    pipe.set_progress_bar_config(disable=True)
    fill = 1 - keep
    masked_latents = m.encode(2 * image01 * (fill < 0.5) - 1 * (fill < 0.5))  # the posterior's mode, as ddpmkit encodes
    noise = seed_noise(7, (4, 8, 8))
    ref = pipe(PROMPT, image=image01, mask_image=fill, masked_image_latents=masked_latents, latents=noise.clone(), num_inference_steps=6,
               guidance_scale=3.0, strength=1.0, output_type="pt").images
    grid = pipe.scheduler.timesteps.to(torch.float64)
    out = edit_inpaint(m, 2 * image01 - 1, keep, 1, GuidanceRequest(prompts=[PROMPT], scale=3.0), steps=6, seed=7, sampler="ddim",
                       options={"grid": grid})
    assert (ref - (out + 1) / 2).abs().max() < 1e-4
    # the command line takes the same route, with any sampler
    from PIL import Image

    Image.fromarray((image01[0].permute(1, 2, 0) * 255).byte().numpy()).save(tmp_path / "image.png")
    assert main(["inpaint", str(tiny_inpainting), str(tmp_path / "image.png"), "--prompt", PROMPT, "--sampler", "dpmpp_2m", "--steps", "4",
                 "--n", "2", "--mask", "right", "--out", str(tmp_path / "edits")]) == 0
    assert (tmp_path / "edits" / "inpaint.png").is_file()
    # it fills in one pass a step: RePaint's --resample would be taken and ignored
    assert main(["inpaint", str(tiny_inpainting), str(tmp_path / "image.png"), "--prompt", PROMPT, "--resample", "3", "--out",
                 str(tmp_path / "edits")]) == 2
    assert "resample 3: a 9-channel inpainting UNet sees the mask and fills the image in one pass a step" in capsys.readouterr().err


def test_unsupported_unets_say_what_is_supported(tiny_sd, tmp_path):
    import shutil

    folder = tmp_path / "pix2pix"
    shutil.copytree(tiny_sd, folder)
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "in_channels": 8}))  # instruct-pix2pix's layout
    with pytest.raises(DiffusersError, match="unsupported UNet with 8 input and 4 output channels; ddpmkit runs text-to-image UNets"):
        ddpmkit.load(folder)
    # a config that leaves the channels out has diffusers' defaults, 4 in and 4 out: a text-to-image UNet, or with
    # 9 in an inpainting one
    from ddpmkit.diffusers_bridge import check_unet_config

    for taken in ({}, {"in_channels": 4}, {"out_channels": 4}, {"in_channels": 9}):
        check_unet_config(taken)
    with pytest.raises(DiffusersError, match="8 input and 4 output channels"):
        check_unet_config({"in_channels": 8})


def test_a_stable_diffusion_folder_is_a_teacher_for_progressive_distillation(tiny_sd, captioned_images, tmp_path):
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    run = train(load_config("sd_lora", [*sd_lora(tiny_sd, captioned_images, tmp_path / "pd", "train.steps=6", "train.checkpoint_every=0", lora=False),
                                        "train.init_from=", "train.task=progressive", f"distill.teacher={tiny_sd}",
                                        "distill.student_steps=4", "train.lr=1e-4"]), progress=False)
    student = ddpmkit.load(run)
    assert student.config.network.kind == "diffusers" and student.kind == "progressive" and student.model_kind.sampler == "ddim_uniform"
    out = generate(student, 1, GuidanceRequest(prompts=[PROMPT], scale=3.0), "ddim_uniform", 4, seed=0, progress=False)
    assert out.images.shape == (1, 3, 16, 16) and out.nfe == 4 and not out.images.requires_grad


def test_full_fine_tuning_of_a_stable_diffusion_folder_saves_and_loads_the_whole_unet(tiny_sd, captioned_images, tmp_path):
    from safetensors.torch import load_file

    from ddpmkit.checkpoint import list_checkpoints
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    run = train(load_config("sd_lora", sd_lora(tiny_sd, captioned_images, tmp_path / "full", "train.steps=3", "train.checkpoint_every=0",
                                               "train.lr=1e-3", lora=False)), progress=False)
    saved = load_file(list_checkpoints(run)[-1] / "ema.safetensors")
    base = ddpmkit.load(tiny_sd).network.state_dict()
    assert saved.keys() == base.keys(), "every UNet weight, no adapters"
    tuned = ddpmkit.load(run).network.state_dict()
    assert all(torch.equal(tuned[k], saved[k]) for k in saved) and any(not torch.equal(saved[k], base[k]) for k in saved)
    assert not (list_checkpoints(run)[-1] / "pytorch_lora_weights.safetensors").exists()


def test_a_lora_fine_tune_of_an_sdxl_folder_loads_in_diffusers_and_samples_alike(tiny_sdxl, captioned_images, tmp_path):
    from ddpmkit.checkpoint import list_checkpoints
    from ddpmkit.config import load_config
    from ddpmkit.train import train

    run = train(load_config("sd_lora", sd_lora(tiny_sdxl, captioned_images, tmp_path / "xl", "train.steps=10", "train.checkpoint_every=0")),
                progress=False)
    base, tuned = ddpmkit.load(tiny_sdxl), ddpmkit.load(run)
    noise = seed_noise(3, (4, 8, 8))

    def sample(m, grid=None):
        model, kwargs, options = guided_model(m, 1, GuidanceRequest(prompts=["a red square"], scale=1.0), "dpmpp_2m")
        return ddpmkit.sample(model, (1, 4, 8, 8), sampler="dpmpp_2m", steps=8, x_T=noise, grid=grid, clip_x0=False,
                              model_kwargs=kwargs, solver_type="midpoint", **options).x

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(list_checkpoints(run)[-1])
    ref = pipe("a red square", num_inference_steps=8, guidance_scale=1.0, latents=noise.clone(), output_type="latent").images
    grid = pipe.scheduler.timesteps.to(torch.float64)
    x = sample(tuned, grid)
    assert (x - ref).abs().max() < 1e-4 * ref.abs().max(), "diffusers' SDXL pipeline with the run's LoRA file samples what ddpmkit does"
    assert (sample(base, grid) - x).abs().max() > 1e-2, "the LoRA changed the model"
