"""How much slower is generation under `explain.adapters.diffusers.trace` than without it?

Runs plain and traced generations interleaved (plain/traced, then traced/plain, ...), takes the
median of each and prints their ratio, all measured in this one run, plus the trace's size.

    python benchmarks/bench_tap_overhead.py                   # CPU, embedded shapes model (< 1 min idle)
    python benchmarks/bench_tap_overhead.py --device cuda     # random-weight SD1.5 UNet, 512², 50 steps, fp16
    python benchmarks/bench_tap_overhead.py --model embedded-dit   # CPU: the shipped shapes MMDiT (64 px, no T5)
    python benchmarks/bench_tap_overhead.py --model sd3       # CPU: small random MMDiT (4 blocks, 4×64), 256 px
    python benchmarks/bench_tap_overhead.py --model flux      # CPU: small random Flux (2 + 4 blocks, 4×64), 256 px
    python benchmarks/bench_tap_overhead.py --model sd3 --device cuda    # SD3-medium-shaped MMDiT, 1024², 28 steps, bf16
    python benchmarks/bench_tap_overhead.py --model flux --device cuda   # FLUX.1-dev-shaped (19 + 38 blocks), 1024², 28 steps, bf16

SD3 and Flux: the transformers are random-weight, in their published shapes on CUDA (SD3-medium:
24 blocks of 24 × 64; FLUX.1-dev: 19 double + 38 single blocks of 24 × 128, guidance-distilled) and
small on the CPU (as wide as the embedded DiT, at 256 px so that text tokens are about a tenth of
the image tokens, as at 1024² with T5); the text encoders are one-layer random ones of the right widths, T5 at
``--t5-length`` tokens. On the CPU the ratio is of process CPU time (wall time on a shared machine
is noise); on CUDA of wall time after synchronising.

The CUDA model is Stable Diffusion 1.5's UNet (config written out below, random init, fp16)
with a tiny random VAE and a one-layer text encoder: only the UNet loop matters here, and the
pipelines are called with ``output_type="latent"`` so the VAE is not timed. The traced time
includes building the trace at the end of the ``with`` block (moving it to the CPU); previews
(optional, one VAE decode per step) are timed separately. Target: ≤ 3 % overhead.

Self-contained: needs torch, transformers and diffusers (e.g. from carried wheels:
``pip install --no-deps .whl/*.whl``) and this repository's ``explain`` package.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PROMPT = "a red circle above a blue square"

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)


def sd15_pipeline(device: str, dtype: torch.dtype, width_div: int = 1):
    """SD1.5's UNet (random weights) in a StableDiffusionPipeline with tiny VAE and text encoder."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from explain.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    config = dict(SD15_UNET)
    if width_div > 1:  # a narrower UNet with the same structure, for a quick CPU check of this script
        config["block_out_channels"] = tuple(c // width_div for c in config["block_out_channels"])
        config["norm_num_groups"] = max(1, 32 // width_div)
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer), hidden_size=768, intermediate_size=768, num_hidden_layers=1,
                num_attention_heads=12, max_position_embeddings=77,
                bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
            )
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
        )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        steps_offset=1, algorithm_type="dpmsolver++", solver_order=2,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.unet.eval()
    return pipe, "random-weight SD1.5 UNet" + (f" (channels / {width_div})" if width_div > 1 else "")


# ---------------------------------------------------------------------------- SD3 / Flux shapes
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, num_attention_heads=24,
                  attention_head_dim=64, caption_projection_dim=1536, joint_attention_dim=4096, pooled_projection_dim=2048,
                  pos_embed_max_size=192)
SD3_SMALL = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, num_attention_heads=4,
                 attention_head_dim=64, caption_projection_dim=256, joint_attention_dim=256, pooled_projection_dim=256,
                 pos_embed_max_size=32)
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# the small CPU models are as wide as the embedded DiT (4 heads × 64)
FLUX_SMALL = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=64, num_attention_heads=4,
                  joint_attention_dim=256, pooled_projection_dim=256, guidance_embeds=False, axes_dims_rope=(16, 24, 24))


