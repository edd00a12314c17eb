"""ddpmkit.heap: freed activations stay on the heap for the next step, instead of fresh pages from the OS each time."""
import json
import os
import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


# in a fresh process: the test worker's own heap depends on what ran before in it (a failed allocation moves a
# thread to another of glibc's arenas, see ddpmkit/heap.py); one thread, so that the step's memory is the main arena's
STEP_FAULTS = """
import json, resource, torch
from torch import nn
import ddpmkit.heap
assert ddpmkit.heap.KEPT
torch.set_num_threads(1)
torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(),
                    nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(8, 32), nn.SiLU(), nn.Conv2d(32, 1, 3, padding=1))
x = torch.randn(64, 1, 28, 28)

def faults_of_a_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).square().mean().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(3):  # the heap grows to its working size
    faults_of_a_step()
print(json.dumps([faults_of_a_step() for _ in range(8)]))
"""


@glibc
def test_a_training_steps_activations_are_reused_without_page_faults():
    faults = json.loads(subprocess.run([sys.executable, "-c", STEP_FAULTS], capture_output=True, text=True, check=True).stdout)
    # without the thresholds glibc hands the freed activations back to the OS and each of these steps maps
    # 14,000-15,600 fresh 4-KiB pages again (this step, one thread, fp32); with them the heap serves them
    assert sum(faults) / len(faults) < 1_000, faults


@glibc
def test_a_users_own_malloc_setting_is_kept():
    code = "import ddpmkit.heap as h; print(h.KEPT)"
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
