"""tti: text-to-image research code (UNet diffusion with cross-attention, alignDRAW)."""
