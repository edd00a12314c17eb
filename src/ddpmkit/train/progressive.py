"""Progressive distillation as a training task (train.task = 'progressive'; the math: distillation.py).

One round: the student starts from its teacher's weights and learns, at every point of its student_steps
uniform grid, the clean-data estimate whose single DDIM step lands where the teacher's two steps land. The
finished run is the next round's teacher: 2K -> K -> K/2 ... Its checkpoints record the round and the steps.

    ddpmkit train runs/mnist/config.json train.task=progressive distill.teacher=runs/mnist \\
        distill.student_steps=16 train.run_dir=runs/pd16 train.steps=1000
    ddpmkit sample runs/pd16 --sampler ddim_uniform --steps 16

A class- or text-conditional teacher is distilled branch by branch: the condition (dropped to the null one as
in training) goes to teacher and student alike, so classifier-free guidance still combines the student's two
branches at sampling.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..distillation import progressive_loss
from ..models import DiffusionModel, load_diffusion
from .batches import Batch
from .denoiser import DenoiserTask
from .task import TrainingError


class ProgressiveTask(DenoiserTask):
    name = "progressive"

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        d = cfg.distill
        if not d.teacher or d.student_steps < 1:
            raise TrainingError("progressive distillation needs distill.teacher (a run folder) and distill.student_steps >= 1")
        self.teacher: DiffusionModel = load_diffusion(d.teacher)
        t = self.teacher
        if t.kind not in ("denoiser", "progressive"):
            raise TrainingError(f"distill.teacher {d.teacher} is a {t.kind}: distil a denoiser run or an earlier progressive run")
        if t.kind == "progressive" and t.config.distill.student_steps != 2 * d.student_steps:
            raise TrainingError(f"the teacher {d.teacher} samples in {t.config.distill.student_steps} steps: its student takes half, "
                                f"distill.student_steps = {t.config.distill.student_steps // 2}")
        if 2 * d.student_steps > self.schedule.T:
            raise TrainingError(f"the teacher's 2 x distill.student_steps = {2 * d.student_steps} steps exceed T = {self.schedule.T}")
        if (t.config.network, t.config.diffusion, t.config.data) != (cfg.network, cfg.diffusion, cfg.data):
            raise TrainingError(f"the student has its teacher's network, diffusion and data settings: start from the teacher's "
                                f"config, `ddpmkit train {t.path}/config.json train.task=progressive distill.teacher=...`")
        self.round = (t.metrics.get("round", 0) if t.kind == "progressive" else 0) + 1
        self.teacher.network.requires_grad_(False)

    def build_model(self) -> nn.Module:
        """The teacher's network and weights (its EMA): the student starts where the teacher is."""
        net = super().build_model()
        net.load_state_dict(self.teacher.network.state_dict())
        return net

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        K, g, B = self.cfg.distill.student_steps, batch.generator, batch.size
        # the global batch's randomness, always in this order (exact resume, N processes = 1)
        j_all = torch.randint(1, K + 1, (B,), generator=g)  # the student's grid point of each example
        noise_all = torch.randn((B, *self.shape), generator=g)
        cond_all = self.conditioning.batch(batch.indices, g)
        x0 = self.dataset.get_batch(batch.indices[batch.mine]).to(batch.device)
        cond = {k: batch.local(v) for k, v in cond_all.items()}
        teacher = self.teacher.denoiser
        teacher.model.to(batch.device)
        return progressive_loss(self.denoiser(model), teacher, x0, batch.local(j_all), K, batch.local(noise_all), model_kwargs=cond)

    def preview_sampling(self) -> dict:
        return {"sampler": "ddim_uniform", "steps": self.cfg.distill.student_steps}

    def evaluate(self, ema: nn.Module) -> dict[str, float]:
        return {}  # the VLB of a few-step student says nothing about its samples

    def finish(self, ema: nn.Module, model: nn.Module) -> dict:
        return {"round": self.round, "student_steps": self.cfg.distill.student_steps, "teacher": str(self.teacher.path)}
