import json
import math
import os

import pytest
import torch

from explain.sweep import manifest
from explain.sweep.manifest import SweepFolder, SweepFolderError, atomic_write_json, clean_json


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"v": 1})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(manifest.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_clean_json_makes_strict_json_of_tensors_and_nan():
    value = clean_json({"a": torch.tensor([1.5, float("nan")]), "b": math.inf, "c": (1, torch.tensor(2))})
    assert value == {"a": [1.5, None], "b": None, "c": [1, 2]}
    json.dumps(value, allow_nan=False)


def _record(rid, status="ok", index=0):
    return {"id": rid, "index": index, "status": status, "columns": {}, "error": None if status == "ok" else "boom"}


def test_done_ids_ignore_temporaries_and_retry_failed_keeps_only_successes(tmp_path):
    folder = SweepFolder(tmp_path)
    folder.write_record(_record("a"))
    folder.write_record(_record("b", "error"))
    (folder.records / ".c.json.123.tmp").write_text("{half")
    assert folder.record_ids() == {"a", "b"}
    assert folder.done_ids() == {"a", "b"}
    assert folder.done_ids(retry_failed=True) == {"a"}
    assert folder.remove_stale_temporaries() == 1
    assert sorted(os.listdir(folder.records)) == ["a.json", "b.json"]
    with pytest.raises(ValueError, match="status must be one of"):
        folder.write_record(_record("d", "maybe"))


def test_a_resumed_sweep_must_have_the_same_settings(tmp_path):
    folder = SweepFolder(tmp_path)
    folder.write_config({"steps": 20, "analyses": ["concepts"]})
    folder.check_config({"steps": 20, "analyses": ["concepts"]})
    with pytest.raises(SweepFolderError, match=r"other settings \(steps: 20 -> 10\).*--restart"):
        folder.check_config({"steps": 10, "analyses": ["concepts"]})


def test_done_markers_belong_to_one_run(tmp_path):
    folder = SweepFolder(tmp_path)
    folder.mark_done(0, 2, "run1", {"ok": 1})
    folder.mark_done(1, 2, "old", {"ok": 1})
    assert folder.finished_ranks(2, "run1") == {0}
    folder.mark_done(1, 2, "run1", {"ok": 0})
    assert folder.finished_ranks(2, "run1") == {0, 1}
