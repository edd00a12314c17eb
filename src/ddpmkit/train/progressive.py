"""Distillation as training tasks (the math: distillation.py): progressive (train.task = 'progressive') and
consistency distillation (train.task = 'consistency'), each from a teacher run whose network and weights the
student starts from.

Progressive distillation:

One round: the student starts from its teacher's weights and learns, at every point of its student_steps
uniform grid, the clean-data estimate whose single DDIM step lands where the teacher's two steps land. The
finished run is the next round's teacher: 2K -> K -> K/2 ... Its checkpoints record the round and the steps.

    ddpmkit train runs/mnist/config.json train.task=progressive distill.teacher=runs/mnist \\
        distill.student_steps=16 train.run_dir=runs/pd16 train.steps=1000
    ddpmkit sample runs/pd16 --sampler ddim_uniform --steps 16

Consistency distillation: the student is the teacher's network inside the consistency parameterization,
trained so that its outputs at the two ends of one teacher ODE step agree, against the run's EMA as the target:

    ddpmkit train runs/mnist/config.json train.task=consistency distill.teacher=runs/mnist distill.points=40 \
        train.ema_decay=0.95 train.run_dir=runs/cd train.steps=1000
    ddpmkit sample runs/cd --sampler consistency --steps 2

A class- or text-conditional teacher is distilled branch by branch: the condition (dropped to the null one as
in training) goes to teacher and student alike, so classifier-free guidance still combines the student's two
branches at sampling.

An autoguided teacher (distill.autoguide = a weaker model, usually the teacher's early checkpoint, and
distill.autoguide_scale = w) is folded in at that fixed w: the teacher's steps are those of
D_bad + w (D_teacher - D_bad), so the student samples the guided teacher's map with one network.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..distillation import consistency_loss, progressive_loss
from ..guidance import Autoguidance
from ..models import DiffusionModel, load_diffusion
from ..parameterization import Denoiser
from ..pipelines.guided import weaker_model
from ..utils import queued_copy
from .batches import Batch
from .denoiser import DenoiserTask
from .task import TrainingError


class DistillationTask(DenoiserTask):
    """What both kinds of distillation share: the teacher (distill.teacher), whose network, diffusion and data settings
    the student has, and whose weights it starts from."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if not cfg.distill.teacher:
            raise TrainingError(f"{self.name} distillation needs distill.teacher, a run folder or a diffusers pipeline folder")
        self.teacher: DiffusionModel = load_diffusion(cfg.distill.teacher, device="cpu")  # moved to the training device by teacher_on
        t = self.teacher
        if t.kind not in ("denoiser", "progressive"):
            raise TrainingError(f"distill.teacher {cfg.distill.teacher} is a {t.kind}: distil a denoiser run or a progressive run")
        if cfg.network.kind == "diffusers":  # a pipeline folder: the student is its UNet (finetune.pipeline_config)
            theirs, ours = t.config.diffusion, cfg.diffusion
            if (theirs.schedule, theirs.T, theirs.prediction) != (ours.schedule, ours.T, ours.prediction):
                raise TrainingError(f"the student has its teacher's diffusion settings: {cfg.distill.teacher}'s scheduler says "
                                    f"{theirs.schedule}, T = {theirs.T}, {theirs.prediction}")
        elif (t.config.network, t.config.diffusion, t.config.data) != (cfg.network, cfg.diffusion, cfg.data):
            raise TrainingError(f"the student has its teacher's network, diffusion and data settings: start from the teacher's "
                                f"config, `ddpmkit train {t.path}/config.json train.task={self.name} distill.teacher=...`")
        self.teacher.network.requires_grad_(False)
        self.weaker: Denoiser | None = None  # autoguidance's bad model, checked to be of the teacher's kind
        self.guided_teacher: Denoiser = t.denoiser
        if cfg.distill.autoguide:
            self.weaker = weaker_model(t, cfg.distill.autoguide, "cpu")
            self.weaker.model.requires_grad_(False)
            self.guided_teacher = Autoguidance(t.denoiser, self.weaker, cfg.distill.autoguide_scale)

    def student_core(self, net: nn.Module) -> nn.Module:
        """The part of the student that has the teacher's architecture."""
        return net

    def build_model(self) -> nn.Module:
        """The teacher's network and weights (its EMA): the student starts where the teacher is."""
        net = super().build_model()
        self.student_core(net).load_state_dict(self.teacher.network.state_dict())
        return net

    def teacher_on(self, device: torch.device) -> Denoiser:
        """The teacher's denoiser on the training device (autoguided when distill.autoguide is set)."""
        self.teacher.network.to(device)
        if self.weaker is not None:
            self.weaker.model.to(device)
        return self.guided_teacher

    def recorded(self) -> dict:
        """What the run's metrics record of its teacher."""
        d = self.cfg.distill
        guided = {"autoguide": d.autoguide, "autoguide_scale": d.autoguide_scale} if d.autoguide else {}
        return {"teacher": str(self.teacher.path), **guided}

    def evaluate(self, ema: nn.Module) -> dict[str, float]:
        return {}  # the VLB of a few-step student says nothing about its samples


