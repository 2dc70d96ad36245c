"""Resume that says what changed, on a finished 3-step tiny run relaunched with other settings:
the changeable ones take effect (the optimizer's LR and weight decay, the EMA decay) and show
in the log, history.jsonl and config.yaml; the fixed ones are refused before a byte is
written; the data are compared by content, not path; weights and EMA load strictly."""
import dataclasses
import json
import os
import re
import shutil

import pytest
import torch
import yaml
from test_run_lock import tree_digest
from test_train import TINY
from test_train import run as train_run
from test_train import shapes_root  # noqa: F401  (a module fixture: the 96/16-image shapes set)

from tti.infra.checkpoints import CheckpointError, load_checkpoint
from tti.config.errors import ConfigError
from tti.config.load import load_config
from tti.config.schema import Config
from tti.models.text_to_image import build, load_trainable_state, trainable_state
from tti.config.resume import APPLIED, FIXED, POLICY, policy
from tti.training.run_log import HISTORY_FILE
from tti.infra.run_lock import LOCK_FILE

STEPS = 3  # the finished run's steps; its last checkpoint is at this step
BASE = ["train.lr_decay=constant", f"train.ckpt_every={STEPS}"]


def run(root, results, *extra):
    return train_run(root, results, *BASE, *extra)


@pytest.fixture(scope="module")
def finished(shapes_root, tmp_path_factory):
    """The results folder of a finished STEPS-step run (copy it before relaunching)."""
    results = tmp_path_factory.mktemp("finished")
    run(shapes_root, results, f"train.steps={STEPS}")
    return str(results)


def copy_of(finished, tmp_path):
    """(results folder, run directory) of a fresh copy of the finished run."""
    results = str(tmp_path / "results")
    shutil.copytree(finished, results)
    return results, os.path.join(results, "shapes32_diffusion", "0")


def history(run_dir):
    with open(os.path.join(run_dir, HISTORY_FILE)) as f:
        return [json.loads(line) for line in f]


def test_every_config_key_is_decided_and_every_decision_names_a_key():
    def keys(data, prefix=""):  # (dotted key, is a section) for every key of a nested dict
        for name, value in data.items():
            yield prefix + name, dataclasses.is_dataclass(value)
            if dataclasses.is_dataclass(value):
                yield from keys(vars(value), f"{prefix}{name}.")
    known = dict(keys(vars(Config())))
    for key, section in known.items():
        if not section:
            assert policy(key)[0] in (FIXED, APPLIED), key  # KeyError: a key nobody decided
    assert set(POLICY) <= set(known), set(POLICY) - set(known)  # no decision on a gone key


def test_changed_settings_take_effect_and_are_recorded(shapes_root, finished, tmp_path):
    results, run_dir = copy_of(finished, tmp_path)
    changed = {"train.steps": (STEPS, 5), "train.lr": (0.001, 0.0005),
               "train.weight_decay": (0.0, 0.01), "train.ema_decay": (0.9975, 0.9)}
    run(shapes_root, results, *[f"{k}={new}" for k, (_, new) in changed.items()])
    changed = {"run.results_dir": (finished, results), **changed}  # the copy lives elsewhere

    with open(os.path.join(run_dir, "log.txt")) as f:
        log = f.read().split("resumed from")[-1]
    line = re.search(r"resumed with changed settings: (.*)", log).group(1)
    assert line == ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
    first, last = history(run_dir)
    assert first["resumed_from"] is None and first["step"] == 0 and first["changes"] == {}
    assert last["step"] == STEPS and last["resumed_from"].endswith("latest.pt")
    assert last["changes"] == {k: list(v) for k, v in changed.items()}

    state = load_checkpoint(run_dir)
    with open(os.path.join(run_dir, "config.yaml")) as f:
        assert yaml.safe_load(f) == state["config"]  # config.yaml is what the run used
    assert state["step"] == 5 and state["config"]["train"]["lr"] == 0.0005
    # What the optimizer itself used (warm-up is over, the decay constant): the new values.
    (group,) = state["optimizer"]["param_groups"]
    assert group["lr"] == group["initial_lr"] == 0.0005 and group["weight_decay"] == 0.01
    assert state["scheduler"]["base_lrs"] == [0.0005]
    assert state["ema"]["decay"] == 0.9 and state["ema"]["updates"] == 5
    logged = dict(re.findall(r"^step (\d+) .*lr=(\S+)", log, re.M))
    assert float(logged["4"]) == float(logged["5"]) == 0.0005


