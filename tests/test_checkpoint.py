"""Checkpoints that cannot be lost: one write per save with `latest` as a hard link, keep-last-K,
a failed or killed save (exception, full disk, SIGKILL) leaves the previous `latest` loadable
and no temp file behind, damaged files fail naming the file, GPU checkpoints load on CPU, and
a checkpoint alone rebuilds the model for sampling."""
import errno
import io
import os
import random
import shutil
import signal
import time

import pytest
import torch

from tti.infra.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from tti.infra.atomic_file import is_temp_file


def state(step, value=None):
    w = torch.full((64, 64), float(step if value is None else value))
    return {"model": {"w": w}, "config": {"run": {}}, "step": step}


def files(run_dir):
    return sorted(os.listdir(os.path.join(run_dir, "checkpoints")))


def test_one_write_per_save_latest_is_a_link_and_keep_last(tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    writes = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: (writes.append(1), real_save(obj, f, *a, **k)))
    for step in range(1, 6):
        save_checkpoint(state(step), run_dir, step, keep_last=2)
    assert len(writes) == 5  # the step file only; latest.pt costs no second write
    assert files(run_dir) == ["0000004.pt", "0000005.pt", "latest.pt"]
    folder = os.path.join(run_dir, "checkpoints")
    assert os.path.samefile(os.path.join(folder, "latest.pt"), os.path.join(folder, "0000005.pt"))
    assert load_checkpoint(run_dir)["step"] == 5
    # Pruning the step file latest points at never breaks latest (it is a link, not a name).
    os.remove(os.path.join(folder, "0000005.pt"))
    assert load_checkpoint(run_dir)["step"] == 5


def test_latest_is_a_copy_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(*_):
        raise OSError(errno.EPERM, "hard links not supported")
    monkeypatch.setattr(os, "link", no_links)
    save_checkpoint(state(1), str(tmp_path), 1)
    save_checkpoint(state(2), str(tmp_path), 2)
    assert load_checkpoint(str(tmp_path))["step"] == 2
    assert files(str(tmp_path)) == ["0000001.pt", "0000002.pt", "latest.pt"]


def half_then(error):
    """A torch.save that writes the first half of the real bytes, then raises `error`
    from inside the write (as a real full disk does: torch wraps it in a RuntimeError)."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        class Failing:
            written = 0

            def write(self, data):
                if self.written > 2000:
                    raise error
                self.written += len(data)
                return f.write(data)

            def flush(self):
                f.flush()
        real_save(obj, Failing(), *args, **kwargs)
    return save


@pytest.mark.parametrize("error, words", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "disk full"),
    (OSError(errno.EIO, "input/output error"), "could not write checkpoint"),
])
def test_failed_save_keeps_previous_latest_and_leaves_no_temp(tmp_path, monkeypatch, error, words):
    run_dir = str(tmp_path)
    save_checkpoint(state(1), run_dir, 1)
    monkeypatch.setattr(torch, "save", half_then(error))
    with pytest.raises(CheckpointError, match=words) as info:
        save_checkpoint(state(2), run_dir, 2)
    assert "0000002.pt" in str(info.value)
    assert files(run_dir) == ["0000001.pt", "latest.pt"]  # no temp file, no half step file
    monkeypatch.undo()
    loaded = load_checkpoint(run_dir)
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], state(1)["model"]["w"])


def test_sigkill_during_save_keeps_previous_latest(tmp_path):
    """A child process is SIGKILLed halfway through writing step 2 (no Python cleanup runs)."""
    run_dir = str(tmp_path)
    save_checkpoint(state(1), run_dir, 1)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: write half of the file, tell the parent, wait to be killed
        try:
            os.close(read_end)
            real_save = torch.save

            def stall_halfway(obj, f, *args, **kwargs):
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.write(write_end, b"x")
                time.sleep(60)
            torch.save = stall_halfway
            save_checkpoint(state(2), run_dir, 2)
        finally:
            os._exit(0)
    os.close(write_end)
    assert os.read(read_end, 1) == b"x"  # the child is mid-write
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    left = files(run_dir)
    assert [f for f in left if is_temp_file(f)], left  # what a kill leaves behind
    assert "0000002.pt" not in left
    assert load_checkpoint(run_dir)["step"] == 1
    # The next save (the restarted run) clears the debris.
    save_checkpoint(state(3), run_dir, 3)
    assert files(run_dir) == ["0000001.pt", "0000003.pt", "latest.pt"]


def instrument_save(patch, kill_at=None) -> list:
    """Record every file operation of the saves that follow: each chunk torch.save writes
    ("write"), each fsync, replace, link and remove; SIGKILL this process just before
    operation number `kill_at` (1-based). patch: setattr, or monkeypatch.setattr.
    Returns the list of operation kinds, filled as they happen."""
    done = []

    def tick(kind):
        done.append(kind)
        if len(done) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def counted(kind, real):
        return lambda *args, **kwargs: (tick(kind), real(*args, **kwargs))[1]
    for name in ("fsync", "replace", "link", "remove"):
        patch(os, name, counted(name, getattr(os, name)))
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        class Counted:
            def write(self, data):
                tick("write")
                return f.write(data)

            def flush(self):
                f.flush()
        real_save(obj, Counted(), *args, **kwargs)
    patch(torch, "save", save)
    return done


def killed_save(run_dir, step, kill_at) -> int:
    """save_checkpoint(state(step)) in a forked child that is SIGKILLed just before its file
    operation number `kill_at`; returns the child's wait status."""
    pid = os.fork()
    if pid == 0:
        try:
            instrument_save(setattr, kill_at)
            save_checkpoint(state(step), run_dir, step, keep_last=2)
        finally:
            os._exit(0)
    return os.waitpid(pid, 0)[1]


