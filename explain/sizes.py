"""Image sizes a model can make, checked before any work: the CLI and the app share these.

A model's *geometry* is its VAE factor (image pixels per latent pixel) and the side it was
trained at. Both are read from the model folder's configs without loading any weights, so a
size the model cannot make is refused before the model loads; for a hub id the loaded
pipeline tells (`pipeline_geometry`).

A side must be a multiple of the VAE factor, at most `MAX_SIDE` (the largest image a trace
describes), and at most `MAX_TIMES_NATIVE` times the trained side unless the caller allows
any size: the embedded 64-px model asked for 2048 px ran for minutes and made noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from explain.trace import MAX_IMAGE_SIDE

MAX_SIDE = MAX_IMAGE_SIDE
MAX_TIMES_NATIVE = 2
DEFAULT_FACTOR = 8  # SD 1.x/2.x, SDXL, SD3, Flux


class SizeError(ValueError):
    """An image size the model cannot make; the message says which sizes it can."""


@dataclass(frozen=True)
class Geometry:
    factor: int  # image pixels per latent pixel
    native: int | None  # the side the model was trained at, in pixels (None: unknown)


def folder_geometry(folder: str | Path) -> Geometry | None:
    """The geometry of the diffusers model folder ``folder`` from its configs; None when they
    do not say (the pipeline then tells once loaded)."""
    folder = Path(folder)
    vae = _read_json(folder / "vae" / "config.json")
    if not vae or not isinstance(vae.get("block_out_channels"), list) or not vae["block_out_channels"]:
        return None
    factor = 2 ** (len(vae["block_out_channels"]) - 1)  # as diffusers' pipelines compute it
    for part in ("unet", "transformer"):
        config = _read_json(folder / part / "config.json")
        if config:
            return Geometry(factor, _native(config.get("sample_size"), factor))
    return Geometry(factor, None)


def spec_geometry(spec: str | None) -> Geometry | None:
    """The geometry of a model spec as `explain.adapters.diffusers.loading.load_model` takes
    it, when a folder holds it (the embedded model, a local folder); None for hub ids."""
    from explain.adapters.diffusers.loading import EMBEDDED_MODELS, embedded_key

    key = embedded_key(spec)
    if key is not None:
        from explain import embedded

        return folder_geometry(embedded.model_dir_for(EMBEDDED_MODELS[key][0]))
    path = Path(spec).expanduser()
    try:
        return folder_geometry(path) if path.is_dir() else None
    except OSError:
        return None


def pipeline_geometry(pipe) -> Geometry:
    factor = int(getattr(pipe, "vae_scale_factor", DEFAULT_FACTOR) or DEFAULT_FACTOR)
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(model, "config", None), "sample_size", None)
    if not isinstance(sample, (int, list, tuple)):  # Flux's transformer has none; its pipeline does
        sample = getattr(pipe, "default_sample_size", None)
    return Geometry(factor, _native(sample, factor))


def check_side(label: str, side: int, geometry: Geometry | None, model: str = "the model", allow_any: bool = False) -> str | None:
    """Refuse ``side`` (named ``label`` in the message) with a `SizeError` saying what to use;
    return a warning when the model was trained at another size, else None. Without a
    ``geometry`` (a hub model not loaded yet) only the upper bound is checked."""
    if side > MAX_SIDE:
        raise SizeError(f"{label} {side} is larger than {MAX_SIDE} px, the largest image diffusion-explain traces; use at most {MAX_SIDE}")
    if geometry is None:  # the rest needs the model's geometry: checked again once it is known
        return None
    factor, native = geometry.factor, geometry.native
    if side < factor:
        raise SizeError(f"{label} {side} is smaller than one latent pixel ({factor} px); use {native or factor * 8} or more")
    if side % factor:
        lower, upper = side // factor * factor, (side // factor + 1) * factor
        raise SizeError(f"{label} {side} is not a multiple of {factor} (the VAE's factor); use {lower} or {upper}")
    if native is None or side == native:
        return None
    if side > MAX_TIMES_NATIVE * native and not allow_any:
        raise SizeError(
            f"{label} {side}: {model} was trained at {native} px, and {side} px is {side / native:.3g} times that; each "
            f"step would cost about {(side / native) ** 2:.0f} times as much for an image it never learned to make. "
            f"Use at most {MAX_TIMES_NATIVE * native} px, or allow any size"
        )
    return f"{model} was trained at {native} px; at {side} px ({label}) its images and maps may be poor"


def _native(sample_size, factor: int) -> int | None:
    if isinstance(sample_size, (list, tuple)) and sample_size:
        sample_size = max(sample_size)
    return int(sample_size) * factor if isinstance(sample_size, int) and sample_size > 0 else None


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
