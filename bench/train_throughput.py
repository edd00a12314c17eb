"""Training throughput of the demo UNet (configs/mnist.toml) on this machine: fp32 vs bf16 autocast.

    .venv/bin/python bench/train_throughput.py

Times full training steps (forward, L_simple, backward, AdamW) at the preset's batch size and
prints images/s for each precision and the bf16/fp32 ratio, measured in one process.
"""
from __future__ import annotations

import time

import torch

from ddpmkit.config import PRESET_DIR, load_config
from ddpmkit.losses import training_losses
from ddpmkit.nets import build_network
from ddpmkit.schedules import NoiseSchedule


def images_per_second(bf16: bool, steps: int = 12, warmup: int = 3) -> float:
    cfg = load_config(PRESET_DIR / "mnist.toml")
    torch.manual_seed(0)
    net = build_network(cfg.network, (1, 28, 28))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr)
    schedule = NoiseSchedule.from_name(cfg.diffusion.schedule, cfg.diffusion.T)
    bs = cfg.train.batch_size
    x0 = torch.rand(bs, 1, 28, 28) * 2 - 1
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        t = torch.randint(0, schedule.T, (bs,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = training_losses(net, x0, t, schedule).get("loss").float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return steps * bs / (time.perf_counter() - start)


if __name__ == "__main__":
    fp32 = images_per_second(False)
    bf16 = images_per_second(True)
    print(f"demo UNet, batch {load_config(PRESET_DIR / 'mnist.toml').train.batch_size}, {torch.get_num_threads()} threads")
    print(f"fp32: {fp32:.0f} images/s")
    print(f"bf16 autocast: {bf16:.0f} images/s  (x{bf16 / fp32:.2f} vs fp32)")
