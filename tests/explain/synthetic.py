"""Synthetic traces with attention whose structure the tests control, so assertions about
heatmaps, concept curves and recovery maps can fail for a wrong implementation."""

from __future__ import annotations

import torch

from explain.trace import Trace, Word

PROMPT = "a red circle above a blue square"
# "circle" is split into two sub-word tokens to exercise merging.
TOKENS = ["<|startoftext|>", "a</w>", "red</w>", "cir", "cle</w>", "above</w>", "a</w>", "blue</w>", "square</w>", "<|endoftext|>"]
WORDS = [("a", [1]), ("red", [2]), ("circle", [3, 4]), ("above", [5]), ("a", [6]), ("blue", [7]), ("square", [8])]
RED_CIRCLE = [2, 3, 4]
BLUE_SQUARE = [7, 8]


def blob(h: int, w: int, cy: float, cx: float, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    return torch.exp(-(((yy / h - cy) ** 2 + (xx / w - cx) ** 2) / (2 * radius**2)))


def synthetic_trace(steps: int = 6, size: int = 8, image_scale: int = 4, batch: int = 1, channels: int = 4, negative: bool = False, layers: bool = False, seed: int = 0) -> Trace:
    """Red-circle tokens attend to the top-left quadrant, blue-square tokens to the bottom-right.
    The red tokens' logits grow with the step and the blue ones' shrink, so the red words' share
    of attention rises and the blue words' falls. x0 converges linearly to the final latent, the
    top-left quadrant settling by step 1 and the rest only at the last step."""
    g = torch.Generator().manual_seed(seed)
    T = len(TOKENS)
    top_left = blob(size, size, 0.25, 0.25, 0.12)
    bottom_right = blob(size, size, 0.75, 0.75, 0.12)
    att = torch.zeros(steps, batch, T, size, size)
    for s in range(steps):
        frac = s / max(steps - 1, 1)
        logits = torch.zeros(T, size, size)
        logits[0] = 3.0  # the start token soaks up much of the mass, as in real models
        for i in RED_CIRCLE:
            logits[i] = 4.0 * top_left * (0.5 + frac)
        for i in BLUE_SQUARE:
            logits[i] = 4.0 * bottom_right * (1.5 - frac)
        logits += 0.01 * torch.randn(T, size, size, generator=g)
        att[s, :] = logits.softmax(0)
    final = torch.randn(batch, channels, size, size, generator=g)
    start = torch.randn(batch, channels, size, size, generator=g)
    x0 = torch.zeros(steps, batch, channels, size, size)
    quadrant = torch.zeros(size, size, dtype=torch.bool)
    quadrant[: size // 2, : size // 2] = True
    for s in range(steps):
        frac = (s + 1) / steps
        x0[s] = start + (final - start) * frac
        if s >= 1:
            x0[s][..., quadrant] = final[..., quadrant]
    x0[-1] = final
    sigmas = torch.linspace(14.6, 0.03, steps, dtype=torch.float64)
    x_t = torch.stack([x0[s] + float(sigmas[s]) * torch.randn(batch, channels, size, size, generator=g) for s in range(steps)])
    words = [[Word(t, list(p)) for t, p in WORDS] for _ in range(batch)]
    trace = Trace(
        prompts=[PROMPT] * batch,
        tokens=[list(TOKENS) for _ in range(batch)],
        words=words,
        timesteps=torch.linspace(999, 50, steps, dtype=torch.float64).round(),
        sigmas=sigmas,
        x_t=x_t,
        x0=x0,
        attention=att,
        final_latent=final,
        images=(torch.rand(batch, size * image_scale, size * image_scale, 3, generator=g) * 255).to(torch.uint8),
        meta={"height": size * image_scale, "width": size * image_scale, "steps": steps, "guidance": 7.5, "seed": 0, "scheduler": "synthetic"},
    )
    if negative:
        neg_tokens = ["<|startoftext|>", "green</w>", "triangle</w>", "<|endoftext|>"]
        neg = torch.zeros(steps, batch, len(neg_tokens), size, size)
        logits = torch.zeros(len(neg_tokens), size, size)
        logits[1] = 4 * blob(size, size, 0.25, 0.75, 0.12)  # top right
        logits[2] = 4 * blob(size, size, 0.75, 0.25, 0.12)  # bottom left
        neg[:] = logits.softmax(0)
        trace.negative_prompts = ["green triangle"] * batch
        trace.negative_tokens = [list(neg_tokens) for _ in range(batch)]
        trace.negative_words = [[Word("green", [1]), Word("triangle", [2])] for _ in range(batch)]
        trace.attention_negative = neg
    if layers:
        # A 2x coarser layer that sees the red circle at the bottom left instead (so a layer
        # subset visibly changes the map), and a full-resolution layer equal to the mean map.
        coarse = torch.zeros(steps, batch, T, size // 2, size // 2)
        logits = torch.zeros(T, size // 2, size // 2)
        logits[0] = 3.0
        for i in RED_CIRCLE:
            logits[i] = 4.0 * blob(size // 2, size // 2, 0.75, 0.25, 0.15)
        coarse[:] = logits.softmax(0)
        trace.attention_layers = {
            f"down_blocks.0.attentions.0.transformer_blocks.0.attn2": att.clone(),
            f"up_blocks.1.attentions.0.transformer_blocks.0.attn2": coarse,
        }
    return trace.validate()
