"""The one list of tti's plug-ins: every model kind, objective and backbone, one line each.
A new idea is its own file with an `ENTRY` (tti/config/registry.py) and one line here;
docs/extending.md walks through one."""
from tti.config.registry import BACKBONES, MODEL_KINDS, OBJECTIVES
from tti.models import diffusion
from tti.models.aligndraw import model as aligndraw
from tti.models.backbones import transformer, unet
from tti.models.objectives import flow, gaussian

MODEL_KINDS.add(diffusion.ENTRY)
MODEL_KINDS.add(aligndraw.ENTRY)
OBJECTIVES.add(gaussian.ENTRY)
OBJECTIVES.add(flow.ENTRY)
BACKBONES.add(unet.ENTRY)
BACKBONES.add(transformer.ENTRY)
