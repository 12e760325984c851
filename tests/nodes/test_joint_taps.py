"""The joint-attention (DiT) tap without ComfyUI: the override's calling convention (old and newest
ComfyUI), reading q/k in both of ComfyUI's layouts, the maps against an explicit joint softmax,
the block wrappers on a toy Flux-shaped model that calls attention the way ComfyUI's does,
installation on a clone (chaining), DF-CAM's image-token probes, and the context's token streams."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from explain.attention import COND, UNCOND
from explain.tokens import PromptTokens
from explain.trace import Word
from nodes import joint_taps, taps
from nodes.prompt_tokens import comfy_prompt_tokens, joint_context_tokens
from nodes.runs import RunRegistry
from tests.nodes.stubs import FakeModelPatcher, install_comfy_stubs

HEADS, D = 2, 8


def explicit_maps(qh, kh, image, text):
    """Head-averaged, text-renormalised image × text slice of the full joint softmax (float64)."""
    probs = torch.softmax(qh.double() @ kh.double().transpose(-1, -2) / qh.shape[-1] ** 0.5, dim=-1)
    part = probs[:, :, image, text]
    return (part / part.sum(-1, keepdim=True)).mean(1)


# ---------------------------------------------------------------------------- a toy Flux-shaped model
class WrapAttn:
    """TEST DOUBLE of ComfyUI's ``wrap_attn`` (a125cd84 and newest): an override set in
    ``transformer_options`` is called as ``override(func, *args, **kwargs)`` with the private
    ``_inside_attn_wrapper`` keyword; with ``containers``, q/k/v arrive as single-use containers
    that are unpacked for an override without a ``container_function`` (newest ComfyUI)."""

    def __init__(self, containers=False):
        self.containers = containers

    def __call__(self, q, k, v, heads, **kwargs):
        def func(q, k, v, heads, mask=None, skip_reshape=False, scale=None, **rest):
            if not skip_reshape:
                q, k, v = (t.view(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            return out if skip_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, heads * out.shape[-1])

        args = (q, k, v, heads)
        options = kwargs.get("transformer_options") or {}
        override = options.get("optimized_attention_override")
        if override is None:
            return func(*args, **kwargs)
        kwargs["_inside_attn_wrapper"] = True
        if self.containers:
            boxes = [types.SimpleNamespace(tensor=t) for t in args[:3]]
            args = tuple(b.tensor for b in boxes) + args[3:]  # no container_function: plain tensors
        return override(func, *args, **kwargs)


class ToyDoubleBlock(torch.nn.Module):
    """Flux's DoubleStreamBlock shape: joint attention over [text, image] (``[B, H, S, D]``,
    ``skip_reshape=True``), then separate updates."""

    def __init__(self, attention, width=HEADS * D):
        super().__init__()
        self.attention = attention
        self.img_qkv, self.txt_qkv = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, 3 * width)
        self.flipped_img_txt = False

    def forward(self, img, txt, transformer_options):
        split = lambda t: t.view(t.shape[0], t.shape[1], 3, HEADS, D).permute(2, 0, 3, 1, 4)  # noqa: E731
        iq, ik, iv = split(self.img_qkv(img))
        tq, tk, tv = split(self.txt_qkv(txt))
        out = self.attention(torch.cat([tq, iq], 2), torch.cat([tk, ik], 2), torch.cat([tv, iv], 2), HEADS, skip_reshape=True, transformer_options=transformer_options)
        t = txt.shape[1]
        return img + out[:, :, t:].transpose(1, 2).reshape(img.shape), txt + out[:, :, :t].transpose(1, 2).reshape(txt.shape)


class ToySingleBlock(torch.nn.Module):
    """Flux's SingleStreamBlock shape: the joint sequence in, q/k as ``[B, S, H·D]`` here (SD3's
    layout), updated in place as ComfyUI's ``x += ...`` does."""

    def __init__(self, attention, width=HEADS * D):
        super().__init__()
        self.attention = attention
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.norm = torch.nn.LayerNorm(width, elementwise_affine=False)

    def forward(self, x, transformer_options):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        x += self.attention(q, k, v, HEADS, transformer_options=transformer_options)
        return x


