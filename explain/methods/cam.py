"""DF-CAM: Grad-CAM on any set of denoiser sub-modules at one step, from one forward and one
backward pass.

At step t the guided denoiser runs on ``[uncond; cond]`` with gradients on. For each hooked
module, the activations A and the gradients G of a scalar target with respect to them are
combined across the two guidance branches as in the paper, A' = A_u + w (A_c - A_u) and
G' = G_u + w (G_c - G_u); the channel weights are the spatial means of G' and the map is
ReLU(Σ_c α_c A'_c). Each layer's map is resized, min-max normalised and the maps are summed over
layers (the paper's aggregation; ``normalize=False`` sums them raw).

The official code needed one full generation per module (43 of them); here every requested
module is hooked at once, and `torch.autograd.grad` is taken with respect to the activations
only, so no parameter ever gets a ``.grad``.

Targets (both summed over the two guidance branches, as the paper's):

* ``"sum"``: the sum of the prediction over all elements (the paper's target, on ε);
* ``"guided_projection"``: the projection of each branch's prediction onto the direction of the
  (detached) guided prediction, so the map explains what moves the output the way it went.

Transformer denoisers (SD3's MMDiT, Flux): the layers are the transformer blocks, whose image
tokens ``[B, N, D]`` (one of the block's outputs, `TRANSFORMER_BLOCKS` says which) are reshaped
row-major to the image-token grid ``[B, D, h/p, w/p]`` of the latent (p = the patch size, 2 for
both) and treated as a feature map; ``"paper"`` and ``"all"`` are every block (the paper's
layer list is UNet-specific; every block of a DiT plays the role of its blocks).

It works inside ``torch.inference_mode()`` (ComfyUI runs nodes that way): it opts out of it,
clones inference-tensor inputs, parameters and buffers for the pass, turns parameter gradients
off, and restores every parameter, flag and hook in ``finally``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from explain.attention import layer_grid
from explain.denoiser import QUANTITIES, GuidedDenoiser, NoiseLevel

TARGETS = ("sum", "guided_projection")

# Module classes that the paper hooks (ResNet blocks, transformer / attention blocks, down- and
# upsamplers), in diffusers and in ComfyUI / original-LDM naming.
RESNET_CLASSES = ("ResnetBlock2D", "ResBlock")
ATTENTION_CLASSES = ("Transformer2DModel", "SpatialTransformer")
SAMPLER_CLASSES = ("Downsample2D", "Upsample2D", "Downsample", "Upsample")
# Transformer blocks of DiT denoisers -> which element of the block's output tuple holds the
# image tokens [B, N, D] (diffusers' joint blocks return (text, image)).
TRANSFORMER_BLOCKS = {"JointTransformerBlock": 1, "FluxTransformerBlock": 1, "FluxSingleTransformerBlock": 1}
_MID = re.compile(r"^(mid_block|middle_block)(\.|$)")


# ---------------------------------------------------------------------------- layer names
def _kind(module: torch.nn.Module) -> str | None:
    name = type(module).__name__
    if name in RESNET_CLASSES:
        return "resnet"
    if name in ATTENTION_CLASSES:
        return "attention"
    if name in SAMPLER_CLASSES:
        return "sampler"
    if name in TRANSFORMER_BLOCKS:
        return "transformer"
    return None


def all_layers(modules: dict[str, torch.nn.Module]) -> list[str]:
    """Every ResNet block, attention block and down/upsampler (UNets) or transformer block (DiTs), in model order."""
    return [name for name, m in modules.items() if name and _kind(m) is not None]


def paper_layers(modules: dict[str, torch.nn.Module]) -> list[str]:
    """The equivalent of the paper's 43 modules: `all_layers` without the mid-block attention
    (commented out of the official config). For Stable Diffusion 1.x this is exactly 43."""
    return [n for n in all_layers(modules) if not (_MID.match(n) and _kind(modules[n]) == "attention")]


def resolve_layers(modules: dict[str, torch.nn.Module], layers) -> list[str]:
    """Turn ``"paper"``, ``"all"``, one module name or a list of names into module names, or
    raise an error that lists the valid ones."""
    if not modules:
        raise ValueError("this denoiser exposes no modules, so DF-CAM cannot hook any layer")
    if isinstance(layers, str):
        if layers == "paper":
            names = paper_layers(modules)
        elif layers == "all":
            names = all_layers(modules)
        else:
            names = [layers]
    else:
        names = list(layers)
    if not names:
        raise ValueError("no layers to hook: pass 'paper', 'all' or module names from all_layers(...)")
    unknown = [n for n in names if n not in modules or not n]
    if unknown:
        valid = all_layers(modules)
        raise KeyError(
            f"unknown module name(s) {unknown}; valid names are 'paper', 'all' or any of: {', '.join(valid)} "
            "(or any other name in dict(unet.named_modules()))"
        )
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------- pure Grad-CAM math
def guidance_combine(t: torch.Tensor, guidance_scale: float, has_uncond: bool) -> torch.Tensor:
    """[uncond; cond] stacked on the batch axis -> u + w (c - u); a cond-only batch unchanged."""
    if not has_uncond:
        return t
    u, c = t.chunk(2)
    return u + float(guidance_scale) * (c - u)


def grad_cam(activation: torch.Tensor, gradient: torch.Tensor, guidance_scale: float = 1.0, has_uncond: bool = False) -> torch.Tensor:
    """Grad-CAM ``[N, h, w]`` from activations and gradients ``[B, C, h, w]`` (B = 2N when the
    batch is [uncond; cond]): ReLU(Σ_c mean_hw(G'_c) A'_c) after the guidance combination."""
    if activation.shape != gradient.shape or activation.ndim != 4:
        raise ValueError(
            f"Grad-CAM needs feature maps [B, C, h, w] and gradients of the same shape, got "
            f"{tuple(activation.shape)} and {tuple(gradient.shape)}"
        )
    a = guidance_combine(activation.float(), guidance_scale, has_uncond)
    g = guidance_combine(gradient.float(), guidance_scale, has_uncond)
    weights = g.mean((-2, -1), keepdim=True)
    return F.relu((weights * a).sum(1))


def minmax(m: torch.Tensor) -> torch.Tensor:
    lo, hi = m.amin(), m.amax()
    if float(hi - lo) <= 1e-12:
        return torch.zeros_like(m)
    return (m - lo) / (hi - lo)


def aggregate(maps: dict[str, torch.Tensor], size: tuple[int, int], normalize: bool = True) -> torch.Tensor:
    """Resize each layer's ``[h, w]`` map bilinearly to ``size``, min-max it (if ``normalize``)
    and sum over layers (the paper's aggregation: every layer counts equally)."""
    total = torch.zeros(size)
    for m in maps.values():
        up = F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]
        total += minmax(up) if normalize else up
    return total


# ---------------------------------------------------------------------------- autograd safety
@contextlib.contextmanager
def autograd_ready(modules: dict[str, torch.nn.Module]):
    """Make a model usable for one backward pass inside ``torch.inference_mode()`` without
    changing it: inference-tensor parameters and buffers are swapped for normal clones, and
    parameter gradients are switched off, all restored on exit (also after an exception)."""
    swapped: list[tuple[dict, str, torch.Tensor]] = []
    flags: list[tuple[torch.nn.Parameter, bool]] = []
    seen: set[int] = set()
    try:
        with torch.inference_mode(False):
            for module in modules.values():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                for store in (module._parameters, module._buffers):
                    for name, t in list(store.items()):
                        if t is not None and t.is_inference():
                            swapped.append((store, name, t))
                            clone = t.clone()
                            store[name] = torch.nn.Parameter(clone, requires_grad=False) if store is module._parameters else clone
                for p in module._parameters.values():
                    if p is not None and p.requires_grad:
                        flags.append((p, True))
                        p.requires_grad_(False)
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for store, name, t in reversed(swapped):
            store[name] = t


def _feature_map(output, module: torch.nn.Module | None = None) -> torch.Tensor | None:
    index = TRANSFORMER_BLOCKS.get(type(module).__name__) if module is not None else None
    if index is not None:  # a DiT block: its image tokens
        part = output[index] if isinstance(output, (tuple, list)) and len(output) > index else output
        return part if isinstance(part, torch.Tensor) else None
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "sample") and isinstance(output.sample, torch.Tensor):
        return output.sample
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def tokens_to_grid(tokens: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """Image tokens ``[B, N, D]`` (row-major patches of a ``latent_size`` latent) → ``[B, D, h_p, w_p]``."""
    b, n, d = tokens.shape
    h, w = layer_grid(n, latent_size)
    return tokens.transpose(1, 2).reshape(b, d, h, w)


# ---------------------------------------------------------------------------- DF-CAM
@dataclass
class CamResult:
    """DF-CAM at one step: ``latent`` ``[h, w]`` and ``image`` ``[H, W]`` (summed over layers,
    each layer min-max normalised unless ``normalized`` is False) and the raw per-layer maps."""

    latent: torch.Tensor
    image: torch.Tensor
    layers: dict[str, torch.Tensor] = field(repr=False)
    target: str = "sum"
    step: int = 0
    item: int = 0
    normalized: bool = True

    def display(self) -> torch.Tensor:
        return minmax(self.image)


def df_cam(
    denoiser: GuidedDenoiser,
    trace,
    step: int,
    item: int = 0,
    *,
    layers="paper",
    target: str = "sum",
    quantity: str = "epsilon",
    normalize: bool = True,
    image_size: tuple[int, int] | None = None,
    progress=None,
) -> CamResult:
    """DF-CAM at ``step`` of ``trace`` (item ``item``) on ``layers`` (``"paper"``, ``"all"``, a
    module name or a list of names from ``denoiser.modules``), all from one forward and one
    backward pass. ``quantity`` is the prediction the target is taken on (``"epsilon"``, as the
    paper's raw UNet output, or ``"x0"``)."""
    if target not in TARGETS:
        raise ValueError(f"unknown DF-CAM target {target!r}; choose one of {', '.join(TARGETS)}")
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    step = trace.check_step(step)
    if not 0 <= item < trace.batch_size:
        raise IndexError(f"item {item} is outside the trace's batch of {trace.batch_size}")
    names = resolve_layers(denoiser.modules, layers)
    level = NoiseLevel.from_trace(trace, step)
    size = trace.latent_size
    image_size = tuple(image_size) if image_size is not None else trace.image_size

    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    from explain.progress import bar

    counter = bar(progress, 2, "DF-CAM forward and backward pass")

    def hook_for(name):
        def hook(module, inputs, output):
            fmap = _feature_map(output, module)
            if fmap is not None and fmap.requires_grad:
                captured[name].append(fmap)

        return hook

    try:
        with autograd_ready(denoiser.modules), torch.inference_mode(False), torch.enable_grad():
            for name in names:
                handles.append(denoiser.modules[name].register_forward_hook(hook_for(name)))
            x = trace.x_t[step, item : item + 1].clone().float()
            if denoiser.device is not None:
                x = x.to(denoiser.device)
            x.requires_grad_(True)
            uncond, cond = denoiser.branches(x, level, quantity)
            counter.update(1)
            has_uncond = uncond is not None
            if target == "sum":
                y = cond.sum() + (uncond.sum() if has_uncond else 0.0)
            else:
                guided = denoiser.combine(uncond, cond).detach()
                direction = guided / guided.norm().clamp_min(1e-12)
                y = (cond * direction).sum() + ((uncond * direction).sum() if has_uncond else 0.0)
            missing = [n for n in names if not captured[n]]
            if missing:
                raise ValueError(f"module(s) {missing} did not take part in the forward pass (or gave no feature map)")
            # a model_fn that runs the branches as separate calls must run the unconditional one first.
            # Gradients are taken w.r.t. each captured tensor and concatenated afterwards: a tensor
            # made by torch.cat is not in y's graph, so its gradient would be None (all-zero maps).
            flat = [t for n in names for t in captured[n]]
            flat_grads = torch.autograd.grad(y, flat, allow_unused=True)
            counter.update(1)
            activations, grads, k = [], [], 0
            for n in names:
                parts = captured[n]
                part_grads = [torch.zeros_like(t) if g is None else g for t, g in zip(parts, flat_grads[k : k + len(parts)])]
                k += len(parts)
                activations.append(torch.cat(parts) if len(parts) > 1 else parts[0])
                grads.append(torch.cat(part_grads) if len(part_grads) > 1 else part_grads[0])
            maps: dict[str, torch.Tensor] = {}
            rows = x.shape[0] * (2 if has_uncond else 1)
            for name, a, g in zip(names, activations, grads):
                if a.ndim == 3 and _kind(denoiser.modules[name]) == "transformer":
                    a, g = tokens_to_grid(a, size), tokens_to_grid(g, size)
                if a.ndim != 4:
                    raise ValueError(f"module {name!r} gives {tuple(a.shape)}, not a feature map [B, C, h, w]; pick a block, not a sub-layer")
                if a.shape[0] != rows:
                    raise ValueError(
                        f"module {name!r} ran on a batch of {a.shape[0]}, but DF-CAM needs {rows} ([uncond; cond] of "
                        f"{x.shape[0]} latent): each branch must run it once, on one conditioning (a conditioning "
                        "with several entries, e.g. ComfyUI's Conditioning Combine, is not supported)"
                    )
                maps[name] = grad_cam(a.detach(), g.detach(), denoiser.guidance_scale, has_uncond)[0].cpu()
    finally:
        for h in handles:
            h.remove()
        captured.clear()
        counter.close()
    latent = aggregate(maps, size, normalize)
    image = aggregate(maps, image_size, normalize)
    return CamResult(latent, image, maps, target, step, item, normalize)
