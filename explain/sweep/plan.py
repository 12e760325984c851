"""Who runs which prompt with which seed: seeds from the rows, shards from accelerate.

* **Seeds.** A prompt's seed is the row's own ``seed``, else a hash of the sweep seed and the
  row's stable id (`prompt_seed`), or, under ``--protocol paper``, the paper's fixed latent seed.
  Never the process rank or the position in a shard: a prompt gives the same result whether one
  process ran the sweep or eight.
* **Order.** Prompts run in a fixed pseudo-random order (sorted by a hash of their id): the
  processes' shares are then alike in cost even when an analysis runs on the file's first rows
  only, and a sweep stopped half-way has done a random sample of the file, not its first half.
* **Shards.** Under ``accelerate launch`` (or ``torchrun``) the pending prompts are split with
  accelerate's ``PartialState().split_between_processes``; one process on its own needs no
  accelerate at all. There is no context parallelism: each prompt runs whole on one device,
  since splitting the sequence would split the attention being recorded.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Sequence

INSTALL_HINT = "pip install accelerate (or pip install 'diffusion-explain[sweep]')"


def prompt_seed(sweep_seed: int, row_id: str) -> int:
    """A 31-bit seed from the sweep seed and a row id (stable across runs, machines, Python versions)."""
    digest = hashlib.blake2b(f"{int(sweep_seed)}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF


def resolve_seed(row, sweep_seed: int, fixed_seed: int | None = None) -> int:
    if row.seed is not None:
        return int(row.seed)
    if fixed_seed is not None:
        return int(fixed_seed)
    return prompt_seed(sweep_seed, row.id)


def run_order(rows: Sequence) -> list:
    """Rows in the sweep's fixed pseudo-random order (by a hash of their id)."""
    return sorted(rows, key=lambda r: (hashlib.blake2b(r.id.encode(), digest_size=8).digest(), r.id))


def contiguous_split(items: Sequence, rank: int, world: int) -> list:
    """Contiguous near-equal parts, the first ones one longer (what accelerate does)."""
    n = len(items)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (1 if rank < extra else 0)])


@dataclass
class Processes:
    """This process's place among the sweep's processes, over accelerate's `PartialState` when
    there are several (or accelerate is installed), else a single process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: str = "cpu"
    state: Any = None  # accelerate.PartialState or None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def split(self, items: Sequence) -> list:
        if self.state is None or self.world == 1:
            return list(items)
        with self.state.split_between_processes(list(items)) as part:
            return list(part)

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    def local_world(self) -> int:
        try:
            return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        except ValueError:
            return 1


def launched_world() -> int:
    """The number of processes a launcher (accelerate, torchrun) started, from its environment."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


class LaunchError(ValueError):
    """A launch the sweep cannot run in; the message says what to install or pass."""


def processes(device: str = "auto") -> Processes:
    """Join the launcher's process group (accelerate's ``PartialState``: NCCL on GPUs, gloo on
    CPUs), or stand alone.

    Several processes without accelerate installed is an error that says how to install it;
    a single process works without it."""
    world = launched_world()
    try:
        from accelerate import PartialState
    except ImportError:
        if world > 1:
            raise LaunchError(
                f"this sweep was launched as {world} processes, which needs accelerate to split the prompts: {INSTALL_HINT}"
            ) from None
        return Processes()
    import torch

    # accelerate only forms a CPU process group (gloo) when told the run is on the CPU
    cpu = device.startswith("cpu") or (device == "auto" and not torch.cuda.is_available())
    state = PartialState(cpu=True) if cpu else PartialState()
    device = "cpu" if cpu else str(state.device)
    return Processes(rank=int(state.process_index), world=int(state.num_processes), local_rank=int(state.local_process_index), device=device, state=state)
