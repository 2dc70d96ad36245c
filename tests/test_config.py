"""Config loading: YAML + overrides, and clear errors that name the bad key."""
import glob

import pytest

from tti.config import ConfigError, load_config, parse_override, validate


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
    ("model.diffusion.schedule=quadratic", ["model.diffusion.schedule"]),
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
    ("model.diffusion.min_snr_gamma=0", ["model.diffusion.min_snr_gamma", "> 0"]),
    ("model.diffusion.prediction=noise", ["model.diffusion.prediction", "'noise'"]),
    ("sample.captions=[a red circle, 7]", ["sample.captions[1]", "string"]),
    ("train.weight_decay=-0.1", ["train.weight_decay", ">= 0"]),
    ("train.lr_decay=linear", ["train.lr_decay", "constant, cosine"]),
    ("run.run_idx=-1", ["run.run_idx", ">= 0"]),
    ("run.dataset=a/b", ["run.dataset", "'/'"]),
])
def test_bad_values_fail_naming_the_key(override, words):
    overrides = [override]
    if override.startswith("train.batch_size"):
        overrides.insert(0, "train.grad_accum=2")
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


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"typo.yaml.*train\.stepz"):
        load_config(str(typo))
