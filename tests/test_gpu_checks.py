"""The GPU mistakes a launch makes end before any work in one line, exit status 1, no
traceback: no CUDA driver, a GPU id that is not there, a GPU with too little free memory
for the config's estimate, fewer GPUs than a multi-node world needs; through tti.preflight
(what the launchers run first) and through `tti.train --device cuda` run by hand. There is
no GPU here: the CUDA queries are patched to each failure. The real launcher on this
machine, which has no NVIDIA driver, is tests/test_launchers.py's."""
import os

import pytest
import torch
from test_cli import assert_one_line, run_module

from tti.config.load import load_config
from tti.training.memory_estimate import estimate

from tiny_run import REPO  # tests/ is on sys.path under pytest

GIB = 2 ** 30
COCO64 = ["--config", os.path.join(REPO, "configs", "coco64_ft_roberta.yaml"),
          "--set", "text.name=packaged-minilm"]
NO_DRIVER = ("Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU "
             "and installed a driver from http://www.nvidia.com/Download/index.aspx")


def no_driver(monkeypatch):
    def init():
        raise RuntimeError(NO_DRIVER)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "init", init)


def fake_gpus(monkeypatch, *free_total_gib, name="NVIDIA A10"):
    """GPUs 0..n-1 with (free, total) GiB each, as the driver would report them."""
    memory = [(int(f * GIB), int(t * GIB)) for f, t in free_total_gib]

    def mem_get_info(index=0):
        return memory[index if isinstance(index, int) else index.index]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(memory))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)


def preflight(monkeypatch, capsys, *argv):
    return run_module("tti.preflight", ["--device", "cuda", *COCO64, *argv], monkeypatch, capsys)


# ---------------------------------------------------------------- the launchers' check


def test_no_driver(monkeypatch, capsys):
    no_driver(monkeypatch)
    code, err = preflight(monkeypatch, capsys, "--gpus", "0")
    assert_one_line(code, err, "tti.preflight",
                    "no usable CUDA GPU here (Found no NVIDIA driver on your system): run on "
                    "the CPU with $gpu_ids cpu (one process) or cpu:N (N processes)")


def test_torch_built_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    code, err = preflight(monkeypatch, capsys, "--gpus", "0")
    assert_one_line(code, err, "tti.preflight", "is built without CUDA", "$gpu_ids cpu")


def test_an_id_beyond_the_visible_gpus(monkeypatch, capsys):
    fake_gpus(monkeypatch, (20, 24), (20, 24))
    code, err = preflight(monkeypatch, capsys, "--gpus", "0,3,4")
    assert_one_line(code, err, "tti.preflight",
                    "GPU ids 3,4: this machine shows 2 GPU(s) (ids 0-1): list ids among those, "
                    "or run on the CPU with $gpu_ids cpu")


def test_a_busy_gpu_is_named_with_the_gpus_that_have_room(monkeypatch, capsys):
    fake_gpus(monkeypatch, (20, 24), (0.5, 24), (70, 80))  # another job fills GPU 1
    code, err = preflight(monkeypatch, capsys, "--gpus", "0,1", "--world-size", "2")
    assert_one_line(code, err, "tti.preflight",
                    "GPU 1 (NVIDIA A10, 0.5 of 24.0 GiB free) is short of memory: "
                    "coco64_ft_roberta needs about ", "at micro-batch 1 (training state ",
                    "by an estimate: run on GPUs with room (2), free that GPU (nvidia-smi shows "
                    "what uses it), or run on the CPU with $gpu_ids cpu")


def test_an_explicit_micro_batch_too_large_for_the_card(monkeypatch, capsys):
    cfg = load_config(COCO64[1], ["text.name=packaged-minilm"])
    need = estimate(cfg, 1)
    free = (need.at(32) + need.at(64)) / 2 / GIB  # between the estimates at 32 and 64
    fake_gpus(monkeypatch, (free, 24))
    code, err = preflight(monkeypatch, capsys, "--gpus", "0", "--set", "train.micro_batch=64")
    assert_one_line(code, err, "tti.preflight", "at micro-batch 64 (training state",
                    "set --set train.micro_batch=auto (the largest that fits, measured at "
                    "start; about 4", "free that GPU")
    # auto needs only the estimate at one image: the check passes
    from tti import preflight as module

    module.main(["--device", "cuda", *COCO64, "--gpus", "0", "--set", "train.micro_batch=auto"])


