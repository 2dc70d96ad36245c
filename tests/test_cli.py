"""Every command line fails on a user's mistake with one line on stderr and a non-zero exit, no
traceback; --debug / TTI_DEBUG=1 shows it; a bug keeps its traceback; arguments are checked
before a model loads. Each module runs its real `if __name__ == "__main__":` block (runpy, in
this process); one real interpreter run checks what a terminal shows."""
import os
import runpy
import subprocess
import sys
import warnings

import pytest

from tti.infra import cli

from tiny_run import REPO  # tests/ is on sys.path under pytest


class FakeConfigError(cli.UserError, ValueError):
    pass


def run_cli_with(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(main, argv)
    return exit_info.value.code, capsys.readouterr().err


def test_user_error_is_one_line_and_exit_1(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    seen = []

    def main(argv):
        seen.append(argv)
        raise FakeConfigError("unknown config key 'train.stpes' (valid keys: steps, lr)")

    code, err = run_cli_with(main, ["--set", "train.stpes=1"], capsys)
    assert code == cli.USER_ERROR_EXIT == 1 and seen == [["--set", "train.stpes=1"]]
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{cli.command_name()}: error: unknown config key 'train.stpes'" in err
    assert err.rstrip().endswith("[--debug shows the traceback]")
    # under torchrun every rank that fails says which it is
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert " (rank 1): error: " in run_cli_with(main, [], capsys)[1]


def test_a_quiet_user_error_exits_1_and_prints_nothing(capsys, monkeypatch):
    """Another torchrun rank already printed the line (tti.infra.distributed.PeerStoppedError)."""
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    class Quiet(cli.UserError):
        quiet = True

    def main(argv):
        raise Quiet("rank 1 ran out of memory in step 3")

    code, err = run_cli_with(main, [], capsys)
    assert code == 1 and err == ""


def test_debug_flag_or_env_shows_the_traceback(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    seen = []

    def main(argv):
        seen.append(argv)
        raise FakeConfigError("bad key")

    with pytest.raises(FakeConfigError, match="bad key"):
        cli.run_cli(main, ["--config", "x.yaml", "--debug"])
    assert seen == [["--config", "x.yaml"]]  # main's parser never sees --debug
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(FakeConfigError):
        cli.run_cli(main, [])


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)

    def main(argv):
        return {}["missing"]

    with pytest.raises(KeyError):
        cli.run_cli(main, [])


def test_check_at_least_names_the_argument(capsys):
    import argparse

    parser = argparse.ArgumentParser(prog="prog")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--guidance", type=float)
    cli.check_at_least(parser, parser.parse_args(["--guidance", "0"]), {"batch_size": 1, "guidance": 0})
    for argv, message in ((["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
                          (["--guidance", "nan"], "--guidance must be >= 0, got nan")):
        with pytest.raises(SystemExit):
            cli.check_at_least(parser, parser.parse_args(argv), {"batch_size": 1, "guidance": 0})
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------- each command's __main__


def run_module(module, argv, monkeypatch, capsys):
    """Run `python -m module argv` in this process: (exit status, stderr). A traceback would be
    an exception escaping here, which fails the test."""
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    monkeypatch.setattr(sys, "argv", [module] + list(argv))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules" (runpy)
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_line(code, err, module, *fragments):
    """Exit status 1 and the error as stderr's one last line (progress bars, e.g. transformers'
    "Loading weights", may come before it)."""
    lines = err.strip().splitlines()
    assert code == 1 and "Traceback" not in err, err
    assert lines[-1].startswith(f"{module}: error: ") and err.count(": error: ") == 1, err
    for fragment in fragments:
        assert fragment in lines[-1]


def test_fid_and_evaluate_user_mistakes(tmp_path, monkeypatch, capsys):
    code, err = run_module("tti.eval.metrics.fid", [str(tmp_path / "nope"), str(tmp_path / "b")],
                           monkeypatch, capsys)
    assert_one_line(code, err, "tti.eval.metrics.fid", "image folder not found", "nope")
    code, err = run_module("tti.evaluate", [str(tmp_path)], monkeypatch, capsys)
    assert_one_line(code, err, "tti.evaluate", "gt_captions.json not found", "tti.export")


ARGUMENT_MISTAKES = [
    (["--n", "0"], "--n must be >= 1, got 0"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--guidance", "-1"], "--guidance must be >= 0, got -1.0"),
    (["--eta", "-0.5"], "--eta must be >= 0, got -0.5"),
]


@pytest.mark.parametrize("module", ["tti.sample", "tti.export"])
@pytest.mark.parametrize("argv, message", ARGUMENT_MISTAKES)
def test_sampling_arguments_are_checked_before_a_model_loads(module, argv, message, tmp_path,
                                                             monkeypatch, capsys):
    # Not a checkpoint at all: loading it first would fail with another error.
    garbage = tmp_path / "model.pt"
    garbage.write_bytes(b"not a checkpoint")
    code, err = run_module(module, ["--checkpoint", str(garbage)] + argv, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err  # argparse's usage line, then the error
    assert err.strip().splitlines()[-1].endswith(f"error: {message}")
    code, err = run_module(module, ["--checkpoint", str(tmp_path / "none")], monkeypatch, capsys)
    assert code == 2 and "no such checkpoint file or run directory" in err


def test_a_real_terminal_shows_one_line_and_debug_the_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO)
    env.pop(cli.DEBUG_ENV, None)
    command = [sys.executable, "-m", "tti.eval.metrics.fid", str(tmp_path / "a"), str(tmp_path / "b")]
    plain = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert plain.returncode == 1 and plain.stdout == ""
    assert plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("tti.eval.metrics.fid: error: image folder not found")
    debug = subprocess.run(command + ["--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "FIDInputError: image folder not found" in debug.stderr


# ---------------------------------------------------------------- errors defined in other files

def test_own_error_classes_are_user_errors():
    from tti.eval.export_folder import ExportError
    from tti.eval.metrics.clip_score import ImageCaptionPairingError
    from tti.eval.metrics.fid import FIDInputError, InceptionNotInstalledError

    for error in (ExportError, ImageCaptionPairingError, FIDInputError, InceptionNotInstalledError):
        assert issubclass(error, cli.UserError)


@pytest.mark.parametrize("where, name", [
    ("tti.config.errors", "ConfigError"),
    ("tti.infra.checkpoints", "CheckpointError"),
    ("tti.data.prepare", "AnnotationError"),
    ("tti.data.prepare", "BadDataError"),
    ("tti.text.encoder", "TextEncoderError"),
    ("tti.data.shapes_folder", "ShapesFolderError"),
    ("tti.infra.run_lock", "RunLockedError"),
    ("tti.training.loop", "NonFiniteLossError"),
    ("tti.infra.distributed", "SharedStoreRestartError"),
    ("tti.infra.distributed", "PeerStoppedError"),
    ("tti.infra.gpus", "GPUError"),
    ("tti.training.out_of_memory", "TrainingOutOfMemoryError"),
])
def test_project_error_classes_are_user_errors(where, name):
    import importlib

    assert issubclass(getattr(importlib.import_module(where), name), cli.UserError)


def test_train_config_typo(monkeypatch, capsys):
    code, err = run_module("tti.train", ["--config", os.path.join(REPO, "configs", "shapes32.yaml"),
                                         "--set", "train.stpes=1"], monkeypatch, capsys)
    assert_one_line(code, err, "tti.train", "train.stpes")


def test_coco_without_annotations(tmp_path, monkeypatch, capsys):
    code, err = run_module("tti.data.coco", [str(tmp_path), "--split", "val2014"], monkeypatch, capsys)
    assert_one_line(code, err, "tti.data.coco", "captions_val2014.json")


def test_shapes_into_a_foreign_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "captions_train2014.json").write_text("{}")  # someone's data
    code, err = run_module("tti.data.shapes", ["--out", str(tmp_path), "--train", "4", "--val", "2"],
                           monkeypatch, capsys)
    assert_one_line(code, err, "tti.data.shapes", str(tmp_path))
