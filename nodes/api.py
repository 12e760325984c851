"""ComfyUI's node API (the V3 schema), from one place.

Imported from the numbered module ``comfy_api.v0_0_2`` rather than ``comfy_api.latest``, as
ComfyUI's V3 migration guide advises: ``latest`` is the version still under development and
changes without warning. ``v0_0_2`` exists from ComfyUI 0.3.48 (July 2025) and is still there,
re-exporting the same ``io`` and ``ComfyExtension``, in the newest version read (0.38.1, which
added ``v0_0_3``)."""

from comfy_api.v0_0_2 import ComfyExtension, io  # noqa: F401

__all__ = ["ComfyExtension", "io"]
