"""The one loader: a run folder (or one of its checkpoints) -> a loaded model with its metadata.

    m = ddpmkit.load("runs/mnist")          # DiffusionModel: network + schedule, prediction, conditioning, decoder
    m.denoiser                               # what samplers, guidance and editing take: it knows its schedule and prediction
    ae = ddpmkit.load("runs/mnist_autoencoder")   # LoadedNetwork(kind='autoencoder')

Every kind of run the training engine writes (train.task: denoiser, superres, autoencoder,
classifier, judge, clip, prior, decoder) is read here, the same way, so callers never pass prediction, learned_variance or the
schedule by hand.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointError, load_saved_state, one_before, read_config, read_weights, resolve_checkpoint
from .config import Config
from .devices import resolve_device
from .diffusers_bridge import PipelineParts, diffusion_config, frozen_parts, pipeline_folder, read_pipeline
from .errors import UserError
from .finetune import adapt
from .graphs import CudaGraphed
from .kinds import ModelKind, kind_of, sampling_kinds
from .loras import LoRA, MergedLoRAs, merge_loras, parse_lora
from .nets import build_for_task
from .nets.unet import UNet, upgrade_legacy_keys
from .parameterization import Denoiser
from .precision import dtype_of
from .schedules import NoiseSchedule
from .text import TextEncoder


@dataclass
class LoadedNetwork:
    """A trained network in eval mode, with the config and bookkeeping of its checkpoint."""

    network: nn.Module
    config: Config
    data_shape: tuple[int, ...]
    step: int
    path: Path
    metrics: dict = field(default_factory=dict)  # the task's final metrics (PSNR, accuracy, ...)
    class_names: tuple[str, ...] = ()  # the names of its classes, in label order, where the data had them (CheckpointInfo)

    @property
    def kind(self) -> str:
        return self.config.train.task

    @property
    def model_kind(self) -> ModelKind:
        """What kinds.py declares about this kind of run: whether it samples, its inputs."""
        return kind_of(self.kind)

    @functools.cached_property
    def schedule(self) -> NoiseSchedule:
        """The noise schedule in the config (the one a denoiser or noisy classifier was trained with)."""
        return self.config.diffusion.noise_schedule()

    @property
    def device(self) -> torch.device:
        """Where the weights are; the CPU for a network without any (an exact denoiser is a plain function)."""
        params = getattr(self.network, "parameters", None)
        first = next(params(), None) if params is not None else None
        return torch.device("cpu") if first is None else first.device

    @functools.cached_property
    def text_encoder(self) -> TextEncoder:
        """The frozen text encoder of network.text_encoder (text-conditional models, CLIP, the prior)."""
        net = self.config.network
        if not net.text_encoder:
            raise UserError(f"{self.path} takes no text (network.text_encoder is empty)")
        return TextEncoder(net.text_encoder, net.text_max_tokens)

    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """A CLIP run's text embeddings of prompts: (n, E) unit vectors, on the CPU."""
        if self.kind != "clip":
            raise UserError(f"{self.path} is a {self.kind}, not a CLIP")
        tokens = self.text_encoder.encode(list(prompts))
        return self.network.embed_texts({k: v.to(self.device) for k, v in tokens.items()}).cpu()


SAMPLING_COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "cuda-graph"]


def compiled(network: nn.Module) -> bool:
    """Whether the network was compiled or captured for sampling already."""
    return isinstance(network, (torch._dynamo.eval_frame.OptimizedModule, CudaGraphed))


