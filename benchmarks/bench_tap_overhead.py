"""How much slower is generation under `explain.adapters.diffusers.trace` than without it?

Runs plain and traced generations interleaved (plain/traced, then traced/plain, ...), takes the
median of each and prints their ratio, all measured in this one run, plus the trace's size.

    python benchmarks/bench_tap_overhead.py                   # CPU, embedded shapes model (< 1 min idle)
    python benchmarks/bench_tap_overhead.py --device cuda     # random-weight SD1.5 UNet, 512², 50 steps, fp16

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
    ap.add_argument("--model", choices=("auto", "embedded", "tiny", "sd15"), default="auto")
    ap.add_argument("--steps", type=int, default=None, help="default 20 on CPU, 50 on CUDA")
    ap.add_argument("--size", type=int, default=None, help="image side; default 512 for sd15, the model's own otherwise")
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
    steps = args.steps or (50 if device.startswith("cuda") else 20)
    t = time.perf_counter()
    if model == "sd15":
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        pipe, name = sd15_pipeline(device, dtype, args.width_div)
        size = args.size or 512
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
        return pipe(
            PROMPT, num_inference_steps=steps, guidance_scale=args.guidance, height=size, width=size,
            generator=torch.Generator("cpu").manual_seed(0), output_type="latent",
        ).images

    latents = {}

    def plain():
        sync()
        t0 = time.perf_counter()
        latents["plain"] = call()
        sync()
        return time.perf_counter() - t0, None

    def traced(previews=False):
        sync()
        t0 = time.perf_counter()
        with trace(pipe, keep_layers=args.keep_layers, previews=previews, method=args.method) as tr:
            call()
        sync()
        return time.perf_counter() - t0, tr.trace

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
    diff = (last.final_latent - reference).abs().max().item() / max(reference.abs().max().item(), 1e-12)
    print(f"model: {name}; device: {torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}"
          f" ({torch.get_num_threads()} CPU threads); torch {torch.__version__}; load {load_s:.1f} s")
    print(f"run: {steps} steps, {last.meta['height']}x{last.meta['width']} px, latent {tuple(last.x_t.shape[-2:])}, "
          f"guidance {args.guidance}, {last.meta['scheduler']}, keep_layers={args.keep_layers}, method={args.method}")
    print(f"plain  : median {p:.3f} s  ({', '.join(f'{x:.3f}' for x in plain_times)})")
    print(f"traced : median {q:.3f} s  ({', '.join(f'{x:.3f}' for x in traced_times)})")
    print(f"overhead: ratio {q / p:.3f} ({(q / p - 1) * 100:+.1f} %), target <= +3 %")
    print(f"traced with previews: {preview_s:.3f} s ({preview_s - q:+.3f} s for {steps} x0 + {steps} x_t decodes)")
    print(f"traced vs plain final latent: max abs difference {diff:.2e} of the latent's range (explicit softmax vs SDPA)")
    print(f"trace: attention {tuple(att.shape)}; in memory {_trace_mb(last):.2f} MB without previews; "
          f"file with previews {file_mb:.2f} MB (attention fp16)")
    return 0


def _trace_mb(trace) -> float:
    tensors = [trace.x_t, trace.x0, trace.attention, trace.attention_negative, trace.final_latent]
    tensors += list(trace.attention_layers.values())
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) / 2**20


if __name__ == "__main__":
    sys.exit(main())
