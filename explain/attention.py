"""Cross-attention probabilities and their bounded-memory aggregation, as pure tensor code.

Fast attention kernels (SDPA, xformers, flash) never materialise the softmax, so a tap
computes it explicitly with `attention_probs` and reuses the probabilities for the layer's
output (`attention_output`); the result equals the fast path up to float rounding.

Shapes: queries ``[..., N, d]`` (N = h_l·w_l image positions), keys ``[..., T, d]`` (T context
positions); probabilities ``[..., N, T]``. Batch-major head layout ``[B·heads, N, T]`` (as
diffusers' ``head_to_batch_dim`` and ComfyUI's basic attention produce) or ``[B, heads, N, T]``.

Joint attention (SD3's MMDiT, Flux): image and text tokens form one sequence and attend over
one joint key set, so the "cross-attention" is the image-query × text-key slice of a larger
softmax. `image_text_slice` reduces joint probabilities to that slice; `joint_image_text_probs`
computes it from the joint queries and keys without materialising the image × image part when
it can. Rows of the raw slice sum to the share of attention each pixel gives the text (0.4-0.7
on random weights), not to 1; ``renormalize=True`` divides each row by that share, which is
exactly a softmax over the text keys alone (per head): the distribution over text positions
given that the pixel attends to text, comparable with a UNet's cross-attention.
`output_space_maps` is ConceptAttention's (Helbling et al., 2025) alternative: dot products of
attention *outputs*, softmaxed over the text or concept tokens.

`StepAccumulator` keeps, for the current denoising step only, a running mean over layers of
the head-averaged maps resized to the latent grid (plus optional per-layer or per-resolution
copies); `end_step` turns it into one ``[B, T, h, w]`` record. Memory is therefore
O(steps · B · T · h · w), never O(layers · heads · steps).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

COND, UNCOND = 0, 1  # ComfyUI's cond_or_uncond codes


# ---------------------------------------------------------------------------- probabilities
def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(scale · q kᵀ + mask) over the key axis.

    ``mask`` is additive (0 keeps, -inf or a large negative drops) or boolean (True keeps),
    broadcastable to ``[..., N, T]``. ``scale`` defaults to 1/√d. With ``upcast`` the scores and
    softmax are computed in float32 and returned as float32 (diffusers' ``upcast_attention``);
    without, in the query's dtype (PyTorch's half-precision softmax still accumulates in
    float32, so rows sum to 1 within fp16 rounding)."""
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key feature sizes differ: {query.shape[-1]} vs {key.shape[-1]}")
    if query.shape[:-2] != key.shape[:-2]:
        raise ValueError(f"query and key batch/head axes differ: {tuple(query.shape[:-2])} vs {tuple(key.shape[:-2])}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if upcast:
        query, key = query.float(), key.float()
    # Scaling the queries first keeps half-precision scores in range (and is one op less).
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    return scores.softmax(dim=-1)


def attention_output(probs: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """probs @ value, in the value's dtype (what the attention layer returns before ``to_out``)."""
    return torch.matmul(probs if probs.dtype == value.dtype else probs.to(value.dtype), value)


CAPTURE_METHODS = ("explicit", "sdpa")
_IDENTITY_CACHE: dict = {}


def attention_with_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    method: str = "explicit",
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention output ``[..., N, d]`` and the probabilities ``[..., N, T]`` in one go.

    ``"explicit"``: `attention_probs` then `attention_output`. ``"sdpa"``: one fused
    ``scaled_dot_product_attention`` call on the values with a T×T identity appended
    (softmax(·)·[V | I] = [softmax(·)·V | softmax(·)]), zero-padded to a multiple of 8 features
    so flash / memory-efficient kernels take it: the probabilities come out of the fused kernel.
    (Counted on a SD1.5-shaped UNet it dispatches one operation per layer more than
    "explicit", which is why the diffusers tap defaults to "explicit".) ``upcast``
    computes in float32 (explicit method only; SDPA kernels accumulate in float32 anyway)."""
    if method == "explicit":
        probs = attention_probs(query, key, scale=scale, mask=mask, upcast=upcast)
        return attention_output(probs, value), probs
    if method != "sdpa":
        raise ValueError(f"unknown capture method {method!r}; choose one of {CAPTURE_METHODS}")
    t, d = key.shape[-2], value.shape[-1]
    cache_key = (t, d, value.dtype, value.device)
    eye = _IDENTITY_CACHE.get(cache_key)
    if eye is None:
        eye = torch.zeros(t, t + (-(d + t)) % 8, dtype=value.dtype, device=value.device)
        eye[:, :t] = torch.eye(t, dtype=value.dtype, device=value.device)
        _IDENTITY_CACHE.clear()  # one model at a time: keep the cache from growing
        _IDENTITY_CACHE[cache_key] = eye
    extended = torch.cat([value, eye.expand(*value.shape[:-2], *eye.shape)], dim=-1)
    out = F.scaled_dot_product_attention(query, key, extended, attn_mask=mask, scale=scale)
    return out[..., :d], out[..., d : d + t]


# ---------------------------------------------------------------------------- joint attention
JOINT_CHUNK_BYTES = 64 * 2**20  # scores held at once by the raw (un-renormalised) joint slice


def _positions(s: slice, length: int) -> range:
    if not isinstance(s, slice) or s.step not in (None, 1):
        raise TypeError(f"positions must be a contiguous slice, got {s!r}")
    return range(*s.indices(length))


def image_text_slice(probs: torch.Tensor, image: slice, text: slice, renormalize: bool = True) -> torch.Tensor:
    """The image-query × text-key part ``[..., N_img, T]`` of joint attention probabilities
    ``[..., S, S]`` (queries and keys over one joint sequence, each row summing to 1).

    ``image`` / ``text`` are the positions of each in the joint sequence (SD3 in diffusers:
    ``[image, text]``; Flux: ``[text, image]``). ``renormalize`` divides each row by its sum,
    the pixel's share of attention on the text, so rows sum to 1 over the text positions."""
    if probs.ndim < 2:
        raise ValueError(f"joint probabilities must be [..., queries, keys], got {tuple(probs.shape)}")
    _positions(image, probs.shape[-2])
    _positions(text, probs.shape[-1])
    part = probs[..., image, text].float()
    if renormalize:
        part = part / part.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return part


def joint_image_text_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    image: slice,
    text: slice,
    scale: float | None = None,
    renormalize: bool = True,
    mean_heads: bool = False,
    chunk_bytes: int = JOINT_CHUNK_BYTES,
) -> torch.Tensor:
    """``image_text_slice(softmax(scale · q kᵀ), image, text, renormalize)`` from the joint
    queries and keys ``[B, H, S, d]``, in float32, without the S × S matrix: ``[B, H, N_img, T]``,
    or ``[B, N_img, T]`` averaged over heads with ``mean_heads``.

    Renormalised rows are a softmax over the text keys alone (the joint normaliser cancels). Raw
    rows need each image query's log-normaliser over *all* keys. Image queries are taken
    ``chunk_bytes`` of scores at a time, so the working memory stays bounded at any resolution."""
    if query.ndim != 4 or key.ndim != 4:
        raise ValueError(f"joint queries and keys must be [B, heads, S, d], got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.shape[-1] != key.shape[-1] or query.shape[:2] != key.shape[:2]:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} do not share batch, head and feature axes")
    img = _positions(image, query.shape[-2])
    txt = _positions(text, key.shape[-2])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    b, h = query.shape[:2]
    k_all = key if key.dtype == torch.float32 else key.float()
    k_text = k_all[:, :, text]
    keys = k_text if renormalize else k_all
    rows = max(1, int(chunk_bytes // max(1, 4 * b * h * keys.shape[-2])))

    def part(start: int, stop: int) -> torch.Tensor:
        q = query[:, :, img.start + start : img.start + stop]
        q = q if q.dtype == torch.float32 else q.float()
        # scores in place: scaling them costs no extra allocation (queries would)
        scores = torch.matmul(q, k_text.transpose(-1, -2)).mul_(scale)
        if renormalize:
            probs = scores.softmax(dim=-1)
        else:
            lse = torch.matmul(q, k_all.transpose(-1, -2)).mul_(scale).logsumexp(dim=-1, keepdim=True)
            probs = scores.sub_(lse).exp_()
        return probs.mean(dim=1) if mean_heads else probs

    if rows >= len(img):
        return part(0, len(img))  # the usual case: one chunk, no output buffer
    out = query.new_empty((b, len(img), len(txt)) if mean_heads else (b, h, len(img), len(txt)), dtype=torch.float32)
    for start in range(0, len(img), rows):
        stop = min(start + rows, len(img))
        if mean_heads:
            out[:, start:stop] = part(start, stop)
        else:
            out[:, :, start:stop] = part(start, stop)
    return out


def output_space_maps(image_out: torch.Tensor, token_out: torch.Tensor) -> torch.Tensor:
    """ConceptAttention's maps ``[B, N, K]``: for each image token, the softmax over the K text
    or concept tokens of the dot products of their attention outputs (``[B, N, D]`` after the
    image output projection, ``[B, K, D]`` after the text one), in float32."""
    if image_out.ndim != 3 or token_out.ndim != 3 or image_out.shape[0] != token_out.shape[0] or image_out.shape[-1] != token_out.shape[-1]:
        raise ValueError(
            f"attention outputs must be [B, N, D] and [B, K, D] with the same B and D, got {tuple(image_out.shape)} and {tuple(token_out.shape)}"
        )
    return torch.matmul(image_out.float(), token_out.float().transpose(-1, -2)).softmax(dim=-1)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, heads·d]`` → ``[B, heads, N, d]``."""
    b, n, inner = x.shape
    if inner % heads:
        raise ValueError(f"feature size {inner} is not divisible by {heads} heads")
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, heads, N, d]`` → ``[B, N, heads·d]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def head_mean(probs: torch.Tensor, heads: int | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mean over heads: ``[B, heads, N, T]`` or batch-major ``[B·heads, N, T]`` (give ``heads``)
    → ``[B, N, T]``, accumulated and returned in ``dtype`` (default: the input's). A 3-D tensor
    without ``heads`` is taken as already averaged."""
    if probs.ndim == 3 and heads not in (None, 1):
        if probs.shape[0] % heads:
            raise ValueError(f"batch·heads axis {probs.shape[0]} is not a multiple of {heads} heads")
        probs = probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])
    if probs.ndim == 4:
        return probs.mean(dim=1, dtype=dtype)
    if probs.ndim != 3:
        raise ValueError(f"attention probabilities must be [B, heads, N, T] or [B*heads, N, T], got {tuple(probs.shape)}")
    return probs if dtype is None else probs.to(dtype)


