"""The plug-in registry: names resolve through it, an unknown one is a one-line config error
listing the known ones, each plug-in's section is typed and checked by its own entry."""
import dataclasses

import pytest

from tti.config.errors import ConfigError
from tti.config.load import from_dict, load_config
from tti.config.registry import (BACKBONES, MODEL_KINDS, OBJECTIVES, Entry, Registry,
                                 model_label, samplers)

SHAPES = "configs/shapes32.yaml"


@pytest.mark.parametrize("key,registry", [("model.kind", MODEL_KINDS),
                                          ("model.objective", OBJECTIVES),
                                          ("model.backbone", BACKBONES)])
def test_an_unknown_name_lists_the_known_ones(key, registry):
    with pytest.raises(ConfigError) as e:
        load_config(SHAPES, [f"{key}=nope"])
    message = str(e.value)
    assert message.startswith(f"--set {key}=nope: {key}: unknown 'nope'; known: ")
    assert all(name in message for name in registry.entries) and "\n" not in message


def test_every_objective_and_backbone_combine_and_round_trip():
    for objective in OBJECTIVES.entries:
        for backbone in BACKBONES.entries:
            cfg = load_config(SHAPES, [f"model.objective={objective}", f"model.backbone={backbone}"])
            assert dataclasses.is_dataclass(getattr(cfg.model, objective))
            assert dataclasses.is_dataclass(getattr(cfg.model, backbone))
            assert set(cfg.model.to_dict()) == {"kind", "objective", "backbone", objective, backbone}
            assert from_dict(cfg.to_dict()) == cfg
            assert samplers(cfg) == OBJECTIVES.get(objective).samplers


def test_a_plugins_section_is_checked_by_its_entry():
    with pytest.raises(ConfigError, match=r"^--set model.flow.shift=0: model.flow.shift: must be > 0"):
        load_config(SHAPES, ["model.objective=flow", "model.flow.shift=0"])
    with pytest.raises(ConfigError, match="model.transformer.patch_size: 5 must divide"):
        load_config(SHAPES, ["model.backbone=transformer", "model.transformer.patch_size=5"])
    with pytest.raises(ConfigError, match="unknown config key 'model.flow.shfit'"):
        load_config(SHAPES, ["model.objective=flow", "model.flow.shfit=2"])
    with pytest.raises(ConfigError, match="unknown config key 'model.dit'"):
        load_config(SHAPES, ["model.dit.width=3"])


def test_the_sampler_must_be_one_of_the_objectives():
    with pytest.raises(ConfigError, match="sample.sampler: must be one of ddim, dpmpp2m, ddpm, got 'euler'"):
        load_config(SHAPES, ["model.objective=gaussian", "sample.sampler=euler"])
    with pytest.raises(ConfigError, match="sample.sampler: must be one of euler, heun, dpmpp2m, got 'ddim'"):
        load_config(SHAPES, ["sample.sampler=ddim"])  # the shipped objective is flow
    cfg = load_config(SHAPES, ["sample.sampler=heun"])
    assert cfg.sample.sampler == "heun"
    # alignDRAW samples its prior: it has no samplers, and sample.sampler is not checked
    cfg = load_config("configs/aligndraw_shapes32.yaml", ["sample.sampler=anything"])
    assert samplers(cfg) == {}


def test_the_old_name_of_the_gaussian_section_still_reads():
    cfg = load_config(SHAPES, ["model.objective=gaussian", "model.diffusion.shift=3.0",
                               "model.diffusion.timesteps=500"])
    assert (cfg.model.gaussian.shift, cfg.model.gaussian.timesteps) == (3.0, 500)
    assert "diffusion" not in cfg.model.to_dict()


def test_labels_for_tables():
    assert model_label(load_config(SHAPES)) == ("rectified flow, logit-normal(0, 1) t, shift 2, "
                                                "UNet 16/32/96")
    gaussian = load_config(SHAPES, ["model.objective=gaussian"])
    assert model_label(gaussian) == "Gaussian v-prediction, UNet 16/32/96"
    flow_dit = load_config(SHAPES, ["model.objective=flow", "model.backbone=transformer",
                                    "model.transformer.text=joint"])
    assert model_label(flow_dit) == ("rectified flow, logit-normal(0, 1) t, shift 2, MMDiT 128x6, "
                                     "patch 2")
    assert model_label(load_config("configs/aligndraw_shapes32.yaml")).startswith("alignDRAW")


def test_a_name_is_registered_once():
    registry = Registry("model.test")
    registry.add(Entry("a", build=lambda cfg: None))
    with pytest.raises(ValueError, match="registered twice"):
        registry.add(Entry("a", build=lambda cfg: None))
    with pytest.raises(TypeError, match="dataclass"):
        registry.add(Entry("b", build=lambda cfg: None, schema=dict))


def test_a_set_item_for_a_section_the_model_does_not_read_is_one_line():
    # configs/shapes32.yaml trains flow: min-SNR (a Gaussian option) would be dropped unseen
    with pytest.raises(ConfigError) as err:
        load_config(SHAPES, ["model.gaussian.min_snr_gamma=5"])
    assert str(err.value) == ("--set model.gaussian.min_snr_gamma=5: this model does not read "
                              "model.gaussian (it reads model.flow, model.unet); set "
                              "model.objective=gaussian first to use it")
    with pytest.raises(ConfigError, match="^--set model.transformer.depth=4: .* set "
                                          "model.backbone=transformer first"):
        load_config(SHAPES, ["model.transformer.depth=4"])
    cfg = load_config(SHAPES, ["model.objective=gaussian", "model.gaussian.min_snr_gamma=5"])
    assert cfg.model.gaussian.min_snr_gamma == 5
    # a YAML file's unused section is dropped quietly: one --set switches the objective
    assert load_config("configs/shapes32_long.yaml", ["model.objective=flow"]).model.flow.shift == 1
