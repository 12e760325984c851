"""Fuzzing the trace loader: mutated valid traces (bit flips, truncation, header edits, tensor
shape and dtype swaps, edits of the trace header's values) must each end in a `TraceFormatError`
or a valid trace, never another exception (issue 17). Seeded, and bounded to a few seconds."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from explain.trace import Trace, TraceFormatError, read_header
from tests.explain.synthetic import synthetic_trace

SEED = 17
CASES_PER_KIND = 60

DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2")
DTYPE_SIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def valid_file_bytes(tmp_path) -> bytes:
    trace = synthetic_trace(steps=3, size=4, image_scale=2, batch=2, negative=True, layers=True)
    trace.x0_previews = torch.zeros(3, 2, 8, 8, 3, dtype=torch.uint8)
    trace.meta["vae_scale_factor"] = 2
    return trace.save(tmp_path / "valid.safetensors").read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + body


# ---------------------------------------------------------------------------- mutations
def bit_flips(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    (n,) = struct.unpack("<Q", data[:8])
    for _ in range(rng.randint(1, 8)):
        # most flips land in the header, where they change meaning rather than one number
        pos = rng.randrange(8 + n) if rng.random() < 0.7 else rng.randrange(len(out))
        out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def truncation(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def outer_header_edit(rng: random.Random, data: bytes) -> bytes:
    """The safetensors header: another dtype, shape or offsets for a tensor, another format or
    schema, a tensor dropped or two tensors' names swapped."""
    header, body = split(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    kind = rng.randrange(7)
    if kind == 0:
        entry["dtype"] = rng.choice(DTYPES)
    elif kind == 1:
        entry["shape"] = [max(0, d + rng.choice((-1, 1, 7))) for d in entry["shape"]]
    elif kind == 2:
        entry["data_offsets"] = [max(0, o + rng.choice((-8, -1, 1, 8, 10**6))) for o in entry["data_offsets"]]
    elif kind == 3:
        header["__metadata__"]["schema_version"] = rng.choice(("0", "2", "-1", "1.0", "", "9" * 30))
    elif kind == 4:
        header["__metadata__"]["format"] = rng.choice(("", "diffusion-explain/trace2", "pt"))
    elif kind == 5:
        del header[name]
    else:
        other = rng.choice(names)
        header[name], header[other] = header[other], header[name]
    return join(header, body)


def shape_dtype_swap(rng: random.Random, data: bytes) -> bytes:
    """A consistent reinterpretation of one tensor's bytes that safetensors accepts: another
    dtype of the same element size, or another dtype with the last axis rescaled, or the same
    elements in another shape (axes permuted or merged)."""
    header, body = split(data)
    name = rng.choice([k for k in header if k != "__metadata__"])
    entry = header[name]
    size = DTYPE_SIZE[entry["dtype"]]
    shape = list(entry["shape"])
    kind = rng.randrange(3)
    if kind == 0:
        entry["dtype"] = rng.choice([d for d, s in DTYPE_SIZE.items() if s == size])
    elif kind == 1:
        new = rng.choice(list(DTYPE_SIZE))
        total = shape[-1] * size
        if total % DTYPE_SIZE[new] == 0:
            entry["dtype"], shape[-1] = new, total // DTYPE_SIZE[new]
    else:
        if len(shape) > 1 and rng.random() < 0.5:
            i = rng.randrange(len(shape) - 1)
            shape[i : i + 2] = [shape[i] * shape[i + 1]]
        else:
            rng.shuffle(shape)
    entry["shape"] = shape
    return join(header, body)


HOSTILE_VALUES = (None, True, 0, -1, -64, 2**31, 10**30, 1.5, "", "x", "[", [], [1], [[1]], {}, {"a": 1}, [None], ["a", 2])


def trace_header_edit(rng: random.Random, data: bytes) -> bytes:
    """The trace's own JSON header: one value anywhere in it replaced by a hostile one, a key
    dropped, or the text cut, nested or given a NaN."""
    header, body = split(data)
    meta = header["__metadata__"]
    kind = rng.randrange(4)
    if kind == 0:
        trace = json.loads(meta["trace"])
        containers = [trace]
        for value in _walk(trace):
            if isinstance(value, (dict, list)) and value:
                containers.append(value)
        target = rng.choice(containers)
        key = rng.choice(list(target)) if isinstance(target, dict) else rng.randrange(len(target))
        if isinstance(target, dict) and rng.random() < 0.2:
            del target[key]
        else:
            target[key] = rng.choice(HOSTILE_VALUES)
        meta["trace"] = json.dumps(trace)
    elif kind == 1:
        text = meta["trace"]
        meta["trace"] = text[: rng.randrange(len(text))]
    elif kind == 2:
        depth = rng.choice((33, 500, 5000, 200_000))
        meta["trace"] = meta["trace"][:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    else:
        text = meta["trace"]
        at = rng.randrange(len(text))
        meta["trace"] = text[:at] + rng.choice(("NaN", "Infinity", "-Infinity", "1e999", '"', "\\", "\x00", "{", "]")) + text[at:]
    return join(header, body)


def _walk(value):
    stack = [value]
    while stack:
        item = stack.pop()
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


MUTATIONS = {
    "bit flips": bit_flips,
    "truncation": truncation,
    "safetensors header edits": outer_header_edit,
    "tensor shape and dtype swaps": shape_dtype_swap,
    "trace header edits": trace_header_edit,
}


@pytest.mark.parametrize("kind", MUTATIONS, ids=list(MUTATIONS))
def test_mutated_traces_load_or_raise_trace_format_error(tmp_path, kind):
    valid = valid_file_bytes(tmp_path)
    rng = random.Random(f"{SEED}:{kind}")
    mutate = MUTATIONS[kind]
    path = tmp_path / "mutant.safetensors"
    outcomes = {"refused": 0, "loaded": 0}
    for case in range(CASES_PER_KIND):
        data = mutate(rng, valid)
        path.write_bytes(data)
        try:
            read_header(path)
        except TraceFormatError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{kind} case {case}: read_header raised {type(exc).__name__}: {exc}")
        try:
            trace = Trace.load(path)
        except TraceFormatError as exc:
            assert str(exc), "the error says what is wrong"
            outcomes["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{kind} case {case}: Trace.load raised {type(exc).__name__}: {exc}")
        # what loads is a valid trace: it validates and saves again
        trace.validate()
        trace.save(tmp_path / "again.safetensors")
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 0, f"no {kind} mutation was refused: the mutations do nothing"


def test_the_fuzzer_starts_from_a_valid_trace(tmp_path):
    path = tmp_path / "t.safetensors"
    path.write_bytes(valid_file_bytes(tmp_path))
    trace = Trace.load(path)
    assert trace.attention_layers and trace.attention_negative is not None and trace.x0_previews is not None
    assert trace.image_size == (8, 8)
