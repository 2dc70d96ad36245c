"""A checkpoint is data, not code: a crafted checkpoint whose pickle would write a marker file is
given to every command that loads one (sampling, export, training resume, the launchers, the
FID monitor's best.pt, the bench scripts, tti.release, tti.preflight); each refuses in one line
naming the global the pickle asked for, and the marker never appears. Today's checkpoints
need no allow-list at all; the legacy fixtures need only LEGACY_SAFE_GLOBALS."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line, run_module

from tti.infra.checkpoints import UnsafeCheckpointError, load_checkpoint, unsafe_globals
from tti.training.fid_monitor import read_best

from tiny_run import REPO, train_tiny_run

FIXTURES = Path(__file__).resolve().parent / "fixtures"


class Payload:
    """What an attacker pickles: unpickling it calls open(marker, "w") (or, with shell=True,
    os.system("touch marker")), creating the marker."""

    def __init__(self, marker: str, shell: bool = False):
        self.marker, self.shell = marker, shell

    def __reduce__(self):
        if self.shell:
            return (os.system, (f"touch '{self.marker}'",))
        return (open, (self.marker, "w"))


@pytest.fixture
def evil(tmp_path):
    """(a run directory whose checkpoints/latest.pt is malicious, that file, the marker path)."""
    marker = tmp_path / "MARKER"
    run_dir = tmp_path / "results" / "shapes32_diffusion" / "0"
    (run_dir / "checkpoints").mkdir(parents=True)
    path = run_dir / "checkpoints" / "latest.pt"
    torch.save({"model": {}, "config": Payload(str(marker)), "step": 1}, path)
    yield run_dir, path, marker
    assert not marker.exists(), "the checkpoint's payload ran"


def test_a_plain_load_would_run_the_payload(tmp_path):
    """The threat is real: what weights_only=False does with the same file."""
    marker = tmp_path / "MARKER"
    torch.save({"config": Payload(str(marker))}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_load_checkpoint_refuses_and_names_the_global(evil):
    _, path, _ = evil
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint(str(path))
    message = str(refused.value)
    assert "io.open" in message and str(path) in message and "\n" not in message
    assert unsafe_globals(str(path)) == ["io.open"]


def test_the_issues_os_system_payload_is_refused(tmp_path):
    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    torch.save({"model": {}, "config": Payload(str(marker), shell=True), "step": 1}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"asks for {os.system.__module__}.system,"):
        load_checkpoint(str(path))
    assert not marker.exists()


@pytest.mark.parametrize("shell", [False, True], ids=["open", "os.system"])
def test_a_refusal_the_scan_misses_still_names_the_global(tmp_path, monkeypatch, shell):
    """A pickle can build a global's name at load time, where no static scan sees it: the
    unpickler's own refusal then gives the one line, without torch's advice to allow it."""
    import tti.infra.checkpoints as checkpoints

    marker, path = tmp_path / "MARKER", tmp_path / "evil.pt"
    torch.save({"model": {}, "config": Payload(str(marker), shell), "step": 1}, path)
    monkeypatch.setattr(checkpoints, "unsafe_globals", lambda p: [])
    with pytest.raises(UnsafeCheckpointError) as refused:
        load_checkpoint(str(path))
    message = str(refused.value)
    wanted = f"{os.system.__module__}.system" if shell else "io.open"
    assert message.startswith(f"refused to load {path}: its pickle asks for {wanted}, "), message
    assert "\n" not in message and "safe_globals" not in message and "PyTorch" not in message
    assert not marker.exists()


def test_the_fid_monitors_best_checkpoint_is_refused(evil):
    run_dir, path, _ = evil
    os.replace(path, run_dir / "checkpoints" / "best.pt")
    with pytest.raises(UnsafeCheckpointError, match="io.open"):
        read_best(str(run_dir))


@pytest.mark.parametrize("module,argv", [
    ("tti.sample", ["--device", "cpu", "--caption", "a red circle", "--out", "{tmp}/grid.png"]),
    ("tti.export", ["--device", "cpu", "--out-dir", "{tmp}/export"]),
    ("tti.release", ["--out", "{tmp}/release"]),
    ("tti.preflight", []),
    ("bench.sampling", ["--device", "cpu"]),
    ("bench.relation", ["--device", "cpu"]),
    ("bench.text_probe", ["--linear-role"]),
    ("bench.text_store", ["--skip", "build,step,memory"]),
])
@pytest.mark.parametrize("given", ["file", "run directory"])
def test_every_command_refuses_in_one_line(evil, module, argv, given, monkeypatch, capsys):
    run_dir, path, _ = evil
    target = str(path if given == "file" else run_dir)
    argv = [a.replace("{tmp}", str(run_dir.parent.parent.parent)) for a in argv]
    code, err = run_module(module, ["--checkpoint", target, *argv], monkeypatch, capsys)
    assert_one_line(code, err, module, "refused to load", "io.open", "nothing in it was run")


def test_training_refuses_to_resume_from_it(evil, monkeypatch, capsys):
    run_dir, _, _ = evil
    results = run_dir.parent.parent
    code, err = run_module("tti.train", ["--config", "configs/shapes32.yaml", "--device", "cpu",
                                         "--set", f"run.results_dir={results}"], monkeypatch, capsys)
    assert_one_line(code, err, "tti.train", "refused to load", "io.open")
    assert not (run_dir / "log.txt").exists()  # refused before the run started


def bash(script: str, *args, cwd, **env) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1",
                    PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], **env)
    return subprocess.run(["bash", os.path.join(REPO, script), *map(str, args)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=300)


def launcher_refused(result, command: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[-1].startswith(f"{command}: error: refused to load"), result.stderr
    assert "io.open" in lines[-1] and result.stderr.count(": error: ") == 1, result.stderr


@pytest.mark.parametrize("gpu_ids", ["cpu", "cpu:2"])
def test_the_export_launcher_refuses_before_any_process_starts(evil, gpu_ids):
    run_dir, _, _ = evil
    result = bash("gen_images_for_metrics.sh", gpu_ids, 0, run_dir, cwd=run_dir.parent)
    launcher_refused(result, "tti.preflight")
    assert not (run_dir.parent / "eval_data_run_0").exists()


def test_the_eval_launcher_refuses(evil):
    run_dir, _, _ = evil
    result = bash("run_tti_eval_coco.sh", "cpu", 0, "a red bus", cwd=run_dir.parent,
                  TTI_RUN_DIR=str(run_dir), TTI_OUT=str(run_dir / "samples"))
    launcher_refused(result, "tti.sample")


def test_the_training_launcher_refuses_to_resume_from_it(evil):
    run_dir, _, _ = evil
    results = run_dir.parent.parent
    target = results / "coco32_aligndraw" / "0"
    target.parent.mkdir()
    os.replace(run_dir, target)  # the run the aligndraw launcher resumes
    result = bash("scripts/run_aligndraw_coco.sh", "cpu:2", 0, results / "no_data_needed",
                  "--set", f"run.results_dir={results}", cwd=results)
    launcher_refused(result, "tti.preflight")
    os.replace(target, run_dir)  # for the fixture's marker check


# ---------------------------------------------------------------- what loads


def test_todays_checkpoints_are_plain_data(tmp_path_factory):
    """A fresh run's checkpoint loads with torch's weights-only defaults, no allow-list."""
    run_dir = train_tiny_run(tmp_path_factory)
    path = os.path.join(run_dir, "checkpoints", "latest.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    state = torch.load(path, weights_only=True)
    kind, key, *_ = state["rng"][0]["numpy"]
    assert kind == "MT19937" and isinstance(key, list) and len(key) == 624


@pytest.mark.parametrize("name", ["legacy_diffusion.pt", "legacy_aligndraw.pt"])
def test_legacy_checkpoints_need_only_the_numpy_allow_list(name):
    path = str(FIXTURES / name)
    found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    assert found == {"numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype"}
    assert unsafe_globals(path) == []
    assert load_checkpoint(path)["rng"][0]["numpy"][1].dtype.name == "uint32"


def test_no_weights_only_false_in_the_code():
    found = []
    for folder in ("tti", "bench", "scripts"):
        for path in sorted(Path(REPO, folder).rglob("*")):
            if path.suffix in (".py", ".sh") and re.search(r"weights_only\s*=\s*False",
                                                           path.read_text()):
                found.append(str(path.relative_to(REPO)))
    assert not found, found