@pytest.mark.parametrize("settings, named, not_named", [
    (["model.unet.channels=[16, 48]", "text.max_length=16", "train.lr=5e-4"],
     ["model.unet.channels [16, 32] -> [16, 48]", "text.max_length 32 -> 16"], ["train.lr"]),
    (["train.batch_size=8", "train.seed=1", "data.image_size=16"],
     ["train.batch_size 16 -> 8", "train.seed 0 -> 1", "data.image_size 32 -> 16"], []),
    (["model.flow.shift=3.0", "text.name=vocab"],
     ["model.flow.shift 2.0 -> 3.0", "text.name 'packaged-minilm' -> 'vocab'"], []),
    (["train.steps=2"], ["train.steps: 2 is below step 3"], []),
])
def test_fixed_settings_are_refused_and_nothing_is_written(shapes_root, finished, tmp_path,
                                                          settings, named, not_named):
    results, run_dir = copy_of(finished, tmp_path)
    before = tree_digest(run_dir)
    with pytest.raises(ConfigError) as refused:
        run(shapes_root, results, *settings)
    message = str(refused.value)
    for words in named:
        assert words in message, message
    for key in not_named:  # an applied setting is not part of the refusal
        assert key not in message, message
    if "-> " in named[0]:
        assert "Revert them" in message and "another run.run_idx" in message
    after = tree_digest(run_dir)
    after[LOCK_FILE] = before[LOCK_FILE]  # the run lock's holder record (taken before the check)
    assert after == before  # log.txt, config.yaml, history, checkpoints: not a byte changed


def test_moved_data_resumes_and_changed_data_is_refused(shapes_root, finished, tmp_path):
    moved = str(tmp_path / "moved")
    shutil.copytree(shapes_root, moved)  # the same files elsewhere (the cache comes along)
    results, run_dir = copy_of(finished, tmp_path)
    run(shapes_root, results, f"data.root={moved}", "train.steps=4")
    assert history(run_dir)[-1]["changes"] == {"run.results_dir": [finished, results],
                                               "data.root": [shapes_root, moved],
                                               "train.steps": [STEPS, 4]}

    edited = str(tmp_path / "edited")
    shutil.copytree(shapes_root, edited)
    path = os.path.join(edited, "annotations", "captions_train2014.json")
    with open(path) as f:
        annotations = json.load(f)
    annotations["annotations"][0]["caption"] = "a caption the run never saw"
    with open(path, "w") as f:  # newer than the cache: it is rebuilt, with other captions
        json.dump(annotations, f)
    with pytest.raises(ConfigError, match="the training data differ from the data this run "
                                          "trained on"):
        run(shapes_root, results, f"data.root={edited}", "train.steps=5")
    assert load_checkpoint(run_dir)["step"] == 4


@pytest.mark.parametrize("part", ["model", "ema"])
def test_checkpoint_that_does_not_fit_the_model_names_the_keys(shapes_root, finished, tmp_path,
                                                               part):
    results, run_dir = copy_of(finished, tmp_path)
    latest = os.path.join(run_dir, "checkpoints", "latest.pt")
    state = torch.load(latest, weights_only=True)
    weights = state["model"] if part == "model" else state["ema"]["shadow"]
    gone = sorted(weights)[-1]
    weights["image_model.extra.weight"] = weights.pop(gone)
    torch.save(state, latest)
    with pytest.raises(CheckpointError) as refused:
        run(shapes_root, results, "train.steps=4")
    message = str(refused.value)
    assert message.startswith(latest) and ("EMA" in message) == (part == "ema")
    assert f"missing {gone}" in message and "unexpected image_model.extra.weight" in message


@pytest.mark.parametrize("finetune", [False, True])
def test_a_frozen_encoder_is_left_out_and_a_fine_tuned_one_is_required(tmp_path, finetune):
    cfg = load_config("configs/shapes32.yaml", TINY + [f"data.root={tmp_path}",
                                                       f"text.finetune={str(finetune).lower()}"])
    model = build(cfg, train_captions=[])
    weights = trainable_state(model)
    assert any(k.startswith("text.") for k in weights) == finetune
    load_trainable_state(model, weights)  # what a checkpoint holds loads strictly
    text_keys = [k for k in model.state_dict() if k.startswith("text.")]
    if finetune:  # a fine-tuned encoder's weights must be there
        del weights[text_keys[0]]
        with pytest.raises(CheckpointError, match=f"missing {re.escape(text_keys[0])}"):
            load_trainable_state(model, weights)
    else:  # a frozen one's must not: checkpoints leave it out on purpose
        weights[text_keys[0]] = model.state_dict()[text_keys[0]]
        with pytest.raises(CheckpointError, match=f"unexpected {re.escape(text_keys[0])}"):
            load_trainable_state(model, weights)
    bad = dict(trainable_state(model))
    first = next(iter(bad))
    bad[first] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=rf"shape {re.escape(first)} .* here, \(3, 3\) in"):
        load_trainable_state(model, bad)
