"""Per-layer maps in the diffusers tap: what is held, where, in which dtype, how much (the
estimate against the bytes really held) and the budget refusal before any step (issue 19)."""

import pytest
import torch

from explain.adapters.diffusers import generate, trace
from explain.adapters.diffusers.tap import DiffusersTap
from explain.attention import COND, UNCOND, layer_grid, to_maps
from explain.memory import MemoryBudgetError, mb
from explain.testing import tiny_flux_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline

torch.set_num_threads(1)

STEPS = 3
PROMPT = "a red circle"
NEGATIVE = "a green square below a blue triangle"  # longer than the prompt: the mean keeps more positions than the prompt's


def _run(pipe, family="unet", steps=STEPS, **kwargs):
    kwargs.setdefault("output_type", "latent")
    if family == "flux":
        kwargs.setdefault("true_cfg_scale", 4.0)
    else:
        kwargs.setdefault("guidance_scale", 5.0)
    if family in ("sd3", "flux"):
        kwargs.setdefault("max_sequence_length", 16)
        kwargs.setdefault("height", 32)
        kwargs.setdefault("width", 32)
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), **kwargs)


PIPELINES = {
    "unet": lambda: tiny_sd_pipeline("dpm++"),
    "sdxl": lambda: tiny_sdxl_pipeline("euler"),
    "sd3": lambda: tiny_sd3_pipeline(),
    "flux": lambda: tiny_flux_pipeline(),
}


@pytest.fixture(scope="module", params=list(PIPELINES))
def case(request):
    return request.param, PIPELINES[request.param]()


def _family(name):
    return "unet" if name in ("unet", "sdxl") else name


class _RawLayers:
    """The probabilities every capture processor reports, per model call (what the old path kept).
    Patched on the class: the capture processors hold the tap's bound method from install on."""

    def __init__(self, monkeypatch):
        self.calls: list[dict] = []
        original = DiffusersTap._record_attention

        def record(tap, name, probs, grid, kind="attention"):
            run = tap._run
            if kind == "attention" and run is not None and run.current is not None:
                if not self.calls or name in self.calls[-1]["maps"]:
                    self.calls.append({"branches": run.current, "maps": {}})
                grid = tuple(grid) if grid is not None else layer_grid(probs.shape[-2], run.latent_size)  # UNets with [B, N, C] inputs
                self.calls[-1]["maps"][name] = (probs.detach().float().clone(), grid)
            return original(tap, name, probs, grid, kind)

        monkeypatch.setattr(DiffusersTap, "_record_attention", record)


def _reference_layers(raw: _RawLayers, positions: list[int]) -> dict[str, torch.Tensor]:
    """Full-precision per-layer maps of the conditional rows, [S, B, T, h, w], from the raw
    probabilities: the head mean of the conditional rows over the trace's positions."""
    per_layer: dict[str, list[torch.Tensor]] = {}
    index = torch.tensor(positions)
    for call in raw.calls:
        branches = call["branches"]
        if COND not in branches:
            continue
        for name, (probs, grid) in call["maps"].items():
            rows = probs.shape[0] // len(branches)
            start = branches.index(COND) * rows
            cond = probs[start : start + rows]
            mean = cond.mean(1) if cond.ndim == 4 else cond  # UNets report heads, joint families head means
            per_layer.setdefault(name, []).append(to_maps(mean.index_select(-1, index), grid))
    return {name: torch.stack(maps) for name, maps in per_layer.items()}


def test_per_layer_maps_equal_the_full_precision_maps_of_the_conditional_rows(case, monkeypatch):
    name, pipe = case
    raw = _RawLayers(monkeypatch)
    with trace(pipe, previews=False, keep_layers=True) as tr:
        _run(pipe, _family(name))
    monkeypatch.undo()
    t = tr.trace
    positions = t.meta.get("text_positions", list(range(t.attention.shape[2])))
    expected = _reference_layers(raw, positions)
    assert set(t.attention_layers) == set(expected) and len(expected) >= 2
    for layer, maps in t.attention_layers.items():
        assert maps.dtype == torch.float16 and maps.device.type == "cpu"
        assert maps.shape == expected[layer].shape and maps.shape[:3] == (STEPS, 1, len(positions))
        assert torch.allclose(maps.float(), expected[layer], atol=1e-3, rtol=1e-3), layer  # float16 rounding
    # the same run in float32 agrees with the reference to float rounding, and the trace saves and loads
    with trace(pipe, previews=False, keep_layers=True, layer_dtype=torch.float32) as full:
        _run(pipe, _family(name))
    for layer, maps in full.trace.attention_layers.items():
        assert maps.dtype == torch.float32 and torch.allclose(maps, expected[layer], atol=1e-5), layer


