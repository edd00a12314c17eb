"""The diffusion denoiser as a training task (DDPM Algorithm 1), pixel or latent, any conditioning.

    repeat
        x_0 ~ q(x_0);  t ~ Uniform({0, ..., T-1});  eps ~ N(0, I)
        gradient step on || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
    until converged

(with the configured prediction target, loss weighting and timestep sampling)
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from .. import dreambooth, viz
from ..conditioning import TrainingConditions
from ..config import Config, DiffusionConfig
from ..data import ArrayDataset, DataError, Dataset, carry_names
from ..evaluate.likelihood import LN2, vlb_estimate
from ..finetune import write_diffusers_lora
from ..losses import training_losses
from ..models import load_autoencoder
from ..parameterization import Denoiser
from ..sampling import sample
from ..schedules import NoiseSchedule
from ..utils import on_device, queued_copy
from .batches import Batch
from .task import Task


def sample_timesteps(dc: DiffusionConfig, schedule: NoiseSchedule, n: int, generator: torch.Generator) -> torch.Tensor:
    """n training timesteps in 0..T-1: uniform (Algorithm 1); logit-normal, t = floor(T * sigmoid(u)),
    u ~ N(mean, std^2) (Esser et al. 2024), which trains the middle of the chain more often; or
    asymmetric (SpeeD, Wang et al. 2024): P(t) is asymmetric_k times larger where log-SNR(t) >=
    asymmetric_log_snr than in the nearly pure-noise tail beyond it; or log-normal (EDM): ln sigma ~
    N(mean, std^2), sigma = exp(-log_snr / 2), at the timestep of the nearest log-SNR."""
    T, device = schedule.T, generator.device  # drawn where the generator lives (a GPU's, in training there)
    if dc.timestep_sampling == "uniform":
        return torch.randint(0, T, (n,), generator=generator, device=device)
    if dc.timestep_sampling == "asymmetric":
        weights = torch.where(on_device(schedule.log_snr, device) >= dc.asymmetric_log_snr, dc.asymmetric_k, 1.0)
        return torch.multinomial(weights, n, replacement=True, generator=generator)
    if dc.timestep_sampling == "log_normal":
        log_snr = -2 * (dc.log_normal_mean + dc.log_normal_std * torch.randn(n, generator=generator, dtype=torch.float64, device=device))
        return nearest_timestep(schedule, log_snr)
    u = dc.logit_normal_mean + dc.logit_normal_std * torch.randn(n, generator=generator, dtype=torch.float64, device=device)
    return (torch.sigmoid(u) * T).long().clamp(0, T - 1)


def nearest_timestep(schedule: NoiseSchedule, log_snr: torch.Tensor) -> torch.Tensor:
    """The timestep in 0..T-1 whose log-SNR is nearest to each value (log-SNR falls with t)."""
    table = -on_device(schedule.log_snr, log_snr.device)  # increasing
    right = torch.searchsorted(table, -log_snr).clamp(1, schedule.T - 1)
    left = right - 1
    closer_left = (table[left] + log_snr).abs() <= (table[right] + log_snr).abs()
    return torch.where(closer_left, left, right)


def map_dataset(fn, dataset: Dataset) -> ArrayDataset:
    """fn applied to every example (a frozen encoder: latents, CLIP embeddings); labels (and image
    files, for their captions, and class names) carry over."""
    with torch.no_grad():  # the encoder is frozen: its outputs are data, not part of any step's graph
        out = ArrayDataset(fn(dataset.get_batch(torch.arange(len(dataset)))), getattr(dataset, "labels", None))
    carry_names(dataset, out)
    return out


def encode_dataset(autoencoder: nn.Module, dataset: Dataset) -> ArrayDataset:
    """The dataset in the autoencoder's scaled latent space."""
    if tuple(dataset.shape) != tuple(autoencoder.image_shape):
        raise DataError(f"the autoencoder was trained on images of shape {autoencoder.image_shape}, the data has {tuple(dataset.shape)}")
    return map_dataset(autoencoder.to_latent, dataset)