def test_a_multi_node_world_needs_a_gpu_per_process_on_every_node(monkeypatch, capsys):
    fake_gpus(monkeypatch, *[(70, 80)] * 4)
    code, err = preflight(monkeypatch, capsys, "--gpus", "0,1", "--world-size", "8",
                          "--nnodes", "2")
    assert_one_line(code, err, "tti.preflight",
                    "a world of 8 processes over 2 node(s) needs 4 GPUs per node, one per "
                    "process, and 2 are listed (0,1): list that many ids on every node, or set "
                    "--world-size 4")


def test_gpus_that_can_run_it_pass(monkeypatch, capsys):
    fake_gpus(monkeypatch, (70, 80), (20, 24))
    from tti import preflight as module

    run_dir = module.main(["--device", "cuda", *COCO64, "--gpus", "0,1", "--world-size", "4",
                           "--nnodes", "2"])
    assert run_dir == os.path.join("results", "coco64_ft_roberta_diffusion", "0")


# ---------------------------------------------------------------- tti.train --device cuda by hand


def train_by_hand(monkeypatch, capsys, tmp_path, *extra):
    args = ["--config", os.path.join(REPO, "configs", "shapes32.yaml"), "--device", "cuda",
            "--set", f"data.root={tmp_path / 'shapes'}", "--set", "data.generate_shapes=true",
            "--set", f"run.results_dir={tmp_path / 'results'}", *extra]
    code, err = run_module("tti.train", args, monkeypatch, capsys)
    assert os.listdir(tmp_path) == []  # no data generated, no run directory
    return code, err


def test_train_by_hand_without_a_driver(monkeypatch, capsys, tmp_path):
    no_driver(monkeypatch)
    code, err = train_by_hand(monkeypatch, capsys, tmp_path)
    assert_one_line(code, err, "tti.train", "no usable CUDA GPU here (Found no NVIDIA driver on "
                    "your system): run with --device cpu")


def test_train_by_hand_on_a_full_gpu(monkeypatch, capsys, tmp_path):
    fake_gpus(monkeypatch, (0.01, 24))
    code, err = train_by_hand(monkeypatch, capsys, tmp_path)
    assert_one_line(code, err, "tti.train", "GPU 0 (NVIDIA A10, 0.0 of 24.0 GiB free) is short "
                    "of memory: shapes32 needs about", "or run with --device cpu")


def test_train_under_torchrun_with_more_processes_than_gpus(monkeypatch, capsys, tmp_path):
    fake_gpus(monkeypatch, (20, 24), (20, 24))
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "3"), ("WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    code, err = train_by_hand(monkeypatch, capsys, tmp_path)
    assert_one_line(code, err, "tti.train (rank 3)", "LOCAL_RANK 3: this machine shows 2 GPU(s) "
                    "(ids 0-1): torchrun's --nproc_per_node must not exceed the GPUs per node")


def test_what_counts_as_out_of_memory():
    from tti.infra.gpus import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                                         "`cublasCreate(handle)`"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. "
                                         "DefaultCPUAllocator: can't allocate memory: you tried "
                                         "to allocate 68719476736 bytes"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


# ---------------------------------------------------------------- sample and export by hand

CHECKPOINT = os.path.join(REPO, "tests", "fixtures", "legacy_diffusion.pt")


@pytest.mark.parametrize("module", ["tti.sample", "tti.export"])
def test_sampling_by_hand_without_a_driver(module, monkeypatch, capsys, tmp_path):
    no_driver(monkeypatch)
    out = ["--out", str(tmp_path / "grid.png")] if module == "tti.sample" else [
        "--out-dir", str(tmp_path / "export"), "--n", "2"]
    code, err = run_module(module, ["--checkpoint", CHECKPOINT, "--device", "cuda", *out],
                           monkeypatch, capsys)
    assert_one_line(code, err, module, "no usable CUDA GPU here (Found no NVIDIA driver on your "
                    "system): run with --device cpu (or a launcher with $gpu_ids cpu)")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module", ["tti.sample", "tti.export"])
def test_a_device_torch_does_not_know(module, monkeypatch, capsys, tmp_path):
    out = ["--out", str(tmp_path / "grid.png")] if module == "tti.sample" else [
        "--out-dir", str(tmp_path / "export")]
    code, err = run_module(module, ["--checkpoint", CHECKPOINT, "--device", "gpu", *out],
                           monkeypatch, capsys)
    assert_one_line(code, err, module, "--device gpu: expected cpu, cuda or cuda:N")
    assert os.listdir(tmp_path) == []