def _clip(tokenizer, hidden: int, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden, num_hidden_layers=2,
                            num_attention_heads=max(1, hidden // 64), max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=len(tokenizer) - 2, eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=64, d_ff=width, num_layers=1,
                                   num_heads=max(1, width // 64), pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(channels: int, levels: int):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(8,) * levels, down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, layers_per_block=1, latent_channels=channels, norm_num_groups=4)
    vae.register_to_config(shift_factor=0.0)
    return vae


def dit_pipeline(kind: str, device: str, dtype: torch.dtype, full: bool):
    """A random-weight SD3 or Flux pipeline: published transformer shapes (``full``) or small ones."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    from explain.testing import tiny_t5_tokenizer, tiny_tokenizer

    torch.manual_seed(0)
    tok, t5tok = tiny_tokenizer(), tiny_t5_tokenizer()
    with torch.device(device):
        if kind == "sd3":
            config = SD3_MEDIUM if full else SD3_SMALL
            half = config["joint_attention_dim"] // 2 if not full else None
            widths = (768, 1280) if full else (half, half)
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**config),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=_vae(config["in_channels"], 4 if full else 3),
                text_encoder=_clip(tok, widths[0], True), tokenizer=tok,
                text_encoder_2=_clip(tok, widths[1], True), tokenizer_2=tiny_tokenizer(),
                text_encoder_3=_t5(t5tok, config["joint_attention_dim"]), tokenizer_3=t5tok,
            )
            name = "SD3-medium-shaped MMDiT (24 blocks, 24×64)" if full else "small MMDiT (4 blocks, 4×64)"
        else:
            config = FLUX_DEV if full else FLUX_SMALL
            pipe = FluxPipeline(
                transformer=FluxTransformer2DModel(**config),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                          max_image_seq_len=4096, base_shift=0.5, max_shift=1.15),
                vae=_vae(config["in_channels"] // 4, 4 if full else 3),
                text_encoder=_clip(tok, config["pooled_projection_dim"], False), tokenizer=tok,
                text_encoder_2=_t5(t5tok, config["joint_attention_dim"]), tokenizer_2=t5tok,
            )
            name = "FLUX.1-dev-shaped (19 + 38 blocks, 24×128)" if full else "small Flux (2 + 4 blocks, 4×64)"
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()  # freshly built transformers models train, and T5's dropout would make every run differ
    return pipe.to(device=device, dtype=dtype), "random-weight " + name


def cpu_pipeline():
    try:
        from explain import embedded

        return embedded.load_pipeline(), "embedded shapes-64 model"
    except Exception as exc:  # noqa: BLE001 - any failure to load means: use the tiny model
        print(f"note: the embedded model could not be loaded ({exc}); timing the tiny random pipeline instead")
        from explain.testing import tiny_sd_pipeline

        return tiny_sd_pipeline("dpm++"), "tiny random SD pipeline"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu (embedded model) or cuda (SD1.5-shaped UNet)")
    ap.add_argument("--model", choices=("auto", "embedded", "embedded-dit", "tiny", "sd15", "sd3", "flux"), default="auto")
    ap.add_argument("--steps", type=int, default=None, help="default 20 on CPU, 50 on CUDA (28 for sd3/flux)")
    ap.add_argument("--size", type=int, default=None, help="image side; default 512 for sd15, 1024 for sd3/flux on CUDA (256 on CPU)")
    ap.add_argument("--full", action="store_true", help="sd3/flux: the published transformer shapes on the CPU too")
    ap.add_argument("--t5-length", type=int, default=None, help="sd3/flux: T5 max_sequence_length (default 512 on CUDA, 32 on CPU)")
    ap.add_argument("--maps", default="attention", choices=("attention", "output"), help="sd3/flux/embedded-dit: what the tap records")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (after one warm-up each)")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--width-div", type=int, default=1, help="divide the SD1.5 UNet's channels (quick CPU check)")
    ap.add_argument("--keep-layers", action="store_true", help="also keep per-layer maps")
    ap.add_argument("--method", default="auto", choices=("auto", "explicit", "sdpa"), help="how the tap computes probabilities")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("CUDA is not available here; run with --device cpu")
        return 2
    model = args.model if args.model != "auto" else ("sd15" if device.startswith("cuda") else "embedded")
    cuda = device.startswith("cuda")
    steps = args.steps or (28 if model in ("sd3", "flux") and cuda else 50 if cuda else 20)
    call_extra: dict = {}
    t = time.perf_counter()
    if model in ("sd3", "flux"):
        full = args.full or cuda
        dtype = torch.bfloat16 if cuda else torch.float32
        pipe, name = dit_pipeline(model, device, dtype, full)
        size = args.size or (1024 if cuda else 256)
        call_extra["max_sequence_length"] = args.t5_length or (512 if cuda else 32)
        if model == "flux" and full:
            call_extra["guidance_scale"] = 3.5  # embedded guidance: FLUX.1-dev has no CFG branch
    elif model == "sd15":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe, name = sd15_pipeline(device, dtype, args.width_div)
        size = args.size or 512
    elif model == "embedded-dit":
        from explain import embedded

        pipe, name = embedded.load_pipeline("dit", device=device), "embedded shapes-dit-64 MMDiT"
        size = args.size
        call_extra["max_sequence_length"] = 0  # no T5: only the CLIP tokens take part (embedded.call_kwargs)
    elif model == "embedded":
        pipe, name = cpu_pipeline()
        pipe = pipe.to(device)
        size = args.size
    else:
        from explain.testing import tiny_sd_pipeline

        pipe, name = tiny_sd_pipeline("dpm++").to(device), "tiny random SD pipeline"
        size = args.size
    pipe.set_progress_bar_config(disable=True)
    load_s = time.perf_counter() - t

    from explain.adapters.diffusers import trace

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def call():
        kwargs = {"guidance_scale": args.guidance, **call_extra}
        if model == "flux" and not pipe.transformer.config.guidance_embeds:
            kwargs.update(true_cfg_scale=args.guidance, negative_prompt="")  # true CFG, two calls per step
        return pipe(
            PROMPT, num_inference_steps=steps, height=size, width=size,
            generator=torch.Generator("cpu").manual_seed(0), output_type="latent", **kwargs,
        ).images

    latents = {}

    clock = time.perf_counter if cuda else time.process_time  # CPU: process time, immune to the machine's other load
    joint = model in ("sd3", "flux", "embedded-dit")
    tap_kwargs = {"maps": args.maps} if joint else {"method": args.method}

    def plain():
        sync()
        t0 = clock()
        latents["plain"] = call()
        sync()
        return clock() - t0, None

    def traced(previews=False):
        sync()
        t0 = clock()
        with trace(pipe, keep_layers=args.keep_layers, previews=previews, **tap_kwargs) as tr:
            call()
        sync()
        return clock() - t0, tr.trace

    plain()  # warm-up (kernels, allocator, caches)
    traced()
    plain_times, traced_times, last = [], [], None
    for r in range(args.repeats):
        order = (plain, traced) if r % 2 == 0 else (traced, plain)
        for fn in order:
            seconds, result = fn()
            (plain_times if fn is plain else traced_times).append(seconds)
            last = result if result is not None else last
    preview_s, with_previews = traced(previews=True)

    p, q = statistics.median(plain_times), statistics.median(traced_times)
    with tempfile.TemporaryDirectory() as tmp:
        path = with_previews.save(Path(tmp) / "trace.safetensors")
        file_mb = os.path.getsize(path) / 2**20
    att = last.attention
    reference = torch.as_tensor(latents["plain"]).float().cpu()
    if reference.ndim == 3:  # Flux returns packed latents: compare in the trace's unpacked layout
        from explain.adapters.diffusers.families.flux import unpack_latents

        reference = unpack_latents(reference, (last.latent_size[0] // 2, last.latent_size[1] // 2))
    diff = (last.final_latent - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)
    print(f"model: {name}; device: {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}"
          f" ({torch.get_num_threads()} CPU threads); torch {torch.__version__}; load {load_s:.1f} s")
    print(f"run: {steps} steps, {last.meta['height']}x{last.meta['width']} px, latent {tuple(last.x_t.shape[-2:])}, "
          f"guidance {args.guidance}, {last.meta['scheduler']}, keep_layers={args.keep_layers}, method={args.method}")
    what = "wall" if cuda else "process CPU"
    target = 5 if joint else 3
    print(f"plain  : median {p:.3f} s {what} time  ({', '.join(f'{x:.3f}' for x in plain_times)})")
    print(f"traced : median {q:.3f} s {what} time  ({', '.join(f'{x:.3f}' for x in traced_times)})")
    print(f"overhead: ratio {q / p:.3f} ({(q / p - 1) * 100:+.1f} %), target <= +{target} %; "
          f"ratio of the fastest runs {min(traced_times) / min(plain_times):.3f} (other load only ever adds time)")
    print(f"traced with previews: {preview_s:.3f} s ({preview_s - q:+.3f} s for {steps} x0 + {steps} x_t decodes)")
    kind = "stock kernel kept: expect 0" if joint else "explicit softmax vs SDPA"
    print(f"traced vs plain final latent: max abs difference {diff:.2e} of the latent's range ({kind})")
    print(f"trace: attention {tuple(att.shape)}; in memory {_trace_mb(last):.2f} MB without previews; "
          f"file with previews {file_mb:.2f} MB (attention fp16)")
    if model in ("sd3", "flux"):
        flux = joint_trace_bytes(28, 1, 512, (128, 128)) / 2**20
        layers = joint_trace_bytes(28, 1, 512, (128, 128), layers=57, token_grid=(64, 64)) / 2**20 - flux
        print(f"formula at Flux 1024² (4,096 image x 512 text tokens, 57 blocks, 28 steps, fp32): attention {flux:.0f} MiB "
              f"(independent of blocks and heads), per-layer maps {layers:.0f} MiB more; during the run one "
              f"{4096 * 512 * 4 / 2**20:.0f} MiB [N, T] sum per branch")
    return 0


def joint_trace_bytes(steps: int, batch: int, text: int, latent: tuple[int, int], branches: int = 1, layers: int = 0,
                      token_grid: tuple[int, int] | None = None, bytes_per: int = 4) -> int:
    """The attention part of a joint-attention trace: S·B·T·h·w per branch (layer-averaged, at the
    latent grid), plus S·B·T·h_p·w_p per kept layer (at the token grid)."""
    h, w = latent
    total = steps * batch * text * h * w * branches
    if layers:
        gh, gw = token_grid
        total += layers * steps * batch * text * gh * gw
    return total * bytes_per


def _trace_mb(trace) -> float:
    tensors = [trace.x_t, trace.x0, trace.attention, trace.attention_negative, trace.final_latent]
    tensors += list(trace.attention_layers.values())
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


if __name__ == "__main__":
    sys.exit(main())
