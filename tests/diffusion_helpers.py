"""A Gaussian diffusion model around any backbone, for tests of the objective and samplers."""
from tti.models.diffusion import Diffusion
from tti.models.objectives.gaussian import GaussianDiffusion


def gaussian(backbone, image_size=None, image_channels=3, **objective) -> Diffusion:
    """Diffusion(backbone, GaussianDiffusion(**objective)). A stub backbone without the
    image_size / image_channels attributes gets them here (default image_size 32)."""
    if not hasattr(backbone, "image_size") or image_size is not None:
        backbone.image_size = image_size or getattr(backbone, "image_size", 32)
        backbone.image_channels = image_channels
    return Diffusion(backbone, GaussianDiffusion(**objective))