def test_sigkill_at_seeded_random_points_of_a_save_keeps_old_or_new(tmp_path, monkeypatch):
    """Killed just before one of a save's file operations (a seeded random one of each kind:
    a chunk write, fsync, rename, the latest link, the pruning), the run directory holds the
    previous checkpoint or the new one, whole, and the next save clears what the kill left."""
    setup = str(tmp_path / "setup")
    for step in (1, 2, 3):
        save_checkpoint(state(step), setup, step, keep_last=2)  # a save that also prunes
    shutil.copytree(setup, tmp_path / "count")
    kinds = instrument_save(monkeypatch.setattr)
    save_checkpoint(state(4), str(tmp_path / "count"), 4, keep_last=2)
    monkeypatch.undo()
    assert set(kinds) == {"write", "fsync", "replace", "link", "remove"}, kinds
    rng = random.Random(17)
    picks = sorted(rng.choice([i + 1 for i, k in enumerate(kinds) if k == kind])
                   for kind in sorted(set(kinds)))
    for kill_at in picks:
        run_dir = str(tmp_path / f"killed_at_{kill_at}")
        shutil.copytree(setup, run_dir)
        status = killed_save(run_dir, 4, kill_at)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (kill_at, status)
        latest = load_checkpoint(run_dir)
        assert latest["step"] in (3, 4), (kill_at, latest["step"])
        assert torch.equal(latest["model"]["w"], state(latest["step"])["model"]["w"])
        folder = os.path.join(run_dir, "checkpoints")
        for name in files(run_dir):
            if name[0].isdigit():  # a step file that exists is whole
                assert load_checkpoint(os.path.join(folder, name))["step"] == int(name[:7])
        save_checkpoint(state(5), run_dir, 5, keep_last=2)
        assert load_checkpoint(run_dir)["step"] == 5
        assert not [f for f in files(run_dir) if is_temp_file(f)], (kill_at, files(run_dir))


def test_damaged_checkpoint_names_the_file_and_why(tmp_path):
    run_dir = str(tmp_path)
    save_checkpoint(state(1), run_dir, 1)
    save_checkpoint(state(2), run_dir, 2)
    path = os.path.join(run_dir, "checkpoints", "0000002.pt")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    for target in (path, run_dir):  # the file itself, and via latest.pt (same inode)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(target)
        message = str(info.value)
        assert "could not load checkpoint" in message and "truncated" in message
        assert str(size // 2) in message and "0000001.pt" in message  # a way out
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a tti checkpoint.*model"):
        load_checkpoint(str(tmp_path / "other.pt"))
    with pytest.raises(CheckpointError, match="no checkpoints/latest.pt"):
        load_checkpoint(str(tmp_path / "checkpoints"))


def test_gpu_checkpoint_loads_on_cpu(tmp_path, monkeypatch):
    """Storages tagged "cuda:0" (what torch.save writes for GPU tensors) load on a CPU box."""
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    save_checkpoint(state(7), str(tmp_path), 7)
    monkeypatch.undo()
    path = os.path.join(str(tmp_path), "checkpoints", "latest.pt")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=False)  # what a plain load does here
    loaded = load_checkpoint(path)
    assert loaded["model"]["w"].device.type == "cpu" and loaded["step"] == 7


def test_checkpoint_alone_rebuilds_the_model_for_sampling(tmp_path):
    from test_train import TINY

    from tti import train
    from tti.data.shapes import write_coco
    from tti.models.text_to_image import load_for_inference
    from tti.eval.grid import generate

    root = tmp_path / "shapes"
    write_coco(str(root), n_train=96, n_val=16, image_size=32, seed=0)
    args = ["--config", "configs/shapes32.yaml", "--device", "cpu",
            "--set", f"data.root={root}", "--set", f"run.results_dir={tmp_path / 'results'}"]
    for item in TINY + ["train.steps=2", "train.ckpt_every=2"]:
        args += ["--set", item]
    run_dir = train.main(args)
    lone = tmp_path / "elsewhere" / "model.pt"
    lone.parent.mkdir()
    shutil.copy(os.path.join(run_dir, "checkpoints", "latest.pt"), lone)
    shutil.rmtree(tmp_path / "results")
    shutil.rmtree(root)  # neither the run directory nor the dataset is needed
    model, cfg = load_for_inference(str(lone))
    assert cfg.data.image_size == 32 and cfg.model.unet.channels == [16, 32]
    a = generate(model, ["a large red circle"], n=2, seed=3, steps=2, guidance=2.0)
    b = generate(model, ["a large red circle"], n=2, seed=3, steps=2, guidance=2.0)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8 and torch.equal(a, b)
