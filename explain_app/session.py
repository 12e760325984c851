"""Per-tab sessions, the process-wide store of their traces, the model cache and which models
visitors may choose.

On a public deployment (a Space, ``--share``, a non-local address) visitors choose only among
the operator's models (`ModelPolicy`), and the store keeps a bounded number of traces
(`TraceStore`); `configure` sets both, and the limits of `explain_app.inputs`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from explain.trace import Trace
from explain_app import inputs
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
    onset: object = None  # the latest explain.explanations.OnsetView

    def require_trace(self) -> Trace:
        if self.trace is None and getattr(self, "dropped", False):
            raise InputError(f"this tab's trace was dropped to make room for newer ones ({STORE.describe()}); generate again, or open the trace file if you downloaded it")
        if self.trace is None:
            raise InputError("nothing to show yet: generate an image or open a trace file first")
        return self.trace

    def workdir(self) -> Path:
        if self.folder is None or not self.folder.is_dir():
            self.folder = Path(tempfile.mkdtemp(prefix="explain-app-"))
        return self.folder

    def __post_init__(self):
        self.dropped = False
        if self.trace is not None:
            STORE.add(self)

    def drop(self) -> None:
        """Let go of the trace and the files (the store needs the room)."""
        self.trace, self.dropped = None, True
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def close_session(session: Session | None) -> None:
    """Remove a session's files (``gr.State`` calls this when a tab is gone)."""
    if isinstance(session, Session):
        STORE.remove(session)
    if isinstance(session, Session) and session.folder is not None:
        shutil.rmtree(session.folder, ignore_errors=True)


# ---------------------------------------------------------------------------- trace store
def trace_bytes(trace: Trace) -> int:
    tensors = [trace.timesteps, trace.sigmas, trace.x_t, trace.x0, trace.attention, trace.attention_negative,
               trace.final_latent, trace.images, trace.x0_previews, trace.x_t_previews, *trace.attention_layers.values()]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class TraceStore:
    """The traces of all sessions, bounded in count and in bytes: a new trace pushes out the
    oldest until both bounds hold (their tabs then say so). Sessions are held weakly, so a
    closed tab's trace goes with it."""

    def __init__(self, max_traces: int, max_bytes: int):
        self.max_traces, self.max_bytes = max(1, int(max_traces)), max(1, int(max_bytes))
        self._entries: OrderedDict[int, tuple[weakref.ref, int]] = OrderedDict()
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"the app keeps the traces of the {self.max_traces} most recent sessions, {self.max_bytes / 2**20:.0f} MB in all"

    def add(self, session: Session) -> None:
        size = trace_bytes(session.trace)
        if size > self.max_bytes:
            session.trace = None
            raise InputError(
                f"this trace takes {size / 2**20:.0f} MB, more than the {self.max_bytes / 2**20:.0f} MB the app keeps for "
                "all sessions; use fewer steps or a smaller image"
            )
        dropped = []
        with self._lock:
            self._entries.pop(id(session), None)
            self._entries[id(session)] = (weakref.ref(session), size)
            for key in [k for k, (ref, _) in self._entries.items() if ref() is None]:
                del self._entries[key]
            while len(self._entries) > self.max_traces or self.total() > self.max_bytes:
                _, (ref, _) = self._entries.popitem(last=False)
                dropped.append(ref())
        for old in dropped:
            if old is not None:
                old.drop()

    def remove(self, session: Session) -> None:
        with self._lock:
            entry = self._entries.get(id(session))
            if entry is not None and entry[0]() is session:
                del self._entries[id(session)]

    def total(self) -> int:
        return sum(size for ref, size in self._entries.values() if ref() is not None)

    def __len__(self) -> int:
        return sum(1 for ref, _ in self._entries.values() if ref() is not None)


STORE = TraceStore(inputs.LIMITS.max_traces, inputs.LIMITS.max_trace_mb * 2**20)


# ---------------------------------------------------------------------------- which models
def normalize_spec(spec) -> str:
    return (str(spec) if spec is not None else "").strip() or DEFAULT_MODEL