def test_per_layer_maps_are_on_the_cpu_in_the_chosen_dtype_after_each_step():
    pipe = tiny_sd_pipeline("euler")
    seen = []
    with trace(pipe, previews=False, keep_layers=True, layer_dtype=torch.bfloat16) as tr:
        def check(pipeline, index, timestep, callback_kwargs):
            held = tr.held_layer_maps()
            pending = sum(acc.pending_layer_bytes() for acc in tr._run.accumulators.values())
            seen.append((len(held), {m.device.type for m in held}, {m.dtype for m in held}, {m.shape[0] for m in held}, pending))
            return callback_kwargs

        _run(pipe, callback_on_step_end=check)
    layers = len(tr.trace.attention_layers)
    assert layers == 7  # two down, one mid, four up
    # after step k the tap holds k+1 steps of every layer, on the CPU as bfloat16, one row (the
    # conditional image of the [uncond, cond] batch), and nothing of the step is left pending
    assert seen == [((k + 1) * layers, {"cpu"}, {torch.bfloat16}, {1}, 0) for k in range(STEPS)]
    assert all(m.dtype == torch.bfloat16 for m in tr.trace.attention_layers.values())
    assert not tr.held_layer_maps()  # handed to the trace


@pytest.mark.parametrize("negative", [True, False])
def test_negative_rows_are_kept_only_when_asked(negative):
    pipe = tiny_sd_pipeline("euler")
    kept = []
    with trace(pipe, previews=False, keep_layers="resolution", negative=negative) as tr:
        def check(pipeline, index, timestep, callback_kwargs):
            kept.append({key: acc.step_map(acc.num_steps - 1).shape[0] for key, acc in tr._run.accumulators.items()})
            return callback_kwargs

        _run(pipe, callback_on_step_end=check)
    t = tr.trace
    if negative:
        assert kept == [{("attention", (UNCOND, COND)): 2}] * STEPS
        assert t.attention_negative is not None and t.attention_negative.shape[:2] == (STEPS, 1)
    else:
        assert kept == [{("attention", (COND,)): 1}] * STEPS  # the unconditional rows were never summed
        assert t.attention_negative is None and not t.negative_prompts
    assert {tuple(m.shape[:2]) for m in t.attention_layers.values()} == {(STEPS, 1)}  # layers: conditional rows only
    assert t.meta["guided"]


def test_flux_without_negative_maps_records_nothing_of_the_negative_call():
    pipe = tiny_flux_pipeline()
    with trace(pipe, previews=False, keep_layers=True, negative=False) as tr:
        def check(pipeline, index, timestep, callback_kwargs):
            assert set(tr._run.accumulators) == {("attention", (COND,))}
            return callback_kwargs

        _run(pipe, "flux", callback_on_step_end=check)
    assert tr.trace.attention_negative is None and tr.trace.meta["model_calls"] == 2 * STEPS


@pytest.mark.parametrize("keep_layers", [True, "resolution", False])
def test_the_estimate_equals_the_bytes_the_trace_holds(case, keep_layers):
    name, pipe = case
    kwargs = {"height": 32, "width": 48} if name == "sdxl" else {}  # non-square: grids rounded per side
    pending = []

    def watch(accumulator):  # the bytes of one step's per-layer maps right before the step ends
        end = accumulator.end_step

        def end_step():
            pending.append(accumulator.pending_layer_bytes())
            return end()

        accumulator.end_step = end_step
        return accumulator

    with trace(pipe, previews=False, keep_layers=keep_layers, memory_budget_mb=1000) as tr:
        new_accumulator = tr._new_accumulator
        tr._new_accumulator = lambda *a: watch(new_accumulator(*a))
        _run(pipe, _family(name), **kwargs)
    t, estimate = tr.trace, tr.memory_estimate
    assert estimate is not None and estimate.shapes.steps == STEPS
    layer_bytes = sum(m.nbytes for m in t.attention_layers.values())
    assert estimate.layers == layer_bytes and (layer_bytes > 0) == bool(keep_layers)
    assert estimate.maps == t.attention.nbytes + t.attention_negative.nbytes
    assert estimate.layers_per_step * STEPS == layer_bytes
    if keep_layers is True:
        assert estimate.shapes.kept > estimate.shapes.tokens  # the negative prompt is longer: layers are cut further
        assert max(pending) == estimate.layers_device  # float32 maps of one step, before they move
    else:
        assert max(pending) == 0


def test_the_estimate_is_printed_once_per_run_when_layers_are_kept(capsys):
    pipe = tiny_sd_pipeline("euler")
    with trace(pipe, previews=False, keep_layers=True) as tr:
        _run(pipe)
    err = capsys.readouterr().err
    assert err.count("trace maps: about") == 1 and "per-layer maps: 7 layers × 3 steps" in err
    with trace(pipe, previews=False) as tr:
        _run(pipe)
    assert "trace maps" not in capsys.readouterr().err and tr.memory_estimate is None