# ---------------------------------------------------------------------------- conditional / unconditional rows
def branch_rows(cond_or_uncond: Sequence[int], batch_rows: int, branch: int = COND) -> slice | list[int]:
    """Rows of a model batch that belong to ``branch`` (0 = conditional, 1 = unconditional).

    The batch is ``len(cond_or_uncond)`` equal chunks in the listed order (ComfyUI passes
    ``transformer_options["cond_or_uncond"]``; diffusers' classifier-free guidance is
    ``[1, 0]``: unconditional first; no guidance is ``[0]``). Returns a slice when the rows are
    contiguous, so selecting them costs no copy."""
    chunks = [int(c) for c in cond_or_uncond]
    if not chunks:
        raise ValueError("cond_or_uncond is empty: it must list each batch chunk as 0 (cond) or 1 (uncond)")
    if batch_rows % len(chunks):
        raise ValueError(f"a batch of {batch_rows} rows cannot be split into {len(chunks)} equal chunks {chunks}")
    per = batch_rows // len(chunks)
    picked = [i for i, c in enumerate(chunks) if c == branch]
    if not picked:
        return []
    if picked == list(range(picked[0], picked[-1] + 1)):
        return slice(picked[0] * per, (picked[-1] + 1) * per)
    return [r for i in picked for r in range(i * per, (i + 1) * per)]