class DenoiserTask(Task):
    name = "denoiser"
    resident_data = True  # on a GPU, keep an in-memory dataset there (examples); False: a task whose augmentation runs on the CPU

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.dataset = self.load_data()
        self.weights: torch.Tensor | None = None  # per-example loss weights (DreamBooth's prior preservation)
        if cfg.dreambooth.instance_prompt:
            self.dataset = self.with_class_images(self.dataset)
        # on the CPU: the latents are the dataset, which the engine keeps there
        self.autoencoder = load_autoencoder(cfg.data.autoencoder, device="cpu").network if cfg.data.autoencoder else None
        if self.autoencoder is not None:  # latent diffusion: train on the scaled latents, show decoded samples
            self.dataset = encode_dataset(self.autoencoder, self.dataset)
        self.dataset = self.prepare(self.dataset)
        self.shape, self.num_examples = tuple(self.dataset.shape), len(self.dataset)
        if cfg.data.hflip and len(self.shape) != 3:  # a (B, 2) batch would broadcast against (B, 1, 1, 1) flags, not flip
            raise DataError(f"data.hflip flips images left to right; this run diffuses vectors of shape {self.shape}: leave data.hflip out")
        self.schedule = cfg.diffusion.noise_schedule()
        self.conditioning = self.training_conditions()

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.conditioning.names

    def prepare(self, dataset: Dataset) -> Dataset:
        """The data this denoiser diffuses (the prior: CLIP image embeddings of the images)."""
        return dataset

    def with_class_images(self, instance: Dataset) -> Dataset:
        """DreamBooth: the instance images, then the base model's class images (dreambooth.py); the weights that
        make the batch mean instance loss + prior_loss_weight * class loss."""
        db = self.cfg.dreambooth
        dreambooth.check(self.cfg)
        n_i = len(instance)
        x = instance.get_batch(torch.arange(n_i))
        extra = dreambooth.class_images(self.cfg, tuple(instance.shape)) if db.class_images else x[:0]
        self.weights = dreambooth.example_weights(n_i, len(extra), db.prior_loss_weight)
        self.caption_ids = torch.cat([torch.zeros(n_i, dtype=torch.long), torch.ones(len(extra), dtype=torch.long)])
        return ArrayDataset(torch.cat([x, extra]))

    def training_conditions(self) -> TrainingConditions:
        """What the network is conditioned on: labels, prompts (from the config; DreamBooth's instance and class
        prompts), or nothing."""
        db = self.cfg.dreambooth
        if db.instance_prompt:
            return TrainingConditions.prompts(self.cfg, [db.instance_prompt, db.class_prompt], self.caption_ids)
        return TrainingConditions.for_config(self.cfg, self.dataset)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        dc, g, B = self.cfg.diffusion, batch.generator, batch.size
        gd = batch.bulk_generator  # g itself on a CPU; the device's on a GPU (batches.py)
        # the global batch's randomness, always in this order (exact resume, N processes = 1)
        t_all = sample_timesteps(dc, self.schedule, B, gd)
        noise_all = torch.randn((B, *self.shape), generator=gd, device=gd.device)
        flip_all = torch.rand(B, generator=gd, device=gd.device) < 0.5
        cond_all = self.conditioning.batch(batch.indices, g)  # labels or prompt embeddings, some dropped to the null condition
        x0 = self.examples(batch.indices[batch.mine], batch.device)
        if self.cfg.data.hflip:
            x0 = torch.where(flip_all[batch.mine].to(x0.device)[:, None, None, None], x0.flip(-1), x0)
        cond = {k: batch.local(v) for k, v in cond_all.items()}
        cond.update({k: queued_copy(v, batch.device) for k, v in self.stage_inputs(x0, batch).items()})  # made on the CPU (superres)
        losses = training_losses(model, queued_copy(x0, batch.device), batch.local(t_all), self.schedule, batch.local(noise_all), dc.prediction,
                                 dc.loss, dc.learned_variance, dc.min_snr_gamma or None,
                                 dc.sigma_data if dc.loss_weighting == "edm" else None, model_kwargs=cond,
                                 uncertainty=dc.uncertainty_weighting)
        if self.weights is not None:
            return losses["loss"] * self.weights[batch.indices[batch.mine]].to(losses["loss"].device)
        return losses["loss"]

    def examples(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The examples at `indices`, on `device`: from a copy of the dataset kept there when it is an in-memory array of
        at most 2 GB (mnist5k is 4 MB), so a GPU step copies only the indices; else from the dataset on the CPU."""
        resident = self.resident_data and isinstance(self.dataset, ArrayDataset) and self.dataset.x.nbytes <= 2 * 2**30
        if device.type == "cpu" or not resident:
            return self.dataset.get_batch(indices)
        if getattr(self, "_resident", None) is None or self._resident.device != device:
            self._resident = self.dataset.x.to(device)
        return self._resident[queued_copy(indices, device)]

    def export(self, ema: nn.Module, folder: Path) -> None:
        """A LoRA on a Stable Diffusion folder's UNet is also written as diffusers reads it: pipe.load_lora_weights(ckpt)."""
        if self.cfg.network.kind == "diffusers" and self.cfg.train.lora_rank and self.cfg.network.text_encoder:
            write_diffusers_lora(ema, self.cfg, folder)

    def stage_inputs(self, x0: torch.Tensor, batch: Batch) -> dict[str, torch.Tensor]:
        """Model inputs made from this process's examples x0 (B_local, ...), with the global batch's
        randomness drawn from batch.generator: a super-resolution stage's augmented low-res image.
        None for plain denoisers."""
        return {}

    def held_out_inputs(self, x0: torch.Tensor) -> dict[str, torch.Tensor]:
        """The same inputs for held-out examples x0 (B, ...), without random augmentation."""
        return {}

    def denoiser(self, network: nn.Module) -> Denoiser:
        """The network with its schedule, prediction and variance: what a sampler takes."""
        dc = self.cfg.diffusion
        return Denoiser(network, self.schedule, dc.prediction, dc.learned_variance)

    def preview(self, ema: nn.Module, path: Path) -> torch.Tensor:
        """train.num_samples samples with fixed seeds as a grid (images) or scatter (2-D). A
        conditional model draws classes 0, 1, 2, ... (or the first captions) without guidance."""
        tc = self.cfg.train
        device = next(ema.parameters()).device
        kwargs = {k: v.to(device) for k, v in self.conditioning.preview(tc.num_samples).items()}
        out = sample(self.denoiser(ema), (tc.num_samples, *self.shape), generator=0, model_kwargs=kwargs, **self.preview_sampling())
        x = out.x if self.autoencoder is None else self.autoencoder.from_latent(out.x)
        if x.ndim == 4:
            viz.save_grid(x, path)
        else:
            viz.scatter_2d(x, path, self.dataset.get_batch(torch.arange(min(self.num_examples, 5000))))
        return x

    def preview_sampling(self) -> dict:
        """How the previews sample: respaced ancestral steps (train.sample_steps)."""
        return {"steps": self.cfg.train.sample_steps, "clip_x0": len(self.shape) == 3}

    @functools.cached_property
    def held_out(self) -> torch.Tensor:
        """The first 64 held-out examples (latents for latent diffusion), loaded once."""
        data = self.load_data("test")
        x = data.get_batch(torch.arange(min(64, len(data))))
        x = x if self.autoencoder is None else self.autoencoder.to_latent(x)
        return self.prepare(ArrayDataset(x)).get_batch(torch.arange(len(x)))

    def evaluate(self, ema: nn.Module) -> dict[str, float]:
        """An unbiased VLB estimate in bits/dim on the same held-out examples, noise levels and
        noise every time (the training data where there is no held-out split). Conditional
        models are scored unconditionally (null condition)."""
        device = next(ema.parameters()).device
        x0 = self.held_out.to(device)
        images = x0.ndim == 4
        null = {k: v.to(device) for k, v in {**self.conditioning.null_batch(len(x0)), **self.held_out_inputs(x0)}.items()}
        est = vlb_estimate(self.denoiser(ema), x0, draws=8,
                           decoder="discretized" if images else "gaussian", clip_x0=images,
                           generator=torch.Generator().manual_seed(self.cfg.train.seed), model_kwargs=null)
        return {"bpd_vlb_estimate": est.mean().item() / LN2}
