"""A fake GPU for CPU tests: a device where a forward pass of more than `fits_up_to` images
runs out of memory. It replaces two things a CPU run lacks: the memory oracle that
`train.micro_batch: auto` searches with (tti/training/batch_plan.py's `memory_oracle`), and
the out-of-memory error itself, raised from inside the model's forward pass (in the
search's probes and in training steps alike) as CUDA's caching allocator raises it."""
import torch

from tti.models.text_to_image import TextToImage
from tti.training import batch_plan

PER_IMAGE = 2 ** 20  # the peak a probe reports per image: far below the budget


class FakeGPU:
    """Fits up to `fits_up_to` images per forward pass; records the micro-batches it saw."""

    def __init__(self, fits_up_to: int, total_gib: float = 24.0):
        self.fits_up_to, self.total_bytes = fits_up_to, int(total_gib * 2 ** 30)
        self.probed, self.forwards, self.releases = [], [], 0

    # ---- the oracle (tti.training.micro_batch_search.MemoryOracle)
    def budget(self) -> int:
        return self.total_bytes  # the decision is the out-of-memory error alone

    def total(self) -> int:
        return self.total_bytes

    def measure(self, micro: int, probe) -> int:
        self.probed.append(micro)
        probe()
        return micro * PER_IMAGE

    def release(self) -> None:
        self.releases += 1

    # ---- installing it
    def forward_of(self, forward):
        def limited(model, images, captions):
            self.forwards.append(images.shape[0])
            if images.shape[0] > self.fits_up_to:
                raise torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate 2.00 GiB (fake GPU: fits up to "
                    f"{self.fits_up_to} images, asked for {images.shape[0]})")
            return forward(model, images, captions)
        return limited

    def install(self, setattr_) -> "FakeGPU":
        """Patch it in with `setattr_` (pytest's monkeypatch.setattr, or plain setattr in a
        torchrun worker): every device gets this oracle, every forward pass its limit."""
        setattr_(batch_plan, "memory_oracle", lambda device: self)
        setattr_(TextToImage, "forward", self.forward_of(TextToImage.forward))
        return self