def select_rows(x: torch.Tensor, rows: slice | Sequence[int]) -> torch.Tensor:
    if isinstance(rows, slice):
        return x[rows]
    return x[torch.as_tensor(list(rows), dtype=torch.long, device=x.device)]


# ---------------------------------------------------------------------------- spatial layout
def layer_grid(positions: int, latent_size: tuple[int, int], max_halvings: int = 8) -> tuple[int, int]:
    """(h_l, w_l) of a layer with ``positions`` image tokens in a UNet whose latent is
    ``latent_size``: each down-sampling halves both sides, rounding up (stride-2 convolutions
    with padding 1), which keeps non-square and odd sizes right."""
    h, w = int(latent_size[0]), int(latent_size[1])
    for k in range(max_halvings + 1):
        hk, wk = -(-h // 2**k), -(-w // 2**k)
        if hk * wk == positions:
            return hk, wk
    raise ValueError(
        f"cannot place {positions} image positions on a grid of a {h}×{w} latent; "
        "pass the layer's (h, w) explicitly"
    )


def to_maps(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, N, T]`` (N = h·w, row-major) → ``[B, T, h, w]``."""
    b, n, t = probs.shape
    h, w = size
    if h * w != n:
        raise ValueError(f"{n} image positions do not fill a {h}×{w} grid")
    return probs.transpose(1, 2).reshape(b, t, h, w)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``[B, T, h, w]`` maps to ``size`` (no-op when equal). Each output
    pixel is a convex combination of input pixels, so maps that sum to 1 over T still do."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


# ---------------------------------------------------------------------------- aggregation
class StepAccumulator:
    """Running mean over layers of one step's cross-attention, at latent resolution.

    ``add(name, probs, layer_size, heads=None)`` takes one layer's probabilities for the rows
    of one branch (``[B, heads, N, T]``, ``[B·heads, N, T]`` with ``heads``, or head-averaged
    ``[B, N, T]``); ``end_step()`` appends the step's ``[B, T, h, w]`` mean; ``discard_step()``
    drops what was added since (e.g. the second model call of a Heun step).

    ``keep_layers`` also keeps each layer's own map per step (keyed by ``name``);
    ``keep_resolutions`` keeps the mean per layer resolution (keyed ``"16x16"`` etc.).
    ``tokens`` cuts the context axis to its first positions (an int) or picks the listed
    positions (a sequence, e.g. SD3's CLIP part and T5 part) as each layer is added.
    Per step only a small ``[B, N_l, T]`` sum per resolution is kept, on the device it was
    computed on; `step_maps` / `records` / `layer_records` resize and move it to
    ``store_device`` as ``store_dtype`` after the run, so a GPU run never syncs per layer or step.

    Per-layer and per-resolution maps can cost far more than the mean (one ``[B, T, h_l, w_l]``
    per layer and step), so they can be cut further: ``layer_rows`` keeps only those rows of
    the added batch (e.g. the conditional branch), ``layer_tokens`` only those positions of the
    cut token axis, ``layer_dtype`` stores them in another dtype (default ``store_dtype``), and
    ``layer_device`` moves each step's maps there when the step ends, so the model's device holds
    one step's maps at most (from a GPU this waits for the step once: pinned memory would spare
    the wait but stays pinned in torch's host cache, up to twice the maps' size). Without
    ``layer_device`` they stay where they were computed until they are read."""

    def __init__(
        self,
        latent_size: tuple[int, int] | None = None,
        tokens: int | Sequence[int] | None = None,
        keep_layers: bool = False,
        keep_resolutions: bool = False,
        store_dtype: torch.dtype = torch.float32,
        store_device: str | torch.device = "cpu",
        layer_rows: slice | Sequence[int] | None = None,
        layer_tokens: Sequence[int] | None = None,
        layer_dtype: torch.dtype | None = None,
        layer_device: str | torch.device | None = None,
    ):
        self.latent_size = tuple(latent_size) if latent_size is not None else None
        self.tokens = tokens if tokens is None or isinstance(tokens, int) else [int(i) for i in tokens]
        self._picked: dict[torch.device, torch.Tensor] = {}
        self.keep_layers = keep_layers
        self.keep_resolutions = keep_resolutions
        self.store_dtype = store_dtype
        self.store_device = torch.device(store_device)
        self.layer_rows = layer_rows
        self.layer_tokens = None if layer_tokens is None else [int(i) for i in layer_tokens]
        self._layer_picked: dict[torch.device, torch.Tensor] = {}
        self.layer_dtype = store_dtype if layer_dtype is None else layer_dtype
        self.layer_device = None if layer_device is None else torch.device(layer_device)
        self._sums: dict[tuple[int, int, int], torch.Tensor] = {}  # (h, w, heads) -> this step's summed probabilities
        self._counts: dict[tuple[int, int, int], int] = {}
        self._shape: tuple[int, int] | None = None  # (rows, tokens) of this step
        self._count = 0
        self._layer_maps: dict[str, list[tuple[torch.Tensor, tuple[int, int]]]] = {}  # name -> this step's maps
        # per step: (sums by resolution, layer count, per-layer maps: finished dict, or raw entries to finish when read)
        self._steps: list[tuple] = []

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    @property
    def pending(self) -> int:
        """Layers added since the last `end_step`."""
        return self._count

    @property
    def moves_layers(self) -> bool:
        """Whether each step's per-layer maps are finished and moved when the step ends."""
        return self.layer_device is not None and (self.keep_layers or self.keep_resolutions)

    def add(
        self,
        name: str,
        probs: torch.Tensor,
        layer_size: tuple[int, int] | None = None,
        heads: int | None = None,
    ) -> None:
        # Called once per layer per model call, so it does as little as possible: one in-place
        # float32 addition of the raw probabilities into a per-(resolution, heads) sum on the
        # device. Head means, token cuts and resizing wait for end_step, once per resolution
        # (bilinear resizing is linear, so this equals the mean of the resized layers).
        if probs.ndim == 3:
            if heads not in (None, 1):
                if probs.shape[0] % heads:
                    raise ValueError(f"batch·heads axis {probs.shape[0]} is not a multiple of {heads} heads")
                probs = probs.view(probs.shape[0] // heads, heads, *probs.shape[1:])
            else:
                probs = probs.unsqueeze(1)
        elif probs.ndim != 4:
            raise ValueError(f"attention probabilities must be [B, heads, N, T] or [B*heads, N, T], got {tuple(probs.shape)}")
        probs = self._cut(probs)
        if layer_size is None:
            if self.latent_size is None:
                raise ValueError("the accumulator does not know the latent size yet; pass latent_size=")
            layer_size = layer_grid(probs.shape[2], self.latent_size)
        key = (int(layer_size[0]), int(layer_size[1]), probs.shape[1])
        summed = self._sums.get(key)
        if summed is None:
            if key[0] * key[1] != probs.shape[2]:
                raise ValueError(f"layer {name!r}: {probs.shape[2]} image positions do not fill a {key[0]}×{key[1]} grid")
            shape = (probs.shape[0], probs.shape[3])
            if self._shape is None:
                self._shape = shape
            elif self._shape != shape:
                raise ValueError(
                    f"layer {name!r} gives maps for {shape[0]} rows × {shape[1]} tokens but earlier layers of this "
                    f"step gave {self._shape[0]} × {self._shape[1]}; every layer of one step must see the same batch and context"
                )
            self._sums[key] = probs.to(torch.float32, copy=True)
            self._counts[key] = 1
        elif summed.shape != probs.shape:
            raise ValueError(
                f"layer {name!r} gives probabilities of shape {tuple(probs.shape)} but earlier layers of this step at "
                f"its resolution gave {tuple(summed.shape)}; every layer of one step must see the same batch and context"
            )
        else:
            summed.add_(probs)
            self._counts[key] += 1
        self._count += 1
        if self.keep_layers:
            rows = probs if self.layer_rows is None else select_rows(probs, self.layer_rows)
            self._layer_maps.setdefault(name, []).append((self._head_mean(rows), key[:2]))

    def _cut(self, probs: torch.Tensor) -> torch.Tensor:
        """The kept context positions (a view for a prefix cut, so adding stays one operation)."""
        if self.tokens is None:
            return probs
        if isinstance(self.tokens, int):
            return probs[..., : self.tokens]
        index = self._picked.get(probs.device)
        if index is None:
            if self.tokens and max(self.tokens) >= probs.shape[-1]:
                raise ValueError(f"kept positions reach {max(self.tokens)} but the context has {probs.shape[-1]}")
            index = self._picked[probs.device] = torch.tensor(self.tokens, dtype=torch.long, device=probs.device)
        return probs.index_select(-1, index)

    def _head_mean(self, summed: torch.Tensor, count: int = 1) -> torch.Tensor:
        """[B, heads, N, T] sum over ``count`` layers → [B, N, T] float32 mean (tokens already cut)."""
        mean = summed.mean(dim=1, dtype=torch.float32)
        return mean / count if count != 1 else mean

    def end_step(self) -> int:
        """Close the step and return its index. Only reduces each resolution's sum over heads
        (and cuts the context); resizing to the latent grid waits for `step_maps` / `records`,
        after the run, so a step costs a couple of operations per resolution. Per-layer maps
        are finished and moved now when ``layer_device`` is set."""
        if self._count == 0:
            raise RuntimeError(
                "no cross-attention was recorded during this step; is another attention processor "
                "replacing the tap's, or does the model have no cross-attention?"
            )
        by_size: dict[tuple[int, int], list] = {}
        for (h, w, heads), summed in self._sums.items():
            layer_sum = self._head_mean(summed)  # [B, N, T]: sum over layers of head means
            entry = by_size.get((h, w))
            if entry is None:
                by_size[(h, w)] = [layer_sum, self._counts[(h, w, heads)]]
            else:
                entry[0] = entry[0] + layer_sum
                entry[1] += self._counts[(h, w, heads)]
        layers = dict(self._layer_maps)
        if self.moves_layers:
            layers = self._layer_step_maps(by_size, layers, self.layer_device)
        self._steps.append((by_size, self._count, layers))
        self.discard_step()
        return len(self._steps) - 1

    def _layer_step_maps(self, by_size: dict, entries: dict, device: torch.device) -> dict[str, torch.Tensor]:
        """One step's per-resolution and per-layer maps ``[B_l, T_l, h_l, w_l]`` as ``layer_dtype`` on ``device``."""
        layers: dict[str, torch.Tensor] = {}
        if self.keep_resolutions:
            for size, (layer_sum, n) in by_size.items():
                rows = layer_sum if self.layer_rows is None else select_rows(layer_sum, self.layer_rows)
                layers[f"{size[0]}x{size[1]}"] = self._finish_layer(to_maps(self._layer_cut(rows) / n, size), device)
        for name, maps in entries.items():
            size = maps[0][1]
            mean = torch.stack([e[0] for e in maps]).mean(0) if len(maps) > 1 else maps[0][0]
            layers[name] = self._finish_layer(to_maps(self._layer_cut(mean), size), device)
        return layers

    def _layer_cut(self, maps: torch.Tensor) -> torch.Tensor:
        """``[B, N, T]`` → the ``layer_tokens`` positions of T."""
        if self.layer_tokens is None:
            return maps
        if self.layer_tokens == list(range(len(self.layer_tokens))):
            return maps[..., : len(self.layer_tokens)]
        index = self._layer_picked.get(maps.device)
        if index is None:
            index = self._layer_picked[maps.device] = torch.tensor(self.layer_tokens, dtype=torch.long, device=maps.device)
        return maps.index_select(-1, index)

    def _finish_layer(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        t = t.detach().to(self.layer_dtype)  # cast where it is: less to move
        return t.contiguous() if t.device == device else t.to(device)

    def step_map(self, index: int) -> torch.Tensor:
        """Step ``index``'s mean map ``[B, T, h, w]`` at latent resolution (``store_dtype`` on ``store_device``)."""
        if self.latent_size is None:
            raise ValueError("the accumulator does not know the latent size; pass latent_size=")
        by_size, count, _ = self._steps[index]
        total = None
        for size, (layer_sum, _) in by_size.items():
            resized = resize_maps(to_maps(layer_sum, size), self.latent_size)
            total = resized if total is None else total + resized
        return self._finish(total / count)

    def step_maps(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Step ``index``'s mean map ``[B, T, h, w]`` at latent resolution, and its per-layer /
        per-resolution maps at their own resolutions (as ``layer_dtype``, on ``layer_device``
        or else ``store_device``)."""
        return self.step_map(index), self.layer_maps(index)

    def layer_maps(self, index: int) -> dict[str, torch.Tensor]:
        """Step ``index``'s per-layer / per-resolution maps (see `step_maps`)."""
        by_size, _, layers = self._steps[index]
        if self.moves_layers:
            return dict(layers)
        return self._layer_step_maps(by_size, layers, self.store_device)

    def take_layer_maps(self, index: int) -> dict[str, torch.Tensor]:
        """`layer_maps` of step ``index``, which the accumulator then no longer holds (frees them
        once the caller drops them)."""
        maps = self.layer_maps(index)
        by_size, count, _ = self._steps[index]
        self._steps[index] = (by_size, count, {})
        return maps

    def held_layer_bytes(self) -> int:
        """Bytes of the finished steps' per-layer maps this accumulator still holds."""
        total = 0
        for _, _, layers in self._steps:
            for value in layers.values():
                total += value.nbytes if isinstance(value, torch.Tensor) else sum(e[0].nbytes for e in value)
        return total

    def pending_layer_bytes(self) -> int:
        """Bytes of the running step's per-layer maps (held until the step ends)."""
        return sum(e[0].nbytes for entries in self._layer_maps.values() for e in entries)

    def discard_step(self) -> None:
        self._sums = {}
        self._counts = {}
        self._shape = None
        self._count = 0
        self._layer_maps = {}

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device=self.store_device, dtype=self.store_dtype)

    def records(self) -> torch.Tensor | None:
        """``[S, B, T, h, w]`` on ``store_device``, or None before the first step."""
        if not self._steps:
            return None
        return torch.stack([self.step_map(i) for i in range(len(self._steps))])

    def layer_records(self) -> dict[str, torch.Tensor]:
        """name → ``[S, B, T, h_l, w_l]`` for layers (or resolutions) seen in every step."""
        per_step = [self.layer_maps(i) for i in range(len(self._steps))]
        names = set(per_step[0]) if per_step else set()
        for layers in per_step[1:]:
            names &= set(layers)
        return {name: torch.stack([layers[name] for layers in per_step]) for name in sorted(names)}
