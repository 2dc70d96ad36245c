"""Shared test setup: CPU only, offline, seeded, few threads (the machine has 2 cores)."""
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Commands run in-process (runpy) or as subprocesses keep one thread too (tti.infra.threads obeys it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

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


@pytest.fixture(scope="session")
def coco_fixture(tmp_path_factory):
    """The COCO-like fixture (tests/coco_fixture.py), written once per session."""
    from coco_fixture import write_coco_fixture

    return write_coco_fixture(tmp_path_factory.mktemp("coco") / "coco")


@pytest.fixture(scope="session")
def tiny_roberta(coco_fixture, tmp_path_factory):
    """A tiny random RoBERTa folder (tti.text.tiny_roberta) whose BPE learnt the fixture's captions:
    what the tests load where a config names roberta-base. Built once per session."""
    from tti.text.tiny_roberta import build_tiny_roberta

    return build_tiny_roberta(tmp_path_factory.mktemp("roberta") / "m", coco_fixture.all_captions())


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A tiny random AutoencoderKL folder of the SD VAE's geometry (tti.models.tiny_vae): what
    the tests load where a config names stabilityai/sd-vae-ft-ema. Built once per session."""
    from tti.models.tiny_vae import build_tiny_vae

    return build_tiny_vae(tmp_path_factory.mktemp("vae") / "m")


import tti.models  # noqa: E402,F401  (registers the plug-ins every config names, as the CLIs do)
