"""Networks (x, t, text) -> output, with t continuous in [0, 1000]."""
