"""diffusion-explain as a Gradio app: generate an image, then look at how it was denoised.

``python gradio_app.py`` serves it on http://127.0.0.1:7860, ``python gradio_app.py --share``
also prints a public link, and the repository runs as a Hugging Face Space as it is (the
README carries the Space's front matter; GPU work is wrapped in ``spaces.GPU`` when that
package is importable, for ZeroGPU).

This file is only the entry point; the app is the `explain_app` package, and every number and
picture in it comes from the ``explain`` core.
"""

from __future__ import annotations

import argparse
import threading

from explain_app.inputs import DEFAULT_MODEL
from explain_app.session import MODELS
from explain_app.ui import build_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="diffusion-explain: the Gradio app")
    parser.add_argument("--share", action="store_true", help="also serve a public gradio.live link")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the model box's default: 'embedded', a diffusers folder or a hub id")
    parser.add_argument("--fixed-model", action="store_true", help="users cannot change the model (for public links)")
    parser.add_argument("--no-preload", action="store_true", help="load the model at the first request, not at start")
    args = parser.parse_args(argv)
    if not args.no_preload:
        # loading takes most of the first request's time; start it while the page opens
        threading.Thread(target=_preload, args=(args.model,), daemon=True).start()
    demo = build_app(default_model=args.model, allow_model_choice=not args.fixed_model)
    demo.launch(share=args.share, server_name=args.host, server_port=args.port)


def _preload(spec: str) -> None:
    try:
        MODELS.get(spec)
    except Exception as exc:  # noqa: BLE001 - the first request will show the error in the UI
        print(f"could not preload the model {spec!r}: {exc}")


if __name__ == "__main__":
    main()
