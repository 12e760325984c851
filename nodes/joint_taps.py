"""The Tap on joint-attention (DiT) models: SD3 / SD3.5 (MMDiT), Flux (dev, schnell) and Chroma.

In these models image and text tokens attend over one joint sequence, so a prompt word's map is
the image-query × text-key slice of each joint attention, read as the core does it
(`explain.attention.joint_image_text_probs`: a softmax over the text keys of the joint key set,
i.e. the joint slice with each row renormalised over the text, heads averaged; the diffusers
tap's default, ``joint_rows="renormalized"``).

Nothing of the model is forked. On the Tap's *clone* of the ModelPatcher:

* ``transformer_options["optimized_attention_override"]`` (ComfyUI >= 0.3.60, where every attention
  backend is wrapped by ``wrap_attn``) is a `JointAttentionTap`: called as
  ``override(func, *args, **kwargs)`` with the q, k, v the backend was about to get, it reads
  them and returns ``func(*args, **kwargs)`` (or the override that was there before, e.g. a
  Sage/Flash-attention pack's, which it chains to), so the output is bit-identical. Every keyword
  (``skip_reshape``, ``mask``, ``scale``, ``enable_gqa``, ``transformer_options``...) is passed on as
  it came. Newer ComfyUI passes q/k/v as single-use containers only to overrides that declare a
  ``container_function``; this one does not, so it is handed plain tensors.
* ``patches_replace["dit"][("double_block", i)]`` and ``[("single_block", i)]`` are `BlockWrapper`s
  that note which block runs and its text length (single-stream blocks only see the joint
  sequence), then call the block (or a wrapper that was there before) unchanged.

ComfyUI's layouts (read from ``comfy/ldm/modules/diffusionmodules/mmdit.py`` and
``comfy/ldm/flux``): SD3 hands q, k as ``[B, S, H·D]``; Flux and Chroma as ``[B, H, S, D]``
(``skip_reshape=True``), already rotated (RoPE is applied before the call). The joint order is
**[text, image]** (the reverse of diffusers' SD3), image-first for blocks with
``flipped_img_txt``; reference-image tokens (Flux Kontext) follow the image and are keys only here.
SD3.5's extra image-only self-attention (MMDiT-X) has S equal to the image length and is skipped.

ComfyUI is imported lazily (inside functions), so this module loads without it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from explain.attention import attention_probs, joint_image_text_probs, split_heads

MIN_COMFYUI_FOR_DIT = "0.3.60"  # optimized_attention_override (ComfyUI commit d7f40442)


@dataclass(frozen=True)
class JointFamily:
    """How the Tap finds a joint-attention model's blocks and names its context positions."""

    name: str
    description: str
    double_blocks: str  # attribute of the diffusion model holding the joint (double-stream) blocks
    single_blocks: str | None = None  # attribute holding single-stream blocks (joint sequence in, out)
    # The tokenizer streams whose encodings sit side by side in the context, in order; each part
    # names the streams that may provide it (the first the CLIP tokenized is used).
    context_parts: tuple[tuple[str, ...], ...] = (("t5xxl",),)


SD3 = JointFamily(
    "sd3", "Stable Diffusion 3 / 3.5 (MMDiT)", "joint_blocks", None, context_parts=(("l", "g"), ("t5xxl",))
)  # CLIP-L/G side by side in the features, then T5 along the sequence (comfy/text_encoders/sd3_clip.py)
FLUX = JointFamily("flux", "Flux (dev, schnell)", "double_blocks", "single_blocks")
CHROMA = JointFamily("chroma", "Chroma", "double_blocks", "single_blocks")

# ComfyUI diffusion-model class -> family. Tested at a125cd84 with tiny models of each.
FAMILIES = {"OpenAISignatureMMDITWrapper": SD3, "Flux": FLUX, "Chroma": CHROMA}
SUPPORTED = "SD1.x, SD2.x and SDXL UNets, SD3 / SD3.5, Flux and Chroma"


def joint_family(diffusion_model) -> JointFamily | None:
    family = FAMILIES.get(type(diffusion_model).__name__)
    if family is None or not list(getattr(diffusion_model, family.double_blocks, None) or []):
        return None
    return family


def override_supported() -> bool:
    """Does this ComfyUI route attention through ``optimized_attention_override`` (0.3.60+)?"""
    try:
        import comfy.ldm.modules.attention as attention
    except Exception:  # noqa: BLE001
        return False
    return hasattr(attention, "wrap_attn")