class Flux(torch.nn.Module):
    """A toy named like ComfyUI's Flux, calling its blocks through ``patches_replace["dit"]`` as
    ``comfy/ldm/flux/model.py`` does."""

    patch_size = 2

    def __init__(self, attention, double=2, single=1):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.double_blocks = torch.nn.ModuleList(ToyDoubleBlock(attention) for _ in range(double))
        self.single_blocks = torch.nn.ModuleList(ToySingleBlock(attention) for _ in range(single))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, img, txt, transformer_options):
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.double_blocks):
            if ("double_block", i) in replace:
                def wrap(args, block=block):
                    img, txt = block(args["img"], args["txt"], args["transformer_options"])
                    return {"img": img, "txt": txt}

                out = replace[("double_block", i)]({"img": img, "txt": txt, "transformer_options": transformer_options}, {"original_block": wrap})
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(img, txt, transformer_options)
        x = torch.cat([txt, img], 1)
        for i, block in enumerate(self.single_blocks):
            if ("single_block", i) in replace:
                def wrap(args, block=block):
                    return {"img": block(args["img"], args["transformer_options"])}

                x = replace[("single_block", i)]({"img": x, "transformer_options": transformer_options}, {"original_block": wrap})["img"]
            else:
                x = block(x, transformer_options)
        return x[:, txt.shape[1] :]


@pytest.fixture
def comfy(monkeypatch):
    install_comfy_stubs(monkeypatch)
    sys.modules["comfy.ldm.modules.attention"].wrap_attn = lambda f: f  # this "ComfyUI" has the override (0.3.60+)
    return sys.modules["comfy.ldm.modules.attention"]


