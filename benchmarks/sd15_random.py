"""A random-weight UNet shaped like Stable Diffusion 1.5's, for GPU benchmarks that need no weights.

Only torch and diffusers (``UNet2DConditionModel``) are needed; no text encoder, tokenizer or VAE:
the prompt contexts are random tensors of CLIP ViT-L's shape [1, 77, 768]. ``channels_div``
shrinks every width (same block structure) for a quick dry run on a CPU.
"""

from __future__ import annotations

import time

import torch

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,  # diffusers' legacy name: 8 heads
    norm_num_groups=32,
)
GUIDANCE = 7.5
TIMESTEP = 300  # the paper's step 15 of 20


def alpha_bar(t: int) -> float:
    """Stable Diffusion's scaled-linear schedule (beta 0.00085..0.012 over 1000 steps) at t."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return float(torch.cumprod(1 - betas, 0)[t])


def random_unet(device, dtype, channels_div: int = 1, latent: int = 64, seed: int = 0):
    from diffusers import UNet2DConditionModel

    config = dict(SD15_UNET, sample_size=latent)
    if channels_div > 1:
        config["block_out_channels"] = tuple(c // channels_div for c in SD15_UNET["block_out_channels"])
        config["norm_num_groups"] = 8
        config["cross_attention_dim"] = 768 // channels_div
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the GPU: an 860M-parameter init on a CPU is slow
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype=dtype).eval()
    unet.requires_grad_(False)
    if torch.device(device).type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    return unet


def random_setup(device="cuda", dtype=torch.float16, latent: int = 64, channels_div: int = 1, guidance: float = GUIDANCE):
    """(unet, GuidedDenoiser, one-step Trace) with random weights, contexts and latent."""
    from explain.denoiser import GuidedDenoiser
    from explain.trace import Trace

    unet = random_unet(device, dtype, channels_div, latent)
    g = torch.Generator().manual_seed(1)
    dim = unet.config.cross_attention_dim
    cond = torch.randn(1, 77, dim, generator=g).to(device, dtype)
    uncond = torch.randn(1, 77, dim, generator=g).to(device, dtype)

    def model_fn(x, level):
        n = x.shape[0]
        x_in = torch.cat([x, x]).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        context = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)])
        out = unet(x_in, torch.tensor(level.timestep, device=device), encoder_hidden_states=context, return_dict=False)[0]
        u, c = out.chunk(2)
        return u, c

    from explain.adapters.diffusers.families.unet import unet_item_bytes

    denoiser = GuidedDenoiser(
        model_fn,
        "epsilon",
        guidance,
        modules=dict(unet.named_modules()),
        device=torch.device(device),
        estimate_item_bytes=lambda x: unet_item_bytes(unet, x, 2, model_fn),
    )
    a = alpha_bar(TIMESTEP)
    x = torch.randn(1, 1, 4, latent, latent, generator=g)
    trace = Trace(
        prompts=["random"],
        tokens=[["<start>", "random", "<end>"]],
        words=[[]],
        timesteps=torch.tensor([float(TIMESTEP)], dtype=torch.float64),
        sigmas=torch.tensor([((1 - a) / a) ** 0.5], dtype=torch.float64),
        x_t=x,
        x0=torch.zeros_like(x),
        meta={"guidance_scale": guidance, "height": latent * 8, "width": latent * 8},
    )
    return unet, denoiser, trace


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        t = time.perf_counter()
        fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(device, dtype, n: int | None = None, repeats: int = 5) -> float:
    """Measured matmul throughput (FLOP/s) of one large square matmul in ``dtype``: the
    practical peak that the FLOP floor is judged against."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    seconds = timed(lambda: a @ b, device, repeats)
    return 2 * n**3 / seconds


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def prepare_device(name: str):
    """``torch.device(name)`` set up for timing (cuDNN autotuning, TF32 matmuls), or None with a
    message when CUDA is asked for and absent."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device here")
            return None
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    return device