def require_override(family: JointFamily) -> None:
    if override_supported():
        return
    try:
        import comfyui_version

        version = str(comfyui_version.__version__)
    except Exception:  # noqa: BLE001
        version = "an unknown version"
    raise RuntimeError(
        f"the Explain Tap needs ComfyUI {MIN_COMFYUI_FOR_DIT} or newer for {family.description} models (it reads their joint "
        f"attention through ComfyUI's optimized_attention_override, added in {MIN_COMFYUI_FOR_DIT}); this is ComfyUI "
        f"{version}. Update ComfyUI, or tap a UNet model (SD1.x, SD2.x, SDXL), which works from 0.3.52"
    )


def token_grid(latent_size: tuple[int, int], patch: int) -> tuple[int, int]:
    """The image-token grid of a latent: ComfyUI pads both sides up to the patch size."""
    h, w = int(latent_size[0]), int(latent_size[1])
    return -(-h // patch), -(-w // patch)


# ---------------------------------------------------------------------------- per model call
@dataclass
class BlockCall:
    """The block running now: its name, text length and total image-stream length (image plus
    any reference-image tokens), and where each sits in its joint sequence."""

    name: str
    text_length: int
    image_length: int
    image_first: bool = False

    @property
    def joint_length(self) -> int:
        return self.text_length + self.image_length

    def slices(self, image_tokens: int) -> tuple[slice, slice]:
        """(image positions, text positions) of the first ``image_tokens`` image tokens."""
        if self.image_first:
            return slice(0, image_tokens), slice(self.image_length, self.joint_length)
        return slice(self.text_length, self.text_length + image_tokens), slice(0, self.text_length)


class JointCallState:
    """What the block wrappers tell the attention override (and DF-CAM's probes): the block in
    progress, and the text / image-stream lengths of the last double-stream block, which the
    single-stream blocks after it share."""

    def __init__(self):
        self.block: BlockCall | None = None
        self.text_length: int | None = None
        self.image_length: int | None = None

    def __deepcopy__(self, memo):
        return self

    def enter(self, kind: str, name: str, args: dict, image_first: bool = False) -> BlockCall | None:
        """Note the block ``name`` about to run; None when its lengths cannot be known."""
        if kind == "double":
            txt, img = args.get("txt"), args.get("img")
            if not isinstance(txt, torch.Tensor) or not isinstance(img, torch.Tensor):
                return None
            self.text_length, self.image_length = int(txt.shape[1]), int(img.shape[1])
            return BlockCall(name, self.text_length, self.image_length, image_first)
        joint = args.get("img")
        if self.text_length is None or not isinstance(joint, torch.Tensor) or int(joint.shape[1]) <= self.text_length:
            return None
        return BlockCall(name, self.text_length, int(joint.shape[1]) - self.text_length)


class BlockWrapper:
    """``patches_replace["dit"][(kind + "_block", index)]``: marks the block in progress for the
    attention override and runs the block, or the replacement that was there before, as it was."""

    def __init__(self, state: JointCallState, kind: str, name: str, previous=None, image_first: bool = False):
        self.state = state
        self.kind = kind
        self.name = name
        self.previous = previous
        self.image_first = image_first

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options; the state must stay shared

    def __call__(self, args: dict, extra: dict, *more, **named):
        outer = self.state.block
        self.state.block = self.state.enter(self.kind, self.name, args, self.image_first)
        try:
            if self.previous is not None:
                return self.previous(args, extra, *more, **named)
            return extra["original_block"](args)
        finally:
            self.state.block = outer


# ---------------------------------------------------------------------------- reading q and k
def _argument(args: tuple, kwargs: dict, index: int, name: str, default=None):
    return args[index] if len(args) > index else kwargs.get(name, default)


def joint_queries_keys(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k ``[B, H, S, D]`` from an optimized-attention call ``(q, k, v, heads, mask, ...)``
    in either of ComfyUI's layouts (``skip_reshape``: already ``[B, H, S, D]``; else ``[B, S, H·D]``),
    with grouped key heads (``enable_gqa``) repeated to the query heads."""
    q, k = args[0], args[1]
    heads = int(_argument(args, kwargs, 3, "heads"))
    if kwargs.get("skip_reshape", False):
        qh, kh = q, k
    else:
        dim_head = q.shape[-1] // heads
        qh = split_heads(q, heads)
        kh = split_heads(k, k.shape[-1] // dim_head)
    if qh.ndim != 4 or kh.ndim != 4 or qh.shape[-1] != kh.shape[-1]:
        raise ValueError(f"unexpected attention inputs q {tuple(q.shape)}, k {tuple(k.shape)}")
    if kh.shape[1] != qh.shape[1]:
        if qh.shape[1] % kh.shape[1]:
            raise ValueError(f"{qh.shape[1]} query heads cannot share {kh.shape[1]} key heads")
        kh = kh.repeat_interleave(qh.shape[1] // kh.shape[1], dim=1)
    return qh, kh


def image_text_maps(
    qh: torch.Tensor, kh: torch.Tensor, image: slice, text: slice, scale: float | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Head-averaged ``[B, N_img, T]``: each image query's softmax over the text keys of the joint
    key set (the joint slice renormalised over the text); an attention mask ``[..., S, S]`` (additive
    or boolean) is applied to those scores."""
    if mask is None:
        return joint_image_text_probs(qh, kh, image, text, scale=scale, renormalize=True, mean_heads=True)
    m = mask
    while m.ndim < 4:
        m = m.unsqueeze(0 if m.ndim < 3 else 1)
    m = m[..., image, text]
    return attention_probs(qh[:, :, image], kh[:, :, text], scale=scale, mask=m, upcast=True).mean(dim=1)


class JointAttentionTap:
    """``transformer_options["optimized_attention_override"]``: records the image × text maps of
    the joint attention of the block in progress, then makes the output with ComfyUI's function
    (or the override it replaced)."""

    def __init__(self, recorder, state: JointCallState, patch: int, previous=None):
        self.recorder = recorder
        self.state = state
        self.patch = patch
        self.previous = previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, *args, **kwargs):
        self.observe(args, kwargs)
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    def observe(self, args: tuple, kwargs: dict) -> None:
        from .taps import is_probing

        run = self.recorder.active
        block = self.state.block
        if run is None or block is None or is_probing() or run.failed or len(args) < 2:
            return
        try:
            qh, kh = joint_queries_keys(args, kwargs)
            if qh.shape[-2] != block.joint_length or kh.shape[-2] != block.joint_length:
                return  # not this block's joint attention (SD3.5's image-only self-attention)
            grid = token_grid(run.latent_size, self.patch)
            tokens = grid[0] * grid[1]
            if block.image_length < tokens:
                run.notes.add("model calls on a cropped area (area conditioning) were left out of the attention maps")
                return
            image, text = block.slices(tokens)
            mask = _argument(args, kwargs, 4, "mask")
            maps = image_text_maps(qh, kh, image, text, scale=kwargs.get("scale"), mask=mask if isinstance(mask, torch.Tensor) else None)
            run.add_attention(block.name, maps, kwargs.get("transformer_options") or {}, layer_size=grid)
        except Exception as exc:  # noqa: BLE001 - never fail the user's sampling because of the tap
            run.fail(f"the joint attention of {block.name} could not be recorded ({type(exc).__name__}: {exc})")


def blocks_of(diffusion_model, family: JointFamily) -> list[tuple[str, int, str, Any]]:
    """``(kind, index, module name, block)`` of every joint block, in model order."""
    out = [("double", i, f"{family.double_blocks}.{i}", b) for i, b in enumerate(getattr(diffusion_model, family.double_blocks, None) or [])]
    if family.single_blocks:
        out += [("single", i, f"{family.single_blocks}.{i}", b) for i, b in enumerate(getattr(diffusion_model, family.single_blocks, None) or [])]
    return out


def install(patched, diffusion_model, family: JointFamily, recorder) -> list[str]:
    """Install the override and the block wrappers on ``patched`` (a clone); returns the names of
    what it chained to (another pack's override or block replacements)."""
    require_override(family)
    state = recorder.joint_state
    patch = int(getattr(diffusion_model, "patch_size", 2) or 2)
    options = patched.model_options.setdefault("transformer_options", {})
    chained: list[str] = []
    previous = options.get("optimized_attention_override")
    if isinstance(previous, JointAttentionTap):
        previous = previous.previous  # tapping a tapped model: replace our own override, keep theirs
    if previous is not None:
        chained.append("optimized_attention_override")
    # Set on the clone's transformer_options directly: newer ComfyUI's set_model_optimized_attention
    # installs a backend *instead of* the function ComfyUI picked (its override drops ``func``),
    # which would change the output; an observer must call that function.
    options["optimized_attention_override"] = JointAttentionTap(recorder, state, patch, previous)
    replace = options.get("patches_replace", {}).get("dit", {})
    for kind, index, name, block in blocks_of(diffusion_model, family):
        before = replace.get((f"{kind}_block", index))
        if isinstance(before, BlockWrapper):
            before = before.previous
        if before is not None:
            chained.append(name)
        wrapper = BlockWrapper(state, kind, name, before, image_first=bool(getattr(block, "flipped_img_txt", False)))
        patched.set_model_patch_replace(wrapper, "dit", f"{kind}_block", index)
    return chained


# ---------------------------------------------------------------------------- DF-CAM on DiT blocks
class ImageTokens(torch.nn.Module):
    """Identity on a block's image tokens shown as a feature map ``[B, D, h, w]`` (row-major
    patches of the latent): the module DF-CAM hooks for that block."""

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return grid


class ImageTokenProbe:
    """A ``patches_replace["dit"]`` wrapper for DF-CAM's run only: after the block (or the
    replacement before it) it routes the block's image tokens through an `ImageTokens` module,
    values unchanged, so Grad-CAM sees them as a feature map."""

    def __init__(self, state: JointCallState, kind: str, name: str, module: ImageTokens, grid: tuple[int, int], previous=None, image_first=False):
        self.state = state
        self.kind = kind
        self.name = name
        self.module = module
        self.grid = grid
        self.previous = previous
        self.image_first = image_first

    def __deepcopy__(self, memo):
        return self

    def __call__(self, args: dict, extra: dict, *more, **named):
        call = self.state.enter(self.kind, self.name, args, self.image_first)
        with keep_saved_inputs(args):
            out = self.previous(args, extra, *more, **named) if self.previous is not None else extra["original_block"](args)
        stream = out.get("img") if isinstance(out, dict) else None
        if call is None or not isinstance(stream, torch.Tensor) or stream.ndim != 3:
            return out
        h, w = self.grid
        start = call.slices(h * w)[0].start if self.kind == "single" else 0
        if stream.shape[1] < start + h * w:
            return out
        b, _, d = stream.shape
        tokens = stream[:, start : start + h * w]
        shown = self.module(tokens.transpose(1, 2).reshape(b, d, h, w))
        tokens = shown.reshape(b, d, h * w).transpose(1, 2)
        return {**out, "img": torch.cat([stream[:, :start], tokens, stream[:, start + h * w :]], dim=1)}


@contextlib.contextmanager
def keep_saved_inputs(args: dict):
    """Let autograd differentiate a block that adds to its input streams in place (Flux's blocks
    do ``txt += ...`` and ``x += ...`` after a LayerNorm saved them, which a backward pass refuses):
    while the block runs with gradients, tensors autograd saves that share storage with the
    inputs are saved as copies, so the in-place update cannot change them. Without gradients it
    does nothing."""
    if not torch.is_grad_enabled():
        yield
        return
    storages = {t.untyped_storage().data_ptr() for t in args.values() if isinstance(t, torch.Tensor)}

    def pack(t: torch.Tensor):
        return t.clone() if t.untyped_storage().data_ptr() in storages else t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


PROBE_SUFFIX = ".image_tokens"


def with_image_token_probes(model, latent_size: tuple[int, int]):
    """A clone of ``model`` whose joint blocks show their image tokens to DF-CAM, and the probe
    modules by name (``"double_blocks.0.image_tokens"``...); ``(model, {})`` for a model that is
    not a DiT."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    family = joint_family(diffusion_model) if diffusion_model is not None else None
    if family is None:
        return model, {}
    patched = model.clone()
    state = JointCallState()
    grid = token_grid(latent_size, int(getattr(diffusion_model, "patch_size", 2) or 2))
    replace = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    probes: dict[str, ImageTokens] = {}
    for kind, index, name, block in blocks_of(diffusion_model, family):
        module = probes[f"{name}{PROBE_SUFFIX}"] = ImageTokens()
        probe = ImageTokenProbe(
            state, kind, name, module, grid, replace.get((f"{kind}_block", index)), image_first=bool(getattr(block, "flipped_img_txt", False))
        )
        patched.set_model_patch_replace(probe, "dit", f"{kind}_block", index)
    return patched, probes