def tapped_toy(comfy, containers=False, previous=None, latent=(4, 6), text=5):
    model = Flux(WrapAttn(containers))
    patcher = FakeModelPatcher(model)
    if previous is not None:
        patcher.model_options["transformer_options"]["optimized_attention_override"] = previous
    recorder = taps.TapRecorder(registry=RunRegistry())
    tapped = taps.install_tap(patcher, recorder)
    run = taps._RunState(recorder, (1, 16, *latent), torch.tensor([1.0, 0.5, 0.0]), {COND: text, UNCOND: text})
    recorder.active = run
    g = torch.Generator().manual_seed(1)
    n = -(-latent[0] // 2) * -(-latent[1] // 2)
    img, txt = torch.randn(2, n, HEADS * D, generator=g), torch.randn(2, text, HEADS * D, generator=g)
    return model, patcher, tapped, recorder, run, img, txt


# ---------------------------------------------------------------------------- the override
@pytest.mark.parametrize("containers", [False, True], ids=["a125cd84", "newest (containers)"])
def test_the_tap_leaves_the_output_bit_identical_and_records_every_joint_block(comfy, containers):
    model, patcher, tapped, recorder, run, img, txt = tapped_toy(comfy, containers)
    options = {**tapped.model_options["transformer_options"], "cond_or_uncond": [1, 0]}
    out = model(img.clone(), txt.clone(), options)
    plain = model(img.clone(), txt.clone(), {"cond_or_uncond": [1, 0]})
    assert torch.equal(out, plain)
    assert run.acc[COND].pending == 3 and run.acc[UNCOND].pending == 3  # two double blocks, one single
    assert recorder.joint_state.block is None  # every wrapper restored the state it found


def test_maps_equal_the_explicit_joint_softmax_with_rows_split_by_cond_or_uncond(comfy):
    seen = []

    def capture(func, *args, **kwargs):  # an override before the Tap: gets the same q, k
        if kwargs.get("skip_reshape"):
            seen.append((args[0].clone(), args[1].clone()))
        else:
            split = lambda t: t.view(t.shape[0], -1, HEADS, D).transpose(1, 2)  # noqa: E731
            seen.append((split(args[0]).clone(), split(args[1]).clone()))
        return func(*args, **kwargs)

    model, patcher, tapped, recorder, run, img, txt = tapped_toy(comfy, previous=capture)
    model(img, txt, {**tapped.model_options["transformer_options"], "cond_or_uncond": [1, 0]})
    assert len(seen) == 3
    t, n = txt.shape[1], img.shape[1]
    reference = torch.stack([explicit_maps(q, k, slice(t, t + n), slice(0, t)) for q, k in seen]).mean(0)  # [2, N, T]
    run.acc[COND].end_step()
    run.acc[UNCOND].end_step()
    for branch, row in ((UNCOND, 0), (COND, 1)):  # cond_or_uncond [1, 0]: the unconditional row first
        record = run.acc[branch].records()[0, 0]  # [T, h, w] at the latent grid
        expected = torch.nn.functional.interpolate(reference[row].T.reshape(1, t, 2, 3).float(), size=(4, 6), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(record, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(run.acc[COND].records()[0].sum(1), torch.ones(1), atol=1e-5)  # rows renormalised over the text


def test_the_override_passes_every_argument_on_and_chains_to_the_one_before(comfy):
    calls = []

    def speed_pack(func, *args, **kwargs):
        calls.append((len(args), sorted(kwargs)))
        return func(*args, **kwargs)

    model, patcher, tapped, recorder, run, img, txt = tapped_toy(comfy, previous=speed_pack)
    override = tapped.model_options["transformer_options"]["optimized_attention_override"]
    assert override.previous is speed_pack and recorder.chained == ["optimized_attention_override"]
    assert patcher.model_options["transformer_options"]["optimized_attention_override"] is speed_pack  # the loaded model keeps its own
    assert "patches_replace" not in patcher.model_options["transformer_options"]
    got = {}

    def func(*args, **kwargs):
        got.update(args=args, kwargs=kwargs)
        return "out"

    q, k = torch.randn(1, HEADS, 7, D), torch.randn(1, HEADS, 7, D)
    extra = {"skip_reshape": True, "mask": None, "scale": 0.3, "enable_gqa": False, "a_future_keyword": 1, "_inside_attn_wrapper": True}
    assert override(func, q, k, q, HEADS, **extra) == "out"
    assert got["args"][0] is q and got["args"][3] == HEADS and got["kwargs"] == extra
    assert calls == [(4, sorted(extra))]


def test_retapping_replaces_the_taps_own_override_and_wrappers_and_keeps_theirs(comfy):
    def theirs(func, *args, **kwargs):
        return func(*args, **kwargs)

    model, patcher, tapped, recorder, run, img, txt = tapped_toy(comfy, previous=theirs)
    again = taps.install_tap(tapped, taps.TapRecorder(registry=RunRegistry()))
    options = again.model_options["transformer_options"]
    assert options["optimized_attention_override"].previous is theirs
    assert all(w.previous is None for w in options["patches_replace"]["dit"].values())


def test_reading_q_and_k_in_both_layouts_and_with_grouped_key_heads():
    g = torch.Generator().manual_seed(2)
    qh, kh = torch.randn(2, 4, 9, D, generator=g), torch.randn(2, 4, 9, D, generator=g)
    flat = lambda t: t.transpose(1, 2).reshape(2, 9, -1)  # noqa: E731
    a = joint_taps.joint_queries_keys((qh, kh, kh, 4), {"skip_reshape": True})
    b = joint_taps.joint_queries_keys((flat(qh), flat(kh), flat(kh)), {"heads": 4})
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    k2 = torch.randn(2, 2, 9, D, generator=g)  # 2 key heads for 4 query heads
    q_read, k_read = joint_taps.joint_queries_keys((qh, k2, k2, 4), {"skip_reshape": True, "enable_gqa": True})
    assert torch.equal(k_read, k2.repeat_interleave(2, dim=1)) and q_read is qh


def test_maps_honour_an_attention_mask_and_the_scale():
    g = torch.Generator().manual_seed(3)
    qh, kh = torch.randn(1, 2, 8, D, generator=g), torch.randn(1, 2, 8, D, generator=g)
    image, text = slice(3, 8), slice(0, 3)
    plain = joint_taps.image_text_maps(qh, kh, image, text)
    torch.testing.assert_close(plain.double(), explicit_maps(qh, kh, image, text), rtol=1e-5, atol=1e-7)
    mask = torch.zeros(8, 8)
    mask[:, 1] = float("-inf")  # text position 1 is masked out (a padded token)
    masked = joint_taps.image_text_maps(qh, kh, image, text, mask=mask)
    assert torch.all(masked[..., 1] == 0) and torch.allclose(masked.sum(-1), torch.ones(1, 5))
    scaled = joint_taps.image_text_maps(qh, kh, image, text, scale=0.1)
    assert not torch.allclose(scaled, plain)


def test_block_calls_place_text_and_image_in_the_joint_sequence():
    call = joint_taps.BlockCall("double_blocks.0", text_length=4, image_length=8)
    assert call.slices(6) == (slice(4, 10), slice(0, 4))  # [text, image, reference-image tokens]
    flipped = joint_taps.BlockCall("b", text_length=4, image_length=8, image_first=True)
    assert flipped.slices(6) == (slice(0, 6), slice(8, 12))
    state = joint_taps.JointCallState()
    assert state.enter("single", "single_blocks.0", {"img": torch.zeros(1, 12, 2)}) is None  # no double block ran yet
    state.enter("double", "double_blocks.0", {"img": torch.zeros(1, 8, 2), "txt": torch.zeros(1, 4, 2)})
    single = state.enter("single", "single_blocks.0", {"img": torch.zeros(1, 12, 2)})
    assert (single.text_length, single.image_length) == (4, 8)


def test_the_tap_on_a_dit_needs_comfyui_0_3_60(monkeypatch):
    install_comfy_stubs(monkeypatch)  # this stand-in has no wrap_attn, as ComfyUI before 0.3.60
    patcher = FakeModelPatcher(Flux(WrapAttn()))
    with pytest.raises(RuntimeError, match=r"needs ComfyUI 0\.3\.60 or newer for Flux.*UNet model.*0\.3\.52"):
        taps.install_tap(patcher, taps.TapRecorder(registry=RunRegistry()))
    assert patcher.model_options == {"transformer_options": {}}


def test_an_unknown_model_gets_the_list_of_supported_families(comfy):
    with pytest.raises(ValueError, match="neither UNet cross-attention blocks nor joint-attention blocks.*SD3 / SD3.5, Flux and Chroma"):
        taps.install_tap(FakeModelPatcher(torch.nn.Linear(2, 2)), taps.TapRecorder(registry=RunRegistry()))


# ---------------------------------------------------------------------------- DF-CAM's probes
def test_image_token_probes_show_each_blocks_image_tokens_and_keep_the_output(comfy):
    model = Flux(WrapAttn())
    patcher = FakeModelPatcher(model)
    probed, probes = joint_taps.with_image_token_probes(patcher, (4, 6))
    assert sorted(probes) == ["double_blocks.0.image_tokens", "double_blocks.1.image_tokens", "single_blocks.0.image_tokens"]
    assert "patches_replace" not in patcher.model_options["transformer_options"]
    shown = {}
    for name, module in probes.items():
        module.register_forward_hook(lambda m, i, o, name=name: shown.__setitem__(name, o))
    g = torch.Generator().manual_seed(4)
    img, txt = torch.randn(1, 6, HEADS * D, generator=g), torch.randn(1, 5, HEADS * D, generator=g)
    x = img.clone().requires_grad_(True)
    out = model(x, txt.clone(), probed.model_options["transformer_options"])  # the single block adds in place
    assert torch.equal(out.detach(), model(img.clone(), txt.clone(), {}))
    assert all(t.shape == (1, HEADS * D, 2, 3) for t in shown.values())
    # the single block's map is its image tokens (after the text), row-major on the 2×3 grid
    assert torch.equal(shown["single_blocks.0.image_tokens"].detach().flatten(2).transpose(1, 2), out.detach())
    grads = torch.autograd.grad(out.sum(), list(shown.values()))  # in-place adds stay differentiable
    assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_probes_leave_a_unet_alone():
    patcher = FakeModelPatcher()
    assert joint_taps.with_image_token_probes(patcher, (4, 4)) == (patcher, {})
    assert joint_taps.with_image_token_probes(None, (4, 4)) == (None, {})


# ---------------------------------------------------------------------------- the context's token streams
def _stream(tokens, words):
    return PromptTokens("a red b", list(tokens), [Word(w, list(i)) for w, i in words])


def test_sd3_contexts_are_clip_then_t5_and_words_keep_both_positions():
    clip = _stream(["<s>", "a</w>", "red</w>", "<e>"], [("a", [1]), ("red", [2])])
    t5 = _stream(["▁a", "▁red", "</s>"], [("a", [0]), ("red", [1])])
    streams, lengths = {"l": clip, "g": clip, "t5xxl": t5}, {"l": 77, "g": 77, "t5xxl": 77}
    parts = joint_taps.SD3.context_parts
    tokens, positions, layout = joint_context_tokens(streams, lengths, parts, 154)
    assert positions == [0, 1, 2, 3, 77, 78, 79] and layout == [["l", 4], ["t5xxl", 3]]
    assert tokens.tokens == ["<s>", "a</w>", "red</w>", "<e>", "▁a", "▁red", "</s>"]
    assert [(w.text, w.token_indices) for w in tokens.words] == [("a", [1, 4]), ("red", [2, 5])]
    without_t5 = joint_context_tokens(streams, lengths, parts, 77)  # SD3 loaded without T5
    assert without_t5[1] == [0, 1, 2, 3] and without_t5[2] == [["l", 4]]
    assert joint_context_tokens(streams, lengths, parts, 100) is None


def test_flux_contexts_are_t5_only():
    t5 = _stream(["▁a", "▁red", "</s>"], [("a", [0]), ("red", [1])])
    tokens, positions, layout = joint_context_tokens({"l": t5, "t5xxl": t5}, {"l": 77, "t5xxl": 256}, joint_taps.FLUX.context_parts, 256)
    assert positions == [0, 1, 2] and layout == [["t5xxl", 3]]


def test_sentencepiece_token_lists_split_words_at_their_markers():
    vocab = {1: "</s>", 0: "<pad>", 10: "▁", 11: "a", 12: "▁red", 13: "▁zebra", 14: "fish", 15: ","}
    chunks = [[(10, 1.0, 1), (11, 1.0, 1), (12, 1.0, 1), (13, 1.0, 1), (14, 1.0, 1), (15, 1.0, 1), (1, 1.0, 0), (0, 1.0, 0), (0, 1.0, 0)]]
    pt = comfy_prompt_tokens(chunks, vocab, "a red zebrafish,")
    assert pt.tokens == ["▁", "a", "▁red", "▁zebra", "fish", ",", "</s>"]
    assert [(w.text, w.token_indices) for w in pt.words] == [("a", [1]), ("red", [2]), ("zebrafish", [3, 4]), (",", [5])]


def test_the_recorder_names_a_joint_context_from_the_prompts_streams():
    clip = _stream(["<s>", "a</w>", "<e>"], [("a", [1])])
    t5 = _stream(["▁a", "</s>"], [("a", [0])])
    info = taps.PromptInfo("a", clip, streams={"l": clip, "t5xxl": t5}, stream_lengths={"l": 77, "t5xxl": 77})
    recorder = taps.TapRecorder(positive=info, registry=RunRegistry())
    recorder.family = joint_taps.SD3
    notes: set[str] = set()
    kept, tokens, layout = recorder.context_tokens(info, 154, notes)
    assert kept == [0, 1, 2, 77, 78] and [w.token_indices for w in tokens.words] == [[1, 3]] and not notes
    assert recorder.context_tokens(info, 90, notes)[0] is None and "do not make up the conditioning's 90" in notes.pop()
    recorder.family = None  # a UNet: the CLIP tokens from the start
    assert recorder.context_tokens(info, 77, notes)[:2] == (3, clip)


def test_flow_models_are_recorded_in_the_flow_space():
    class CONST:
        pass

    class ModelSamplingDiscreteFlow(CONST):
        pass

    flow = types.SimpleNamespace(model_sampling=ModelSamplingDiscreteFlow(), model_type=types.SimpleNamespace(name="FLOW"))
    eps = types.SimpleNamespace(model_sampling=object(), model_type=types.SimpleNamespace(name="EPS"))
    assert taps.latent_space_of(flow) == "flow" and taps._prediction_type(flow) == "flow"
    assert taps.latent_space_of(eps) == "sigma" and taps._prediction_type(eps) == "epsilon"
