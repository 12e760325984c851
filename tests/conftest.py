import os

import pytest
import torch

# Shared 2-core machines: one thread keeps timings and results steady.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
