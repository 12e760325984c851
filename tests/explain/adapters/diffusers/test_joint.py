"""ConceptAttention's options on the joint-attention families: output-space maps, a concept stream
for words that are not in the prompt, and how they are stored."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from explain.adapters.diffusers import trace
from explain.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline
from explain.trace import Trace, TraceFormatError

torch.set_num_threads(1)

PROMPT = "a red circle above a blue square"


def _run(pipe, prompt=PROMPT, steps=2, **kwargs):
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("max_sequence_length", 16)
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, generator=torch.Generator().manual_seed(0), **kwargs).images


class FirstBlock:
    """Records, at the first denoiser call, block 0's conditioning embedding, its attention inputs
    and its image output: enough to recompute block 0's concept maps by hand."""

    def __init__(self, block):
        self.block, self.seen, self.handles = block, {}, []

    def __enter__(self):
        def block_hook(module, args, kwargs):
            self.seen.setdefault("temb", kwargs["temb"])

        def attn_pre(module, args, kwargs):
            self.seen.setdefault("inputs", kwargs)

        def attn_post(module, args, kwargs, output):
            self.seen.setdefault("image_out", output[0])
            self.seen.setdefault("text_out", output[1])

        self.handles = [
            self.block.register_forward_pre_hook(block_hook, with_kwargs=True),
            self.block.attn.register_forward_pre_hook(attn_pre, with_kwargs=True),
            self.block.attn.register_forward_hook(attn_post, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _flux_concept_maps_by_hand(pipe, seen, concepts, kind):
    """Block 0 of Flux: concept tokens = context_embedder(mean T5 embedding of each concept's word),
    through the block's text-side weights, attending over [image keys, concept keys]."""
    from explain.adapters.diffusers.families.flux import FAMILY
    from tests.explain.adapters.diffusers.joint_reference import rotate

    block, attn = pipe.transformer.transformer_blocks[0], pipe.transformer.transformer_blocks[0].attn
    embeds = FAMILY.encode_concepts(pipe, concepts, 16)  # [K, D_text]
    c = pipe.transformer.context_embedder(embeds)[None]
    norm_c = block.norm1_context(c, emb=seen["temb"])[0]
    heads = lambda t: t.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)  # noqa: E731
    cq, ck, cv = attn.norm_added_q(heads(attn.add_q_proj(norm_c))), attn.norm_added_k(heads(attn.add_k_proj(norm_c))), heads(attn.add_v_proj(norm_c))
    x = seen["inputs"]["hidden_states"]
    cos, sin = seen["inputs"]["image_rotary_emb"]
    t = seen["inputs"]["encoder_hidden_states"].shape[1]
    q = rotate(attn.norm_q(heads(attn.to_q(x))).double(), cos[t:], sin[t:]).float()
    k = rotate(attn.norm_k(heads(attn.to_k(x))).double(), cos[t:], sin[t:]).float()
    v = heads(attn.to_v(x))
    if kind == "attention":
        return torch.softmax(q @ ck.transpose(-1, -2) / attn.head_dim**0.5, -1).mean(1)[0]  # [N, K]
    probs = torch.softmax(cq @ torch.cat([k, ck], 2).transpose(-1, -2) / attn.head_dim**0.5, -1)
    concept_out = attn.to_add_out((probs @ torch.cat([v, cv], 2)).transpose(1, 2).flatten(2))
    return torch.softmax(seen["image_out"] @ concept_out.transpose(-1, -2), -1)[0]  # [N, K]


@pytest.mark.parametrize("kind", ["attention", "output"])
def test_concept_maps_of_words_not_in_the_prompt_leave_the_image_alone_and_match_by_hand(kind):
    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=1)  # one double-stream block: the concept stream's only stop
    concepts = ["triangle", "zebra", "circle"]
    plain = _run(pipe)
    with trace(pipe, previews=False, concepts=concepts, maps=kind) as tr, FirstBlock(pipe.transformer.transformer_blocks[0]) as first:
        tapped = _run(pipe)
    assert np.array_equal(plain, tapped)
    t = tr.trace
    assert t.concepts == concepts and t.concept_maps.shape == (2, 1, 3, 16, 16) and t.meta["concept_maps"] == kind
    with torch.no_grad():
        by_hand = _flux_concept_maps_by_hand(pipe, first.seen, concepts, kind)  # [64, 3] at step 0
    expected = F.interpolate(by_hand.T.reshape(1, 3, 8, 8), size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(t.concept_maps[0], expected, atol=1e-5)
    assert torch.allclose(t.concept_maps.sum(2), torch.ones(2, 1, 16, 16), atol=1e-5)  # a softmax over the concepts


def test_output_space_maps_of_the_prompt_use_only_blocks_with_both_projections():
    pipe = tiny_sd3_pipeline(num_layers=2)  # block 1 is context_pre_only: no text output projection
    with trace(pipe, previews=False, maps="output", keep_layers=True, layer_dtype=torch.float32) as tr:
        _run(pipe, guidance_scale=1.0)
    t = tr.trace
    assert t.meta["maps"] == "output" and "joint_rows" not in t.meta
    assert set(t.attention_layers) == {"transformer_blocks.0.attn"}
    assert torch.allclose(t.attention, F.interpolate(t.attention_layers["transformer_blocks.0.attn"][:, 0], size=(16, 16),
                                                      mode="bilinear", align_corners=False)[:, None], atol=1e-6)


def test_flux_output_space_maps_of_the_prompt_equal_output_dot_products_by_hand():
    pipe = tiny_flux_pipeline(num_layers=1, num_single_layers=1)  # single-stream blocks give no output maps
    with trace(pipe, previews=False, maps="output") as tr, FirstBlock(pipe.transformer.transformer_blocks[0]) as first:
        _run(pipe)
    t = tr.trace
    by_hand = torch.softmax(first.seen["image_out"] @ first.seen["text_out"].transpose(-1, -2), -1)[0]  # [64, 16] over all 16 T5 positions
    kept = by_hand[:, t.meta["text_positions"]]
    expected = F.interpolate(kept.T.reshape(1, -1, 8, 8), size=(16, 16), mode="bilinear", align_corners=False)
    assert torch.allclose(t.attention[0], expected, atol=1e-5)


def test_sd3_concept_stream_runs_through_every_block_and_keeps_the_image():
    pipe = tiny_sd3_pipeline()
    plain = _run(pipe, guidance_scale=4.0)
    for kind in ("attention", "output"):
        with trace(pipe, previews=False, concepts=["square", "zebra"], maps=kind) as tr:
            tapped = _run(pipe, guidance_scale=4.0)
        assert np.array_equal(plain, tapped)
        maps = tr.trace.concept_maps
        assert maps.shape == (2, 1, 2, 16, 16) and torch.allclose(maps.sum(2), torch.ones(2, 1, 16, 16), atol=1e-5)


def test_concept_traces_save_and_load_and_damaged_ones_are_refused(tmp_path):
    pipe = tiny_flux_pipeline()
    with trace(pipe, previews=False, concepts=["circle", "zebra"]) as tr:
        _run(pipe)
    path = tr.trace.save(tmp_path / "concepts.safetensors")
    back = Trace.load(path)
    assert back.concepts == ["circle", "zebra"]
    assert torch.allclose(back.concept_maps, tr.trace.concept_maps, atol=1e-3)  # stored as fp16 like attention
    back.concepts = ["circle"]
    with pytest.raises(TraceFormatError, match="concept_maps must be"):
        back.validate()
    back.concepts = [1, 2]
    with pytest.raises(TraceFormatError, match="concepts must be a list of strings"):
        back.validate()
    back.concepts, back.concept_maps = ["circle", "zebra"], back.concept_maps * float("nan")
    with pytest.raises(TraceFormatError, match="concept_maps holds .* NaN"):
        back.validate()
    back.concept_maps = None
    with pytest.raises(TraceFormatError, match="no concept_maps"):
        back.validate()
    plain = tr.trace
    plain.concepts, plain.concept_maps = [], None
    assert Trace.load(plain.save(tmp_path / "plain.safetensors")).concept_maps is None  # a schema-1 trace as before


def test_options_are_checked_and_unets_refuse_joint_options():
    with pytest.raises(ValueError, match="maps must be one of"):
        with trace(tiny_flux_pipeline(), maps="heads"):
            pass
    with pytest.raises(ValueError, match="joint_rows"):
        with trace(tiny_flux_pipeline(), joint_rows="softmax"):
            pass
    with pytest.raises(ValueError, match="distinct"):
        with trace(tiny_flux_pipeline(), concepts=["a", "a"]):
            pass
    with pytest.raises(TypeError, match="list of words"):
        with trace(tiny_flux_pipeline(), concepts="circle"):
            pass
    with pytest.raises(ValueError, match="joint-attention models"):
        with trace(tiny_sd_pipeline(), concepts=["circle"]):
            pass


@pytest.mark.parametrize("family,maps", [("sd3", "attention"), ("sd3", "output"), ("flux", "output")])
def test_a_concept_stream_fed_the_prompt_itself_retraces_the_text_stream(monkeypatch, family, maps):
    """With the prompt's own text tokens as concepts, the concept stream sees exactly what the text
    stream sees in every block (its keys, its modulation, its feed-forward), so its maps must equal
    the prompt's maps over the whole context: a check of the stream through all blocks."""
    from explain.adapters.diffusers.families import flux, sd3

    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    module = sd3 if family == "sd3" else flux
    with torch.no_grad():
        if family == "sd3":
            context = pipe.encode_prompt(PROMPT, None, None, max_sequence_length=16, do_classifier_free_guidance=False)[0][0]
        else:
            context = pipe.encode_prompt(PROMPT, None, max_sequence_length=16)[0][0]
    monkeypatch.setattr(module.FAMILY, "encode_concepts", lambda p, concepts, length: context)
    names = [f"position {i}" for i in range(context.shape[0])]
    with trace(pipe, previews=False, maps=maps, concepts=names, full_context=True) as tr:
        _run(pipe, guidance_scale=1.0)
    t = tr.trace
    assert t.attention.shape == t.concept_maps.shape
    assert torch.allclose(t.concept_maps, t.attention, atol=1e-5)


class _CustomProcessor:
    """A user's own attention processor: the tap must leave it alone and say so."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _attention_modules(pipe):
    return [m for m in pipe.transformer.modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_layers_with_custom_processors_are_named_and_a_model_with_none_traceable_is_refused(family):
    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_flux_pipeline()
    layers = _attention_modules(pipe)
    custom = _CustomProcessor(layers[0].processor)
    layers[0].set_processor(custom)
    with pytest.warns(UserWarning, match="custom processors and are not traced: .*_CustomProcessor"):
        with trace(pipe, previews=False):
            assert layers[0].processor is custom
    assert layers[0].processor is custom  # still the user's own after the tap
    for layer in layers:
        layer.set_processor(_CustomProcessor(layer.processor))
    with pytest.raises(RuntimeError, match=f"the {'SD3' if family == 'sd3' else 'Flux'} transformer has no .*to trace"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with trace(pipe, previews=False):
            pass
    assert all(isinstance(layer.processor, _CustomProcessor) for layer in layers)
