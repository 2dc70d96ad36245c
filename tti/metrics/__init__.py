"""Metrics: FID, CLIP score, and the exact caption judge for the shapes dataset."""
