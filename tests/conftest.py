import os

import pytest
import torch

# keep tests deterministic and light on the 2-core CI machine
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def toy_overrides(tmp_path):
    return [f"train.run_dir={tmp_path / 'run'}", "train.log_every=10"]
