"""Save Trace / Load Trace: the core's trace file (.safetensors + JSON header) in ComfyUI's
output folder, so the Gradio app and the CLI open what ComfyUI recorded."""

from __future__ import annotations

import copy
import json
import os
import struct
from pathlib import Path

from explain.trace import FORMAT_TAG, Trace

from .api import io
from .decode import add_decoded_images
from .runs import TraceHandle
from .tap_node import CATEGORY, TraceSocket

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


class ExplainSaveTrace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainSaveTrace",
            display_name="Explain Save Trace",
            category=CATEGORY,
            description=(
                "Saves the trace of the run that made LATENT as one .safetensors file (tensors plus a JSON header) in "
                "ComfyUI's output folder. Open it in the diffusion-explain Gradio app or with `python -m explain`. "
                "Connect the VAE to store the final images and decoded step previews too."
            ),
            is_output_node=True,
            inputs=[
                TraceSocket.Input("trace", tooltip="From an Explain Tap (or Explain Load Trace)."),
                io.String.Input(
                    "filename_prefix", default="diffusion-explain/trace",
                    tooltip="Where in the output folder: a sub-folder and a file name start; a counter is added.",
                ),  # fmt: skip
                io.Latent.Input("latent", optional=True, tooltip="The sampler's LATENT output (required for a Tap's trace)."),
                io.Vae.Input("vae", optional=True, tooltip="Decode the final images and per-step previews into the file."),
                io.Boolean.Input("previews", optional=True, default=True, tooltip="With a VAE: also decode x0 and x_t at every step."),
            ],
            outputs=[io.String.Output("path", display_name="path", tooltip="The saved file's full path.")],
        )

    @classmethod
    def execute(cls, trace, filename_prefix, latent=None, vae=None, previews=True):
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
        return io.NodeOutput(str(path), ui={"text": [relative]})


NO_TRACE_FILES = "(no trace files in the output folder yet)"


class ExplainLoadTrace(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = list_trace_files(output_directory())
        return io.Schema(
            node_id="DiffusionExplainLoadTrace",
            display_name="Explain Load Trace",
            category=CATEGORY,
            description="Loads a trace saved by Save Trace (or by the CLI / diffusers tap) from ComfyUI's output folder.",
            inputs=[
                io.Combo.Input(
                    "trace_file", options=files or [NO_TRACE_FILES],
                    tooltip="A trace file in ComfyUI's output folder (newest first); refresh the page after saving one.",
                ),  # fmt: skip
            ],
            outputs=[TraceSocket.Output("trace", display_name="trace", tooltip="The loaded trace, for the explanation nodes (leave their 'latent' unconnected).")],
        )

    @classmethod
    def fingerprint_inputs(cls, trace_file):
        try:
            stat = resolve_trace_path(trace_file, output_directory()).stat()
        except (OSError, ValueError):
            return trace_file
        return f"{trace_file}:{stat.st_mtime_ns}:{stat.st_size}"

    @classmethod
    def validate_inputs(cls, trace_file):
        try:
            path = resolve_trace_path(trace_file, output_directory())
        except ValueError as exc:
            return str(exc)
        if not path.is_file():
            return f"no trace file {trace_file!r} in the output folder; save one with the Save Trace node first"
        return True

    @classmethod
    def execute(cls, trace_file):
        path = resolve_trace_path(trace_file, output_directory())
        return io.NodeOutput(TraceHandle(trace=Trace.load(path), source=trace_file))
