"""The training loop's parts: state, checkpoints, EMA, monitors, the run log."""
