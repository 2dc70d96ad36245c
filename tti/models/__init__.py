"""The research core: model kinds, objectives, backbones. Importing it registers every
plug-in (tti/models/registry.py)."""
from tti.models import registry  # noqa: F401
