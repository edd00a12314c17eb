import os
import tempfile

import pytest
import torch

# keep tests deterministic and light on the 2-core CI machine
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# whatever the code under test caches goes to a throw-away folder, not the user's ~/.cache
os.environ.setdefault("DDPMKIT_CACHE", tempfile.mkdtemp(prefix="ddpmkit-test-cache-"))


@pytest.fixture
def toy_overrides(tmp_path):
    return [f"train.run_dir={tmp_path / 'run'}", "train.log_every=10"]


TINY_DIGITS_RUN = ["data.name=digits", "network.base_channels=8", "network.channel_mult=1,2", "network.attention_resolutions=4",
                   "train.batch_size=16", "train.sample_every=0", "train.warmup_steps=5", "train.log_every=5",
                   "train.checkpoint_every=0", "train.steps=6"]


@pytest.fixture(scope="session")
def web_runs(tmp_path_factory):
    """A folder of two tiny runs on the 8x8 digits, `uncond` and `class` (class-conditional), for the web page's tests."""
    from ddpmkit.config import PRESET_DIR, load_config
    from ddpmkit.train import train

    root = tmp_path_factory.mktemp("web") / "runs"
    for name, preset in (("uncond", "mnist.toml"), ("class", "mnist_class.toml")):
        train(load_config(PRESET_DIR / preset, [*TINY_DIGITS_RUN, f"train.run_dir={root / name}"]), progress=False)
    return root