def grid_points(K: int, B: int, generator: torch.Generator) -> torch.Tensor:
    """The student's grid point j in 1..K of each of B examples, uniformly: its step from t_j to t_{j-1}."""
    return torch.randint(1, K + 1, (B,), generator=generator)


class ProgressiveTask(DistillationTask):
    name = "progressive"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        K, t = cfg.distill.student_steps, self.teacher
        if K < 1:
            raise TrainingError("progressive distillation needs distill.student_steps >= 1, the student's DDIM steps")
        if t.kind == "progressive" and t.config.distill.student_steps != 2 * K:
            raise TrainingError(f"the teacher {cfg.distill.teacher} samples in {t.config.distill.student_steps} steps: its student "
                                f"takes half, distill.student_steps = {t.config.distill.student_steps // 2}")
        if 2 * K > self.schedule.T:
            raise TrainingError(f"the teacher's 2 x distill.student_steps = {2 * K} steps exceed T = {self.schedule.T}")
        self.round = (t.metrics.get("round", 0) if t.kind == "progressive" else 0) + 1

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        K, g, B = self.cfg.distill.student_steps, batch.generator, batch.size
        # the global batch's randomness, always in this order (exact resume, N processes = 1)
        j_all = grid_points(K, B, g)
        noise_all = torch.randn((B, *self.shape), generator=g)
        cond_all = self.conditioning.batch(batch.indices, g)
        x0 = queued_copy(self.dataset.get_batch(batch.indices[batch.mine]), batch.device)
        cond = {k: batch.local(v) for k, v in cond_all.items()}
        return progressive_loss(self.denoiser(model), self.teacher_on(batch.device), x0, batch.local(j_all), K, batch.local(noise_all),
                                model_kwargs=cond, check=False)  # j_all is in 1..K by its draw

    def preview_sampling(self) -> dict:
        return {"sampler": "ddim_uniform", "steps": self.cfg.distill.student_steps}

    def finish(self, ema: nn.Module, model: nn.Module) -> dict:
        K = self.cfg.distill.student_steps  # sample_steps: what `ddpmkit sample` uses when given no --steps
        return {"round": self.round, "student_steps": K, "sample_steps": K, **self.recorded()}


class ConsistencyTask(DistillationTask):
    name = "consistency"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.diffusion.prediction != "x0":
            raise TrainingError("consistency distillation builds on an x0-predicting teacher (diffusion.prediction = 'x0', as the "
                                f"demo recipe); {cfg.distill.teacher} predicts {cfg.diffusion.prediction}")
        if cfg.distill.points > self.schedule.T:
            raise TrainingError(f"distill.points = {cfg.distill.points} exceeds T = {self.schedule.T}")
        self.target: nn.Module | None = None

    def student_core(self, net: nn.Module) -> nn.Module:
        return net.net  # inside the ConsistencyFunction

    def attach_ema(self, ema: nn.Module) -> None:
        self.target = ema  # the paper's target network theta^-: an EMA of the student (train.ema_decay = mu)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        N, g, B = self.cfg.distill.points, batch.generator, batch.size
        # the global batch's randomness, always in this order (exact resume, N processes = 1)
        n_all = torch.randint(0, N - 1, (B,), generator=g)  # the grid interval t_n < t_{n+1} of each example
        noise_all = torch.randn((B, *self.shape), generator=g)
        cond_all = self.conditioning.batch(batch.indices, g)
        x0 = queued_copy(self.dataset.get_batch(batch.indices[batch.mine]), batch.device)
        cond = {k: batch.local(v) for k, v in cond_all.items()}
        return consistency_loss(self.denoiser(model), self.denoiser(self.target), self.teacher_on(batch.device), x0,
                                batch.local(n_all).to(batch.device), N, batch.local(noise_all), model_kwargs=cond)

    def preview_sampling(self) -> dict:
        return {"sampler": "consistency", "steps": 2}

    def finish(self, ema: nn.Module, model: nn.Module) -> dict:
        return {"points": self.cfg.distill.points, "sample_steps": 1, **self.recorded()}
