"""The ComfyUI adapter of diffusion-explain: node classes (ComfyUI's V3 schema) and the tap that
records into the core's `explain.trace.Trace`.

Importing this package imports nothing: `nodes.environment` (checked at load) is standard library
only, `nodes.pack` lists the nodes for ComfyUI and needs its V3 API (`nodes.api`), and the
adapter modules (`nodes.taps`, `nodes.comfy_denoiser`...) import ComfyUI inside functions."""