@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_a_run_over_the_budget_is_refused_before_any_step(family):
    pipe = tiny_sd_pipeline("euler") if family == "unet" else tiny_sd3_pipeline()
    denoiser = pipe.unet if family == "unet" else pipe.transformer
    processors = {k: type(v) for k, v in denoiser.attn_processors.items()}
    forwards, steps = [], []
    handle = denoiser.register_forward_hook(lambda *a: forwards.append(1))
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda *a, **k: (steps.append(1), step(*a, **k))[1]
    try:
        with pytest.raises(MemoryBudgetError) as error:
            with trace(pipe, previews=False, keep_layers=True, memory_budget_mb=0.001) as tr:
                _run(pipe, family, steps=20)
    finally:
        handle.remove()
        del pipe.scheduler.step
    assert forwards == [] and steps == []  # nothing was denoised
    estimate = tr.memory_estimate
    message = str(error.value)
    assert f"about {mb(estimate.total)} MB" in message and "memory budget of 0.001 MB" in message
    for option in ("fewer steps (not even one fits)", "keep_layers='resolution' (", "keep_layers=False (", "negative=False (",
                   "a shorter context", "a larger memory_budget_mb (at least 1)"):
        assert option in message, option
    assert {k: type(v) for k, v in denoiser.attn_processors.items()} == processors  # the tap left the model as it was
    # the options it names do fit: the per-resolution maps and fewer steps
    budget = estimate_of(pipe, family, keep_layers="resolution", steps=20) / 1e6
    with trace(pipe, previews=False, keep_layers="resolution", memory_budget_mb=budget) as ok:
        _run(pipe, family, steps=20)
    assert ok.trace.num_steps == 20


def estimate_of(pipe, family, **options):
    steps = options.pop("steps")
    with trace(pipe, previews=False, **options) as tr:
        _run(pipe, family, steps=steps)
    return sum(m.nbytes for m in tr.trace.attention_layers.values()) + tr.trace.attention.nbytes + tr.trace.attention_negative.nbytes


def test_generate_takes_the_budget_and_bad_budgets_are_named():
    pipe = tiny_sd_pipeline("euler")
    with pytest.raises(MemoryBudgetError, match="over the memory budget of 0.01 MB"):
        generate(pipe, PROMPT, steps=4, keep_layers=True, memory_budget_mb=0.01, output_type="latent", previews=False)
    result, _ = generate(pipe, PROMPT, steps=2, keep_layers=True, memory_budget_mb=10, output_type="latent", previews=False)
    assert result.num_steps == 2
    for bad in (0, -5, True, "100"):
        with pytest.raises(ValueError, match="memory_budget_mb must be a positive number"):
            with trace(pipe, memory_budget_mb=bad):
                pass
    with pytest.raises(TypeError, match="layer_dtype must be a floating-point"):
        with trace(pipe, layer_dtype=torch.int8):
            pass


def test_layer_grids_of_full_size_models_built_without_weights():
    """The grids the estimate uses for SDXL at 1024² (latent 128²), SD3 and Flux: the families'
    own reading of full-size configs, built on the meta device (no weights, no memory)."""
    from collections import Counter
    from types import SimpleNamespace

    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    from explain.adapters.diffusers.families import flux, sd3, unet

    with torch.device("meta"):
        sdxl = UNet2DConditionModel(
            sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        mmdit = SD3Transformer2DModel(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                      joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                                      in_channels=16, out_channels=16, pos_embed_max_size=192)
        dit = FluxTransformer2DModel(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True)
    cases = [(unet.FAMILY, SimpleNamespace(unet=sdxl), {(64, 64): 10, (32, 32): 60}),
             (sd3.FAMILY, SimpleNamespace(transformer=mmdit), {(64, 64): 24}),
             (flux.FAMILY, SimpleNamespace(transformer=dit), {(64, 64): 57})]
    for family, pipe, expected in cases:
        assert family.layer_grids(pipe, (128, 128)) == {}  # nothing captured yet
        undo = family.install_capture(pipe, lambda *a: None)
        try:
            assert Counter(family.layer_grids(pipe, (128, 128)).values()) == expected, family.name
        finally:
            for u in reversed(undo):
                u()
    # an odd latent side rounds up at each down-sampling, as the convolutions do
    undo = unet.FAMILY.install_capture(SimpleNamespace(unet=sdxl), lambda *a: None)
    assert set(unet.FAMILY.layer_grids(SimpleNamespace(unet=sdxl), (127, 90)).values()) == {(64, 45), (32, 23)}
    for u in reversed(undo):
        u()


def test_float16_layer_maps_save_validate_and_load(tmp_path):
    from explain.trace import Trace

    pipe = tiny_sd_pipeline("euler")
    with trace(pipe, previews=False, keep_layers=True) as tr:
        _run(pipe)
    t = tr.trace.validate()
    loaded = Trace.load(t.save(tmp_path / "layers.safetensors"))
    assert set(loaded.attention_layers) == set(t.attention_layers)
    for name, maps in t.attention_layers.items():
        assert torch.equal(loaded.attention_layers[name].float(), maps.float())  # float16 in, float16 in the file
