"""Training objectives: noise, time, targets, loss weighting and sampling."""
