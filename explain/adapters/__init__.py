"""Framework adapters: each translates one framework's models and runs into the core's `Trace`
and `GuidedDenoiser`. The ComfyUI adapter lives with the node pack (``nodes/``), since the core
never imports ComfyUI."""
