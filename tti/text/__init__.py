"""Captions to token states: pretrained encoders, the text store, the word vocabulary."""
