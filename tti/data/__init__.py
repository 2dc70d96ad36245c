"""Datasets: COCO-format captions and the embedded shapes dataset."""
