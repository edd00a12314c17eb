"""Models people already have: a diffusers pipeline folder (model_index.json) read into
ddpmkit's contract, so every ddpmkit sampler, guidance, editor and the voyage runs on it.

    unconditional   UNet2DModel + a scheduler            (google/ddpm-cifar10-32's layout)
    Stable Diffusion UNet2DConditionModel + AutoencoderKL + CLIPTextModel + CLIPTokenizer + a scheduler

Only the scheduler's *config* is read (its beta schedule, trained T and prediction type): the
sampling itself is ddpmkit's. diffusers and transformers are an optional extra
(pip install "ddpmkit[diffusers]"); nothing is downloaded: a hub id works only when the hub cache
already holds it. models.load() dispatches here.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError
from .config import DiffusionConfig
from .errors import UserError
from .parameterization import Prediction
from .schedules import NoiseSchedule, cosine_betas, rescale_zero_terminal_snr

PIPELINE_INDEX = "model_index.json"
PREDICTIONS: dict[str, Prediction] = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned_range")


class DiffusersError(CheckpointError):
    """A folder that is not a pipeline ddpmkit can run, with what is missing and what is supported."""


def pipeline_folder(path: str | Path) -> Path | None:
    """The diffusers pipeline folder `path` names: the folder itself when it holds model_index.json,
    a hub id ("org/name") already in the local hub cache, or None for anything else (a ddpmkit run).
    A hub id that is not cached is an error that says how to get the folder."""
    path = Path(path)
    if (path / PIPELINE_INDEX).is_file():
        return path
    text = str(path)
    # a local path, not a hub id: "runs/mnist_text" before it is trained (its first folder here, or the runs/ every preset uses)
    if path.exists() or text.count("/") != 1 or text.startswith((".", "/", "runs/")) or Path(text.split("/")[0]).is_dir():
        return None
    try:
        from huggingface_hub import snapshot_download  # optional: comes with the diffusers extra
    except ImportError:
        return None
    try:
        folder = Path(snapshot_download(text, local_files_only=True))  # the cache only, never the network
    except Exception:  # noqa: BLE001 -- any failure means: not cached (or not a repo id)
        raise DiffusersError(f"{text!r} is neither a run folder nor a local diffusers pipeline folder, and the hub cache does not hold "
                             f"it. ddpmkit downloads nothing: fetch it once where there is network, e.g. "
                             f"`huggingface-cli download {text} --local-dir models/{text.split('/')[-1]}` (or "
                             f"`DiffusionPipeline.from_pretrained('{text}').save_pretrained(DIR)`), then pass that folder") from None
    return folder if (folder / PIPELINE_INDEX).is_file() else None


def schedule_from_config(cfg: dict) -> tuple[NoiseSchedule, Prediction, bool]:
    """(schedule, prediction, learned_variance) from a diffusers scheduler config. The betas are
    the config's own (diffusers does not rescale linear end points with T, so neither does this)."""
    T = int(cfg.get("num_train_timesteps", 1000))
    kind = cfg.get("beta_schedule", "linear")
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
    elif kind == "linear":
        betas = torch.linspace(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), T, dtype=torch.float64)
    elif kind == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        betas = torch.linspace(cfg.get("beta_start", 0.00085) ** 0.5, cfg.get("beta_end", 0.012) ** 0.5, T, dtype=torch.float64) ** 2
    elif kind == "squaredcos_cap_v2":  # Nichol & Dhariwal's cosine, beta capped at 0.999
        betas = cosine_betas(T)
    else:
        raise DiffusersError(f"unsupported beta_schedule {kind!r} in the scheduler config; ddpmkit reads {list(BETA_SCHEDULES)} "
                             "(or trained_betas)")
    if cfg.get("rescale_betas_zero_snr"):
        betas = rescale_zero_terminal_snr(betas).clamp(max=1.0)
    prediction_type = cfg.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTIONS:
        raise DiffusersError(f"unsupported prediction_type {prediction_type!r}; ddpmkit reads {list(PREDICTIONS)}")
    if cfg.get("rescale_betas_zero_snr") and prediction_type == "epsilon":
        # at SNR 0 (alpha_bar_T = 0) x_0 = (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) divides by zero: every sample is NaN
        raise DiffusersError("the scheduler config has rescale_betas_zero_snr = true with prediction_type = 'epsilon': an eps model "
                             "cannot give x_0 at zero terminal SNR (every sample would be NaN); zero-SNR models predict "
                             "'v_prediction' (Lin et al. 2024): fix the folder's scheduler_config.json")
    variance = cfg.get("variance_type") or "fixed_small"
    if variance not in VARIANCE_TYPES:
        raise DiffusersError(f"unsupported variance_type {variance!r}; ddpmkit reads {list(VARIANCE_TYPES)}")
    return NoiseSchedule(betas), PREDICTIONS[prediction_type], variance == "learned_range"


