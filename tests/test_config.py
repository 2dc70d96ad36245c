"""Config loading: YAML + overrides, and clear errors that name the bad key and what set it."""
import dataclasses
import glob

import pytest

from tti.config.errors import ConfigError
from tti.config.load import from_dict, load_config, parse_override
from tti.config.rules import validate
from tti.config.schema import TrainConfig
from tti.models.objectives.gaussian import SAMPLERS


def test_every_shipped_config_loads():
    paths = sorted(glob.glob("configs/*.yaml"))
    assert {"configs/shapes32.yaml", "configs/coco32_frozen_roberta.yaml",
            "configs/coco64_frozen_roberta.yaml", "configs/coco32_ft_roberta.yaml",
            "configs/coco64_ft_roberta.yaml"} <= set(paths)
    for path in paths:
        load_config(path)


def test_overrides_are_typed_and_nested():
    cfg = load_config("configs/shapes32.yaml", ["train.lr=3e-4", "train.steps=7",
                                                "model.unet.channels=[16, 32]", "model.unet.attn_resolutions=[16]", "model.unet.self_attn_resolutions=[16]",
                                                "text.finetune=true"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7
    assert cfg.model.unet.channels == [16, 32]
    assert cfg.text.finetune is True
    assert parse_override("a.b.c=x") == {"a": {"b": {"c": "x"}}}


@pytest.mark.parametrize("override, words", [
    ("train.lrr=1", ["train.lrr", "unknown"]),
    ("bogus=1", ["bogus", "unknown"]),
    ("train.steps=ten", ["train.steps", "integer"]),
    ("text.finetune=maybe", ["text.finetune", "true/false"]),
    ("data.image_size=48", ["data.image_size"]),
    ("model.unet.channels=[8, 8, 8, 8, 8, 8, 8]", ["data.image_size", "divisible"]),
    ("model.unet.attn_resolutions=[4]", ["attn_resolutions", "never occurs"]),
    ("model.unet.self_attn_resolutions=[32]", ["model.unet.self_attn_resolutions", "[32]"]),
    ("model.unet.text_width=100", ["model.unet.text_width", "head_dim"]),
    ("sample.guidance=-1", ["sample.guidance", ">= 0"]),
    ("model.gaussian.schedule=quadratic", ["model.gaussian.schedule"]),
    ("model.unet.position_init=learned", ["model.unet.position_init", "sinusoidal"]),
    ("model.kind=gan", ["model.kind"]),
    ("sample.steps=5000", ["sample.steps"]),
    ("train.batch_size=63", ["train.batch_size", "divisible"]),
    ("model.unet.text_skip=true", ["model.unet.text_skip", "removed"]),
    ("model.unet.add_full_res_skips=true", ["model.unet.add_full_res_skips", "removed"]),
    ("model.unet.channels=[16, x]", ["model.unet.channels[1]", "integer"]),
    ("model.unet.num_res_blocks=0", ["model.unet.num_res_blocks", ">= 1"]),
    ("model.unet.dropout=1.0", ["model.unet.dropout", "[0, 1)"]),
    ("model.unet.head_dim=0", ["model.unet.head_dim", ">= 1"]),
    ("model.gaussian.min_snr_gamma=0", ["model.gaussian.min_snr_gamma", "> 0"]),
    ("model.gaussian.prediction=noise", ["model.gaussian.prediction", "'noise'"]),
    ("sample.captions=[a red circle, 7]", ["sample.captions[1]", "string"]),
    ("train.weight_decay=-0.1", ["train.weight_decay", ">= 0"]),
    ("train.lr_decay=linear", ["train.lr_decay", "constant, cosine"]),
])
def test_bad_values_fail_naming_the_key(override, words):
    overrides = [override]
    if override.startswith("train.batch_size"):
        overrides.insert(0, "train.grad_accum=2")
    if override.startswith(("model.gaussian", "sample.steps")):
        # the Gaussian objective's own checks (its 1,000 steps bound the sampler's)
        overrides.insert(0, "model.objective=gaussian")
    with pytest.raises(ConfigError) as err:
        load_config("configs/shapes32.yaml", overrides)
    message = str(err.value)
    assert message.startswith(f"--set {override}: ") and "\n" not in message
    for w in words:
        assert w in message


def test_batch_must_divide_by_world_size():
    cfg = load_config("configs/shapes32.yaml", ["train.batch_size=66"])
    validate(cfg, world_size=2)
    with pytest.raises(ConfigError, match="4 processes"):
        validate(cfg, world_size=4)


def test_batch_size_error_names_the_nearest_valid_sizes():
    cfg = load_config("configs/shapes32.yaml", ["train.batch_size=30"])
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=4)
    # 30 lies between the multiples of 4 x 1: 28 and 32
    assert str(err.value) == ("train.batch_size: 30 is not divisible by 4 processes x 1 "
                              "grad_accum: use 28 or 32")
    cfg.train.batch_size, cfg.train.grad_accum = 4, 2
    with pytest.raises(ConfigError, match=r"4 is not divisible by 3 processes x 2 grad_accum: "
                                          r"use 6$"):
        validate(cfg, world_size=3)  # no positive multiple of 6 below 4


def test_sampler_names_come_from_the_diffusion_module():
    gaussian = ["model.objective=gaussian"]
    for name in SAMPLERS:
        cfg = load_config("configs/shapes32.yaml", gaussian + [f"sample.sampler={name}"])
        assert cfg.sample.sampler == name
    with pytest.raises(ConfigError) as err:
        load_config("configs/shapes32.yaml", gaussian + ["sample.sampler=euler"])
    assert "sample.sampler" in str(err.value) and all(name in str(err.value) for name in SAMPLERS)


def test_set_typo_is_blamed_on_the_set_item_with_a_suggestion():
    with pytest.raises(ConfigError) as err:
        load_config("configs/shapes32.yaml", ["train.steps=5", "train.stpes=100"])
    message = str(err.value)
    assert message.startswith("--set train.stpes=100: unknown config key 'train.stpes' "
                              "(did you mean 'train.steps'? valid keys in train: ")
    listed = message.split("valid keys in train: ")[1].rstrip(")").split(", ")
    assert listed == sorted(f.name for f in dataclasses.fields(TrainConfig))
    with pytest.raises(ConfigError,
                       match=r"^--set train\.image_size=64: .*did you mean 'data\.image_size'"):
        load_config("configs/shapes32.yaml", ["train.image_size=64"])


def test_errors_name_the_file_or_the_set_item_that_set_the_key(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  steps: ten\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path), ["train.lr=3e-4"])  # an unrelated --set does not take the blame
    assert str(err.value) == f"{path}: train.steps: expected an integer, got 'ten'"
    assert load_config(str(path), ["train.steps=5"]).train.steps == 5  # the --set replaces it
    path.write_text("model:\n  diffusion:\n    timesteps: 10\n")
    with pytest.raises(ConfigError, match=rf"^{path}: sample.steps: must be in \[1, model"):
        load_config(str(path))
    # two keys clash: the one set last (here by --set) is named
    with pytest.raises(ConfigError, match=r"^--set sample.steps=15: sample.steps: must be in"):
        load_config(str(path), ["sample.steps=15"])
    with pytest.raises(ConfigError, match=r"^--set model.unet.channels=\[8, 8, 8, 8, 8, 8, 8\]: "
                                          r"data.image_size: 32 is not divisible"):
        load_config("configs/shapes32.yaml", ["model.unet.channels=[8, 8, 8, 8, 8, 8, 8]"])


@pytest.mark.parametrize("item", ["train.lr", "=3", "train..lr=1", "train.lr=[1,"])
def test_malformed_set_item_is_named(item):
    with pytest.raises(ConfigError) as err:
        load_config("configs/shapes32.yaml", [item])
    assert str(err.value).startswith(f"--set {item}: ") and "\n" not in str(err.value)


def test_configs_saved_before_the_removed_options_still_load():
    saved = load_config("configs/shapes32.yaml").to_dict()
    # what runs saved before the two options were removed
    saved["model"]["unet"].update(text_skip=False, add_full_res_skips=False)
    assert from_dict(saved) == load_config("configs/shapes32.yaml")
    saved["model"]["unet"]["add_full_res_skips"] = True
    with pytest.raises(ConfigError, match="model.unet.add_full_res_skips: .*removed"):
        from_dict(saved)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML: .* at line 2, column 1$") as e:
        load_config(str(bad))
    assert "\n" not in str(e.value)
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.*train\.stepz"):
        load_config(str(typo))
