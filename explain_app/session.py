"""Per-tab sessions and the process-wide model cache."""

from __future__ import annotations

import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from explain.trace import Trace
from explain_app.inputs import DEFAULT_MODEL, InputError


# ---------------------------------------------------------------------------- session
@dataclass
class Session:
    """What one browser tab has made or opened. Lives in a ``gr.State``, so tabs never share it."""

    trace: Trace | None = None
    source: str = ""  # "generated" or the opened file's name
    model: str | None = None  # the model spec that made the trace; None when opened from a file
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    folder: Path | None = None
    explanations: dict = field(default_factory=dict)  # method name -> its latest explain.explanations.MethodMap

    def require_trace(self) -> Trace:
        if self.trace is None:
            raise InputError("nothing to show yet: generate an image or open a trace file first")
        return self.trace

    def workdir(self) -> Path:
        if self.folder is None or not self.folder.is_dir():
            self.folder = Path(tempfile.mkdtemp(prefix="explain-app-"))
        return self.folder


def close_session(session: Session | None) -> None:
    """Remove a session's files (``gr.State`` calls this when a tab is gone)."""
    if isinstance(session, Session) and session.folder is not None:
        shutil.rmtree(session.folder, ignore_errors=True)


def _session(value) -> Session:
    return value if isinstance(value, Session) else Session()


# ---------------------------------------------------------------------------- models
class ModelCache:
    """Pipelines loaded once per process and shared by all sessions.

    A tap changes a pipeline's attention processors for the length of a run, so runs on one
    pipeline must not overlap: `run_lock` serialises all model work.
    """

    def __init__(self, loader=None, max_models: int = 2):
        from collections import OrderedDict

        self._loader = loader
        self._pipes: OrderedDict[str, tuple[object, str]] = OrderedDict()
        self._max_models = max(1, int(max_models))
        self._load_lock = threading.Lock()
        self.run_lock = threading.Lock()
        self._loading: dict[str, int] = {}  # spec -> requests waiting for it
        self._failed: dict[str, str] = {}
        self._count_lock = threading.Lock()

    def get(self, spec: str | None):
        spec = (spec or DEFAULT_MODEL).strip() or DEFAULT_MODEL
        with self._count_lock:
            self._loading[spec] = self._loading.get(spec, 0) + 1
        try:
            return self._get(spec)
        finally:
            with self._count_lock:
                self._loading[spec] -= 1
                if not self._loading[spec]:
                    del self._loading[spec]

    def status(self, spec: str | None) -> str:
        """``"ready"``, ``"loading"``, ``"failed: <why>"`` or ``"not loaded"``, without waiting
        for a load in progress (the page shows it while the model preloads)."""
        spec = (spec or DEFAULT_MODEL).strip() or DEFAULT_MODEL
        if spec in self._pipes:
            return "ready"
        if spec in self._loading:
            return "loading"
        if spec in self._failed:
            return f"failed: {self._failed[spec]}"
        return "not loaded"

    def loaded(self, spec: str | None):
        """The cached pipeline for ``spec``, or None when it is not loaded (never loads)."""
        entry = self._pipes.get((spec or DEFAULT_MODEL).strip() or DEFAULT_MODEL)
        return entry[0] if entry is not None else None

    def _get(self, spec: str):
        with self._load_lock:
            if spec not in self._pipes:
                try:
                    self._pipes[spec] = self._load(spec)
                except Exception as exc:
                    self._failed[spec] = str(exc)
                    raise
                self._failed.pop(spec, None)
                while len(self._pipes) > self._max_models:  # the least recently used goes; runs holding it finish
                    self._pipes.popitem(last=False)
            self._pipes.move_to_end(spec)
            return self._pipes[spec]

    def _load(self, spec: str):
        from explain.adapters.diffusers.loading import ModelLoadError, load_model

        loader = self._loader or load_model
        try:
            return loader(spec)
        except ModelLoadError as exc:
            raise InputError(str(exc).replace("--model", "the model box").replace("pass another model", "enter another model in the model box")) from None


MODELS = ModelCache()