def diffusion_config(scheduler_config: dict) -> DiffusionConfig:
    """ddpmkit's [diffusion] section for a scheduler config: the schedule by name, T, zero terminal SNR, prediction."""
    schedule, prediction, learned_variance = schedule_from_config(scheduler_config)
    kind = scheduler_config.get("beta_schedule", "linear")
    return DiffusionConfig(schedule={"squaredcos_cap_v2": "cosine"}.get(kind, kind), T=schedule.T,
                           zero_terminal_snr=bool(scheduler_config.get("rescale_betas_zero_snr", False)), prediction=prediction,
                           learned_variance=learned_variance)


def check_unet_config(cfg: dict) -> None:
    """One clear error for the UNet variants ddpmkit does not run, before any weight is read."""
    cin, cout = cfg.get("in_channels", 4), cfg.get("out_channels", 4)
    if cin != cout and cin != 2 * cout + 1:
        raise DiffusersError(f"unsupported UNet with {cin} input and {cout} output channels; ddpmkit runs text-to-image UNets (as many in "
                             f"as out) and inpainting UNets ({2 * cout + 1} in: latents, mask, masked-image latents)")
    added = cfg.get("addition_embed_type")
    if added not in (None, "text_time"):
        raise DiffusersError(f"unsupported UNet addition_embed_type {added!r}; ddpmkit runs Stable Diffusion 1/2 (none) and SDXL ('text_time')")


