"""How long the Gradio app makes its users wait, with the embedded model.

    python benchmarks/bench_gradio_app.py            # the app's functions, then the served app
    python benchmarks/bench_gradio_app.py --no-http  # the functions only (no gradio needed)

Prints, for this machine (CPU or GPU, whichever torch picks, as the app does):

* the app's functions in one process: model load, a 20-step traced generation, the views of
  its trace (steps, words, concepts, R1), DF-RISE with 200 masks plus its insertion/deletion
  games, DF-CAM on the paper's layers with its games, the HTML report holding both;
* the served app, as a user meets it: from launch (the model preloading in the background,
  as ``python gradio_app.py`` does) to the first image of a click on Generate, through the
  queue, measured with ``gradio_client``.

The goal is a first result within ~20 s of start on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "a large red circle above a small blue square"


def timed(label: str, fn, rows: list):
    t = time.perf_counter()
    out = fn()
    rows.append((label, time.perf_counter() - t))
    print(f"  {label:<44} {rows[-1][1]:7.2f} s", flush=True)
    return out


def functions(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    import explain_app as app

    device = "cuda (" + torch.cuda.get_device_name(0) + ")" if torch.cuda.is_available() else f"cpu, {torch.get_num_threads()} threads"
    print(f"app functions, embedded model, {device}")
    rows: list = []
    models = app.ModelCache()
    timed("load model (imports included)", lambda: models.get("embedded"), rows)
    session = timed("generate + trace, 20 steps", lambda: app.generate(PROMPT, steps=20, model="embedded", models=models), rows)
    trace = session.trace
    timed("step view", lambda: app.step_view(trace, 10), rows)
    timed("word view (one word + all words)", lambda: app.word_view(trace, app.default_word(trace), "", 0, trace.num_steps - 1), rows)
    timed("concept curves", lambda: app.concept_frame(trace), rows)
    timed("R1 recovery view", lambda: app.recovery_views(trace), rows)
    from explain.methods import defaults

    timed(f"DF-RISE {defaults.RISE.n_masks} masks + insertion/deletion", lambda: app.rise_view(session, 10, models=models), rows)
    timed("DF-CAM, paper layers + insertion/deletion", lambda: app.cam_view(session, 10, "paper", models=models), rows)
    timed("HTML report (with both maps)", lambda: app.save_report(session), rows)
    first = rows[0][1] + rows[1][1]
    print(f"  => load + first generation: {first:.1f} s; views after it: {sum(r[1] for r in rows[2:6]):.1f} s")


def served(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    from gradio_client import Client

    import gradio_app

    threading.Thread(target=gradio_app._preload, args=("embedded",), daemon=True).start()
    demo = gradio_app.build_app()
    _, url, _ = demo.launch(prevent_thread_lock=True, quiet=True)
    t_served = time.perf_counter()
    client = Client(url, verbose=False)
    t_click = time.perf_counter()
    out = client.predict(PROMPT, "", 0, 20, 5.0, "model default", "uniform", 60, "embedded", api_name="/generate")
    t_image = time.perf_counter()
    assert PROMPT in out[1]
    t_click2 = time.perf_counter()
    client.predict(PROMPT, "", 1, 20, 5.0, "model default", "uniform", 60, "embedded", api_name="/generate")
    t_image2 = time.perf_counter()
    demo.close()
    print("served app (fresh process, model preloading at launch)")
    print(f"  {'start -> serving':<44} {t_served - t_start:7.2f} s")
    print(f"  {'serving -> first image (click at once)':<44} {t_image - t_click:7.2f} s")
    print(f"  {'start -> first image':<44} {t_image - t_start:7.2f} s")
    print(f"  {'second click -> image':<44} {t_image2 - t_click2:7.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-http", action="store_true", help="time the functions only")
    parser.add_argument("--http-only", action="store_true", help="time the served app only")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if not args.http_only:
        functions(args.threads)
    if not args.no_http:
        # a fresh interpreter, so that imports and the model load count as a user would meet them
        import subprocess

        cmd = [sys.executable, __file__, "--http-only"] + (["--threads", str(args.threads)] if args.threads else [])
        if args.http_only:
            served(args.threads)
        else:
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