@dataclass(frozen=True)
class ModelPolicy:
    """Which models visitors may choose. With ``allow_any`` any diffusers folder or hub id
    (a local app); otherwise only ``choices``, and a model outside them is refused before
    anything looks at the file system or the hub, with the same message for every name, so
    the app never tells a visitor which server paths exist. ``hide_load_errors``: a model that
    fails to load says only that (the reason goes to the server log)."""

    choices: tuple[str, ...] = (DEFAULT_MODEL,)
    allow_any: bool = True
    hide_load_errors: bool = False

    def check(self, spec) -> str:
        spec = normalize_spec(spec)
        if self.allow_any or spec in self.choices:
            return spec
        shown = spec if len(spec) <= 80 else spec[:77] + "..."
        raise InputError(f"the model {shown!r} is not offered here; choose one of: {', '.join(self.choices)}")


LOCAL_POLICY = ModelPolicy()


def public_policy(choices=(DEFAULT_MODEL,), allow_any: bool = False) -> ModelPolicy:
    return ModelPolicy(tuple(dict.fromkeys(normalize_spec(c) for c in choices)), allow_any=allow_any, hide_load_errors=True)


def is_public(share: bool = False, host: str | None = None) -> bool:
    """A Space, a public share link, or an address other machines reach."""
    return bool(os.environ.get("SPACE_ID")) or share or (host is not None and host not in ("127.0.0.1", "localhost", "::1"))


def configure(policy: ModelPolicy | None = None, limits: "inputs.Limits | None" = None, models: "ModelCache | None" = None) -> None:
    """Set which models visitors may choose (on ``models``, default the shared cache) and the
    limits of requests and of the trace store."""
    if policy is not None:
        (models or MODELS).policy = policy
    if limits is not None:
        inputs.LIMITS = limits
        STORE.max_traces, STORE.max_bytes = max(1, limits.max_traces), max(1, limits.max_trace_mb * 2**20)


def check_generation(models: "ModelCache", spec, size, steps) -> None:
    """What a generate request may ask for, checked before it queues for the model: the model
    (`ModelPolicy`), the steps and the size within `inputs.LIMITS`, and the size against the
    model's geometry where its folder tells it (a hub model's is checked once it loads)."""
    from explain import sizes

    spec = models.policy.check(spec)
    inputs.check_steps(steps)
    side = inputs.parse_size(size)
    pipe = models.loaded(spec) if hasattr(models, "loaded") else None
    geometry = sizes.pipeline_geometry(pipe) if pipe is not None else sizes.spec_geometry(spec)
    if geometry is None and side is not None:
        geometry = sizes.pipeline_geometry(models.get(spec)[0])
    inputs.check_size_for_model(side, geometry, "the embedded model" if spec == DEFAULT_MODEL else repr(spec))


def _session(value) -> Session:
    return value if isinstance(value, Session) else Session()


# ---------------------------------------------------------------------------- models
class ModelCache:
    """Pipelines loaded once per process and shared by all sessions.

    A tap changes a pipeline's attention processors for the length of a run, so runs on one
    pipeline must not overlap: `run_lock` serialises all model work.
    """

    def __init__(self, loader=None, max_models: int = 2, policy: ModelPolicy | None = None):
        from collections import OrderedDict

        self.policy = policy or (public_policy() if is_public() else LOCAL_POLICY)
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
                    # shown on the page: on a public app only what the refusal itself says
                    hide = getattr(self.policy, "hide_load_errors", False) and not isinstance(exc, InputError)
                    self._failed[spec] = "it could not be loaded on this server" if hide else str(exc)
                    raise
                self._failed.pop(spec, None)
                while len(self._pipes) > self._max_models:  # the least recently used goes; runs holding it finish
                    self._pipes.popitem(last=False)
            self._pipes.move_to_end(spec)
            return self._pipes[spec]

    def _load(self, spec: str):
        from explain.adapters.diffusers.loading import ModelLoadError, load_model

        spec = self.policy.check(spec)  # before anything looks for it
        loader = self._loader or load_model
        try:
            return loader(spec)
        except ModelLoadError as exc:
            if self.policy.hide_load_errors:  # the reason could tell which server paths exist
                inputs.LOG.warning("could not load the model %r: %s", spec, " ".join(str(exc).split()))
                raise InputError(f"the model {spec!r} could not be loaded on this server; choose another") from None
            raise InputError(str(exc).replace("--model", "the model box").replace("pass another model", "enter another model in the model box")) from None


MODELS = ModelCache()