def compile_for_sampling(network: nn.Module, mode: str | None = None) -> nn.Module:
    """torch.compile for sampling (about a minute on a CPU; the gain: bench/sampling_throughput.py
    --compile). "freezing" folds the weights into the graph as constants, so oneDNN convolutions take
    pre-packed weights instead of reordering them at every call; it applies under no_grad, which is
    how the samplers call the network, and the weights must not change afterwards. It is set in
    inductor's global config because passed as torch.compile(options=...) it folded less in a quick
    comparison on 2 CPU cores. Training does not compile, and a call that needs gradients (posterior
    sampling) still gets them: freezing only changes the no_grad graph. mode: torch.compile's, e.g. "reduce-overhead", which
    on a GPU also captures the call as a CUDA graph (a small network's call without a launch per kernel). mode "cuda-graph"
    captures the plain network's call as a CUDA graph, with no compiling (graphs.py; a GPU only)."""
    if mode == "cuda-graph":
        device = next(network.parameters()).device
        if device.type != "cuda":
            raise UserError(f"--compile cuda-graph needs a CUDA GPU; the network is on {device.type} (leave --compile out, or pick "
                            f"one of {SAMPLING_COMPILE_MODES[:3]})")
        return CudaGraphed(network)
    import torch._inductor.config as inductor_config  # 1.3 s to import: only where compiling is asked for

    inductor_config.freezing = True
    return torch.compile(network, mode=mode)


