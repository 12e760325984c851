"""The core's pictures (``uint8`` RGB arrays, `explain.render`) as ComfyUI ``IMAGE`` tensors."""

from __future__ import annotations

import numpy as np
import torch

from explain.render import as_uint8_image


def to_comfy_image(images) -> torch.Tensor:
    """ComfyUI ``IMAGE``: float ``[B, H, W, 3]`` in 0..1 from one image or a list of equal size."""
    if isinstance(images, (list, tuple)):
        arrays = [as_uint8_image(i) for i in images]
    else:
        arrays = [as_uint8_image(images)]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images in one ComfyUI batch must share a size, got {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).float() / 255.0
