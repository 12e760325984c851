"""The embedded model's training script: its grounding loss and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from explain.embedded import world

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_embedded", ROOT / "scripts" / "train_embedded.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_token_objects_mark_each_objects_words(train):
    pool = world.scenes(20, seed=4)
    ids = torch.zeros(len(pool), 77, dtype=torch.long)
    marks = train.token_objects(pool, ids)
    for n, scene in enumerate(pool):
        words = world.caption_words(scene.caption)
        for k, obj in enumerate(scene.objects):
            named = [words[t - 1] for t in marks[n, k].nonzero().flatten().tolist()]
            assert obj.color in named and obj.shape in named
            assert set(named) <= {obj.color, obj.shape, "big", "large", "small", "little", "tiny", "huge"}
        assert not marks[n, len(scene.objects) :].any()


def _probs_with(token_map: torch.Tensor, tokens: int = 5) -> torch.Tensor:
    """Attention probabilities ``[1, 2 heads, N, T]`` whose token 1 has the spatial shape ``token_map``."""
    n = token_map.numel()
    probs = torch.full((1, 2, n, tokens), 1.0)
    probs[0, :, :, 1] = token_map.flatten() * 50
    return probs / probs.sum(-1, keepdim=True)


def test_grounding_loss_is_zero_inside_and_large_outside(train):
    side = 8
    cover = torch.zeros(1, 3, 64, 64)
    cover[0, 0, :32, :32] = 1  # object 0 fills the top-left quarter
    token_obj = torch.zeros(1, 3, 5, dtype=torch.bool)
    token_obj[0, 0, 1] = True
    inside = torch.zeros(side, side)
    inside[:4, :4] = 1
    outside = torch.zeros(side, side)
    outside[4:, 4:] = 1
    # token 1's map exactly on the object: only the uniform floor leaks out
    on = train.grounding_loss([_probs_with(inside + 1e-6)], cover, token_obj)
    off = train.grounding_loss([_probs_with(outside + 1e-6)], cover, token_obj)
    uniform = train.grounding_loss([_probs_with(torch.full((side, side), 1e-6))], cover, token_obj)
    assert on < 0.01
    assert off > 0.9
    assert uniform == pytest.approx(0.75**2, abs=1e-3)  # a quarter of a uniform map is inside
    empty = train.grounding_loss([_probs_with(inside)], cover, torch.zeros_like(token_obj))
    assert empty == 0


def test_grounding_processor_computes_what_diffusers_computes(train):
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=4, dim_head=4)
    x, context = torch.randn(2, 9, 16), torch.randn(2, 7, 12)
    expected = attn(x, encoder_hidden_states=context)
    store: list = []
    attn.set_processor(train.GroundingAttnProcessor(store))
    got = attn(x, encoder_hidden_states=context)
    assert torch.allclose(got, expected, atol=1e-5)
    assert store[0].shape == (2, 4, 9, 7)
    assert torch.allclose(store[0].sum(-1), torch.ones(2, 4, 9))


def test_tiny_run_writes_a_loadable_pipeline_and_its_record(train, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "model"
    train.main(
        ["--out", str(out), "--device", "cpu", "--pool", "64", "--vae-steps", "2", "--vae-batch", "4",
         "--unet-steps", "3", "--batch", "4", "--warmup", "1", "--ground-weight", "0.02"]
    )
    record = json.loads((out / "training.json").read_text())
    assert record["unet_steps_done"] == 3
    assert record["generator_version"] == world.GENERATOR_VERSION
    assert record["args"]["ground_weight"] == 0.02
    from explain import embedded

    pipe = embedded.load_pipeline(out, device="cpu")
    # the grounding processors were a training device only: the saved UNet has diffusers' own
    assert not any(type(p).__name__ == "GroundingAttnProcessor" for p in pipe.unet.attn_processors.values())
    # and a stock from_pretrained (no dtype) loads it in one dtype and generates on the CPU
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    assert stock.text_encoder.dtype == stock.unet.dtype == torch.float32
    stock("a red circle", num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0))


def test_object_mix_sets_the_pools_shares_of_object_counts(train):
    pool = train.draw_pool(200, seed=3, object_mix=train.parse_object_mix("1,5,4"))
    counts = [sum(len(s.objects) == k for s in pool) for k in (1, 2, 3)]
    assert counts == [20, 100, 80]
    assert all(not world.is_held_out(s.key) for s in pool)
    assert [s.caption for s in pool] == [s.caption for s in train.draw_pool(200, seed=3, object_mix=[0.1, 0.5, 0.4])]
    # shuffled: the counts are interleaved, not in blocks
    assert len({len(s.objects) for s in pool[:20]}) > 1
    with pytest.raises(ValueError, match="three non-negative shares"):
        train.parse_object_mix("0.5,0.5")
    with pytest.raises(SystemExit):  # the command line says so with its usage, as for its other checks
        train.parse_args(["--object-mix", "0.5,-0.1,0.6"])


def test_high_noise_share_moves_that_share_of_timesteps_up(train):
    g = torch.Generator().manual_seed(0)
    plain = train.sample_timesteps(20_000, 0.0, 400, g, "cpu")
    leaned = train.sample_timesteps(20_000, 0.5, 400, g, "cpu")
    assert 0 <= plain.min() and plain.max() < 1000 and 0 <= leaned.min() and leaned.max() < 1000
    assert abs((plain < 400).float().mean().item() - 0.4) < 0.02
    assert abs((leaned < 400).float().mean().item() - 0.2) < 0.02
