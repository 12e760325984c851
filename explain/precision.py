"""Which floating-point type a model runs in when the user says ``auto``, and why.

On a CPU with native bf16 matrix instructions (AVX512-BF16, AMX) a Stable Diffusion UNet runs
several times faster in bfloat16 than in float32, and the maps the project draws agree with
fp32 to a rank correlation of 0.99 or better (``benchmarks/bench_precision.py`` measures both on
every model family we ship tests for). Elsewhere bf16 is emulated and slower, so ``auto`` keeps
float32 there. On CUDA, external models run in float16 as diffusers users expect; the small
embedded models stay float32. The choice comes with a one-line reason the front ends print.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DtypeChoice:
    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).replace("torch.", "")


@lru_cache(maxsize=1)
def native_cpu_bf16() -> str | None:
    """The CPU's native bf16 matrix instructions ("AMX" or "AVX512-BF16"), or None."""
    cpu = getattr(torch, "cpu", None)
    try:
        if cpu is not None and cpu._is_amx_tile_supported():
            return "AMX"
        if cpu is not None and cpu._is_avx512_bf16_supported():
            return "AVX512-BF16"
        return None
    except AttributeError:  # older torch: read the kernel's flags instead
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(f.read().split())
    except OSError:
        return None
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX512-BF16" if "avx512_bf16" in flags else None


def choose_dtype(requested: str, device: str, external: bool) -> DtypeChoice:
    """The dtype for ``requested`` ("auto" or a name in `DTYPES`) on ``device``; ``external`` is
    True for models from outside the package (hub ids, folders)."""
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"unknown dtype {requested!r}; use auto, {', '.join(DTYPES)}")
        return DtypeChoice(DTYPES[requested], f"{requested}, as asked")
    if str(device).startswith("cuda"):
        if external:
            return DtypeChoice(torch.float16, "float16 on CUDA (pass --dtype float32 for full precision)")
        return DtypeChoice(torch.float32, "float32: the embedded models are small enough for full precision on a GPU")
    if str(device) == "cpu":
        native = native_cpu_bf16()
        if native:
            return DtypeChoice(
                torch.bfloat16,
                f"bfloat16: this CPU has native bf16 instructions ({native}), so it runs faster than float32 and its "
                "maps agree with float32 (rank correlation >= 0.99, benchmarks/bench_precision.py); "
                "pass --dtype float32 for float32",
            )
        return DtypeChoice(torch.float32, "float32: this CPU has no native bf16 instructions (bf16 would be emulated and slower)")
    return DtypeChoice(torch.float32, f"float32 on {device}")
