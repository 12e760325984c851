import math
import pytest
import torch
import torch.nn.functional as F

from explain.attention import (
    StepAccumulator,
    attention_output,
    attention_probs,
    branch_rows,
    head_mean,
    layer_grid,
    merge_heads,
    resize_maps,
    select_rows,
    split_heads,
    to_maps,
)

torch.set_num_threads(1)


def _qkv(b=2, heads=4, n=12, t=7, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(b, heads, n, d), mk(b, heads, t, d), mk(b, heads, t, d)


def test_output_matches_sdpa():
    q, k, v = _qkv()
    probs = attention_probs(q, k)
    assert torch.allclose(attention_output(probs, v), F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    assert torch.allclose(probs.sum(-1), torch.ones(probs.shape[:-1]), atol=1e-6)


def test_output_matches_sdpa_with_additive_and_boolean_masks():
    q, k, v = _qkv()
    keep = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    keep[..., 5:] = False
    additive = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    for mask in (keep, additive):
        probs = attention_probs(q, k, mask=mask)
        assert torch.allclose(attention_output(probs, v), ref, atol=1e-5)
        assert torch.all(probs[..., 5:] == 0)


def test_matches_diffusers_get_attention_scores_in_batch_major_layout():
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4)
    q, k, _ = _qkv(b=2, heads=4, n=9, t=5, d=4)
    qb, kb = q.reshape(8, 9, 4), k.reshape(8, 5, 4)  # [B*heads, N, d], batch-major
    ref = attn.get_attention_scores(qb, kb)
    ours = attention_probs(qb, kb, scale=attn.scale)
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(head_mean(ours, heads=4), head_mean(ours.view(2, 4, 9, 5)))


def test_fp16_upcast_keeps_rows_normalised_and_dtype_choice():
    q, k, v = _qkv(dtype=torch.float16)
    p = attention_probs(q, k)
    assert p.dtype == torch.float32 and torch.allclose(p.sum(-1), torch.ones(p.shape[:-1]), atol=1e-5)
    assert attention_probs(q, k, upcast=False).dtype == torch.float16
    assert attention_output(p, v).dtype == torch.float16


def test_split_merge_heads_round_trip_and_errors():
    x = torch.randn(2, 5, 12)
    assert split_heads(x, 3).shape == (2, 3, 5, 4)
    assert torch.equal(merge_heads(split_heads(x, 3)), x)
    with pytest.raises(ValueError, match="divisible"):
        split_heads(x, 5)
    with pytest.raises(ValueError, match="multiple of 5 heads"):
        head_mean(torch.rand(8, 3, 2), heads=5)
    with pytest.raises(ValueError, match="feature sizes differ"):
        attention_probs(torch.rand(1, 2, 3), torch.rand(1, 2, 4))


def test_branch_rows_follow_cond_or_uncond():
    assert branch_rows([1, 0], 4) == slice(2, 4)  # diffusers CFG: [uncond, cond]
    assert branch_rows([1, 0], 4, branch=1) == slice(0, 2)
    assert branch_rows([0, 1], 6) == slice(0, 3)  # ComfyUI may put cond first
    assert branch_rows([0], 2) == slice(0, 2)  # guidance 1: no unconditional rows
    assert branch_rows([0], 2, branch=1) == []
    assert branch_rows([0, 1, 0], 3) == [0, 2]  # not contiguous: explicit rows
    x = torch.arange(3)
    assert select_rows(x, [0, 2]).tolist() == [0, 2] and select_rows(x, slice(1, 3)).tolist() == [1, 2]
    with pytest.raises(ValueError, match="equal chunks"):
        branch_rows([1, 0], 3)
    with pytest.raises(ValueError, match="empty"):
        branch_rows([], 2)


def test_layer_grid_handles_non_square_and_odd_sizes():
    assert layer_grid(16 * 24, (16, 24)) == (16, 24)
    assert layer_grid(8 * 12, (16, 24)) == (8, 12)
    assert layer_grid(3 * 4, (9, 13)) == (3, 4)  # 9×13 → 5×7 → 3×4
    with pytest.raises(ValueError, match="cannot place"):
        layer_grid(7, (16, 16))


def test_to_maps_is_row_major_and_resize_keeps_rows_summing_to_one():
    probs = torch.rand(1, 6, 3).softmax(-1)  # N = 2×3
    maps = to_maps(probs, (2, 3))
    assert maps.shape == (1, 3, 2, 3) and torch.equal(maps[0, :, 1, 2], probs[0, 5])
    big = resize_maps(maps, (4, 6))
    assert torch.allclose(big.sum(1), torch.ones(1, 4, 6), atol=1e-6)
    # A non-square map resizes per axis: a column pattern stays a column pattern.
    col = torch.zeros(1, 1, 2, 3)
    col[..., 0] = 1
    up = resize_maps(col, (4, 6))
    assert torch.allclose(up[0, 0, 0], up[0, 0, 3]) and up[0, 0, 0, 0] == 1 and up[0, 0, 0, 5] == 0


def test_accumulator_mean_over_layers_per_step():
    acc = StepAccumulator(latent_size=(4, 6), keep_layers=True, keep_resolutions=True)
    for step in range(3):
        full = torch.full((2, 3, 24, 5), float(step))  # [B, heads, N, T] at latent size
        half = torch.full((6, 6, 5), float(step) + 2)  # [B*heads, N=2×3, T] at half size
        acc.add("a", full, (4, 6))
        acc.add("b", half, heads=3)  # grid inferred from N and the latent size
        acc.end_step()
    rec = acc.records()
    assert rec.shape == (3, 2, 5, 4, 6) and rec.device.type == "cpu"
    assert torch.allclose(rec[:, 0, 0, 0, 0], torch.tensor([1.0, 2.0, 3.0]))
    layers = acc.layer_records()
    assert layers["a"].shape == (3, 2, 5, 4, 6) and layers["b"].shape == (3, 2, 5, 2, 3)
    assert set(layers) == {"a", "b", "4x6", "2x3"}


def test_accumulator_rows_sum_to_one_over_full_context_and_token_cut():
    acc = StepAccumulator(latent_size=(4, 4), tokens=3)
    q, k, _ = _qkv(b=1, heads=2, n=16, t=7)
    acc.add("x", attention_probs(q, k), (4, 4))
    q2, k2, _ = _qkv(b=1, heads=2, n=4, t=7, seed=1)
    acc.add("y", attention_probs(q2, k2), (2, 2))
    acc.end_step()
    assert acc.records().shape == (1, 1, 3, 4, 4)  # cut to the first 3 context positions
    full = StepAccumulator(latent_size=(4, 4))
    full.add("x", attention_probs(q, k), (4, 4))
    full.add("y", attention_probs(q2, k2), (2, 2))
    full.end_step()
    assert torch.allclose(full.records().sum(2), torch.ones(1, 1, 4, 4), atol=1e-5)


def test_accumulator_discard_step_and_errors():
    acc = StepAccumulator(latent_size=(2, 2), store_dtype=torch.float16)
    acc.add("x", torch.rand(1, 4, 3), (2, 2))
    acc.discard_step()
    assert acc.pending == 0
    with pytest.raises(RuntimeError, match="no cross-attention was recorded"):
        acc.end_step()
    acc.add("x", torch.rand(1, 4, 3), (2, 2))
    with pytest.raises(ValueError, match="same batch and context"):
        acc.add("y", torch.rand(2, 4, 3), (2, 2))
    acc.end_step()
    assert acc.records().dtype == torch.float16 and acc.num_steps == 1
    assert StepAccumulator().records() is None
    with pytest.raises(ValueError, match="latent size"):
        StepAccumulator().add("x", torch.rand(1, 4, 3))


@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_identity_method_equals_explicit(masked):
    from explain.attention import attention_with_probs

    q, k, v = _qkv(t=9, d=8)
    mask = None
    if masked:
        mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
        mask[..., 7:] = False
    out_e, probs_e = attention_with_probs(q, k, v, mask=mask, method="explicit")
    out_s, probs_s = attention_with_probs(q, k, v, mask=mask, method="sdpa")
    assert probs_s.shape == probs_e.shape == (2, 4, 12, 9) and out_s.shape == out_e.shape == (2, 4, 12, 8)
    assert torch.allclose(probs_s, probs_e, atol=1e-5) and torch.allclose(out_s, out_e, atol=1e-5)
    assert torch.allclose(out_s, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-5)
    with pytest.raises(ValueError, match="capture method"):
        attention_with_probs(q, k, v, method="fast")


# ---------------------------------------------------------------------------- joint attention
def _joint(b=2, heads=3, n=10, t=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, n + t, d, generator=g) * 2
    k = torch.randn(b, heads, n + t, d, generator=g) * 2
    return q, k


@pytest.mark.parametrize("order", ["image_first", "text_first"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_joint_slice_equals_the_explicit_joint_softmax(order, renormalize):
    from explain.attention import image_text_slice, joint_image_text_probs

    n, t = 10, 6
    q, k = _joint(n=n, t=t)
    image, text = (slice(0, n), slice(n, n + t)) if order == "image_first" else (slice(t, t + n), slice(0, t))
    full = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # over the joint keys
    expected = full[:, :, image, text]
    if renormalize:
        expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(image_text_slice(full, image, text, renormalize), expected, atol=1e-6)
    got = joint_image_text_probs(q, k, image, text, renormalize=renormalize)
    assert got.shape == (2, 3, n, t) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-6)
    # bounded memory: a chunk of one query row at a time gives the same numbers, heads averaged too
    tiny = joint_image_text_probs(q, k, image, text, renormalize=renormalize, mean_heads=True, chunk_bytes=1)
    assert torch.allclose(tiny, expected.mean(1), atol=1e-6)
    rows = got.sum(-1)
    if renormalize:
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    else:  # the text's share of each pixel's attention: strictly between 0 and 1
        assert bool((rows > 0).all() and (rows < 1).all()) and float(rows.std()) > 1e-3


def test_joint_slice_errors():
    from explain.attention import joint_image_text_probs

    q, k = _joint()
    with pytest.raises(TypeError, match="contiguous slice"):
        joint_image_text_probs(q, k, [0, 1], slice(10, 16))
    with pytest.raises(ValueError, match=r"\[B, heads, S, d\]"):
        joint_image_text_probs(q[0], k[0], slice(0, 10), slice(10, 16))


def test_output_space_maps_are_a_softmax_over_tokens_of_output_dot_products():
    from explain.attention import output_space_maps

    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(2, 5, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    maps = output_space_maps(img, txt)
    expected = torch.stack([torch.softmax(img[b] @ txt[b].T, dim=-1) for b in range(2)])
    assert maps.shape == (2, 5, 3) and torch.allclose(maps, expected, atol=1e-6)
    with pytest.raises(ValueError, match="same B and D"):
        output_space_maps(img, txt[:, :, :4])


def test_accumulator_keeps_listed_positions():
    q, k, _ = _qkv(b=1, heads=2, n=16, t=9)
    probs = attention_probs(q, k)
    acc = StepAccumulator(latent_size=(4, 4), tokens=[0, 1, 5, 6])
    acc.add("x", probs, (4, 4))
    acc.end_step()
    full = StepAccumulator(latent_size=(4, 4))
    full.add("x", probs, (4, 4))
    full.end_step()
    assert torch.allclose(acc.records(), full.records()[:, :, [0, 1, 5, 6]])
    with pytest.raises(ValueError, match="kept positions reach"):
        StepAccumulator(latent_size=(4, 4), tokens=[0, 20]).add("x", probs, (4, 4))


def test_accumulator_keeps_the_asked_rows_and_positions_of_each_layer_and_moves_them_per_step():
    acc = StepAccumulator(latent_size=(4, 4), tokens=5, keep_layers=True, keep_resolutions=True,
                          layer_rows=slice(1, 2), layer_tokens=[0, 2], layer_dtype=torch.float16, layer_device="cpu")
    probs = torch.rand(2, 3, 16, 7)  # [B, heads, N, T]: rows 0 (uncond) and 1 (cond)
    acc.add("x", probs, (4, 4))
    assert acc.pending_layer_bytes() == 1 * 16 * 5 * 4  # one row, float32, until the step ends
    acc.end_step()
    assert acc.pending_layer_bytes() == 0
    layers = acc.layer_maps(0)
    expected = probs[1:2, :, :, [0, 2]].mean(1).transpose(1, 2).reshape(1, 2, 4, 4)
    assert layers["x"].dtype == torch.float16 and layers["x"].shape == (1, 2, 4, 4)
    assert torch.allclose(layers["x"].float(), expected, atol=1e-3) and torch.allclose(layers["4x4"].float(), expected, atol=1e-3)
    assert acc.held_layer_bytes() == 2 * 1 * 2 * 16 * 2
    assert acc.step_map(0).shape == (2, 5, 4, 4)  # the mean keeps every row and kept position
    taken = acc.take_layer_maps(0)
    assert set(taken) == {"x", "4x4"} and acc.held_layer_bytes() == 0 and acc.layer_maps(0) == {}


def test_accumulator_without_a_layer_device_finishes_layers_when_read_as_before():
    acc = StepAccumulator(latent_size=(4, 4), keep_resolutions=True)  # ComfyUI's use
    acc.add("x", torch.rand(2, 3, 16, 7), (4, 4))
    acc.end_step()
    assert not acc.moves_layers and acc.held_layer_bytes() == 0  # nothing finished yet: only the sums
    maps = acc.layer_records()
    assert maps["4x4"].shape == (1, 2, 7, 4, 4) and maps["4x4"].dtype == torch.float32
