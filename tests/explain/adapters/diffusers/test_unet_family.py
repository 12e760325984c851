import torch

from explain.adapters.diffusers.families.unet import materialises_self_attention, unet_item_bytes
from explain.testing import tiny_sd_pipeline


def test_probe_memory_counts_the_score_matrix_only_where_the_backend_holds_it():
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = tiny_sd_pipeline().unet
    x = torch.zeros(1, 4, 64, 64)
    unet.set_attn_processor(AttnProcessor2_0())  # diffusers' default: fused SDPA, no N×N scores
    assert not materialises_self_attention(unet)
    fused = unet_item_bytes(unet, x, 2, None)
    unet.set_attn_processor(AttnProcessor())
    assert materialises_self_attention(unet)
    classic = unet_item_bytes(unet, x, 2, None)
    heads = unet.config.attention_head_dim if isinstance(unet.config.attention_head_dim, int) else max(unet.config.attention_head_dim)
    assert classic - fused == 2 * 3 * heads * (64 * 64) ** 2 * 4  # three fp32 N×N copies per head and branch
    assert fused < 64 * 2**20  # the tiny UNet's feature maps alone
