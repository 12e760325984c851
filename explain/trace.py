"""The trace: what the taps saw during one denoising run, and the contract between taps and explanations.

A `Trace` holds, per denoising *step* (not per model call):

* ``timesteps[s]`` and ``sigmas[s]``: the scheduler's timestep and the noise level
  sigma = sqrt((1 - alpha_bar) / alpha_bar) of the latent entering step ``s``;
* ``x_t[s]``: that latent, ``[B, C, h, w]``;
* ``x0[s]``: the model's guided prediction of the clean latent at step ``s``;
* ``attention[s]``: per-token cross-attention probabilities of the conditional branch,
  averaged over heads and layers at latent resolution, ``[B, T, h, w]``;
* optionally ``attention_negative[s]`` (the unconditional / negative-prompt branch),
  ``attention_layers[name][s]`` (one layer or resolution, at its own resolution) and, for
  joint-attention models traced with concepts, ``concept_maps[s]`` ``[B, K, h, w]`` over the
  ``concepts`` (words that need not be in the prompt; ``meta["concept_maps"]`` says whether they
  are attention- or output-space maps).

``sigmas`` are in the scheduler's own terms, which ``meta["latent_space"]`` names: for "vp" and
"sigma" traces the k-diffusion σ above, for "flow" traces (SD3, Flux) the flow-matching σ in
[0, 1] of x_t = (1-σ)·x0 + σ·ε.

Token axis ``T`` is the text-encoder context as it was fed to the model, cut after the
last end-of-text token of the longest prompt, so position 0 is the start token.
``tokens[b][i]`` names position ``i`` and ``words[b]`` maps each prompt word to the
positions of its (sub-word) tokens.

A trace saves to one ``.safetensors`` file: tensors as tensors, everything else as JSON in
the file's metadata header, with a format tag and a schema version. Nothing is pickled.
Saving is deterministic: the same trace gives the same bytes (sorted keys, a fixed tensor
order), and the model is recorded by name, never by a local path (`shareable_model_name`).

A trace from someone else is untrusted input. `Trace.load` refuses a header larger than
`MAX_HEADER_BYTES` or nested deeper than `MAX_JSON_DEPTH` before parsing it, and `validate`
checks every text field's type, every tensor's dtype, shape and values (finite numbers only)
and every size in ``meta`` against the tensors it describes, within the ``MAX_*`` bounds
below; anything else is a `TraceFormatError` that says what is wrong.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import torch

FORMAT_TAG = "diffusion-explain/trace"
SCHEMA_VERSION = 1

_PER_STEP = ("x_t", "x0", "attention", "attention_negative", "x_t_previews", "x0_previews")

# What a trace may hold. These keep a small hostile file from making a reader allocate gigabytes
# (sizes in meta drive the pictures' sizes) or recurse without end, and sit far above real runs:
# SDXL at 1024 px has a 128x128 latent, Flux reads 512 tokens, a 1000-step DDPM run 1000 steps.
MAX_HEADER_BYTES = 16 * 2**20  # the safetensors JSON header, which carries the trace header
MAX_JSON_DEPTH = 32  # a trace's own header is 5 levels deep
MAX_STEPS = 10_000
MAX_BATCH = 256
MAX_CHANNELS = 1024
MAX_TOKENS = 4096
MAX_LATENT_SIDE = 512
MAX_VAE_FACTOR = 32  # SD/SDXL/SD3/Flux use 8, deep-compression autoencoders 32
MAX_IMAGE_SIDE = 4096
MAX_LAYERS = 1024

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_TENSOR_NAMES = ("timesteps", "sigmas", "x_t", "x0", "attention", "attention_negative", "final_latent", "images", "x0_previews", "x_t_previews")
_CONCEPT_TENSOR = "concept_maps"  # optional (joint-attention traces with concepts); one tensor, read beside the others
# meta keys that name the model: a local path there would tell everyone the file is shared with
# where the author keeps models (and their user name)
MODEL_KEYS = ("model", "model_source", "model_path", "model_name", "name_or_path", "_name_or_path", "pretrained_model_name_or_path", "checkpoint")


class TraceFormatError(ValueError):
    """A file or object is not a valid diffusion-explain trace."""


@dataclass
class Word:
    """One word of a prompt and the context positions of its tokens."""

    text: str
    token_indices: list[int]

    def to_json(self) -> dict:
        return {"text": self.text, "token_indices": list(self.token_indices)}

    @classmethod
    def from_json(cls, data: dict) -> "Word":
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise TraceFormatError(f"a word must be {{\"text\": string, \"token_indices\": [whole numbers]}}, got {_describe(data)}")
        indices = data.get("token_indices")
        if not isinstance(indices, list) or not all(_is_whole(i) for i in indices):
            raise TraceFormatError(f"word {data['text']!r} must list its token positions as whole numbers, got {_describe(indices)}")
        return cls(text=data["text"], token_indices=[int(i) for i in indices])


@dataclass
class Trace:
    prompts: list[str]
    tokens: list[list[str]]
    words: list[list[Word]]
    timesteps: torch.Tensor  # [S]
    sigmas: torch.Tensor  # [S]
    x_t: torch.Tensor  # [S, B, C, h, w]
    x0: torch.Tensor  # [S, B, C, h, w]
    attention: torch.Tensor | None = None  # [S, B, T, h, w]
    negative_prompts: list[str] = field(default_factory=list)
    negative_tokens: list[list[str]] = field(default_factory=list)
    negative_words: list[list[Word]] = field(default_factory=list)
    attention_negative: torch.Tensor | None = None  # [S, B, T', h, w]
    attention_layers: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [S, B, T, hl, wl]
    final_latent: torch.Tensor | None = None  # [B, C, h, w]
    images: torch.Tensor | None = None  # [B, H, W, 3] uint8, the final decoded images
    x0_previews: torch.Tensor | None = None  # [S, B, Hp, Wp, 3] uint8
    x_t_previews: torch.Tensor | None = None  # [S, B, Hp, Wp, 3] uint8
    meta: dict[str, Any] = field(default_factory=dict)
    concepts: list[str] = field(default_factory=list)  # names of concept_maps' K axis
    concept_maps: torch.Tensor | None = None  # [S, B, K, h, w]

    # ------------------------------------------------------------------ shape helpers
    @property
    def num_steps(self) -> int:
        return int(self.x_t.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.x_t.shape[1])

    @property
    def latent_size(self) -> tuple[int, int]:
        return int(self.x_t.shape[-2]), int(self.x_t.shape[-1])

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the generated image in pixels."""
        if "height" in self.meta and "width" in self.meta:
            return int(self.meta["height"]), int(self.meta["width"])
        if self.images is not None:
            return int(self.images.shape[1]), int(self.images.shape[2])
        factor = int(self.meta.get("vae_scale_factor", 8))
        h, w = self.latent_size
        return h * factor, w * factor

    def word(self, text: str, item: int = 0, negative: bool = False) -> Word:
        """The first word of prompt ``item`` equal to ``text`` (case-insensitive)."""
        words = (self.negative_words if negative else self.words)[item]
        wanted = text.strip().lower()
        for w in words:
            if w.text.lower() == wanted:
                return w
        available = ", ".join(repr(w.text) for w in words) or "(none)"
        which = "negative prompt" if negative else "prompt"
        raise KeyError(f"word {text!r} is not in the {which} of item {item}; its words are: {available}")

    def check_step(self, step: int) -> int:
        """Return ``step`` as a non-negative index, or raise a clear error."""
        n = self.num_steps
        if not isinstance(step, int) and not (isinstance(step, torch.Tensor) and step.numel() == 1):
            raise TypeError(f"step must be an integer, got {type(step).__name__}")
        step = int(step)
        if step < -n or step >= n:
            raise IndexError(f"step {step} is outside the trace, which has steps 0..{n - 1}")
        return step % n

    # ------------------------------------------------------------------ validation
    def validate(self) -> "Trace":
        """Check the types, dtypes, values and shapes of every part and the sizes in ``meta``;
        raise `TraceFormatError` saying what is wrong."""
        self._check_text()
        self._check_tensors()
        self._check_shapes()
        self._check_meta()
        self._check_geometry()
        return self

    def _check_text(self) -> None:
        for name in ("prompts", "negative_prompts", "concepts"):
            _check_strings(getattr(self, name), name)
        for name in ("tokens", "negative_tokens"):
            lists = getattr(self, name)
            if not isinstance(lists, (list, tuple)):
                raise TraceFormatError(f"{name} must be a list with one list of token strings per batch item, got {_describe(lists)}")
            for item, token_list in enumerate(lists):
                _check_strings(token_list, f"{name}[{item}]")
        for name in ("words", "negative_words"):
            lists = getattr(self, name)
            if not isinstance(lists, (list, tuple)) or not all(isinstance(wl, (list, tuple)) for wl in lists):
                raise TraceFormatError(f"{name} must be a list with one list of words per batch item, got {_describe(lists)}")
            for word in (word for wl in lists for word in wl):
                if not isinstance(word, Word) or not isinstance(word.text, str) or not all(_is_whole(i) for i in word.token_indices):
                    raise TraceFormatError(f"{name} must hold words (a text and whole-number token positions), got {_describe(word)}")
        if not isinstance(self.meta, dict):
            raise TraceFormatError(f"meta must be a JSON object (a dict), got {_describe(self.meta)}")
        if not isinstance(self.attention_layers, dict):
            raise TraceFormatError(f"attention_layers must map layer names to tensors, got {_describe(self.attention_layers)}")
        if len(self.attention_layers) > MAX_LAYERS:
            raise TraceFormatError(f"the trace has {len(self.attention_layers)} attention layers; a trace holds at most {MAX_LAYERS}")
        for name in self.attention_layers:
            if not isinstance(name, str) or not name:
                raise TraceFormatError(f"attention layer names must be non-empty strings, got {name!r}")

    def _check_tensors(self) -> None:
        """Every tensor holds numbers of the dtype its kind needs, all of them finite: a NaN in
        a latent or a map turns every figure made from it into NaN without a word."""
        _check_numbers("timesteps", self.timesteps, integers=True)
        _check_numbers("sigmas", self.sigmas)
        for name in ("x_t", "x0", "attention", "attention_negative", "concept_maps", "final_latent"):
            if getattr(self, name) is not None:
                _check_numbers(name, getattr(self, name))
        for name, t in self.attention_layers.items():
            _check_numbers(f"attention layer {name!r}", t)
        for name in ("images", "x0_previews", "x_t_previews"):
            p = getattr(self, name)
            if p is not None and not isinstance(p, torch.Tensor):
                raise TraceFormatError(f"{name} must be a tensor, got {_describe(p)}")
            if p is not None and p.dtype != torch.uint8:
                raise TraceFormatError(
                    f"{name} must be uint8 RGB (0..255), got {p.dtype}; "
                    "convert floats in 0..1 with (x.clamp(0, 1) * 255).round().to(torch.uint8)"
                )

    def _check_shapes(self) -> None:
        if self.x_t.ndim != 5:
            raise TraceFormatError(f"x_t must be [steps, batch, channels, h, w], got shape {tuple(self.x_t.shape)}")
        s, b = self.x_t.shape[:2]
        h, w = self.x_t.shape[-2:]
        if s < 1:
            raise TraceFormatError("the trace has no steps; record at least one denoising step")
        for size, axis, high in zip(self.x_t.shape, ("steps", "batch items", "channels", "latent rows", "latent columns"),
                                    (MAX_STEPS, MAX_BATCH, MAX_CHANNELS, MAX_LATENT_SIDE, MAX_LATENT_SIDE)):
            if not 1 <= size <= high:
                raise TraceFormatError(f"x_t {tuple(self.x_t.shape)} has {size} {axis}; a trace holds 1 to {high}")
        if self.x0.shape != self.x_t.shape:
            raise TraceFormatError(f"x0 shape {tuple(self.x0.shape)} differs from x_t shape {tuple(self.x_t.shape)}")
        for name in ("timesteps", "sigmas"):
            t = getattr(self, name)
            if t.ndim != 1 or t.shape[0] != s:
                raise TraceFormatError(f"{name} must have one entry per step ({s}), got shape {tuple(t.shape)}")
        if len(self.prompts) != b:
            raise TraceFormatError(f"{len(self.prompts)} prompts for a batch of {b}")
        if len(self.tokens) != b or len(self.words) != b:
            raise TraceFormatError(f"tokens/words must have one entry per batch item ({b})")
        # A trace without a negative branch leaves these empty.
        if any(lists and len(lists) != b for lists in (self.negative_tokens, self.negative_words)):
            raise TraceFormatError(
                f"negative_tokens/negative_words must be empty or have one entry per batch item ({b}), "
                f"got {len(self.negative_tokens)} and {len(self.negative_words)}"
            )
        if self.final_latent is not None and self.final_latent.shape != self.x_t.shape[1:]:
            raise TraceFormatError(
                f"final_latent must be one step of x_t {tuple(self.x_t.shape[1:])}, got {tuple(self.final_latent.shape)}"
            )
        for which, name, att, toks, word_lists in (
            ("prompt", "attention", self.attention, self.tokens, self.words),
            ("negative prompt", "attention_negative", self.attention_negative, self.negative_tokens, self.negative_words),
        ):
            if att is None:
                continue
            if att.ndim != 5 or tuple(att.shape[:2]) != (s, b) or tuple(att.shape[-2:]) != (h, w):
                raise TraceFormatError(
                    f"{name} must be [steps={s}, batch={b}, tokens, {h}, {w}], got {tuple(att.shape)}"
                )
            t = att.shape[2]
            if not 1 <= t <= MAX_TOKENS:
                raise TraceFormatError(f"{name} has {t} token positions; a trace holds 1 to {MAX_TOKENS}")
            if toks and any(len(tl) != t for tl in toks):
                raise TraceFormatError(f"{name} has {t} token positions but the token lists disagree")
            for word in (word for wl in word_lists for word in wl):
                if any(i < 0 or i >= t for i in word.token_indices):
                    raise TraceFormatError(
                        f"{which} word {word.text!r} points at token positions {word.token_indices}, "
                        f"outside the {t} positions of {name}"
                    )
        if self.concept_maps is not None:
            c = self.concept_maps
            if c.ndim != 5 or tuple(c.shape[:2]) != (s, b) or tuple(c.shape[-2:]) != (h, w) or c.shape[2] != len(self.concepts):
                raise TraceFormatError(
                    f"concept_maps must be [steps={s}, batch={b}, concepts={len(self.concepts)}, {h}, {w}], got {tuple(c.shape)}"
                )
            if not 1 <= c.shape[2] <= MAX_TOKENS:
                raise TraceFormatError(f"concept_maps has {c.shape[2]} concepts; a trace holds 1 to {MAX_TOKENS}")
        elif self.concepts:
            raise TraceFormatError(f"the trace names {len(self.concepts)} concepts but has no concept_maps")
        for name, att in self.attention_layers.items():
            if att.ndim != 5 or tuple(att.shape[:2]) != (s, b):
                raise TraceFormatError(f"attention layer {name!r} must be [steps, batch, tokens, h, w]")
            if not (1 <= att.shape[2] <= MAX_TOKENS and all(1 <= side <= MAX_LATENT_SIDE for side in att.shape[-2:])):
                raise TraceFormatError(
                    f"attention layer {name!r} {tuple(att.shape)} must have 1 to {MAX_TOKENS} token positions "
                    f"and sides of 1 to {MAX_LATENT_SIDE}"
                )
            # Word positions index every layer, so all must share the mean map's context.
            if self.attention is not None and att.shape[2] != self.attention.shape[2]:
                raise TraceFormatError(
                    f"attention layer {name!r} has {att.shape[2]} token positions but attention has "
                    f"{self.attention.shape[2]}; record all layers over the same (cut) context"
                )
        for name in ("x0_previews", "x_t_previews"):
            p = getattr(self, name)
            if p is not None and (p.ndim != 5 or tuple(p.shape[:2]) != (s, b) or p.shape[-1] != 3):
                raise TraceFormatError(f"{name} must be [steps, batch, H, W, 3], got {tuple(p.shape)}")
        if self.images is not None and (self.images.ndim != 4 or self.images.shape[0] != b or self.images.shape[-1] != 3):
            raise TraceFormatError(f"images must be [batch, H, W, 3], got {tuple(self.images.shape)}")

    def _check_meta(self) -> None:
        """The meta fields that readers compute with have their types; everything is JSON with
        finite numbers, nested at most `MAX_JSON_DEPTH` deep."""
        meta = self.meta
        _check_json_value(meta, "meta")
        for key, low in (("height", 1), ("width", 1), ("vae_scale_factor", 1), ("steps", 1), ("lam", 1), ("model_calls", 0), ("schedule_steps", 0)):
            if key in meta and not (_is_whole(meta[key]) and meta[key] >= low):
                raise TraceFormatError(f"meta {key} must be a whole number of at least {low}, got {meta[key]!r}")
        if "seed" in meta and not _is_whole(meta["seed"]):
            raise TraceFormatError(f"meta seed must be a whole number, got {meta['seed']!r}")
        for key in ("guidance", "guidance_scale", "guidance_rescale", "latent_scale_factor", "latent_shift_factor"):
            if key in meta and not (isinstance(meta[key], numbers.Real) and not isinstance(meta[key], bool)):
                raise TraceFormatError(f"meta {key} must be a number, got {meta[key]!r}")
        if "latent_scale_factor" in meta and meta["latent_scale_factor"] == 0:
            raise TraceFormatError("meta latent_scale_factor is 0; latents are divided by it before decoding")
        for key in ("model", "scheduler", "pipeline", "prediction_type", "latent_space", "schedule", "negative_prompt", "source", "family", "sampler"):
            if key in meta and not isinstance(meta[key], str):
                raise TraceFormatError(f"meta {key} must be a string, got {_describe(meta[key])}")
        for key in ("notes", "truncated_words"):
            if key in meta:
                _check_strings(meta[key], f"meta {key}")

    def _check_geometry(self) -> None:
        """The image sizes in ``meta`` are the latent's times the VAE factor: readers draw every
        picture at that size, so a size the tensors do not back would allocate for nothing."""
        h, w = self.latent_size
        meta = self.meta
        factor = meta.get("vae_scale_factor")
        if factor is not None and factor > MAX_VAE_FACTOR:
            raise TraceFormatError(f"meta vae_scale_factor is {factor}; VAE factors go from 1 to {MAX_VAE_FACTOR}")
        if ("height" in meta) != ("width" in meta):
            given, missing = ("height", "width") if "height" in meta else ("width", "height")
            raise TraceFormatError(f"meta has a {given} but no {missing}; a trace records both image sides or neither")
        if "height" in meta:
            height, width = int(meta["height"]), int(meta["width"])
            if factor is not None and (height, width) != (h * factor, w * factor):
                raise TraceFormatError(
                    f"meta says the image is {width}x{height} px, but the latent is {w}x{h} with VAE factor {factor}, "
                    f"which makes {w * factor}x{h * factor} px; the file is damaged or was edited"
                )
            if factor is None and (height % h or width % w or height // h != width // w or height // h > MAX_VAE_FACTOR):
                raise TraceFormatError(
                    f"meta says the image is {width}x{height} px, which is not the {w}x{h} latent times one "
                    f"VAE factor (1 to {MAX_VAE_FACTOR}); the file is damaged or was edited"
                )
        for name in ("images", "x0_previews", "x_t_previews"):
            p = getattr(self, name)
            if p is None:
                continue
            ph, pw = p.shape[-3:-1]
            high_h, high_w = min(MAX_IMAGE_SIDE, h * MAX_VAE_FACTOR), min(MAX_IMAGE_SIDE, w * MAX_VAE_FACTOR)
            if not (1 <= ph <= high_h and 1 <= pw <= high_w):
                raise TraceFormatError(
                    f"{name} are {pw}x{ph} px; for a {w}x{h} latent they must be 1 to {high_w}x{high_h} px "
                    f"(the latent times at most {MAX_VAE_FACTOR}, at most {MAX_IMAGE_SIDE} px)"
                )
        ih, iw = self.image_size
        if not (1 <= ih <= MAX_IMAGE_SIDE and 1 <= iw <= MAX_IMAGE_SIDE):
            raise TraceFormatError(f"the trace describes a {iw}x{ih} px image; a trace describes images of 1 to {MAX_IMAGE_SIDE} px a side")

    # ------------------------------------------------------------------ persistence
    def _tensors(self, attention_dtype: torch.dtype) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {
            "timesteps": self.timesteps.detach().to(torch.float64),
            "sigmas": self.sigmas.detach().to(torch.float64),
            "x_t": self.x_t.detach().float(),
            "x0": self.x0.detach().float(),
        }
        if self.attention is not None:
            out["attention"] = self.attention.detach().to(attention_dtype)
        if self.attention_negative is not None:
            out["attention_negative"] = self.attention_negative.detach().to(attention_dtype)
        for name, t in self.attention_layers.items():
            out[f"attention_layers/{name}"] = t.detach().to(attention_dtype)
        if self.concept_maps is not None:
            out["concept_maps"] = self.concept_maps.detach().to(attention_dtype)
        if self.final_latent is not None:
            out["final_latent"] = self.final_latent.detach().float()
        for name in ("images", "x0_previews", "x_t_previews"):
            t = getattr(self, name)
            if t is not None:
                out[name] = t.detach().to(torch.uint8)
        return {k: v.cpu().contiguous() for k, v in out.items()}

    def _header(self) -> dict[str, Any]:
        return {
            "prompts": list(self.prompts),
            "tokens": [list(t) for t in self.tokens],
            "words": [[w.to_json() for w in wl] for wl in self.words],
            "negative_prompts": list(self.negative_prompts),
            "negative_tokens": [list(t) for t in self.negative_tokens],
            "negative_words": [[w.to_json() for w in wl] for wl in self.negative_words],
            "meta": shareable_meta(self.meta),
        } | ({"concepts": list(self.concepts)} if self.concepts else {})

    def save(self, path: str | os.PathLike, attention_dtype: torch.dtype = torch.float16) -> Path:
        """Write the trace to ``path`` (a ``.safetensors`` file), atomically: an existing file is
        replaced only once the new one is complete. The same trace always gives the same bytes."""
        self.validate()
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        try:
            header = json.dumps(self._header(), default=_json_default, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            raise TraceFormatError(f"the trace's header cannot be stored as JSON ({exc})") from None
        metadata = {"format": FORMAT_TAG, "schema_version": str(SCHEMA_VERSION), "trace": header}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            write_safetensors(tmp, self._tensors(attention_dtype), metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, max_bytes: int | None = None) -> "Trace":
        """Read a trace written by `save`; raise `TraceFormatError` with the reason if the file
        is missing, larger than ``max_bytes``, not a safetensors file, from another program,
        from a newer schema, or damaged in any part (see `validate`)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        header = read_header(path, max_bytes=max_bytes)
        try:
            with safe_open(str(path), framework="pt") as f:
                names = [k for k in f.keys() if k in _TENSOR_NAMES or k.startswith("attention_layers/")]
                if len(names) > len(_TENSOR_NAMES) + MAX_LAYERS:
                    raise TraceFormatError(f"{path.name} holds {len(names)} trace tensors; a trace holds at most {len(_TENSOR_NAMES) + MAX_LAYERS}")
                tensors = {k: f.get_tensor(k) for k in names}
                if _CONCEPT_TENSOR in f.keys():
                    tensors[_CONCEPT_TENSOR] = f.get_tensor(_CONCEPT_TENSOR)
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
            if isinstance(exc, TraceFormatError):
                raise
            raise TraceFormatError(f"{path.name} is not a readable safetensors file ({exc})") from None
        return cls.from_parts(header, tensors, source=path.name)

    @classmethod
    def from_parts(cls, header: dict, tensors: dict[str, torch.Tensor], source: str = "trace") -> "Trace":
        """A validated trace from a parsed header and its tensors (as `load` reads them)."""
        if not isinstance(header, dict):
            raise TraceFormatError(f"{source} has a damaged trace header: it must be a JSON object, got {_describe(header)}")
        for key in ("timesteps", "sigmas", "x_t", "x0"):
            if key not in tensors:
                raise TraceFormatError(f"{source} lacks the tensor {key!r}")
        for key in ("prompts", "tokens", "words"):
            if key not in header:
                raise TraceFormatError(f"{source} has a damaged trace header: it has no {key!r}")
        for name, t in tensors.items():  # check before converting: .float() would turn bools and ints into numbers
            label = f"attention layer {name.split('/', 1)[1]!r}" if name.startswith("attention_layers/") else name
            try:
                _check_numbers(label, t, integers=name == "timesteps", uint8=name in ("images", "x0_previews", "x_t_previews"), finite=False)
            except TraceFormatError as exc:
                raise TraceFormatError(f"{source}: {exc}") from None
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise TraceFormatError(f"{source} has a damaged trace header: meta must be a JSON object, got {_describe(meta)}")
        try:
            trace = cls(
                prompts=header["prompts"],
                tokens=header["tokens"],
                words=_words_from_json(header["words"], "words"),
                timesteps=tensors["timesteps"],
                sigmas=tensors["sigmas"],
                x_t=tensors["x_t"].float(),
                x0=tensors["x0"].float(),
                attention=_float_or_none(tensors.get("attention")),
                negative_prompts=header.get("negative_prompts", []),
                negative_tokens=header.get("negative_tokens", []),
                negative_words=_words_from_json(header.get("negative_words", []), "negative_words"),
                attention_negative=_float_or_none(tensors.get("attention_negative")),
                attention_layers={k.split("/", 1)[1]: v.float() for k, v in tensors.items() if k.startswith("attention_layers/")},
                final_latent=_float_or_none(tensors.get("final_latent")),
                images=tensors.get("images"),
                x0_previews=tensors.get("x0_previews"),
                x_t_previews=tensors.get("x_t_previews"),
                meta=shareable_meta(meta),
                concepts=header.get("concepts", []),
                concept_maps=_float_or_none(tensors.get("concept_maps")),
            )
            return trace.validate()
        except TraceFormatError as exc:
            raise TraceFormatError(f"{source}: {exc}") from None


# ---------------------------------------------------------------------------- reading files
def read_header(path: str | os.PathLike, max_bytes: int | None = None) -> dict:
    """The parsed trace header of the file at ``path`` (prompts, tokens, words, meta), checked
    as far as it can be without reading the tensors: a cheap test of "is this a trace I can
    open" for file lists. Raises `TraceFormatError` saying what is wrong."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise TraceFormatError(f"no trace file at {str(path)!r}")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise TraceFormatError(f"{path.name} cannot be read ({exc.strerror or exc})") from None
    if max_bytes is not None and size > max_bytes:
        raise TraceFormatError(f"{path.name} is {_mib(size)}, more than the {_mib(max_bytes)} accepted here; open it with the CLI instead")
    try:
        with open(path, "rb") as f:
            prefix = f.read(8)
    except OSError as exc:
        raise TraceFormatError(f"{path.name} cannot be read ({exc.strerror or exc})") from None
    if len(prefix) < 8:
        raise TraceFormatError(f"{path.name} is not a readable safetensors file (it has only {len(prefix)} bytes)")
    (length,) = struct.unpack("<Q", prefix)
    if length > size - 8:
        raise TraceFormatError(f"{path.name} is not a readable safetensors file (its header would need {length} bytes; the file has {size})")
    if length > MAX_HEADER_BYTES:
        raise TraceFormatError(
            f"{path.name} has a {_mib(length)} header; a trace's header is at most {_mib(MAX_HEADER_BYTES)}, "
            "so this is not a trace diffusion-explain wrote"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise TraceFormatError(f"{path.name} is not a readable safetensors file ({exc})") from None
    if metadata.get("format") != FORMAT_TAG:
        raise TraceFormatError(
            f"{path.name} is a safetensors file but not a diffusion-explain trace "
            "(model weights, perhaps?); save one with Trace.save, the CLI or the Save Trace node"
        )
    if "schema_version" not in metadata:
        raise TraceFormatError(
            f"{path.name} has no trace schema version, so diffusion-explain did not write it (every "
            "trace it saves has one); save the trace again with Trace.save, the CLI or the Save Trace node"
        )
    try:
        version = int(metadata["schema_version"])
    except ValueError:
        raise TraceFormatError(f"{path.name} has an unreadable schema version") from None
    if version < 1:
        raise TraceFormatError(
            f"{path.name} claims trace schema {version}, which diffusion-explain never wrote (schemas start "
            "at 1); the file is damaged or from another program, save the trace again with Trace.save"
        )
    if version > SCHEMA_VERSION:
        raise TraceFormatError(
            f"{path.name} uses trace schema {version}, newer than this diffusion-explain "
            f"understands ({SCHEMA_VERSION}); upgrade diffusion-explain"
        )
    if "trace" not in metadata:
        raise TraceFormatError(f"{path.name} has no trace header; the file is damaged, save the trace again")
    try:
        return parse_header_json(metadata["trace"])
    except TraceFormatError as exc:
        raise TraceFormatError(f"{path.name} has a damaged trace header ({exc})") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of the JSON ``text`` nest, counted without parsing it
    (so without recursion) and without counting brackets inside strings."""
    skeleton = np.frombuffer(_JSON_STRING.sub("", text).encode("utf-8", "replace"), dtype=np.uint8)
    steps = np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64) - np.isin(skeleton, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def parse_header_json(text: str) -> Any:
    """``json.loads`` for untrusted headers: at most `MAX_HEADER_BYTES`, nested at most
    `MAX_JSON_DEPTH` deep (checked before parsing: the parser recurses), no NaN or infinities."""
    if not isinstance(text, str):
        raise TraceFormatError(f"the header must be JSON text, got {_describe(text)}")
    if len(text) > MAX_HEADER_BYTES:
        raise TraceFormatError(f"it has {len(text)} characters, more than {MAX_HEADER_BYTES}")
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise TraceFormatError(f"it is nested {depth} levels deep; a trace header nests at most {MAX_JSON_DEPTH}")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:  # only if the depth count above missed a way of nesting
        raise TraceFormatError(f"it is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as exc:
        raise TraceFormatError(str(exc)) from None


def _refuse_constant(name: str):
    raise ValueError(f"it holds {name}, which is not a number JSON allows; numbers in a trace are finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"it holds {text}, which overflows to {value}; numbers in a trace are finite")
    return value


# ---------------------------------------------------------------------------- writing files
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
                       torch.int64: "I64", torch.int32: "I32"}


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format, written deterministically. safetensors' own writer orders the
    metadata by a randomly seeded hash map, so one trace saved twice gave different bytes; here
    keys are sorted and tensors laid out widest dtype first, then by name (each starts at a
    multiple of its element size, as the format asks)."""
    if sys.byteorder != "little":  # the format is little-endian; let the library swap bytes
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
        return
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    entries: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TraceFormatError(f"cannot store {name} of dtype {t.dtype} in a trace")
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(entries, sort_keys=True, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for name in names:
            t = tensors[name].detach().cpu().contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)


# ---------------------------------------------------------------------------- sharing
def shareable_model_name(source: Any) -> Any:
    """A model's name fit for a shared file: a local path becomes its folder's name
    (``/home/ana/models/sd15`` → ``sd15``); a hub id (``org/name``) and plain names stay."""
    if not isinstance(source, str):
        return source
    text = source.strip()
    windows = bool(re.match(r"^[A-Za-z]:[\\/]", text)) or text.startswith("\\\\") or "\\" in text
    local = windows or text.startswith(("/", "~", ".", "file:")) or text.count("/") > 1
    if not local:
        return source
    name = (PureWindowsPath(text) if windows else PurePosixPath(text.removeprefix("file://").removeprefix("file:"))).name
    return name or "local model"


def shareable_meta(meta: dict) -> dict:
    """``meta`` with every model key (`MODEL_KEYS`, or ending in ``_path``) holding a name, not a path."""
    if not isinstance(meta, dict):
        return meta
    return {k: shareable_model_name(v) if isinstance(k, str) and (k in MODEL_KEYS or k.endswith("_path")) else v for k, v in meta.items()}


# ---------------------------------------------------------------------------- checks
def _is_whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    """A short description of an unexpected value for an error message."""
    if isinstance(value, (list, tuple)):
        odd = next((v for v in value if not isinstance(v, str)), None)
        inner = f" holding {type(odd).__name__} {_short(odd)}" if odd is not None else ""
        return f"a {type(value).__name__} of {len(value)}{inner}"
    return f"{type(value).__name__} {_short(value)}"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_strings(value: Any, name: str) -> None:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TraceFormatError(f"{name} must be a list of strings, got {_describe(value)}")


def _words_from_json(value: Any, name: str) -> list[list[Word]]:
    if not isinstance(value, list) or not all(isinstance(wl, list) for wl in value):
        raise TraceFormatError(f"{name} must be a list with one list of words per batch item, got {_describe(value)}")
    return [[Word.from_json(w) for w in wl] for wl in value]


def _check_numbers(name: str, t: Any, integers: bool = False, uint8: bool = False, finite: bool = True) -> None:
    """``t`` is a tensor of floats (or whole numbers where ``integers``, or uint8 pictures where
    ``uint8``), every one finite (checked only where ``finite``)."""
    if not isinstance(t, torch.Tensor):
        raise TraceFormatError(f"{name} must be a tensor, got {_describe(t)}")
    if uint8:
        return  # pictures: validate names the dtype they need
    if t.dtype not in _FLOAT_DTYPES and not (integers and t.dtype in (torch.int32, torch.int64)):
        kinds = "floating-point or whole numbers" if integers else "floating-point numbers (float16, bfloat16, float32 or float64)"
        raise TraceFormatError(f"{name} must hold {kinds}, got {t.dtype}")
    if finite and t.is_floating_point():
        bad = _count_non_finite(t)
        if bad:
            raise TraceFormatError(
                f"{name} holds {bad} NaN or infinite value{'s' if bad != 1 else ''}; a trace holds finite numbers only "
                "(an infinite guidance scale, a float16 overflow in the model or a damaged file gives these)"
            )


def _count_non_finite(t: torch.Tensor) -> int:
    # one step at a time: a mask of the whole tensor would double a large trace's memory
    parts = t.unbind(0) if t.ndim > 1 else (t,)
    return sum(int(part.numel() - torch.isfinite(part).sum()) for part in parts)


def _check_json_value(value: Any, name: str) -> None:
    """``value`` nests at most `MAX_JSON_DEPTH` deep, its keys are strings and its floats are
    finite (walked with a stack: a deeply nested value must not exhaust Python's)."""
    stack = [(value, 1, name)]
    while stack:
        item, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise TraceFormatError(f"{where} is nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str):
                    raise TraceFormatError(f"{where} has a key {key!r} that is not a string")
                if isinstance(inner, (dict, list, tuple, float)):
                    stack.append((inner, depth + 1, f"{where}.{key}"))
        elif isinstance(item, (list, tuple)):
            stack.extend((inner, depth + 1, f"{where}[{i}]") for i, inner in enumerate(item) if isinstance(inner, (dict, list, tuple, float)))
        elif isinstance(item, float) and not math.isfinite(item):
            raise TraceFormatError(f"{where} is {item}; numbers in a trace are finite")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _float_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (Path,)):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"cannot store {type(obj).__name__} in trace metadata")
