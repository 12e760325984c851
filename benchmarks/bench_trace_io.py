#!/usr/bin/env python
"""What the checks of an untrusted trace cost (issue 17): `Trace.load` against a plain read of
the same file (safetensors + ``json.loads`` + the float32 conversions, no checks), and the deterministic writer of
`Trace.save` against safetensors' own ``save_file``. Process CPU time, best of a few repeats,
one run.

    python benchmarks/bench_trace_io.py                    # SD 1.5 512 px-shaped: 64x64 latent, 77 tokens, 20 steps
    python benchmarks/bench_trace_io.py --latent 128 --steps 30
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain.trace import Trace, Word, write_safetensors  # noqa: E402


def sd_shaped_trace(steps: int, latent: int, tokens: int = 77) -> Trace:
    g = torch.Generator().manual_seed(0)
    att = torch.rand(steps, 1, tokens, latent, latent, generator=g)
    return Trace(
        prompts=["a red circle above a blue square"],
        tokens=[[f"t{i}</w>" for i in range(tokens)]],
        words=[[Word("circle", [3])]],
        timesteps=torch.linspace(999, 1, steps, dtype=torch.float64),
        sigmas=torch.linspace(14.6, 0.03, steps, dtype=torch.float64),
        x_t=torch.randn(steps, 1, 4, latent, latent, generator=g),
        x0=torch.randn(steps, 1, 4, latent, latent, generator=g),
        attention=att / att.sum(2, keepdim=True),
        attention_negative=att.clone(),
        images=torch.randint(0, 255, (1, latent * 8, latent * 8, 3), dtype=torch.uint8, generator=g),
        x0_previews=torch.randint(0, 255, (steps, 1, 256, 256, 3), dtype=torch.uint8, generator=g),
        meta={"height": latent * 8, "width": latent * 8, "vae_scale_factor": 8, "model": "sd15", "guidance": 7.5},
    ).validate()


def cpu_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def plain_read(path: Path):
    """What loading did before the checks: read, parse, latents and maps as float32."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["trace"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    floats = {k: v.float() for k, v in tensors.items() if v.is_floating_point()}
    return header, tensors, floats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--latent", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    trace = sd_shaped_trace(args.steps, args.latent)
    with tempfile.TemporaryDirectory() as folder:
        path = trace.save(Path(folder) / "t.safetensors")
        print(f"trace: {args.steps} steps, {args.latent}x{args.latent} latent, file {path.stat().st_size / 2**20:.1f} MiB")
        plain = cpu_seconds(lambda: plain_read(path), args.repeats)
        checked = cpu_seconds(lambda: Trace.load(path), args.repeats)
        print(f"read: plain {plain * 1000:.0f} ms, Trace.load with every check {checked * 1000:.0f} ms ({checked / plain:.2f}x)")
        from safetensors.torch import save_file

        tensors = trace._tensors(torch.float16)
        metadata = {"format": "x", "trace": json.dumps(trace._header(), sort_keys=True)}
        library = cpu_seconds(lambda: save_file(tensors, str(Path(folder) / "a.safetensors"), metadata=metadata), args.repeats)
        ours = cpu_seconds(lambda: write_safetensors(Path(folder) / "b.safetensors", tensors, metadata), args.repeats)
        print(f"write: safetensors save_file {library * 1000:.0f} ms, deterministic writer {ours * 1000:.0f} ms ({ours / library:.2f}x)")
        validate = cpu_seconds(trace.validate, args.repeats)
        print(f"validate alone (what each tap run and save adds): {validate * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
