"""Taps: adapters that watch a framework's denoising run and translate it into a `Trace`.

* `explain.taps.diffusers`: a context manager for diffusers Stable Diffusion 1.x/2.x and SDXL
  pipelines (``with trace(pipe) as tr: pipe(...)``), and `generate`, the one-call helper the
  CLI, the Gradio app and the benchmarks share.

Taps never leave a model changed: everything they patch is restored on exit, also after an
exception.
"""
