"""The sweep's output folder: what is done, written so that a killed run never leaves half a result.

    DIR/sweep.json                 the settings (written once; a resumed run must match them)
    DIR/run.json                   the current run's token and process count
    DIR/prompts.jsonl              the rows the sweep was given (ids, seeds, ground truth)
    DIR/records/<id>.json          one finished prompt: status ok / error / invalid, its columns,
                                   tables and curves; the manifest of what is done
    DIR/traces/<id>.safetensors    the prompt's trace, only with the ``traces`` analysis
    DIR/shards/rank-R-of-W.jsonl   each process's own log (one line per prompt it finished)
    DIR/shards/rank-R-of-W.done    written when that process has finished its share
    DIR/manifest.json              the summary: counts and the status of every id
    DIR/results.csv, words.csv, objects.csv, layers.csv, schedule_words.csv (+ .parquet with pyarrow)
    DIR/report.html, DIR/report.json

Every file is written to a temporary name in the same folder and moved into place with
``os.replace``, which is atomic on POSIX and Windows: a reader (or a resumed run) sees either
the old file or the complete new one. A record exists only once its prompt is completely
done, so "done" is simply "has a record". Failed prompts have a record too (with the error);
``--retry-failed`` runs them again.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

STATUSES = ("ok", "error", "invalid")
CONFIG_VERSION = 1
RUN_KEYS = ("run",)  # record fields that describe how it ran, not what it found


class SweepFolderError(ValueError):
    """An output folder that holds another sweep; the message says what to do."""


def _default(obj: Any):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def clean_json(value: Any) -> Any:
    """NaN and infinities become None (strict JSON); tensors and numpy values become lists and numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return clean_json(value.tolist())
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        return clean_json(value.item())
    return value


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def atomic_write_json(path: Path, value: Any, indent: int | None = None) -> Path:
    text = json.dumps(clean_json(value), indent=indent, default=_default, allow_nan=False, ensure_ascii=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


class SweepFolder:
    """Paths and reads/writes of one sweep's output folder."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.records = self.root / "records"
        self.traces = self.root / "traces"
        self.shards = self.root / "shards"

    # ------------------------------------------------------------------ settings
    @property
    def config_path(self) -> Path:
        return self.root / "sweep.json"

    def read_config(self) -> dict | None:
        if not self.config_path.is_file():
            return None
        try:
            return json.loads(self.config_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SweepFolderError(f"{self.config_path} is unreadable ({exc}); delete the folder or pass another --out") from None

    def write_config(self, config: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.config_path, {"version": CONFIG_VERSION, **config}, indent=2)

    def check_config(self, config: dict) -> None:
        """Refuse to resume a sweep whose result-changing settings differ from ``config``."""
        old = self.read_config()
        if old is None:
            raise SweepFolderError(f"{self.config_path} is missing; the main process writes it before the others start")
        old = {k: v for k, v in old.items() if k != "version"}
        new = clean_json(config)
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            details = "; ".join(f"{k}: {json.dumps(old.get(k))} -> {json.dumps(new.get(k))}" for k in changed[:6])
            raise SweepFolderError(
                f"{self.root} holds a sweep with other settings ({details}); resume it with the same settings, "
                "pass another --out, or --restart to discard its results"
            )

    # ------------------------------------------------------------------ runs
    def new_run(self, world: int) -> str:
        token = uuid.uuid4().hex[:12]
        atomic_write_json(self.root / "run.json", {"run": token, "processes": world, "started": time.time()})
        return token

    def current_run(self) -> dict:
        return json.loads((self.root / "run.json").read_text(encoding="utf-8"))

    def shard_log(self, rank: int, world: int) -> Path:
        return self.shards / f"rank-{rank}-of-{world}.jsonl"

    def log(self, rank: int, world: int, entry: dict) -> None:
        """Append one line to this process's shard log (its own file: no other process writes it)."""
        self.shards.mkdir(parents=True, exist_ok=True)
        with open(self.shard_log(rank, world), "a", encoding="utf-8") as f:
            f.write(json.dumps(clean_json(entry)) + "\n")

    def mark_done(self, rank: int, world: int, run: str, counts: dict) -> None:
        atomic_write_json(self.shards / f"rank-{rank}-of-{world}.done", {"run": run, **counts})

    def finished_ranks(self, world: int, run: str) -> set[int]:
        done = set()
        for rank in range(world):
            path = self.shards / f"rank-{rank}-of-{world}.done"
            try:
                if json.loads(path.read_text(encoding="utf-8")).get("run") == run:
                    done.add(rank)
            except (OSError, json.JSONDecodeError):
                pass
        return done

    # ------------------------------------------------------------------ records
    def record_path(self, row_id: str) -> Path:
        return self.records / f"{row_id}.json"

    def trace_path(self, row_id: str) -> Path:
        return self.traces / f"{row_id}.safetensors"

    def write_record(self, record: dict) -> Path:
        if record.get("status") not in STATUSES:
            raise ValueError(f"a record's status must be one of {STATUSES}, got {record.get('status')!r}")
        return atomic_write_json(self.record_path(record["id"]), record)

    def record_ids(self) -> set[str]:
        """Ids that have a record (temporary files of an interrupted write are not records)."""
        if not self.records.is_dir():
            return set()
        return {e.name[:-5] for e in os.scandir(self.records) if e.name.endswith(".json") and not e.name.startswith(".")}

    def count_records(self) -> int:
        return len(self.record_ids())

    def read_record(self, row_id: str) -> dict | None:
        try:
            return json.loads(self.record_path(row_id).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def read_records(self, ids: Iterable[str] | None = None) -> list[dict]:
        ids = sorted(self.record_ids()) if ids is None else ids
        out = []
        for row_id in ids:
            record = self.read_record(row_id)
            if record is not None:
                out.append(record)
        return out

    def done_ids(self, retry_failed: bool = False) -> set[str]:
        """Ids the run should skip: every record, or only the successful ones with ``retry_failed``."""
        ids = self.record_ids()
        if not retry_failed:
            return ids
        return {r["id"] for r in self.read_records(ids) if r.get("status") == "ok"}

    def remove_stale_temporaries(self) -> int:
        """Delete the temporary files of writes a killed process did not finish."""
        removed = 0
        for folder in (self.records, self.traces, self.root):
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    try:
                        os.unlink(entry.path)
                        removed += 1
                    except OSError:
                        pass
        return removed

    def write_manifest(self, rows, records: list[dict]) -> dict:
        by_id = {r["id"]: r for r in records}
        status = {row.id: by_id.get(row.id, {}).get("status", "pending") for row in rows}
        counts = {s: sum(1 for v in status.values() if v == s) for s in (*STATUSES, "pending")}
        manifest = {"total": len(rows), **counts, "status": status}
        atomic_write_json(self.root / "manifest.json", manifest, indent=1)
        return manifest


def comparable(record: dict) -> dict:
    """A record without how it ran (timing, rank): what two runs of the same sweep must share."""
    return {k: v for k, v in record.items() if k not in RUN_KEYS}
