"""ddpmkit.heap: freed activations stay on the heap for the next step, instead of fresh pages from the OS each time."""
import os
import platform
import resource
import subprocess
import sys

import pytest
import torch
from torch import nn

import ddpmkit.heap

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


@glibc
def test_a_training_steps_activations_are_reused_without_page_faults():
    assert ddpmkit.heap.KEPT
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 1, 3, padding=1))
    x = torch.randn(64, 1, 28, 28)

    def faults_of_a_step() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x).square().mean().backward()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    for _ in range(3):  # the heap grows to its working size
        faults_of_a_step()
    faults = [faults_of_a_step() for _ in range(8)]
    # without the thresholds glibc hands the freed activations back to the OS and each of these steps maps
    # 6,000-11,000 fresh 4-KiB pages again (2 cores, fp32); with them the heap serves them
    assert sum(faults) / len(faults) < 1_000, faults


@glibc
def test_a_users_own_malloc_setting_is_kept():
    code = "import ddpmkit.heap as h; print(h.KEPT)"
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
