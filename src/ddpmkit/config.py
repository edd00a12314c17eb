"""Typed, frozen configuration: TOML presets plus `section.key=value` overrides.

A misspelt key or a value outside its choices raises ConfigError naming the valid options.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import UserError, read_user_text
from .losses import LossType
from .parameterization import Prediction
from .schedules import NoiseSchedule


class ConfigError(UserError):
    """A bad configuration file, key or value."""


@dataclass(frozen=True)
class DataConfig:
    name: str = "mnist5k"  # mnist5k, digits, swiss_roll, moons, 8gaussians, checkerboard, folder, npz
    path: str = ""  # for 'folder' and 'npz'
    image_size: int = 64  # for 'folder'
    channels: int = 3  # for 'folder': 1 (grey) or 3 (RGB)
    hflip: bool = False  # random horizontal flips (not for digits)
    autoencoder: str = ""  # a train-autoencoder folder: diffuse in its latent space (latent diffusion)
    resize: int = 0  # > 0: area-downsample the images to resize x resize (e.g. 14: the base stage of a 14 -> 28 cascade)

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.resize < 0:
            raise ConfigError(f"data.image_size = {self.image_size} must be >= 1 and data.resize = {self.resize} >= 0 (0 = as loaded)")
        if self.channels not in (1, 3):
            raise ConfigError(f"data.channels = {self.channels} must be 1 (grey) or 3 (RGB)")


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: Literal["linear", "cosine", "scaled_linear", "sigmoid"] = "linear"
    T: int = 1000
    zero_terminal_snr: bool = False
    prediction: Prediction = "eps"
    loss: LossType = "simple"
    learned_variance: bool = False
    min_snr_gamma: float = 0.0  # 0 = off
    # training timesteps: "uniform" (Algorithm 1); "logit_normal" (t/T = sigmoid(N(mean, std^2)), as in
    # SD3: more of the training on the middle of the chain, less on the nearly clean and nearly pure-noise ends);
    # "asymmetric" (SpeeD, Wang et al. 2024): timesteps whose log-SNR is >= asymmetric_log_snr are drawn
    # asymmetric_k times as often as the nearly pure-noise ones beyond it, whose loss is small and flat;
    # "log_normal" (EDM): ln sigma ~ N(log_normal_mean, log_normal_std^2) with sigma = 1 / sqrt(SNR), taken
    # to the timestep of the nearest log-SNR
    timestep_sampling: Literal["uniform", "logit_normal", "asymmetric", "log_normal"] = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    asymmetric_log_snr: float = -4.6  # SNR 0.01: t >= 674 of the linear schedule's 1000
    asymmetric_k: float = 4.0
    log_normal_mean: float = -1.2  # EDM's P_mean and P_std
    log_normal_std: float = 1.2
    # "edm": the network F is wrapped into EDM's denoiser c_skip x_t + c_out F(c_in x_t; t) (preconditioning.py),
    # which predicts x0 (set prediction = "x0"); sigma_data is the data's standard deviation
    precondition: Literal["none", "edm"] = "none"
    sigma_data: float = 0.5
    # the per-example weight of the simple loss: "default" = none, or min-SNR-gamma when min_snr_gamma > 0;
    # "edm" = EDM's lambda(sigma) = SNR + 1 / sigma_data^2 on the x0 error (= unit weight on F's error), with
    # the SNR term clipped at min_snr_gamma when that is > 0
    loss_weighting: Literal["default", "edm"] = "default"
    # EDM2's learned per-level uncertainty u(t): the loss becomes L / exp(u(t)) + u(t) (uncertainty.py)
    uncertainty_weighting: bool = False

    def __post_init__(self) -> None:
        for name in ("logit_normal_std", "log_normal_std"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"diffusion.{name} = {getattr(self, name)} must be > 0")
        if self.sigma_data <= 0:
            raise ConfigError(f"diffusion.sigma_data = {self.sigma_data} must be > 0")
        if self.precondition == "edm" and (self.prediction != "x0" or self.learned_variance):
            raise ConfigError(f"diffusion.precondition = 'edm' makes the network an x0-predictor: set diffusion.prediction = 'x0' "
                              f"(not {self.prediction!r}) and learned_variance = false")
        if self.loss_weighting == "edm" and self.loss != "simple":
            raise ConfigError(f"diffusion.loss_weighting = 'edm' weights the simple loss: set loss = 'simple', not {self.loss!r}")
        if self.uncertainty_weighting and self.loss != "simple":
            raise ConfigError(f"diffusion.uncertainty_weighting learns a weight for the simple loss: set loss = 'simple', not {self.loss!r}")
        if self.asymmetric_k <= 0:
            raise ConfigError(f"diffusion.asymmetric_k = {self.asymmetric_k} must be > 0")
        if self.min_snr_gamma < 0:
            raise ConfigError(f"diffusion.min_snr_gamma = {self.min_snr_gamma} must be >= 0 (0 = off)")
        if self.zero_terminal_snr and self.prediction == "eps":
            # at SNR 0 (alpha_bar_T = 0) x_0 = (x_T - sqrt(1 - alpha_bar_T) eps) / sqrt(alpha_bar_T) divides by zero
            raise ConfigError("diffusion.zero_terminal_snr = true with prediction = 'eps': an eps model cannot give x_0 at zero "
                              "SNR (every sample would be NaN); zero-SNR models predict 'v' (Lin et al. 2024) or 'x0'")

    def noise_schedule(self) -> NoiseSchedule:
        """The float64 schedule tables these settings name."""
        return NoiseSchedule.from_name(self.schedule, self.T, self.zero_terminal_snr)


@dataclass(frozen=True)
class NetworkConfig:
    kind: Literal["unet", "mlp", "diffusers"] = "unet"  # diffusers: the UNet of the pipeline folder `pipeline` (fine-tuning it)
    pipeline: str = ""
    base_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    dropout: float = 0.0
    patch_size: int = 1  # > 1: the UNet works on p x p pixel patches folded into channels (image_size / p per side)
    # true: each upsampling convolution outputs the finer level's width (U-Net's halving up-convolution), not the coarser's
    narrow_upsampling: bool = False
    mlp_hidden: int = 256
    mlp_layers: int = 4
    num_classes: int = 0  # > 0: class-conditional (label embedding + a null label for guidance)
    text_encoder: str = ""  # e.g. 'all-MiniLM-L6-v2': text-conditional (cross-attention on its token embeddings)
    context_dim: int = 384  # width of the text encoder's token embeddings
    text_max_tokens: int = 16  # prompts are padded or cut to this many tokens

    def __post_init__(self) -> None:
        least = {"base_channels": 1, "num_res_blocks": 0, "num_heads": 1, "patch_size": 1, "mlp_hidden": 1, "mlp_layers": 1,
                 "num_classes": 0, "context_dim": 1, "text_max_tokens": 1}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"network.{name} = {getattr(self, name)} must be >= {low}")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"network.channel_mult = {list(self.channel_mult)} must be one width multiple >= 1 per level, e.g. [1, 2, 4]")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"network.dropout = {self.dropout} must be in [0, 1)")


@dataclass(frozen=True)
class AutoencoderConfig:
    """The KL autoencoder of latent diffusion (`ddpmkit train-autoencoder`)."""

    z_channels: int = 3  # latent channels
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # one level per entry; the latent is 2^(levels-1) times smaller per side
    num_res_blocks: int = 1
    kl_weight: float = 1e-3  # weight of KL(q(z|x) || N(0, I)) against the summed squared reconstruction error
    pad_to: int = 32  # pad images (with the background value -1) to this size first; 0 = no padding


@dataclass(frozen=True)
class SuperResConfig:
    """A super-resolution stage (train.task = 'superres'): p(x | z) for the data's images x and
    their area-downsampled z (CDM, Imagen). Pairs are made on the fly from any image dataset."""

    low_res: int = 14  # side of the low-res input z
    upsample: Literal["nearest", "bilinear", "bicubic"] = "bicubic"  # how the UNet brings z to the output size
    # noise conditioning augmentation: during training z is replaced by z_s ~ q(z_s | z) at a level
    # s ~ U(0, aug_max) of the schedule (0 = no augmentation), and s is given to the network
    aug_max: float = 0.5
    aug_level: float = 0.1  # the default level s at sampling (a knob: --aug)
    blur_prob: float = 0.0  # blur augmentation: share of training inputs blurred first ...
    blur_sigma: tuple[float, ...] = (0.4, 0.6)  # ... by a Gaussian of sigma ~ U(lo, hi) low-res pixels

    def __post_init__(self) -> None:
        if self.low_res < 1:
            raise ConfigError(f"superres.low_res = {self.low_res} must be >= 1")
        if not (0.0 <= self.aug_max <= 1.0 and 0.0 <= self.aug_level <= 1.0):
            raise ConfigError(f"superres.aug_max = {self.aug_max} and superres.aug_level = {self.aug_level} must lie in [0, 1]")
        if not 0.0 <= self.blur_prob <= 1.0:
            raise ConfigError(f"superres.blur_prob = {self.blur_prob} must lie in [0, 1]")
        if len(self.blur_sigma) != 2 or not 0 <= self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ConfigError(f"superres.blur_sigma = {list(self.blur_sigma)} must be [lo, hi] with 0 <= lo <= hi")


@dataclass(frozen=True)
class CLIPConfig:
    """A contrastive text-image encoder (train.task = 'clip'): the frozen text encoder of
    network.text_encoder with a learned projection, and an image tower with the UNet down path's
    widths (network.base_channels, channel_mult, ...), trained with the symmetric InfoNCE loss."""

    embed_dim: int = 64  # the joint embedding's size
    noisy: bool = False  # the image tower sees x_t and t (uniform t of the diffusion schedule): for CLIP guidance
    text_hidden: int = 256  # width of the text projection's hidden layer
    init_temperature: float = 0.07  # the learned temperature starts here (CLIP)

    def __post_init__(self) -> None:
        if self.embed_dim < 2 or self.text_hidden < 1 or not self.init_temperature > 0:
            raise ConfigError(f"clip.embed_dim = {self.embed_dim} must be >= 2, clip.text_hidden >= 1 and clip.init_temperature > 0")


@dataclass(frozen=True)
class UnCLIPConfig:
    """The diffusion prior (train.task = 'prior': caption -> CLIP image embedding) and the decoder
    (train.task = 'decoder': CLIP image embedding -> image) of unCLIP (Ramesh et al. 2022)."""

    clip: str = ""  # the CLIP run (train.task = 'clip') whose image embeddings the prior draws and the decoder takes
    embed_dim: int = 64  # that CLIP's clip.embed_dim (checked when training starts)
    embed_tokens: int = 4  # decoder: the embedding also becomes this many cross-attention tokens
    prior_width: int = 128  # the prior's transformer
    prior_layers: int = 3
    prior_heads: int = 4

    def __post_init__(self) -> None:
        if self.embed_dim < 2 or self.embed_tokens < 1 or self.prior_layers < 1 or self.prior_width % self.prior_heads:
            raise ConfigError(f"unclip: embed_dim = {self.embed_dim} must be >= 2, embed_tokens >= 1, prior_layers >= 1, and "
                              f"prior_width = {self.prior_width} divisible by prior_heads = {self.prior_heads}")


MAX_BATCH = 2**20  # train.batch_size's bound: far past any diffusion recipe's (EDM2's largest: 2,048)


@dataclass(frozen=True)
class TrainConfig:
    # which kind of model this run trains
    # the kind of model (kinds.KINDS: denoiser, superres, autoencoder, classifier, judge, clip, prior, decoder); an unknown
    # name is one clear error when the run starts or loads
    task: str = "denoiser"
    run_dir: str = "runs/mnist"
    steps: int = 5000
    max_minutes: float = 0.0  # stop (and checkpoint) after this long; 0 = no limit
    # with max_minutes: time the first budget_calibration steps, then shorten the run to the steps that fit
    # in the budget, so a cosine learning rate still decays fully on a slower machine; re-fitted every
    # budget_calibration steps as the pace changes (the decay is saved in checkpoints: a resumed run keeps
    # it); no effect without max_minutes or on shorter runs
    fit_to_budget: bool = False
    budget_calibration: int = 100
    batch_size: int = 128  # global batch, split across processes
    lr: float = 2e-3
    warmup_steps: int = 100
    lr_schedule: Literal["constant", "cosine"] = "constant"  # cosine: decay to 5% of lr at train.steps (or the budget's horizon)
    weight_decay: float = 0.0
    # AdamW's (beta1, beta2); a beta2 below 0.999 lets the per-weight step sizes follow a short run's quickly
    # changing gradient scale
    adam_betas: tuple[float, float] = (0.9, 0.999)
    cond_drop_prob: float = 0.1  # conditional models: share of examples trained on the null label / empty prompt
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 = the "EMA" weights are the last weights (no averaging)
    # post-hoc EMA (EDM2): keep power-function averages of these relative widths (e.g. [0.05, 0.1]) and save
    # snapshots of them every posthoc_every steps into run_dir/posthoc; `ddpmkit posthoc-ema` makes any other width later
    posthoc_ema: tuple[float, ...] = ()
    posthoc_every: int = 100
    seed: int = 0
    # "auto": bf16 autocast where the device computes in bf16 natively (CUDA with bf16, CPUs with AVX-512 BF16 /
    # AMX), else fp32: on an AVX2-only CPU bf16 autocast is emulated and about 8x slower than fp32
    mixed_precision: Literal["fp32", "no", "bf16", "fp16", "auto"] = "fp32"  # precision.py's vocabulary ("no" = fp32)
    # deterministic kernels (cuDNN, cuBLAS, scatter/index ops) so that a resumed GPU run continues bit for
    # bit; false lets cuDNN pick the fastest, nondeterministic, algorithms. No effect on CPU.
    deterministic: bool = True
    # torch.compile of the network for training: "no"; "default" (inductor's fused kernels); "reduce-overhead" (on a GPU
    # also CUDA graphs: a small network's step without a launch per kernel); "max-autotune". Weights and checkpoints are the
    # same either way; keep one only where bench/gpu.py shows it pays (on a CPU the compile alone takes minutes).
    # "cuda-graph": no compile; the network's forward and backward captured as CUDA graphs in seconds (ddpmkit.graphs;
    # one process on a CUDA GPU)
    compile: Literal["no", "default", "reduce-overhead", "max-autotune", "cuda-graph"] = "no"
    log_every: int = 50
    sample_every: int = 1000  # 0 = never
    sample_steps: int = 100  # respaced ancestral steps for the periodic grids
    eval_every: int = 0  # log an unbiased bits/dim estimate of the VLB on held-out data; 0 = never
    num_samples: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # checkpoints at these steps are written (whatever checkpoint_every) and never pruned by keep_checkpoints: e.g. an
    # early one as the weaker model of autoguidance (`ddpmkit sample RUN --autoguide RUN/ckpt-0000500`)
    keep_steps: tuple[int, ...] = ()
    # NaN safety: a step whose loss or gradient is not finite is skipped; after nan_patience such
    # steps in a row the run rolls back to its last checkpoint with the learning rate halved, at
    # most max_rollbacks times, then stops with one line naming the step
    nan_patience: int = 5
    max_rollbacks: int = 3
    # fine-tuning (finetune.py): start from another run's weights (its EMA) and train them all, or, with
    # lora_rank > 0, only low-rank adapters (LoRA, through peft) on the layers whose names end in lora_targets;
    # a LoRA run saves only its adapters, and loads with its init_from's weights under them
    init_from: str = ""
    lora_rank: int = 0
    lora_alpha: float = 0.0  # the adapters' scale is lora_alpha / lora_rank; 0 = lora_rank (a scale of 1)
    lora_targets: tuple[str, ...] = ("qkv", "proj", "q", "kv", "conv1", "conv2")

    def __post_init__(self) -> None:
        least = {"batch_size": 1, "log_every": 1, "num_samples": 1, "sample_steps": 1, "steps": 0, "warmup_steps": 0,
                 "sample_every": 0, "eval_every": 0, "checkpoint_every": 0, "keep_checkpoints": 0}
        for name, low in least.items():
            if getattr(self, name) < low:
                raise ConfigError(f"train.{name} = {getattr(self, name)} must be >= {low}")
        if any(step < 1 for step in self.keep_steps):  # no checkpoint is ever written at step 0 or before
            raise ConfigError(f"train.keep_steps = {list(self.keep_steps)} must be steps >= 1")
        if not 0 <= self.seed < 2**40:  # each step's generator is seeded by (seed * 1,000,003 + step) * 7 + stream: 64 bits
            raise ConfigError(f"train.seed = {self.seed} must be in 0 .. 2**40-1")
        if self.batch_size > MAX_BATCH:  # the batch's indices alone would be gigabytes, drawn for minutes before any step
            raise ConfigError(f"train.batch_size = {self.batch_size} must be <= {MAX_BATCH} (examples a step, over all processes)")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not 0 <= self.max_minutes < math.inf \
                or not self.weight_decay >= 0 or not self.grad_clip >= 0:  # written so that NaN fails them too
            raise ConfigError(f"train.lr = {self.lr} must be > 0, and train.max_minutes = {self.max_minutes}, train.weight_decay = "
                              f"{self.weight_decay} and train.grad_clip = {self.grad_clip} >= 0")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ConfigError(f"train.lora_rank = {self.lora_rank} and train.lora_alpha = {self.lora_alpha} must be >= 0")
        if self.lora_rank and not self.init_from:
            raise ConfigError("train.lora_rank > 0 adapts a trained model: give train.init_from, the run to start from")
        if self.lora_rank and not self.lora_targets:
            raise ConfigError("train.lora_targets is empty: name the layers to adapt, e.g. qkv,proj")
        if len(self.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas = {list(self.adam_betas)} must be two numbers in [0, 1)")
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ConfigError(f"train.cond_drop_prob = {self.cond_drop_prob} must be in [0, 1]")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay = {self.ema_decay} must be in [0, 1) (0 = no averaging)")
        if any(not 0 < s < 12**-0.5 for s in self.posthoc_ema) or self.posthoc_every < 1:
            raise ConfigError(f"train.posthoc_ema = {list(self.posthoc_ema)} must hold widths in (0, 0.2887) and "
                              f"train.posthoc_every = {self.posthoc_every} must be >= 1")
        if self.budget_calibration <= 10:
            raise ConfigError(f"train.budget_calibration = {self.budget_calibration} must be > 10 (the first 10 steps are not timed)")
        if self.nan_patience < 1 or self.max_rollbacks < 0:
            raise ConfigError(f"train.nan_patience = {self.nan_patience} must be >= 1 and train.max_rollbacks = {self.max_rollbacks} >= 0")


@dataclass(frozen=True)
class DistillConfig:
    """Progressive distillation (train.task = 'progressive'; Salimans & Ho 2022): a student of student_steps DDIM
    steps learns what its teacher does in twice as many. The student has the teacher's network and diffusion
    settings and starts from its weights; each round's run is the next round's teacher."""

    teacher: str = ""  # a denoiser run, or the progressive run of the round before (whose student_steps is 2 x this one's)
    student_steps: int = 0  # the student's DDIM steps this round (the teacher takes twice as many)
    # consistency (train.task = 'consistency'): the points of the teacher's ODE grid from t = 0 to T - 1 (the paper's N);
    # the target network is the run's EMA, so train.ema_decay is the paper's mu
    points: int = 40
    # an autoguided teacher (Karras et al. 2024): D_bad + w (D_teacher - D_bad), with D_bad a weaker model of the same kind
    # (an early checkpoint of the teacher); the student learns the guided teacher's map, so it needs no second network
    autoguide: str = ""
    autoguide_scale: float = 2.0

    def __post_init__(self) -> None:
        if self.student_steps < 0 or self.points < 2:
            raise ConfigError(f"distill.student_steps = {self.student_steps} must be >= 1 (0 = not set), and distill.points = "
                              f"{self.points} >= 2")
        if not 0.0 <= self.autoguide_scale < float("inf"):
            raise ConfigError(f"distill.autoguide_scale = {self.autoguide_scale} must be a finite number >= 0 (1 = the teacher alone)")


@dataclass(frozen=True)
class DreamBoothConfig:
    """DreamBooth (Ruiz et al. 2023): a text model fine-tuned (train.init_from) on a few images of a new subject, all
    captioned with instance_prompt (a rare token: "a photo of sks digit"), while class_images images the base model
    draws for class_prompt, cached in the run, keep the class as it was (prior preservation):
    loss = mean over the instance images + prior_loss_weight * mean over the class images."""

    instance_prompt: str = ""  # "" = off
    class_prompt: str = ""
    class_images: int = 0  # 0 = no prior preservation
    prior_loss_weight: float = 1.0
    # how the base model draws the class images (once, before training; seeds 0..class_images-1)
    class_sampler: str = "dpmpp_2m"
    class_steps: int = 20
    class_guidance: float = 3.0

    def __post_init__(self) -> None:
        if self.class_images < 0 or self.prior_loss_weight < 0 or self.class_steps < 1:
            raise ConfigError(f"dreambooth.class_images = {self.class_images}, prior_loss_weight = {self.prior_loss_weight} must be >= 0 "
                              f"and class_steps = {self.class_steps} >= 1")
        if self.class_images and not self.class_prompt:
            raise ConfigError("dreambooth.class_images > 0 draws images of the class: give dreambooth.class_prompt (e.g. 'a digit')")
        if (self.class_prompt or self.class_images) and not self.instance_prompt:
            raise ConfigError("give dreambooth.instance_prompt, the rare-token prompt of the new subject (e.g. 'a sks digit')")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    superres: SuperResConfig = field(default_factory=SuperResConfig)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    unclip: UnCLIPConfig = field(default_factory=UnCLIPConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dreambooth: DreamBoothConfig = field(default_factory=DreamBoothConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def differences(self, other: Config, sections: tuple[str, ...], ignore: frozenset[str] = frozenset()) -> list[str]:
        """"section.key = value here, value there" for train.task and every key of `sections` that differs from other's,
        but the keys named in `ignore`."""
        differ = [f"train.task = {self.train.task!r} here, {other.train.task!r} there"] \
            if self.train.task != other.train.task and "task" not in ignore else []
        for section in sections:
            here, there = dataclasses.asdict(getattr(self, section)), dataclasses.asdict(getattr(other, section))
            differ += [f"{section}.{key} = {here[key]!r} here, {there[key]!r} there" for key in here
                       if here[key] != there[key] and key not in ignore]
        return differ


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _finite(x: float, where: str) -> float:
    """Every float setting is a finite number: a NaN or infinite weight, scale or mean trained NaN losses (the NaN
    guard then rolling back again and again) or was ignored, without a word."""
    if not math.isfinite(x):
        raise ConfigError(f"{where} = {x} must be a finite number")
    return x


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Literal:
        options = typing.get_args(hint)
        if value not in options:
            close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
            hint_txt = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where} = {value!r} is not valid{hint_txt}; choose one of {list(options)}")
        return value
    if hint in (int, float) or (origin is tuple and typing.get_args(hint)[0] in (int, float)):
        if any(isinstance(v, bool) for v in (value if isinstance(value, (list, tuple)) else [value])):  # Python's True == 1
            raise ConfigError(f"{where} = {value!r} must be {'a list of numbers' if origin is tuple else 'a number'}, not true or false")
    if origin is tuple:
        if isinstance(value, (int, float)):
            value = [value]
        item = {float: float, str: str}.get(typing.get_args(hint)[0], int)
        try:
            if isinstance(value, str):
                value = [item(v.strip()) for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{where} must be a list, got {value!r}")
            items = tuple(item(v) for v in value)
            return tuple(_finite(v, where) for v in items) if item is float else items
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"{where} = {value!r} must be a list of {item.__name__}s") from None
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise UserError(value)
                return value.lower() in ("true", "1", "yes")
            if value not in (0, 1):  # 0.5 or 7 for a switch is a slip, not True
                raise UserError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise UserError(value)
            return int(value)
        if hint is float:
            return _finite(float(value), where)
        if hint is str:
            return str(value)
    except ConfigError:
        raise
    except (TypeError, ValueError):
        raise ConfigError(f"{where} = {value!r} is not a valid {hint.__name__}") from None
    return value


def build_config(values: dict[str, Any]) -> Config:
    """Config from a nested dict {section: {key: value}}, checking every key and value."""
    classes = _section_classes()
    sections = {}
    for name, section_values in values.items():
        if name not in classes:
            raise ConfigError(_unknown("section", name, list(classes)))
        if not isinstance(section_values, dict):
            raise ConfigError(f"[{name}] must be a table of key = value pairs")
        sections[name] = section_values
    built = {}
    for name, cls in classes.items():
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for key, value in sections.get(name, {}).items():
            if key not in hints:
                raise ConfigError(_unknown(f"key in [{name}]", key, list(hints), prefix=f"{name}."))
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        built[name] = cls(**kwargs)
    return Config(**built)


def _unknown(what: str, name: str, options: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return f"unknown {what}: '{prefix}{name}'{hint}; valid: {', '.join(options)}"


def parse_overrides(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """['train.lr=1e-3', 'network.channel_mult=1,2,2'] -> {'train': {'lr': 0.001}, ...}"""
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-3")
        key, raw = item.split("=", 1)
        section, name = key.strip().split(".", 1)
        try:  # TOML gives numbers, booleans and lists their types; anything else stays a string
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[name] = value
    return out


def merge(base: dict, extra: dict) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in extra.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section].update(values)
        else:
            merged[section] = values
    return merged


def preset_names() -> list[str]:
    """The presets shipped inside the package (ddpmkit/presets/*.toml)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def how_to_make(run_dir: str) -> str:
    """The command whose run lands in run_dir ("runs/clip": `ddpmkit train clip`; "runs/demo": `ddpmkit demo`), or ""."""
    if Path(run_dir) == Path("runs/demo"):
        return "ddpmkit demo"
    made = [name for name in preset_names() if Path(read_values(name).get("train", {}).get("run_dir", TrainConfig.run_dir)) == Path(run_dir)]
    return f"ddpmkit train {made[0]}" if made else ""


def resolve_config_path(spec: str | Path) -> Path:
    """A config file path, a run folder (its config.json), or the name of a shipped preset ('mnist', 'mnist.toml',
    'configs/mnist.toml')."""
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir() and (path / "config.json").is_file():  # a run folder, as `sample` and train.init_from take one
        return path / "config.json"
    preset = PRESET_DIR / (path.stem + ".toml")
    if path.suffix in ("", ".toml") and preset.is_file():
        return preset
    close = difflib.get_close_matches(path.stem, preset_names(), n=1)
    what = f"{spec} is a folder without a config.json (a run folder holds one)" if path.is_dir() else f"config file not found: {spec}"
    raise ConfigError(f"{what}{f' (did you mean {close[0]!r}?)' if close else ''}; presets: {', '.join(preset_names())}")


def parse_config_file(path: Path) -> dict:
    """One config file's own keys as written, its `extends` included; of a checkpoint's config.json, the sections."""
    text = read_user_text(path, ConfigError)
    try:
        values = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"cannot parse {path}: {e}") from None
    if path.suffix == ".json":  # a checkpoint's config.json: its bookkeeping (step, metrics...) sits beside the sections
        return {key: value for key, value in values.items() if key in SECTIONS}
    return values


def read_values(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """The sections of a TOML (or JSON) config file or preset. A TOML file may begin with `extends = "NAME"`
    (a preset or a file): its sections are that config's, with this file's keys on top."""
    path = resolve_config_path(path)
    if path.resolve() in seen:
        raise ConfigError(f"{path} extends itself (through {' -> '.join(p.name for p in seen)})")
    return on_its_base(path, parse_config_file(path), seen)


def on_its_base(path: Path, own: dict, seen: tuple[Path, ...] = ()) -> dict:
    """A file's own keys on top of the sections of the config it extends (if any)."""
    values = dict(own)
    base = values.pop("extends", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends takes the name of a preset or a config file, got {base!r}")
    return merge(read_values(base, (*seen, path.resolve())), values)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML (or JSON) config file or a preset by name, apply overrides, and validate everything. The keys the
    user gave (the overrides, and a file of their own: not a shipped preset or a run's config.json, which hold keys
    their config may not read) must be ones the config reads (check_overrides_are_read)."""
    values, given = {}, parse_overrides(overrides or [])
    if path is not None:
        path = resolve_config_path(path)
        own = parse_config_file(path)
        values = on_its_base(path, own)
        if path.suffix != ".json" and path.resolve().parent != PRESET_DIR.resolve():
            given = merge({k: v for k, v in own.items() if k != "extends"}, given)
    cfg = build_config(merge(values, given))
    check_overrides_are_read(cfg, given)
    return cfg


class ReadWhen(typing.NamedTuple):
    """When a config reads a key: `reads(cfg)`, said as `condition`; `governs` names the key that decides it."""

    reads: Callable[[Config], bool]
    condition: str
    governs: str


def _timesteps(kind: str) -> ReadWhen:
    return ReadWhen(lambda c: c.diffusion.timestep_sampling == kind, f"diffusion.timestep_sampling = {kind}", "diffusion.timestep_sampling")


def _folder(*names: str) -> ReadWhen:
    return ReadWhen(lambda c: c.data.name in names, f"data.name = {' or '.join(names)}", "data.name")


def _network(kind: str) -> ReadWhen:
    # the denoiser builds network.kind's network; other tasks (a classifier, a registered kind) may read any key
    return ReadWhen(lambda c: c.network.kind == kind or c.train.task != "denoiser", f"network.kind = {kind}", "network.kind")


def _lora() -> ReadWhen:
    return ReadWhen(lambda c: c.train.lora_rank > 0, "train.lora_rank > 0", "train.lora_rank")


# keys that only some configs read: a command line's key that its config would not read is refused
READ_ONLY_WHEN: dict[str, ReadWhen] = {
    "data.path": _folder("folder", "npz"), "data.image_size": _folder("folder"), "data.channels": _folder("folder"),
    "diffusion.sigma_data": ReadWhen(lambda c: "edm" in (c.diffusion.precondition, c.diffusion.loss_weighting),
                                     "diffusion.precondition = edm or diffusion.loss_weighting = edm", "diffusion.precondition"),
    "diffusion.min_snr_gamma": ReadWhen(lambda c: c.diffusion.loss == "simple", "diffusion.loss = simple (its per-example weight)",
                                        "diffusion.loss"),
    "diffusion.logit_normal_mean": _timesteps("logit_normal"), "diffusion.logit_normal_std": _timesteps("logit_normal"),
    "diffusion.asymmetric_log_snr": _timesteps("asymmetric"), "diffusion.asymmetric_k": _timesteps("asymmetric"),
    "diffusion.log_normal_mean": _timesteps("log_normal"), "diffusion.log_normal_std": _timesteps("log_normal"),
    "train.posthoc_every": ReadWhen(lambda c: bool(c.train.posthoc_ema), "train.posthoc_ema (the snapshots' widths)", "train.posthoc_ema"),
    "train.fit_to_budget": ReadWhen(lambda c: c.train.max_minutes > 0, "train.max_minutes > 0 (the budget it fits)", "train.max_minutes"),
    "train.budget_calibration": ReadWhen(lambda c: c.train.fit_to_budget, "train.fit_to_budget = true", "train.fit_to_budget"),
    "train.lora_alpha": _lora(), "train.lora_targets": _lora(),
    # (a fine-tune's folder or another task may bring the condition: only a plain denoiser's missing one is known here)
    "train.cond_drop_prob": ReadWhen(lambda c: bool(c.network.num_classes or c.network.text_encoder or c.train.init_from
                                                    or c.train.task != "denoiser" or c.train.cond_drop_prob == 0),
                                     "a class- or text-conditional model (network.num_classes > 0 or network.text_encoder)",
                                     "network.num_classes"),
    **{f"network.{name}": _network("unet") for name in ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
                                                         "num_heads", "patch_size", "narrow_upsampling")},
    "network.mlp_hidden": _network("mlp"), "network.mlp_layers": _network("mlp"),
    **{f"dreambooth.{name}": ReadWhen(lambda c: bool(c.dreambooth.instance_prompt), "dreambooth.instance_prompt (DreamBooth on)",
                                      "dreambooth.instance_prompt")
       for name in ("prior_loss_weight", "class_sampler", "class_steps", "class_guidance")},  # (class_prompt, class_images: __post_init__)
}
# sections that only some of the built-in tasks read (a task of one's own, registered under another name, may read any)
BUILTIN_TASKS = ("denoiser", "classifier", "judge", "clip", "autoencoder", "superres", "prior", "decoder", "progressive", "consistency")
SECTION_READ_BY = {"distill": ("progressive", "consistency"), "superres": ("superres",), "autoencoder": ("autoencoder",), "clip": ("clip",),
                   "unclip": ("prior", "decoder")}


def _read_by_tasks(tasks: tuple[str, ...]) -> ReadWhen:
    return ReadWhen(lambda c: c.train.task in tasks or c.train.task not in BUILTIN_TASKS, f"train.task = {' or '.join(tasks)}", "train.task")


READ_HINTS = {"data.path": "; for your own images add data.name=folder (a folder) or data.name=npz (an .npz file)",
              "data.image_size": "; data.resize=N area-downsamples any image dataset"}


def check_overrides_are_read(cfg: Config, given: dict[str, dict[str, Any]]) -> None:
    """A key given on the command line or in a user's own config file that this config would not read is an error,
    not a silent no-op: `train mnist data.path=my_photos` trained on the digits, and `diffusion.logit_normal_std=2`
    with asymmetric timesteps changed nothing (load_config: a preset or a run's config.json is not checked). A key given
    its default value (`train.fit_to_budget=false`, `data.path=`) changes nothing, so it is taken wherever it is given."""
    defaults = Config()
    for section, values in given.items():
        for name in values:
            key = f"{section}.{name}"
            rule = READ_ONLY_WHEN.get(key) or (_read_by_tasks(SECTION_READ_BY[section]) if section in SECTION_READ_BY else None)
            at_default = getattr(getattr(cfg, section), name) == getattr(getattr(defaults, section), name)
            if rule is not None and not at_default and not rule.reads(cfg):
                section_of, name_of = rule.governs.split(".")
                now = getattr(getattr(cfg, section_of), name_of)
                raise ConfigError(f"{key} is read only with {rule.condition}; this config has {rule.governs} = {now!r} and would "
                                  f"train without it{READ_HINTS.get(key, '')}")


PRESET_DIR = Path(__file__).resolve().parent / "presets"
