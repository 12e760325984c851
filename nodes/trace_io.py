"""Save Trace / Load Trace: the core's trace file (.safetensors + JSON header) in ComfyUI's
output folder, so the Gradio app and the CLI open what ComfyUI recorded."""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

from explain.trace import FORMAT_TAG, Trace

from .decode import add_decoded_images
from .runs import TraceHandle
from .tap_node import CATEGORY, TRACE_TYPE

MAX_LISTED = 2000  # trace files offered by Load Trace (newest first)


def output_directory() -> str:
    import folder_paths

    return folder_paths.get_output_directory()


def is_trace_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a trace file whose header the core can read (`explain.trace.read_header`:
    format tag, schema, the JSON header's size and depth; not the tensors), so Load Trace never
    offers a damaged or hostile file, and listing a folder of model weights stays cheap."""
    from explain.trace import TraceFormatError, read_header

    try:
        read_header(path)
    except (TraceFormatError, OSError):
        return False
    return True


def list_trace_files(root: str | os.PathLike) -> list[str]:
    """Trace files under ``root`` as ``/``-separated relative paths, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("*.safetensors"):
        if path.is_file() and is_trace_file(path):
            found.append((path.stat().st_mtime, path.relative_to(root).as_posix()))
    found.sort(reverse=True)
    return [name for _, name in found[:MAX_LISTED]]


def resolve_trace_path(name: str, root: str | os.PathLike) -> Path:
    """``name`` (relative to ``root``) as a path inside ``root``; refuses paths that leave it."""
    root = Path(root).resolve()
    path = (root / name).resolve()
    if root != path and root not in path.parents:
        raise ValueError(f"{name!r} is outside the output folder; pick a trace file from the list")
    return path


class ExplainSaveTrace:
    DESCRIPTION = (
        "Saves the trace of the run that made LATENT as one .safetensors file (tensors plus a JSON header) in "
        "ComfyUI's output folder. Open it in the diffusion-explain Gradio app or with `python -m explain`. "
        "Connect the VAE to store the final images and decoded step previews too."
    )
    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "trace": (TRACE_TYPE,),
                "filename_prefix": ("STRING", {"default": "diffusion-explain/trace"}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "The sampler's LATENT output (required for a Tap's trace)."}),
                "vae": ("VAE", {"tooltip": "Decode the final images and per-step previews into the file."}),
                "previews": ("BOOLEAN", {"default": True, "tooltip": "With a VAE: also decode x0 and x_t at every step."}),
            },
        }

    def save(self, trace, filename_prefix, latent=None, vae=None, previews=True):
        import folder_paths

        resolved = trace.resolve(latent)
        if vae is not None:
            resolved = add_decoded_images(copy.copy(resolved), vae, previews=bool(previews))
        out_dir = output_directory()
        h, w = resolved.image_size
        folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir, w, h)
        path = Path(folder) / f"{filename}_{counter:05}_.safetensors"
        resolved.save(path)
        relative = Path(subfolder, path.name).as_posix() if subfolder else path.name
        return {"ui": {"text": [relative]}, "result": (str(path),)}


class ExplainLoadTrace:
    DESCRIPTION = "Loads a trace saved by Save Trace (or by the CLI / diffusers tap) from ComfyUI's output folder."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (TRACE_TYPE,)
    RETURN_NAMES = ("trace",)

    @classmethod
    def INPUT_TYPES(cls):
        files = list_trace_files(output_directory())
        return {"required": {"trace_file": (files or ["(no trace files in the output folder yet)"],)}}

    @classmethod
    def IS_CHANGED(cls, trace_file):
        try:
            stat = resolve_trace_path(trace_file, output_directory()).stat()
        except (OSError, ValueError):
            return trace_file
        return f"{trace_file}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def VALIDATE_INPUTS(cls, trace_file):
        try:
            path = resolve_trace_path(trace_file, output_directory())
        except ValueError as exc:
            return str(exc)
        if not path.is_file():
            return f"no trace file {trace_file!r} in the output folder; save one with the Save Trace node first"
        return True

    def load(self, trace_file):
        path = resolve_trace_path(trace_file, output_directory())
        return (TraceHandle(trace=Trace.load(path), source=trace_file),)
