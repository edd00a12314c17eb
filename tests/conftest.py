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
