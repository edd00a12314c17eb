"""What would make a GPU's host wait, found on the CPU: the samplers' steps and the training step run on torch's
"meta" device (shapes, no numbers), where every copy from the host is visible as an op and any read of a device value
fails. A copy of a CPU tensor to a GPU that is not queued from pinned memory makes the host wait for the GPU to catch
up (torch synchronizes the stream after it), so none may happen after the first step; tests/test_cuda.py checks the
same on a real GPU with torch's sync debug mode."""
import traceback
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddpmkit.config import load_config
from ddpmkit.losses import training_losses
from ddpmkit.nets import build_for_task
from ddpmkit.sampling import sample
from ddpmkit.schedules import NoiseSchedule
from test_train import KIND_PARAMS, KINDS

SMALL_UNET = ["network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=14"]


class HostCopies(TorchDispatchMode):
    """Counts copies from the CPU to another device while `on`: "queued" those made by utils.queued_copy (pinned and
    non-blocking on a GPU), the others by where in ddpmkit they are made."""

    def __init__(self):
        super().__init__()
        self.on, self.copies = False, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            to_copy = func is torch.ops.aten._to_copy.default
            src, dst = (args[0], kwargs.get("device")) if to_copy else (args[1], args[0].device)
            if dst is not None and src.device.type == "cpu" and torch.device(dst).type != "cpu":
                where = [f for f in traceback.extract_stack() if "/ddpmkit/" in f.filename][-1]
                queued = where.name == "queued_copy"
                self.copies["queued" if queued else f"waited for: {where.filename.split('/ddpmkit/')[-1]}:{where.lineno}"] += 1
        return func(*args, **kwargs)


DEMO = load_config("mnist", SMALL_UNET)  # the demo's recipe at toy width: its UNet inside EDM's preconditioning, x0-prediction


def small_unet() -> torch.nn.Module:
    """The network as a run of the demo preset builds it (build_for_task), on the meta device."""
    return build_for_task(DEMO, (1, 28, 28)).to("meta")


@pytest.mark.parametrize("sampler, options", [("ddpm", {}), ("ddim", {"eta": 1.0}), ("dpmpp_2m", {}), ("heun", {}), ("unipc", {}),
                                              ("euler_maruyama", {}), ("pc", {}), ("dpmpp_2m_sde", {})])
def test_a_sampler_step_copies_nothing_the_host_waits_for(sampler, options):
    net, copies = small_unet().eval(), HostCopies()

    def after_step(info: dict) -> None:
        copies.on = True  # the first step copies the schedule's tables to the device, once

    with copies:
        sample(net, (3, 1, 28, 28), NoiseSchedule.from_name("linear", 1000), sampler=sampler, steps=8, generator=0, device="meta",
               prediction=DEMO.diffusion.prediction, callback=after_step, **options)
    assert [k for k in copies.copies if k != "queued"] == []
    assert copies.copies["queued"] <= 3  # the noise of 7 steps comes in blocks of 1, 2 and 4 draws: one copy each


def test_a_training_step_copies_nothing_the_host_waits_for():
    net, copies = small_unet().train(), HostCopies()
    assert type(net).__name__ == "EDMPreconditioned"  # as the demo's runs train it
    schedule = NoiseSchedule.from_name("linear", 1000)
    with copies:
        for step in range(2):
            copies.on = step > 0
            x0 = torch.empty(4, 1, 28, 28, device="meta")
            t = torch.empty(4, dtype=torch.long, device="meta")
            noise = torch.empty_like(x0)
            training_losses(net, x0, t, schedule, noise, DEMO.diffusion.prediction)["loss"].mean().backward()
    assert copies.copies == Counter()


@pytest.mark.parametrize("kind", KIND_PARAMS)
def test_every_kinds_training_step_copies_only_queued(kind):
    """The whole step of each task kind (its data, augmentation and conditioning made on the CPU, the loss on the meta
    device): what it copies to the device goes queued. The super-resolution task's CPU-made low-res input and its
    examples were plain copies, and v-prediction's target copied the alpha_bar table at every step."""
    from ddpmkit.train.batches import Batch, batch_indices, step_generator
    from ddpmkit.train.task import TASKS

    cfg = load_config(KINDS[kind][0], KINDS[kind][1:])
    task = TASKS[cfg.train.task](cfg)
    net, meta, copies = task.build_model().to("meta").train(), torch.device("meta"), HostCopies()
    with copies:
        for step in range(2):
            copies.on = step > 0
            batch = Batch(step, batch_indices(step, 16, task.num_examples, 0), step_generator(0, step), slice(0, 16), meta)
            task.loss(net, batch).mean().backward()
    assert set(copies.copies) == {"queued"}, copies.copies
