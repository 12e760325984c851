"""Prompt files for a sweep: plain text, CSV or JSON lines, read into validated `PromptRow`s.

Formats (chosen by the file's extension; ``--format`` overrides it):

* ``.txt``: one prompt per line; blank lines and lines starting with ``#`` are skipped.
* ``.csv``: a header row with a ``prompt`` column (``caption`` and ``text`` are accepted too);
  optional ``id``, ``seed`` and ``negative`` (or ``negative_prompt``) columns; every other
  column is a ground-truth field, kept with the row and its results.
* ``.jsonl`` / ``.ndjson``: one JSON object per line with the same keys; a ground-truth
  field may hold any JSON value (the shapes world's scenes use ``"scene"``).

Two kinds of problem, told apart on purpose:

* a file the sweep cannot read at all (missing, unknown format, a CSV without a prompt column,
  duplicate ids) raises `PromptFileError`, whose message says what to change;
* a single bad row (an empty prompt, a seed that is not a whole number, a line that is not a
  JSON object) becomes a row with ``error`` set: the sweep records it as invalid and goes on,
  unless the caller asks for strictness.

Every row has a stable ``id``: the file's own ``id`` field, else a hash of the prompt and
negative prompt (with ``~2``, ``~3``, ... for repeats). Ids name the per-prompt result files,
and seeds are derived from them (`explain.sweep.plan`), so reordering or extending a prompt
file neither changes a prompt's seed nor repeats work already done.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("txt", "csv", "jsonl")
_EXTENSIONS = {".txt": "txt", ".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
PROMPT_KEYS = ("prompt", "caption", "text")
NEGATIVE_KEYS = ("negative", "negative_prompt")
RESERVED = ("id", "seed", *PROMPT_KEYS, *NEGATIVE_KEYS)
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
MAX_SEED = 2**63 - 1


class PromptFileError(ValueError):
    """A prompt file the sweep cannot read; the message says what to change."""


@dataclass
class PromptRow:
    id: str
    index: int  # position among the file's rows (0-based), for sorting results
    prompt: str
    line: int  # 1-based line of the file, for messages
    seed: int | None = None
    negative: str | None = None
    truth: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set for an invalid row

    @property
    def valid(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "index": self.index,
            "line": self.line,
            "prompt": self.prompt,
            "seed": self.seed,
            "negative": self.negative,
            "truth": self.truth,
            "error": self.error,
        }


def content_id(prompt: str, negative: str | None) -> str:
    digest = hashlib.blake2b(f"{prompt}\x00{negative or ''}".encode(), digest_size=6).hexdigest()
    return f"p{digest}"


def detect_format(path: Path, fmt: str | None = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise PromptFileError(f"unknown prompt-file format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return fmt
    try:
        return _EXTENSIONS[path.suffix.lower()]
    except KeyError:
        raise PromptFileError(
            f"cannot tell the format of {path.name}: name it .txt (one prompt per line), .csv (with a "
            "'prompt' column) or .jsonl (one JSON object per line), or pass --format txt|csv|jsonl"
        ) from None


def read_prompts(path: str | Path, fmt: str | None = None) -> list[PromptRow]:
    """The rows of a prompt file, each validated; raises `PromptFileError` for a file it
    cannot read at all (see the module notes for what counts as a bad row instead)."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"no prompt file at {path}; pass a .txt, .csv or .jsonl file (or --shapes-world N)")
    kind = detect_format(path, fmt)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"{path.name} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    return parse_prompts(text, kind, name=path.name, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")


def parse_prompts(text: str, kind: str, name: str = "prompts", delimiter: str = ",") -> list[PromptRow]:
    if kind == "txt":
        raw = [(n, {"prompt": line.strip()}) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.lstrip().startswith("#")]
    elif kind == "csv":
        raw = _csv_records(text, name, delimiter)
    elif kind == "jsonl":
        raw = _jsonl_records(text)
    else:
        raise PromptFileError(f"unknown prompt-file format {kind!r}; choose one of {', '.join(FORMATS)}")
    if not raw:
        raise PromptFileError(f"{name} holds no prompts; write one prompt per row")
    rows = [row_from_record(record, index, line) for index, (line, record) in enumerate(raw)]
    return assign_ids(rows, name)


