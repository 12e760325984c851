"""The memory estimate of a trace's maps and the budget refusal (explain.memory), by hand."""

from dataclasses import replace

import pytest
import torch

from explain.memory import MapShapes, MemoryBudgetError, check_budget, estimate_memory, legacy_layer_bytes

# SDXL at 1024² (latent 128²): cross-attention in 10 layers at 64² and 60 at 32², full 77-token context.
SDXL_GRIDS = {f"a{i}": (64, 64) for i in range(10)} | {f"b{i}": (32, 32) for i in range(60)}
SDXL = MapShapes(latent_size=(128, 128), layer_grids=SDXL_GRIDS, steps=50, images=1, tokens=77, negative_tokens=77,
                 keep_layers=True)


def test_sdxl_full_context_layers_by_hand():
    positions = 10 * 64 * 64 + 60 * 32 * 32  # 102400 image positions over the 70 layers
    e = estimate_memory(SDXL)
    assert e.layers == 50 * 1 * 77 * positions * 2  # conditional rows, float16: 788 MB
    assert e.layers <= 1.4e9  # the target
    assert e.layers_per_step * 50 == e.layers
    assert e.layers_device == 1 * 77 * positions * 4  # one step in float32 before it moves
    assert e.maps == 50 * 1 * (77 + 77) * 128 * 128 * 4  # attention + attention_negative, float32
    assert e.maps_device == 50 * 2 * (64 * 64 + 32 * 32) * 77 * 4  # the per-step sums of both branches
    old = legacy_layer_bytes(SDXL, guided=True)
    assert old["device"] == 50 * 2 * 77 * positions * 4 == 3_153_920_000  # the 3.15 GB measured before
    assert old["trace"] == 50 * 77 * positions * 4
    assert old["device"] + old["trace"] >= 4 * e.layers


def test_per_resolution_maps_one_per_grid_and_no_negative_rows():
    e = estimate_memory(replace(SDXL, keep_layers="resolution"))
    assert e.layers == 50 * 77 * (64 * 64 + 32 * 32) * 2
    none = estimate_memory(replace(SDXL, keep_layers=False, negative_tokens=0))
    assert none.layers == none.layers_device == 0 and none.maps == 50 * 77 * 128 * 128 * 4
    assert none.maps_device == 50 * 1 * (64 * 64 + 32 * 32) * 77 * 4  # conditional rows only
    # a caller-chosen dtype and more images scale the per-layer bytes
    wide = estimate_memory(replace(SDXL, layer_dtype=torch.float32, images=2))
    assert wide.layers == 4 * estimate_memory(SDXL).layers


def test_the_layers_cut_to_the_prompt_while_the_sums_keep_the_union_of_positions():
    shapes = replace(SDXL, tokens=9, negative_tokens=12, kept_tokens=12)
    e = estimate_memory(shapes)
    assert e.layers == 50 * 9 * 102400 * 2 and e.layers_device == 12 * 102400 * 4


def test_the_budget_refusal_names_the_estimate_the_budget_and_what_fits():
    e = estimate_memory(SDXL)
    check_budget(e, None)
    check_budget(e, e.total / 1e6)  # exactly at the budget: fits
    with pytest.raises(MemoryBudgetError) as error:
        check_budget(e, 500)
    message = str(error.value)
    per_step = e.total / 50
    assert f"fewer steps ({int(500e6 // per_step)} fit)" in message and int(500e6 // per_step) == 19
    assert "about 1293 MB (505 MB mean maps, 788 MB per-layer maps), over the memory budget of 500 MB" in message
    assert "keep_layers='resolution' (544 MB)" in message and "keep_layers=False (505 MB)" in message
    assert "negative=False (" in message and "a shorter context: 77 tokens now" in message
    assert "a larger memory_budget_mb (at least 1294)" in message and "nothing was generated" in message
    with pytest.raises(MemoryBudgetError, match="full_context=False"):
        check_budget(estimate_memory(replace(SDXL, notes={"full_context": True})), 1)
    with pytest.raises(ValueError, match="positive number of megabytes"):
        check_budget(e, 0)
