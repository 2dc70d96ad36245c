"""Evaluation: exported items, grids, metrics."""
