"""alignDRAW, a model kind of its own."""