class UNetDenoiser(nn.Module):
    """A diffusers UNet under ddpmkit's contract: model(x_t: (B, C, H, W), t: (B,) timesteps, context=None,
    **inputs) -> the prediction, in float32 whatever dtype the UNet computes in. SDXL's UNet also takes the
    pooled text embedding and the size/crop time ids (`pooled`, `time_ids`); an inpainting UNet (9 input
    channels) the mask and the masked image's latents, concatenated to x_t as Stable Diffusion inpainting does."""

    def __init__(self, unet: nn.Module, conditional: bool):
        super().__init__()
        self.unet, self.conditional = unet, conditional
        check_unet_config(dict(unet.config))
        self.inpainting = unet.config.in_channels == 2 * unet.config.out_channels + 1
        self.added = getattr(unet.config, "addition_embed_type", None)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                masked_latents: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.unet.dtype
        t = t.to(x.device)
        if self.inpainting:
            if mask is None or masked_latents is None:
                raise UserError("this inpainting UNet needs the mask and the masked image's latents: use `ddpmkit inpaint` "
                                "(or model_kwargs mask=, masked_latents=)")
            x = torch.cat([x, mask.to(x.dtype), masked_latents.to(x.dtype)], dim=1)
        if not self.conditional:
            return self.unet(x.to(dtype), t).sample.float()
        if context is None:
            raise UserError("this Stable Diffusion UNet needs a prompt's text embeddings (context)")
        added = None
        if self.added == "text_time":
            if pooled is None or time_ids is None:
                raise UserError("this SDXL UNet needs the pooled prompt embedding and the time ids (pooled, time_ids)")
            added = {"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)}
        return self.unet(x.to(dtype), t, encoder_hidden_states=context.to(dtype), added_cond_kwargs=added).sample.float()


class VAELatents(nn.Module):
    """An AutoencoderKL as ddpmkit's latent decoder: images in [-1, 1] <-> latents * scaling_factor."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_shape: tuple[int, ...] = ()  # set by the loader from the UNet's sample size

    def to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior's mode (deterministic, unlike diffusers' img2img, which samples it)."""
        z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.mode()
        return ((z - self.shift_factor) * self.scaling_factor).float()

    def from_latent(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
        return x.float().clamp(-1, 1)


class CLIPPrompts:
    """The pipeline's tokenizer + CLIP text encoder as ddpmkit's prompt encoder: {"context":
    (n, max_length, d)}, padded to the tokenizer's length as Stable Diffusion pipelines do."""

    def __init__(self, tokenizer, text_encoder: nn.Module):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @property
    def dim(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def _tokens(self, tokenizer, prompts: list[str], encoder: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
        dev = next(encoder.parameters()).device
        mask = tokens.attention_mask.to(dev) if getattr(encoder.config, "use_attention_mask", False) else None
        return tokens.input_ids.to(dev), mask

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        ids, mask = self._tokens(self.tokenizer, prompts, self.text_encoder)
        hidden = self.text_encoder(ids, attention_mask=mask)[0]
        return {"context": hidden.float().to(device)}

    def null(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The unconditional branch of guidance: the empty prompt's embedding."""
        return self.encode([""], device)


class SDXLPrompts(CLIPPrompts):
    """SDXL's two text encoders: context = both encoders' penultimate hidden states side by side, pooled = the
    second encoder's projected embedding, time_ids = (height, width, crop top, crop left, height, width) of the
    UNet's native size; the null condition is zeros when the pipeline forces them for the empty prompt (its default)."""

    def __init__(self, tokenizers: list, text_encoders: list[nn.Module], image_size: tuple[int, int], force_zeros: bool):
        super().__init__(tokenizers[0], text_encoders[0])
        self.tokenizers, self.text_encoders, self.force_zeros = tokenizers, text_encoders, force_zeros
        self.time_ids = torch.tensor([*image_size, 0, 0, *image_size], dtype=torch.float32)

    @property
    def dim(self) -> int:
        return sum(int(e.config.hidden_size) for e in self.text_encoders)

    @torch.no_grad()
    def encode(self, prompts: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids, _ = self._tokens(tokenizer, prompts, encoder)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected (pooled) embedding
        return {"context": torch.cat(hidden, dim=-1).float().to(device), "pooled": pooled.float().to(device),
                "time_ids": self.time_ids.expand(len(prompts), -1).to(device)}

    def null(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        out = self.encode([""], device)
        if self.force_zeros:
            out["context"], out["pooled"] = torch.zeros_like(out["context"]), torch.zeros_like(out["pooled"])
        return out


@dataclass
class PipelineParts:
    """What ddpmkit needs of a pipeline folder."""

    network: UNetDenoiser
    schedule: NoiseSchedule
    prediction: Prediction
    learned_variance: bool
    data_shape: tuple[int, ...]
    autoencoder: VAELatents | None
    prompts: CLIPPrompts | None
    scheduler_config: dict


def read_index(folder: Path) -> dict:
    try:
        index = json.loads((folder / PIPELINE_INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusersError(f"cannot read {folder / PIPELINE_INDEX}: {e}") from None
    for name in ("unet", "scheduler"):
        if name not in index or not (folder / name).is_dir():
            raise DiffusersError(f"{folder} is a diffusers pipeline without a '{name}' component (model_index.json lists "
                                 f"{sorted(k for k in index if not k.startswith('_'))}); ddpmkit runs UNet pipelines: "
                                 "unet + scheduler (+ vae, text_encoder, tokenizer for Stable Diffusion)")
    return index


def read_unet(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> UNetDenoiser:
    """The folder's UNet alone, freshly loaded (the network a fine-tuning run trains)."""
    import diffusers  # optional: the diffusers extra

    unet_class = read_index(folder)["unet"][1]
    if unet_class not in ("UNet2DModel", "UNet2DConditionModel"):
        raise DiffusersError(f"unsupported unet class {unet_class!r}; ddpmkit runs UNet2DModel and UNet2DConditionModel")
    try:
        check_unet_config(json.loads((folder / "unet" / "config.json").read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise DiffusersError(f"cannot read {folder / 'unet' / 'config.json'}: {e}") from None
    unet = getattr(diffusers, unet_class).from_pretrained(folder / "unet", torch_dtype=dtype).to(device).eval()
    return UNetDenoiser(unet, unet_class == "UNet2DConditionModel")


@functools.lru_cache(maxsize=2)
def frozen_parts(folder: str) -> PipelineParts:
    """A pipeline's parts on the CPU in float32, read once per process: the frozen VAE and text encoder a
    fine-tuning run encodes its data with (never train these: other callers share them)."""
    return read_pipeline(Path(folder))


def read_pipeline(folder: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> PipelineParts:
    """Load a pipeline folder's components (nothing is downloaded) in eval mode."""
    try:
        import diffusers  # optional: the diffusers extra
        import transformers  # optional: the text encoder and tokenizer of Stable Diffusion pipelines
    except ImportError as e:
        raise DiffusersError(f"{folder} is a diffusers pipeline; reading it needs the diffusers extra: pip install 'ddpmkit[diffusers]' "
                             f"({e})") from None
    index = read_index(folder)
    scheduler_config = json.loads(next((folder / "scheduler").glob("*.json")).read_text())
    schedule, prediction, learned_variance = schedule_from_config(scheduler_config)
    network = read_unet(folder, device, dtype)
    unet, conditional = network.unet, network.conditional
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    data_shape = (unet.config.out_channels, *size)  # an inpainting UNet takes more channels than it diffuses
    autoencoder = prompts = None
    if conditional:
        sdxl = network.added == "text_time"
        needed = ("vae", "text_encoder", "tokenizer", *(("text_encoder_2", "tokenizer_2") if sdxl else ()))
        missing = [c for c in needed if c not in index or not (folder / c).is_dir()]
        if missing:
            raise DiffusersError(f"{folder} has a text-conditional UNet but no {missing}: a Stable Diffusion folder holds unet, vae, "
                                 "text_encoder, tokenizer and scheduler (SDXL also text_encoder_2 and tokenizer_2; refiner pipelines, "
                                 "with the second encoder alone, are not supported)")
        vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=dtype).to(device).eval()
        autoencoder = VAELatents(vae)
        autoencoder.image_shape = (vae.config.out_channels, *(s * autoencoder.downsampling for s in size))

        def part(name: str, **kw):
            return getattr(transformers, index[name][1]).from_pretrained(folder / name, **kw)
        encoders = [part(n, torch_dtype=dtype).to(device).eval() for n in needed if n.startswith("text_encoder")]
        tokenizers = [part(n) for n in needed if n.startswith("tokenizer")]
        prompts = (SDXLPrompts(tokenizers, encoders, tuple(autoencoder.image_shape[1:]), bool(index.get("force_zeros_for_empty_prompt", True)))
                   if sdxl else CLIPPrompts(tokenizers[0], encoders[0]))
    return PipelineParts(network, schedule, prediction, learned_variance, data_shape, autoencoder, prompts,
                         scheduler_config)
