"""diffusion-explain as a Gradio app: generate an image, then look at how it was denoised.

``python gradio_app.py`` serves it on http://127.0.0.1:7860, ``python gradio_app.py --share``
also prints a public link, and the repository runs as a Hugging Face Space as it is (the
README carries the Space's front matter; GPU work is wrapped in ``spaces.GPU`` when that
package is importable, for ZeroGPU).

A public app (a Space, ``--share``, or ``--host`` other than this machine) offers only the
models the operator lists (``--models``, default ``--model``), never an arbitrary folder or hub
id unless ``--allow-any-model`` says so, and bounds each request and the traces it keeps
(`explain_app.inputs.PUBLIC_LIMITS`, each bound its own option). A local app takes any model.

This file is only the entry point; the app is the `explain_app` package, and every number and
picture in it comes from the ``explain`` core.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import threading

from explain.cli import positive_int
from explain_app import inputs
from explain_app.inputs import DEFAULT_MODEL
from explain_app.session import (
    LOCAL_POLICY,
    MODELS,
    ModelPolicy,
    configure,
    is_public,
    public_policy,
)
from explain_app.ui import build_app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="diffusion-explain: the Gradio app")
    parser.add_argument("--share", action="store_true", help="also serve a public gradio.live link (a public app: see --models)")
    parser.add_argument("--host", default=None, help="address to listen on (default 127.0.0.1; 0.0.0.0 for a LAN, which makes a public app)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860 or the next free one)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="the default model: 'embedded' (shapes UNet), 'embedded-dit' (shapes MMDiT), a diffusers folder or a hub id")
    parser.add_argument("--models", default=None, metavar="LIST",
                        help="comma-separated models visitors may choose, e.g. embedded,embedded-dit (default on a public app: --model only)")
    parser.add_argument("--allow-any-model", action="store_true",
                        help="on a public app, let visitors enter any diffusers folder or hub id on this server (they can then probe its paths)")
    parser.add_argument("--fixed-model", action="store_true", help="users cannot change the model")
    parser.add_argument("--no-preload", action="store_true", help="load the model at the first request, not at start")
    defaults = inputs.PUBLIC_LIMITS
    bounds = parser.add_argument_group("bounds of one request and of the trace store (defaults: local / public app)")
    for name, field, unit in (("--max-steps", "max_steps", "denoising steps"), ("--max-size", "max_side", "image side, px"),
                              ("--max-masks", "max_masks", "DF-RISE masks"), ("--max-traces", "max_traces", "sessions whose trace is kept"),
                              ("--max-trace-mb", "max_trace_mb", "MB of traces kept in all"), ("--max-upload-mb", "max_upload_mb", "MB of a trace file to open")):
        bounds.add_argument(name, type=positive_int, default=None, dest=field,
                            help=f"{unit} (default {getattr(inputs.LOCAL_LIMITS, field)} / {getattr(defaults, field)})")
    return parser


def settings(args) -> tuple[ModelPolicy, inputs.Limits, bool]:
    """The model policy, the limits and whether the app is public, from the options and the environment."""
    public = is_public(args.share, args.host)
    listed = [m.strip() for m in (args.models or "").split(",") if m.strip()]
    if args.fixed_model:
        listed = [args.model]
    if public:
        policy = public_policy([args.model, *listed], allow_any=args.allow_any_model and not args.fixed_model)
    elif listed:
        policy = ModelPolicy(tuple(dict.fromkeys([args.model, *listed])), allow_any=False)
    else:
        policy = LOCAL_POLICY
    limits = inputs.PUBLIC_LIMITS if public else inputs.LOCAL_LIMITS
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(limits) if getattr(args, f.name, None) is not None}
    return policy, dataclasses.replace(limits, **overrides), public


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    policy, limits, public = settings(args)
    configure(policy=policy, limits=limits)
    offered = "any folder or hub id" if policy.allow_any else ", ".join(policy.choices)
    inputs.LOG.info("%s app; models: %s; %s", "public" if public else "local", offered, limits.describe())
    if not args.no_preload:
        # loading takes most of the first request's time; start it while the page opens
        threading.Thread(target=_preload, args=(args.model,), daemon=True).start()
    demo = build_app(default_model=args.model, allow_model_choice=not args.fixed_model)
    demo.launch(share=args.share, server_name=args.host, server_port=args.port, max_file_size=f"{limits.max_upload_mb}mb")


def _preload(spec: str) -> None:
    try:
        MODELS.get(spec)
    except Exception as exc:  # noqa: BLE001 - the first request will show the error in the UI
        inputs.LOG.warning("could not preload the model %r: %s", spec, " ".join(str(exc).split()))


def _log_to_stderr() -> None:
    """The app's one-line messages (refused input, models that did not load) on stderr."""
    log = inputs.LOG
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False



if __name__ == "__main__":
    main()
