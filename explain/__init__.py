"""diffusion-explain core: explain the denoising process of text-to-image diffusion models.

The core works on plain tensors and dataclasses. Framework adapters (diffusers, ComfyUI)
translate into the `Trace` format defined in `explain.trace`.
"""

from explain.trace import Trace, TraceFormatError, Word

__all__ = ["Trace", "TraceFormatError", "Word"]
__version__ = "0.1.0"
