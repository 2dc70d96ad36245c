"""Metrics: FID, CLIP score, and the exact caption judge for the shapes dataset."""

# Image files the metrics read from a folder: the extensions `python -m pytorch_fid` reads.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
