"""The ComfyUI tap without ComfyUI: attention patch numerics and row slicing, one record per
step, context folding, installation on a clone, and a whole simulated sampling run."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from explain.attention import COND, UNCOND, attention_probs, merge_heads, split_heads
from explain.tokens import PromptTokens
from explain.trace import Word
from nodes import taps
from nodes.runs import RunRegistry, TraceHandle
from tests.nodes.stubs import FakeModelPatcher, fake_unet, install_comfy_stubs

B, HEADS, DIM, T = 2, 2, 4, 5
H = W = 4


def recorder_with_run(batch=B, size=(H, W), contexts=None, tokens=None, negative=True):
    info = None
    if tokens is not None:
        info = taps.PromptInfo("p", PromptTokens("p", [f"t{i}" for i in range(tokens)], [Word("x", [1])]))
    rec = taps.TapRecorder(positive=info, record_negative=negative, registry=RunRegistry())
    run = taps._RunState(rec, (batch, 4, *size), torch.tensor([3.0, 2.0, 1.0, 0.0]), contexts or {COND: T, UNCOND: T})
    rec.active = run
    return rec, run


def options(cond_or_uncond, size=(H, W), batch=B):
    return {
        "n_heads": HEADS,
        "cond_or_uncond": cond_or_uncond,
        "original_shape": [batch * len(cond_or_uncond), 4, *size],
        "activations_shape": [batch * len(cond_or_uncond), 8, *size],
    }


def qkv(rows, n=H * W, t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, n, HEADS * DIM, generator=g), torch.randn(rows, t, HEADS * DIM, generator=g), torch.randn(rows, t, HEADS * DIM, generator=g))


# ---------------------------------------------------------------------------- the attention patch
def test_patch_output_equals_scaled_dot_product_attention():
    rec, run = recorder_with_run()
    q, k, v = qkv(2 * B)
    out = taps.AttentionTap(rec, "input.1.0")(q, k, v, options([1, 0]))
    expected = merge_heads(F.scaled_dot_product_attention(split_heads(q, HEADS), split_heads(k, HEADS), split_heads(v, HEADS)))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert run.acc[COND].pending == 1 and run.acc[UNCOND].pending == 1


def test_rows_are_split_by_cond_or_uncond_not_by_position():
    """The same cond rows give the same map whether ComfyUI batched them first or second."""
    q, k, v = qkv(B, seed=1)  # cond rows
    qu, ku, vu = qkv(B, seed=2)  # uncond rows
    maps = []
    for order in ([0, 1], [1, 0]):
        rec, run = recorder_with_run()
        parts = [(q, k, v), (qu, ku, vu)] if order == [0, 1] else [(qu, ku, vu), (q, k, v)]
        batch = [torch.cat([p[i] for p in parts]) for i in range(3)]
        taps.AttentionTap(rec, "l")(*batch, options(order))
        run.on_step(0, torch.zeros(B, 4, H, W), torch.zeros(B, 4, H, W))
        maps.append((run.attention(COND)[0], run.attention(UNCOND)[0]))
    torch.testing.assert_close(maps[0][0], maps[1][0])
    torch.testing.assert_close(maps[0][1], maps[1][1])
    expected = attention_probs(split_heads(q, HEADS), split_heads(k, HEADS)).mean(1).transpose(1, 2).reshape(B, T, H, W)
    torch.testing.assert_close(maps[0][0][0], expected)
    assert not torch.allclose(maps[0][0], maps[0][1])


def test_cond_only_batch_records_no_negative_branch():
    rec, run = recorder_with_run()
    taps.AttentionTap(rec, "l")(*qkv(B), options([0]))
    run.on_step(0, torch.zeros(B, 4, H, W), torch.zeros(B, 4, H, W))
    assert run.attention(COND)[0].shape == (1, B, T, H, W)
    assert run.attention(UNCOND)[0] is None


def test_separate_cond_and_uncond_calls_make_one_record():
    rec, run = recorder_with_run()
    run.begin_evaluation()
    taps.AttentionTap(rec, "l")(*qkv(B, seed=3), options([0]))
    taps.AttentionTap(rec, "l")(*qkv(B, seed=4), options([1]))
    run.on_step(0, torch.zeros(B, 4, H, W), torch.zeros(B, 4, H, W))
    assert run.attention(COND)[0].shape[0] == 1 and run.attention(UNCOND)[0].shape[0] == 1


def test_without_an_active_run_nothing_is_recorded_and_the_previous_patch_answers():
    rec = taps.TapRecorder(registry=RunRegistry())
    seen = []

    def previous(q, k, v, extra):
        seen.append(q.shape)
        return torch.full_like(q, 7.0)

    out = taps.AttentionTap(rec, "l", previous)(*qkv(B), options([0]))
    assert seen and torch.all(out == 7.0)


def test_chained_patch_makes_the_output_while_probabilities_are_recorded():
    rec, run = recorder_with_run()
    out = taps.AttentionTap(rec, "l", lambda q, k, v, extra: torch.zeros_like(q))(*qkv(2 * B), options([0, 1]))
    assert torch.all(out == 0)
    assert run.acc[COND].pending == 1


def test_probing_records_nothing():
    rec, run = recorder_with_run()
    with taps.probing():
        rec_out = taps.AttentionTap(rec, "l", lambda q, k, v, e: q)(*qkv(B), options([0]))
    assert run.acc[COND].pending == 0 and rec_out is not None


# ---------------------------------------------------------------------------- one record per step
def _probs(token: int, rows=B, n=H * W, t=T) -> torch.Tensor:
    """Probabilities [rows, heads, n, t] that put all mass on ``token``."""
    p = torch.zeros(rows, HEADS, n, t)
    p[..., token] = 1.0
    return p


def test_a_steps_attention_is_its_last_evaluation_before_the_callback():
    """Heun: eval(step 0), callback 0, correction eval, eval(step 1), callback 1."""
    rec, run = recorder_with_run(negative=False)
    x = torch.zeros(B, 4, H, W)
    run.begin_evaluation()
    run.add_attention("l", _probs(1), options([0]))
    run.on_step(0, x, x)
    run.begin_evaluation()
    run.add_attention("l", _probs(2), options([0]))  # the correction: discarded
    run.begin_evaluation()
    run.add_attention("l", _probs(3), options([0]))
    run.on_step(1, x, x)
    att, borrowed = run.attention(COND)
    assert att.shape[0] == 2 and borrowed == []
    assert torch.all(att[0, :, 1] == 1) and torch.all(att[1, :, 3] == 1)
    assert run.evaluations == 3


def test_a_step_without_its_own_evaluation_borrows_the_previous_and_says_so():
    rec, run = recorder_with_run(negative=False)
    x = torch.zeros(B, 4, H, W)
    run.begin_evaluation()
    run.add_attention("l", _probs(1), options([0]))
    run.on_step(0, x, x)
    run.on_step(1, x, x)
    att, borrowed = run.attention(COND)
    assert borrowed == [1] and torch.equal(att[0], att[1])


def test_layers_of_other_sizes_and_cropped_calls():
    rec, run = recorder_with_run(negative=False)
    run.begin_evaluation()
    run.add_attention("a", _probs(1), options([0]))
    run.add_attention("b", _probs(2, n=4), options([0], size=(2, 2)) | {"original_shape": [B, 4, H, W]})
    run.add_attention("area", _probs(3, n=4), options([0], size=(2, 2)))  # an area-cropped call
    run.on_step(0, torch.zeros(B, 4, H, W), torch.zeros(B, 4, H, W))
    att = run.attention(COND)[0][0]
    torch.testing.assert_close(att[:, 1], torch.full((B, H, W), 0.5))
    torch.testing.assert_close(att[:, 2], torch.full((B, H, W), 0.5))
    assert att[:, 3].abs().max() == 0
    assert any("area" in n for n in run.notes)


def test_token_limit_cuts_the_context_after_the_prompt():
    rec, run = recorder_with_run(tokens=3, negative=False)
    run.begin_evaluation()
    run.add_attention("l", _probs(1), options([0]))
    run.on_step(0, torch.zeros(B, 4, H, W), torch.zeros(B, 4, H, W))
    assert run.attention(COND)[0].shape[2] == 3


def test_fold_repeated_context_recovers_the_unpadded_probabilities():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 6, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    plain = attention_probs(q, k)
    padded = attention_probs(q, torch.cat([k, k], dim=1))  # ComfyUI's repeat padding
    torch.testing.assert_close(taps.fold_repeated_context(padded, 3), plain)
    assert taps.fold_repeated_context(plain, 3) is plain
    assert taps.fold_repeated_context(plain, None) is plain


def test_context_lengths_and_token_lists():
    conds = {"positive": [{"cross_attn": torch.zeros(1, 154, 8)}], "negative": [{"cross_attn": torch.zeros(1, 77, 8)}]}
    assert taps.context_lengths(conds) == {COND: 154, UNCOND: 77}
    assert taps.context_lengths({}) == {COND: None, UNCOND: None}
    tokens, words, prompts = taps.token_lists(None, None, 2, 4)
    assert tokens[1] == ["<position 0>", "<position 1>", "<position 2>", "<position 3>"] and words == [[], []] and prompts == ["", ""]
    info = taps.PromptInfo("a b", PromptTokens("a b", ["s", "a</w>", "b</w>", "e"], [Word("a", [1]), Word("b", [2])]))
    tokens, words, prompts = taps.token_lists(info.tokens, info, 1, 3)
    assert tokens == [["s", "a</w>", "b</w>"]] and [w.text for w in words[0]] == ["a", "b"] and prompts == ["a b"]


def test_prompt_check_compares_the_encoded_prompt_with_the_samplers_conditioning():
    cond = torch.randn(1, 77, 8)
    info = taps.PromptInfo("p", conditioning=cond)
    same = types.SimpleNamespace(original_conds={"positive": [{"cross_attn": cond.clone()}]})
    other = types.SimpleNamespace(original_conds={"positive": [{"cross_attn": cond + 1}]})
    assert taps.prompt_check(info, same) is True
    assert taps.prompt_check(info, other) is False
    assert taps.prompt_check(taps.PromptInfo("p"), same) is None


# ---------------------------------------------------------------------------- installing
def test_cross_attention_blocks_walks_the_unet():
    blocks = taps.cross_attention_blocks(fake_unet(((1, 1), (2,), (1, 1, 1))))
    assert blocks == [
        ("input", 1, 0), ("input", 2, 0), ("middle", 0, 0), ("middle", 0, 1),
        ("output", 0, 0), ("output", 1, 0), ("output", 2, 0),
    ]  # fmt: skip


def test_install_patches_a_clone_and_leaves_the_model_alone(monkeypatch):
    install_comfy_stubs(monkeypatch)
    model = FakeModelPatcher()
    rec = taps.TapRecorder(registry=RunRegistry())
    tapped = taps.install_tap(model, rec)
    assert model.attn2_patches() == {} and model.wrappers == {}
    patches = tapped.attn2_patches()
    assert len(patches) == 4 and all(isinstance(p, taps.AttentionTap) and p.recorder is rec for p in patches.values())
    assert list(tapped.wrappers["outer_sample"]) == [taps.PATCH_KEY]
    # ComfyUI deep-copies model_options on every clone: the recorder must stay shared
    again = tapped.clone()
    assert all(p.recorder is rec for p in again.attn2_patches().values())


def test_install_chains_to_another_packs_patch_and_retapping_replaces_only_ours(monkeypatch):
    install_comfy_stubs(monkeypatch)
    model = FakeModelPatcher()

    def theirs(q, k, v, extra):
        return q

    model.set_model_attn2_replace(theirs, "input", 1)  # keyed by block, as some packs do
    first = taps.install_tap(model, taps.TapRecorder(registry=RunRegistry()))
    assert first.attn2_patches()[("input", 1, 0)].previous is theirs
    rec2 = taps.TapRecorder(registry=RunRegistry())
    second = taps.install_tap(first, rec2)
    patch = second.attn2_patches()[("input", 1, 0)]
    assert patch.recorder is rec2 and patch.previous is theirs
    assert rec2.chained == ["input.1.0"]
    assert len(second.wrappers["outer_sample"][taps.PATCH_KEY]) == 1


def test_install_refuses_models_without_cross_attention(monkeypatch):
    install_comfy_stubs(monkeypatch)
    empty = torch.nn.Module()
    empty.input_blocks, empty.output_blocks = torch.nn.ModuleList(), torch.nn.ModuleList()
    with pytest.raises(ValueError, match="UNet"):
        taps.install_tap(FakeModelPatcher(empty), taps.TapRecorder(registry=RunRegistry()))
    with pytest.raises(ValueError, match="diffusion model"):
        taps.install_tap(types.SimpleNamespace(model=None), taps.TapRecorder(registry=RunRegistry()))


# ---------------------------------------------------------------------------- a simulated run
class _Model:
    latent_format = types.SimpleNamespace(scale_factor=0.5, shift_factor=None)
    model_type = types.SimpleNamespace(name="EPS")
    model_sampling = types.SimpleNamespace(timestep=lambda s: s * 100)

    def process_latent_in(self, x):
        return x * 0.5

    def process_latent_out(self, x):
        return x / 0.5


class _Executor:
    """What ComfyUI's OUTER_SAMPLE executor does for a Heun-like sampler: two evaluations a
    step (the second after the callback), cond and uncond batched [uncond, cond]."""

    def __init__(self, recorder, guider, fail_at=None):
        self.class_obj = guider
        self.recorder = recorder
        self.fail_at = fail_at
        self.patch = taps.AttentionTap(recorder, "input.1.0")

    def _evaluate(self, x, sigma):
        def predict(x, timestep, model_options, seed):
            self.patch(*qkv(2 * x.shape[0], seed=int(sigma * 10)), options([1, 0], batch=x.shape[0]))
            return x / (1 + sigma)

        return self.recorder.predict_noise(predict, x, sigma, {}, 0)

    def __call__(self, noise, latent_image, sampler, sigmas, denoise_mask, callback, disable_pbar, seed):
        x = noise * sigmas[0]
        for i in range(len(sigmas) - 1):
            if self.fail_at == i:
                raise RuntimeError("interrupted")
            denoised = self._evaluate(x, float(sigmas[i]))
            callback(i, denoised, x, len(sigmas) - 1)
            self._evaluate(x, float(sigmas[i + 1]))  # Heun's correction
            x = denoised + (x - denoised) * float(sigmas[i + 1] / sigmas[i])
        return self.class_obj.model_patcher.model.process_latent_out(x)


def _guider():
    cond = {"cross_attn": torch.zeros(1, T, 8)}
    return types.SimpleNamespace(
        model_patcher=types.SimpleNamespace(model=_Model()),
        conds={"positive": [cond], "negative": [cond]},
        original_conds={"positive": [cond], "negative": [cond]},
        cfg=4.0,
    )


def _sample(recorder, seed=0, fail_at=None):
    noise = torch.randn(B, 4, H, W, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.0])
    executor = _Executor(recorder, _guider(), fail_at)
    return recorder.outer_sample(executor, noise, torch.zeros_like(noise), object(), sigmas, None, None, True, seed)


def test_a_simulated_heun_run_is_filed_and_found_by_its_latent():
    registry = RunRegistry()
    rec = taps.TapRecorder(tap_key="k", registry=registry)
    out = _sample(rec, seed=1)
    handle = TraceHandle(tap_key="k", registry=registry)
    trace = handle.resolve({"samples": out})
    assert trace.num_steps == 3 and trace.batch_size == B and trace.latent_size == (H, W)
    assert trace.attention.shape == (3, B, T, H, W) and trace.attention_negative.shape == (3, B, T, H, W)
    assert trace.meta["model_calls"] == 6 and trace.meta["latent_space"] == "sigma"
    assert trace.sigmas.tolist() == [4.0, 2.0, 1.0] and trace.timesteps.tolist() == [400.0, 200.0, 100.0]
    torch.testing.assert_close(trace.final_latent, out * 0.5)
    assert rec.active is None


def test_runs_never_leak_into_each_other_and_a_failed_run_is_not_filed():
    registry = RunRegistry()
    rec = taps.TapRecorder(tap_key="k", registry=registry)
    first = _sample(rec, seed=1)
    with pytest.raises(RuntimeError, match="interrupted"):
        _sample(rec, seed=2, fail_at=1)
    assert rec.active is None and len(registry) == 1
    second = _sample(rec, seed=3)
    handle = TraceHandle(tap_key="k", registry=registry)
    a, b = handle.resolve({"samples": first}), handle.resolve({"samples": second})
    assert a is not b and not torch.equal(a.x_t[0], b.x_t[0])
    torch.testing.assert_close(b.final_latent, second * 0.5)


def test_deepcopy_keeps_patches_and_recorders_shared():
    rec = taps.TapRecorder(registry=RunRegistry())
    options_ = {"patch": taps.AttentionTap(rec, "l"), "wrapper": rec.outer_sample}
    copied = copy.deepcopy(options_)
    assert copied["patch"] is options_["patch"] and copied["wrapper"].__self__ is rec


# ---------------------------------------------------------------------------- newer calling conventions
class _NewerExecutor(_Executor):
    """The simulated run as a newer ComfyUI calls it: arguments by keyword, ``latent_shapes``
    and a keyword this code has never heard of, and a callback with an extra argument."""

    def __init__(self, recorder, guider, denoised_as=None):
        super().__init__(recorder, guider)
        self.received = None
        self.denoised_as = denoised_as

    def __call__(self, *args, **kwargs):
        self.received = (args, kwargs)
        callback = kwargs["callback"]
        x = kwargs["noise"] * kwargs["sigmas"][0]
        sigmas = kwargs["sigmas"]
        for i in range(len(sigmas) - 1):
            denoised = self._evaluate(x, float(sigmas[i]))
            shown = self.denoised_as(denoised) if self.denoised_as else denoised
            callback(i, shown, x, len(sigmas) - 1, "future positional", future="keyword")
            x = denoised + (x - denoised) * float(sigmas[i + 1] / sigmas[i])
        return x


def test_outer_sample_passes_on_arguments_it_does_not_know():
    registry = RunRegistry()
    rec = taps.TapRecorder(tap_key="k", registry=registry)
    executor = _NewerExecutor(rec, _guider())
    seen = []
    noise = torch.randn(B, 4, H, W, generator=torch.Generator().manual_seed(0))
    call = dict(
        noise=noise, latent_image=torch.zeros_like(noise), sampler=object(), sigmas=torch.tensor([4.0, 2.0, 0.0]),
        denoise_mask=None, callback=lambda *a, **k: seen.append((a[0], a[4:], k)), disable_pbar=True, seed=3,
        latent_shapes=[noise.shape], added_in_2030=object(),
    )  # fmt: skip
    out = rec.outer_sample(executor, **call)
    args, kwargs = executor.received
    assert args == () and set(kwargs) == set(call)
    assert all(kwargs[k] is call[k] for k in call if k != "callback") and kwargs["callback"] is not call["callback"]
    assert seen == [(0, ("future positional",), {"future": "keyword"}), (1, ("future positional",), {"future": "keyword"})]
    trace = TraceHandle(tap_key="k", registry=registry).resolve({"samples": out})
    assert trace.num_steps == 2 and trace.meta["seed"] == 3


def test_outer_sample_swaps_a_positional_callback_in_place():
    rec = taps.TapRecorder(tap_key="k", registry=RunRegistry())
    executor = _NewerExecutor(rec, _guider())
    received = {}

    def executor_call(*args, **kwargs):
        received["args"], received["kwargs"] = args, kwargs
        return executor(**dict(zip(taps.OUTER_SAMPLE_ARGUMENTS, args)), **kwargs)

    executor_call.class_obj = executor.class_obj
    noise = torch.randn(B, 4, H, W)
    args = (noise, torch.zeros_like(noise), object(), torch.tensor([4.0, 2.0, 0.0]), None, None, True, 5)
    rec.outer_sample(executor_call, *args, latent_shapes=[noise.shape])
    assert len(received["args"]) == 8 and received["kwargs"] == {"latent_shapes": [noise.shape]}
    assert received["args"][5] is not None and all(a is b for i, (a, b) in enumerate(zip(received["args"], args)) if i != 5)


def test_predict_noise_and_the_attention_patch_pass_on_what_they_do_not_know():
    rec, run = recorder_with_run()
    got = {}

    def executor(*args, **kwargs):
        got["predict"] = (args, kwargs)
        return "out"

    assert rec.predict_noise(executor, "x", "t", {}, 1, "extra", newer=True) == "out"
    assert got["predict"] == (("x", "t", {}, 1, "extra"), {"newer": True}) and run.evaluations == 1

    def previous(q, k, v, extra, *args, **kwargs):
        got["patch"] = (args, kwargs)
        return torch.zeros_like(q)

    taps.AttentionTap(rec, "l", previous)(*qkv(2 * B), options([0, 1]), "extra", newer=True)
    assert got["patch"] == (("extra",), {"newer": True}) and run.acc[COND].pending == 1


def test_a_recording_that_fails_stops_recording_but_never_the_sampling(caplog, monkeypatch):
    """Newer ComfyUI hands callbacks NestedTensors for multi-latent models: the tap cannot record
    them, so it stops, says why, files nothing, and the sampler's result is unchanged."""
    install_comfy_stubs(monkeypatch)

    class Nested:  # not a tensor: has no .detach()
        def __init__(self, t):
            self.t = t

    registry = RunRegistry()
    rec = taps.TapRecorder(tap_key="k", registry=registry)
    plain = taps.TapRecorder(tap_key="p", registry=RunRegistry())
    noise = torch.randn(B, 4, H, W, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([4.0, 2.0, 0.0])

    def run(recorder, denoised_as):
        executor = _NewerExecutor(recorder, _guider(), denoised_as=denoised_as)
        return recorder.outer_sample(executor, noise=noise, latent_image=noise, sampler=None, sigmas=sigmas, callback=None, seed=0)

    with caplog.at_level("WARNING", logger="diffusion-explain"):
        out = run(rec, Nested)
    torch.testing.assert_close(out, run(plain, None))
    assert len(registry) == 0 and "step 0 could not be recorded" in rec.last_error
    assert sum("recording stopped, sampling goes on" in r.message for r in caplog.records) == 1
