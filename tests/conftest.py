"""Shared test setup: CPU only, offline, seeded, few threads (the machine has 2 cores)."""
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np
import pytest
import torch

# One thread: tiny test models gain nothing from more, and on a shared machine two
# threads per process oversubscribe the cores (a 10x slowdown was measured).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
