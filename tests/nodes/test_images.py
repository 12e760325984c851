import numpy as np
import pytest
import torch

from nodes.images import to_comfy_image


def test_to_comfy_image_is_a_float_batch():
    a = np.zeros((6, 7, 3), np.uint8)
    out = to_comfy_image([a, a + 255])
    assert out.shape == (2, 6, 7, 3) and out.dtype == torch.float32 and float(out[1].min()) == 1.0
    with pytest.raises(ValueError, match="must share a size"):
        to_comfy_image([a, np.zeros((3, 3, 3), np.uint8)])
