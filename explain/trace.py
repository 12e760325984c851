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
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_TAG = "diffusion-explain/trace"
SCHEMA_VERSION = 1

_PER_STEP = ("x_t", "x0", "attention", "attention_negative", "x_t_previews", "x0_previews")


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
        return cls(text=str(data["text"]), token_indices=[int(i) for i in data["token_indices"]])


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
        """Check that all shapes and image dtypes agree; raise `TraceFormatError` saying what is wrong."""
        if self.x_t.ndim != 5:
            raise TraceFormatError(f"x_t must be [steps, batch, channels, h, w], got shape {tuple(self.x_t.shape)}")
        s, b = self.x_t.shape[:2]
        h, w = self.x_t.shape[-2:]
        if s < 1:
            raise TraceFormatError("the trace has no steps; record at least one denoising step")
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
        elif self.concepts:
            raise TraceFormatError(f"the trace names {len(self.concepts)} concepts but has no concept_maps")
        for name, att in self.attention_layers.items():
            if att.ndim != 5 or tuple(att.shape[:2]) != (s, b):
                raise TraceFormatError(f"attention layer {name!r} must be [steps, batch, tokens, h, w]")
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
        for name in ("images", "x0_previews", "x_t_previews"):
            p = getattr(self, name)
            if p is not None and p.dtype != torch.uint8:
                raise TraceFormatError(
                    f"{name} must be uint8 RGB (0..255), got {p.dtype}; "
                    "convert floats in 0..1 with (x.clamp(0, 1) * 255).round().to(torch.uint8)"
                )
        return self

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
            "meta": self.meta,
        } | ({"concepts": list(self.concepts)} if self.concepts else {})

    def save(self, path: str | os.PathLike, attention_dtype: torch.dtype = torch.float16) -> Path:
        """Write the trace to ``path`` (a ``.safetensors`` file), atomically: an existing file is
        replaced only once the new one is complete."""
        from safetensors.torch import save_file

        self.validate()
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        metadata = {
            "format": FORMAT_TAG,
            "schema_version": str(SCHEMA_VERSION),
            "trace": json.dumps(self._header(), default=_json_default),
        }
        fd, tmp = tempfile.mkstemp(prefix=".trace-", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(self._tensors(attention_dtype), tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trace":
        """Read a trace written by `save`; raise `TraceFormatError` with the reason if the file
        is missing, not a safetensors file, from another program or from a newer schema."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise TraceFormatError(f"no trace file at {str(path)!r}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
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
        try:
            header = json.loads(metadata["trace"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise TraceFormatError(f"{path.name} has a damaged trace header ({exc})") from None
        return cls.from_parts(header, tensors, source=path.name)

    @classmethod
    def from_parts(cls, header: dict, tensors: dict[str, torch.Tensor], source: str = "trace") -> "Trace":
        for key in ("timesteps", "sigmas", "x_t", "x0"):
            if key not in tensors:
                raise TraceFormatError(f"{source} lacks the tensor {key!r}")
        try:
            words = [[Word.from_json(w) for w in wl] for wl in header["words"]]
            negative_words = [[Word.from_json(w) for w in wl] for wl in header.get("negative_words", [])]
            layers = {k.split("/", 1)[1]: v.float() for k, v in tensors.items() if k.startswith("attention_layers/")}
            trace = cls(
                prompts=list(header["prompts"]),
                tokens=[list(t) for t in header["tokens"]],
                words=words,
                timesteps=tensors["timesteps"],
                sigmas=tensors["sigmas"],
                x_t=tensors["x_t"].float(),
                x0=tensors["x0"].float(),
                attention=_float_or_none(tensors.get("attention")),
                negative_prompts=list(header.get("negative_prompts", [])),
                negative_tokens=[list(t) for t in header.get("negative_tokens", [])],
                negative_words=negative_words,
                attention_negative=_float_or_none(tensors.get("attention_negative")),
                attention_layers=layers,
                final_latent=_float_or_none(tensors.get("final_latent")),
                images=tensors.get("images"),
                x0_previews=tensors.get("x0_previews"),
                x_t_previews=tensors.get("x_t_previews"),
                meta=dict(header.get("meta", {})),
                concepts=[str(c) for c in header.get("concepts", [])],
                concept_maps=_float_or_none(tensors.get("concept_maps")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceFormatError(f"{source} has a damaged trace header ({exc!r})") from None
        return trace.validate()


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