@dataclass
class DiffusionModel(LoadedNetwork):
    """A trained denoiser ready for sampling: model(x_t, t, **condition) plus everything a sampler,
    guidance or an editor needs to know about it."""

    autoencoder: nn.Module | None = None  # latent diffusion: samples are decoded by autoencoder.from_latent
    loras: MergedLoRAs | None = None  # LoRAs merged into the weights by load_diffusion(..., loras=[...])

    @property
    def prediction(self) -> str:
        return self.config.diffusion.prediction

    @property
    def learned_variance(self) -> bool:
        return self.config.diffusion.learned_variance

    @property
    def denoiser(self) -> Denoiser:
        """The network as the one denoiser object (schedule, prediction and variance attached), for
        ddpmkit.sample, the guidance wrappers and editing. Built on the current network, so it follows
        compile() and a precision change."""
        return Denoiser(self.network, self.schedule, self.prediction, self.learned_variance)

    @property
    def conditioning(self) -> str:
        """'text', 'class', 'embed' (unCLIP's decoder: a CLIP image embedding) or 'none'."""
        net = self.config.network
        if "image_embed" in self.model_kind.inputs:
            return "embed"
        return "text" if net.text_encoder else "class" if net.num_classes > 0 else "none"

    @functools.cached_property
    def clip(self) -> LoadedNetwork:
        """The CLIP run of an unCLIP prior or decoder (config unclip.clip): .network embeds."""
        if not self.model_kind.uses_clip:
            raise UserError(f"{self.path} is a {self.kind}, not an unCLIP prior or decoder: it has no CLIP")
        return load_clip(self.config.unclip.clip, device=self.device)

    @property
    def num_classes(self) -> int:
        return self.config.network.num_classes

    @property
    def is_super_resolution(self) -> bool:
        """A super-resolution stage: it samples x given a low-res image (model kwargs low_res, aug_level)."""
        return self.model_kind.needs_low_res

    @property
    def low_res_shape(self) -> tuple[int, ...]:
        """(C, h, w) of the low-res images a super-resolution stage takes."""
        if not self.is_super_resolution:
            raise UserError(f"{self.path} is not a super-resolution stage")
        return (self.data_shape[0], self.config.superres.low_res, self.config.superres.low_res)

    @property
    def own_sampler(self) -> tuple[str, int | None] | None:
        """A distilled run's own few-step sampler and the steps it was distilled for; None for the others."""
        own = self.model_kind.sampler
        return (own, self.metrics.get("sample_steps")) if own else None

    def sampler_or_own(self, sampler: str | None, steps: int | None) -> tuple[str, int | None]:
        """The sampler and steps asked for, else the run's own (own_sampler), else Algorithm 2 over all T steps: what
        `sample`, `eval` and cascades draw with by default."""
        if sampler is not None:
            return sampler, steps
        own = self.own_sampler
        return (own[0], steps or own[1]) if own else ("ddpm", steps)

    @property
    def bounded_x0(self) -> bool:
        """Whether x_0 is pixels in [-1, 1], which the samplers may clip it to and dynamic thresholding may rescale it
        into: not latents, not vectors (the 2-D toys lie in [-3, 3]; clipped, `ddpmkit sample` of a toy run drew every
        point inside the square [-1, 1]^2)."""
        return self.autoencoder is None and len(self.data_shape) == 3

    @property
    def image_shape(self) -> tuple[int, ...]:
        """The shape of one output: decoded images for latent models, else data_shape."""
        return tuple(self.autoencoder.image_shape) if self.autoencoder is not None else self.data_shape

    def encode_prompts(self, prompts: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The model kwargs of prompts: token embeddings and mask (and, for unCLIP's prior, the CLIP text embedding)."""
        tokens = self.text_encoder.encode(prompts)
        if "text_embed" in self.model_kind.inputs:
            tokens["text_embed"] = self.clip.network.embed_texts({k: v.to(self.clip.device) for k, v in tokens.items()})
        return {k: v.to(device) for k, v in tokens.items()}

    def null_condition(self, n: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Model kwargs of the unconditional branch for n examples: the null label or the empty
        prompt ({} for unconditional models)."""
        if self.conditioning == "text":
            return {k: v.expand(n, *v.shape[1:]) for k, v in self.encode_prompts([""], device).items()}
        if self.conditioning == "class":
            return {"y": torch.full((n,), self.num_classes, device=device)}
        if self.conditioning == "embed":
            return {"image_embed": torch.zeros(n, self.config.unclip.embed_dim, device=device)}
        return {}

    def compile(self, mode: str | None = None) -> DiffusionModel:
        """Compile the network for sampling (compile_for_sampling, in torch.compile's `mode`), once."""
        if not compiled(self.network):
            self.network = compile_for_sampling(self.network, mode)
        return self

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples in data space: decoded latents for a latent model, else x itself."""
        return x if self.autoencoder is None else self.autoencoder.from_latent(x)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images into the space the model diffuses in (scaled latents, or the images themselves)."""
        images = images.to(self.device)
        return images if self.autoencoder is None else self.autoencoder.to_latent(images)


@dataclass
class DiffusersModel(DiffusionModel):
    """A diffusers pipeline folder (an unconditional UNet, or Stable Diffusion) with ddpmkit's
    metadata: the schedule, prediction and variance come from its scheduler config, prompts go
    through its CLIP text encoder (the empty prompt is the null condition, as in diffusers' CFG),
    latents through its VAE. `config` describes it in ddpmkit's terms for code that reads one."""

    parts: PipelineParts | None = None

    @property
    def kind(self) -> str:
        """'denoiser' for a folder; the run's train.task for a run that fine-tuned or distilled one."""
        return self.config.train.task

    @functools.cached_property
    def schedule(self) -> NoiseSchedule:
        return self.parts.schedule

    @property
    def prediction(self) -> str:
        return self.parts.prediction

    @property
    def learned_variance(self) -> bool:
        return self.parts.learned_variance

    @property
    def conditioning(self) -> str:
        return "text" if self.parts.prompts is not None else "none"

    @property
    def num_classes(self) -> int:
        return 0

    def encode_prompts(self, prompts: list[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        if self.parts.prompts is None:
            raise UserError(f"{self.path} is an unconditional pipeline: it takes no prompt")
        return self.parts.prompts.encode(list(prompts), device)

    def null_condition(self, n: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The pipeline's own unconditional branch (SDXL: zeros for the empty prompt, as its pipeline does)."""
        if self.parts.prompts is None:
            return {}
        return {k: v.expand(n, *v.shape[1:]) for k, v in self.parts.prompts.null(device).items()}

    @property
    def inpainting(self) -> bool:
        """A 9-channel inpainting UNet: it takes the mask and the masked image's latents (`ddpmkit inpaint`)."""
        return self.parts.network.inpainting


def load_pipeline(folder: Path, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> DiffusersModel:
    """A diffusers pipeline folder as a DiffusersModel (dtype: fp32, bf16 or fp16 weights; torch's names work too), on
    device (None: the default device)."""
    parts = read_pipeline(folder, resolve_device(device), dtype_of(dtype or "fp32"))
    # read_pipeline has refused any other beta_schedule, so the config describes the real schedule: parts.schedule
    diffusion = diffusion_config(parts.scheduler_config)
    return DiffusersModel(network=parts.network, config=Config(diffusion=diffusion), data_shape=parts.data_shape, step=0, path=folder,
                          autoencoder=parts.autoencoder, parts=parts)


def load(path: str | Path, weights: str = "ema", device: str | torch.device | None = None, kind: str | None = None,
         dtype: str | torch.dtype | None = None, loras: Sequence[LoRA | str] = ()) -> LoadedNetwork:
    """Load a run folder (its newest checkpoint), a ckpt-XXXXXXX folder, or a diffusers pipeline
    folder (model_index.json; a hub id only from the local hub cache), in eval mode.

    weights: 'ema' (what sampling uses) or 'model' (the raw weights). kind: the train.task the
    caller needs ('denoiser', 'superres', 'autoencoder', 'classifier', 'judge', 'clip', 'prior',
    'decoder'; 'diffusion' = any that samples); a run of another kind is a clear error. A model that
    samples (denoiser, super-resolution stage, prior, decoder) comes back as a DiffusionModel,
    anything else as a LoadedNetwork. loras: LoRA files or runs (LoRA, or "FILE:SCALE") merged into a
    diffusion model's weights at their scales (loras.py; m.loras.unmerge() takes them out).
    device: None or "auto" = where training would run (CUDA, then MPS, then the CPU: devices.default_device)."""
    m = _load(path, weights, resolve_device(device), kind, dtype)
    if loras:
        if not isinstance(m, DiffusionModel):
            raise UserError(f"{m.path} is a {m.config.train.task}: LoRAs merge into models that sample")
        m.loras = merge_loras(m, [lora if isinstance(lora, LoRA) else parse_lora(lora) for lora in loras])
    return m


def damaged(e: CheckpointError, ckpt: Path) -> CheckpointError:
    """e, for a checkpoint that cannot be read, with the one before it to load instead where its run has one."""
    before = one_before(ckpt)
    return CheckpointError(f"{e}; the checkpoint before it, {before}, can be given instead" if before else str(e))


def article(word: str) -> str:
    """'an' before a vowel's sound ("an autoencoder"), else 'a'."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _load(path: str | Path, weights: str, device: torch.device, kind: str | None, dtype: str | torch.dtype | None) -> LoadedNetwork:
    folder = pipeline_folder(path)
    if folder is not None:
        if kind not in (None, "diffusion", "denoiser"):
            raise CheckpointError(f"{folder} is a diffusers pipeline (a denoiser), not {article(kind)} {kind} model")
        return load_pipeline(folder, device, dtype)
    ckpt = resolve_checkpoint(path)
    try:
        config, info = read_config(ckpt)
    except CheckpointError as e:
        raise damaged(e, ckpt) from None
    config = with_paths_found(ckpt, config)
    task = config.train.task
    if kind is not None and task not in (sampling_kinds() if kind == "diffusion" else (kind,)):
        raise CheckpointError(f"{ckpt} holds {article(task)} {task} (train.task = {task!r}), not {article(kind)} {kind} model")
    if config.network.kind == "diffusers":
        return _load_pipeline_run(ckpt, config, info, weights, device, dtype)
    if dtype is not None:  # it was ignored: a ddpmkit run keeps float32 weights and computes in the precision asked
        raise CheckpointError(f"`dtype` is the weights' type of a diffusers pipeline folder; {ckpt} is a ddpmkit run, whose float32 "
                              "weights compute in bf16 or fp16 with `precision` (e.g. ddpmkit sample RUN --precision bf16)")
    net = build_for_task(config, info.data_shape)
    if config.train.lora_rank:  # the checkpoint holds the adapters; their base is the run it fine-tuned
        try:
            net = adapt(net, config)
        except CheckpointError as e:
            raise CheckpointError(f"{ckpt} is a LoRA run: its adapters sit on the weights of {config.train.init_from} (its "
                                  f"train.init_from), which cannot be loaded from here ({e})") from None
    try:
        state = read_weights(ckpt, weights)
    except CheckpointError as e:
        raise damaged(e, ckpt) from None
    try:
        load_saved_state(net, upgrade_legacy_keys(state) if isinstance(net, UNet) else state)
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {ckpt} do not fit the network its config.json describes: {e}") from None
    net.to(device).eval()
    common = dict(network=net, config=config, data_shape=info.data_shape, step=info.step, path=ckpt, metrics=info.metrics,
                  class_names=info.class_names)
    if not kind_of(task).samples:
        return LoadedNetwork(**common)
    autoencoder = load_autoencoder(config.data.autoencoder, device=device).network if config.data.autoencoder else None
    return DiffusionModel(**common, autoencoder=autoencoder)


# the runs and folders a run's config names that loading or evaluating it reads: a LoRA run's base, a latent run's
# autoencoder, an unCLIP run's CLIP, a fine-tuned pipeline's folder, the image folder or .npz it trained on (eval's data)
LOADED_PATHS = (("train", "init_from"), ("data", "autoencoder"), ("unclip", "clip"), ("network", "pipeline"), ("data", "path"))


def with_paths_found(ckpt: Path, config: Config) -> Config:
    """config with each relative path of LOADED_PATHS found: as given (from the working folder), else from the folder
    the run trained from (train.run_dir = "runs/lora" in runs/lora/ckpt-...: two folders up), so that `cd runs &&
    ddpmkit sample lora` finds the base "runs/mnist" that training named from the project's folder."""
    run_dir = Path(config.train.run_dir)
    here = ckpt.resolve().parent.parts
    if run_dir.is_absolute() or here[len(here) - len(run_dir.parts):] != run_dir.parts:
        return config
    trained_from = Path(*here[:len(here) - len(run_dir.parts)])
    for section, key in LOADED_PATHS:
        path = Path(getattr(getattr(config, section), key))
        if str(path) in ("", ".") or path.is_absolute() or path.exists() or not (trained_from / path).exists():
            continue  # none, or found as given, or nowhere: the loader's own message then
        config = dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **{key: str(trained_from / path)})})
    return config


def _load_pipeline_run(ckpt: Path, config: Config, info, weights: str, device, dtype) -> DiffusersModel:
    """A run that fine-tuned a diffusers pipeline: the pipeline, with the run's UNet weights or LoRA adapters on its UNet."""
    m = load_pipeline(Path(config.network.pipeline), device, dtype)
    m.network = adapt(m.network, config)
    try:
        load_saved_state(m.network, read_weights(ckpt, weights))
    except RuntimeError as e:
        raise CheckpointError(f"the weights in {ckpt} do not fit the UNet of {config.network.pipeline}: {e}") from None
    m.network.to(device).eval()
    m.config, m.step, m.path, m.metrics = config, info.step, ckpt, info.metrics
    return m


def load_diffusion(path: str | Path, weights: str = "ema", device: str | torch.device | None = None,
                   dtype: str | torch.dtype | None = None, loras: Sequence[LoRA] = ()) -> DiffusionModel:
    """load(path) for a model that samples: a denoiser run, a super-resolution stage, an unCLIP
    prior or decoder, or a diffusers pipeline folder (dtype applies to pipelines), with `loras`
    merged into its weights at their scales (loras.py; m.loras.unmerge() takes them out)."""
    return load(path, weights, device, kind="diffusion", dtype=dtype, loras=loras)


def load_autoencoder(path: str | Path, device: str | torch.device | None = None) -> LoadedNetwork:
    """load(path) for an autoencoder run (`ddpmkit train mnist_autoencoder`), or a diffusers pipeline folder's VAE."""
    if pipeline_folder(path) is not None:
        parts = frozen_parts(str(pipeline_folder(path)))
        if parts.autoencoder is None:
            raise CheckpointError(f"{path} is a pipeline without a VAE")
        return LoadedNetwork(network=parts.autoencoder, config=Config(), data_shape=parts.autoencoder.image_shape, step=0, path=Path(path))
    try:
        return load(path, "ema", device, kind="autoencoder")
    except CheckpointError as e:
        raise CheckpointError(f"no autoencoder at {path}: {e}") from None


def load_classifier(path: str | Path, device: str | torch.device | None = None) -> LoadedNetwork:
    """load(path) for a noisy-classifier run (`ddpmkit train mnist_classifier`)."""
    return load(path, "ema", device, kind="classifier")


def load_clip(path: str | Path, device: str | torch.device | None = None) -> LoadedNetwork:
    """load(path) for a CLIP run (`ddpmkit train clip`, or clip_noisy for CLIP guidance)."""
    return load(path, "ema", device, kind="clip")