def _csv_records(text: str, name: str, delimiter: str) -> list[tuple[int, dict]]:
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise PromptFileError(f"{name} is empty; a CSV prompt file starts with a header row such as: id,prompt,seed") from None
    header = [h.strip() for h in header]
    if not any(h.lower() in PROMPT_KEYS for h in header):
        raise PromptFileError(
            f"{name} has no 'prompt' column (its header is: {', '.join(header) or '(empty)'}); "
            "name the column with the prompts 'prompt' (or 'caption' / 'text')"
        )
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise PromptFileError(f"{name} has the column(s) {', '.join(dupes)} more than once; give every column its own name")
    records = []
    for values in reader:
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            records.append((line, {"__error__": f"has {len(values)} fields but the header has {len(header)} (quote fields that contain the delimiter)"}))
            continue
        records.append((line, {h: v for h, v in zip(header, values) if v != "" or h.lower() in PROMPT_KEYS}))
    return records


def _jsonl_records(text: str) -> list[tuple[int, dict]]:
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            records.append((n, {"__error__": f"is not valid JSON ({exc.msg} at column {exc.colno})"}))
            continue
        if not isinstance(value, dict):
            records.append((n, {"__error__": f"is a JSON {type(value).__name__}, not an object like {{\"prompt\": \"...\"}}"}))
            continue
        records.append((n, value))
    return records


def row_from_record(record: dict, index: int, line: int) -> PromptRow:
    """One row from a record; problems go into ``error`` (with the line), never raise."""
    if "__error__" in record:
        return PromptRow(id="", index=index, prompt="", line=line, error=f"line {line} {record['__error__']}")
    keys = {k.lower() if isinstance(k, str) else k: k for k in record}
    problems = []
    prompt_key = next((keys[k] for k in PROMPT_KEYS if k in keys), None)
    prompt = record.get(prompt_key) if prompt_key is not None else None
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("has no prompt" if prompt is None else "has an empty prompt" if isinstance(prompt, str) else f"has a prompt that is a {type(prompt).__name__}, not text")
        prompt = prompt if isinstance(prompt, str) else ""
    negative = next((record[keys[k]] for k in NEGATIVE_KEYS if k in keys), None)
    if negative is not None and not isinstance(negative, str):
        problems.append(f"has a negative prompt that is a {type(negative).__name__}, not text")
        negative = None
    seed = record.get(keys["seed"]) if "seed" in keys else None
    if seed is not None:
        seed, problem = _parse_seed(seed)
        if problem:
            problems.append(problem)
    rid = record.get(keys["id"]) if "id" in keys else None
    if rid is not None:
        rid = str(rid).strip()
        if not _ID.match(rid):
            problems.append(f"has the id {rid!r}; ids are 1-80 letters, digits, '.', '_' or '-', starting with a letter or digit")
            rid = None
    truth = {k: v for k, v in record.items() if not (isinstance(k, str) and k.lower() in RESERVED)}
    error = f"line {line} " + "; ".join(problems) if problems else None
    return PromptRow(id=rid or "", index=index, prompt=prompt.strip(), line=line, seed=seed, negative=(negative or "").strip() or None, truth=truth, error=error)


def _parse_seed(value) -> tuple[int | None, str | None]:
    if isinstance(value, bool):
        return None, f"has the seed {value!r}; a seed is a whole number from 0 to 2**63-1"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None, f"has the seed {value!r}; a seed is a whole number from 0 to 2**63-1"
    if not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        return None, f"has the seed {value!r}; a seed is a whole number from 0 to 2**63-1"
    return value, None


def assign_ids(rows: list[PromptRow], name: str = "prompts") -> list[PromptRow]:
    """Fill in content ids (``~n`` for the n-th repeat); refuse duplicate explicit ids."""
    explicit: dict[str, int] = {}
    for row in rows:
        if row.id:
            if row.id in explicit:
                raise PromptFileError(f"{name}: the id {row.id!r} is used on line {explicit[row.id]} and line {row.line}; every row needs its own id")
            explicit[row.id] = row.line
    seen: dict[str, int] = {}
    for row in rows:
        if row.id:
            continue
        base = content_id(row.prompt, row.negative) if row.prompt else f"line{row.line}"
        seen[base] = seen.get(base, 0) + 1
        candidate = base if seen[base] == 1 else f"{base}~{seen[base]}"
        while candidate in explicit:
            seen[base] += 1
            candidate = f"{base}~{seen[base]}"
        row.id = candidate
    return rows
