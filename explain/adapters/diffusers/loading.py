"""Loading a diffusers text-to-image pipeline by name, folder or hub id, with clear errors.

``"embedded"`` (the default) and ``"embedded-dit"`` are the shapes models shipped in the
package (`explain.embedded`: a UNet ``StableDiffusionPipeline`` and an SD3-style MMDiT
``StableDiffusion3Pipeline``, `EMBEDDED_MODELS`); a local diffusers folder loads offline; ``org/name`` goes to the Hugging Face hub (which needs the
network). ``"tiny"``, ``"tiny-sd3"`` and ``"tiny-flux"`` are random-weight pipelines for tests.

A folder's ``model_index.json`` decides the pipeline class. An SD3 folder saved without T5 lists
``text_encoder_3`` / ``tokenizer_3`` as ``[null, null]`` (or lacks their folders), and diffusers
then refuses it unless ``text_encoder_3=None, tokenizer_3=None`` are passed: the loader passes
them. A loaded pipeline that no model family of the adapter serves is refused with the list of
the supported ones.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# --model name -> (explain.embedded.load_pipeline's name, what it is); the first is the default
EMBEDDED_MODELS = {
    "embedded": ("unet", "the shapes UNet model, default"),
    "embedded-dit": ("dit", "the shapes MMDiT model, SD3-style"),
}
EMBEDDED_NAMES = tuple(EMBEDDED_MODELS)
TINY_NAMES = ("tiny", "tiny-sd3", "tiny-flux")
# Components a pipeline runs without when its folder has none: SD3's T5 (it pads zeros instead).
OPTIONAL_COMPONENTS = {"StableDiffusion3Pipeline": ("text_encoder_3", "tokenizer_3")}


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what to pass instead."""


def resolve_dtype(name: str, device: str, external: bool):
    """The weights' dtype for ``name`` ("auto" or a dtype name); see `explain.precision.choose_dtype`."""
    return choose(name, device, external).dtype


def choose(name: str, device: str, external: bool):
    from explain.precision import choose_dtype

    try:
        return choose_dtype(name, device, external)
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from None


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name} was asked for but torch sees no CUDA GPU; use cpu")
    return name


def is_embedded(model_name: str) -> bool:
    """Whether a loaded model's name (as `load_model` returns it) is an embedded model."""
    return model_name.startswith("embedded")


def embedded_key(spec: str | None) -> str | None:
    """The `EMBEDDED_MODELS` name ``spec`` asks for (``None``/empty: the default), else None."""
    if spec in (None, ""):
        return EMBEDDED_NAMES[0]
    return spec if spec in EMBEDDED_MODELS else None


def describe_names() -> str:
    """The model names `load_model` knows, for error messages and help texts."""
    shipped = ", ".join(f"{name} ({what})" for name, (_, what) in EMBEDDED_MODELS.items())
    return f"{shipped}; for tests: {', '.join(TINY_NAMES)} (random weights)"


def _unknown_name(spec: str) -> str:
    import difflib

    library = {which: name for name, (which, _) in EMBEDDED_MODELS.items()}  # embedded.load_pipeline's names
    close = [library[spec.lower()]] if spec.lower() in library else difflib.get_close_matches(spec.lower(), [*EMBEDDED_NAMES, *TINY_NAMES], n=1, cutoff=0.75)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return (
        f"no model folder at {spec}{hint}; pass an existing diffusers folder, a hub id like org/name, "
        f"or a shipped model: {describe_names()}"
    )


def load_model(spec: str | None, device: str = "auto", dtype: str = "auto", announce=None):
    """A diffusers text-to-image pipeline and a short, shareable name for it (never a local path).

    ``dtype="auto"`` picks bf16 on CPUs with native bf16 and fp16 for external models on CUDA
    (`explain.precision.choose_dtype`); ``announce(message)`` is told the choice and its reason
    (default: printed once per process on stderr)."""
    device = resolve_device(device)
    external = spec not in (None, "", *EMBEDDED_NAMES, *TINY_NAMES)
    choice = choose(dtype, device, external)
    (announce or _announce_once)(f"dtype: {choice.reason}")
    key = embedded_key(spec)
    if key is not None:
        from explain import embedded

        which = EMBEDDED_MODELS[key][0]
        quiet_loading()
        try:
            pipe = embedded.load_pipeline(which, device=device, dtype=choice.dtype)
        except embedded.EmbeddedModelMissing as exc:
            raise ModelLoadError(f"{exc}; or pass another model") from None
        return pipe, f"{key} ({embedded.DIT_MODEL_ID if which == 'dit' else embedded.MODEL_ID})"
    if spec in TINY_NAMES:  # random weights, for tests: exercises the whole path in a second
        from explain import testing

        build = {"tiny": testing.tiny_sd_pipeline, "tiny-sd3": testing.tiny_sd3_pipeline, "tiny-flux": testing.tiny_flux_pipeline}[spec]
        return build().to(device, choice.dtype), f"{spec} (random weights, test only)"

    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            raise ModelLoadError(f"{spec} is a single file; pass a diffusers model folder (with model_index.json) or a hub id")
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(f"{spec} is not a diffusers model folder: it has no model_index.json")
        quiet_loading()
        return from_pretrained(str(path), device, choice.dtype, local=True), path.name
    looks_like_path = spec.startswith((".", "/", "~")) or "\\" in spec or not _HUB_ID.match(spec)
    if looks_like_path:
        raise ModelLoadError(_unknown_name(spec))
    quiet_loading()
    return from_pretrained(spec, device, choice.dtype, local=False), spec


def quiet_loading() -> None:
    """Silence the libraries' own loading bars and notices; the front ends print their own progress."""
    try:
        import diffusers.utils.logging as dlog
        import transformers.utils.logging as tlog

        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except (ImportError, AttributeError):  # older versions name these differently; the bars are harmless
        pass


def pipeline_class():
    from diffusers import AutoPipelineForText2Image

    return AutoPipelineForText2Image


def folder_kwargs(folder: Path) -> dict:
    """``from_pretrained`` arguments a local folder needs: ``None`` for each optional component its
    ``model_index.json`` lists as null or whose sub-folder is missing (SD3 saved without T5)."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder} has an unreadable model_index.json ({exc})") from None
    if not isinstance(index, dict):
        raise ModelLoadError(f"{folder}/model_index.json is not a diffusers model index")
    kwargs = {}
    for name in OPTIONAL_COMPONENTS.get(str(index.get("_class_name")), ()):
        entry = index.get(name)
        if entry is None or not isinstance(entry, (list, tuple)) or None in entry or not (folder / name).is_dir():
            kwargs[name] = None
    return kwargs


def from_pretrained(source: str, device: str, dtype, local: bool):
    kwargs = {"local_files_only": True} if local else {}
    if local:
        kwargs.update(folder_kwargs(Path(source)))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*safety_checker.*")
            pipe = pipeline_class().from_pretrained(source, **kwargs)
    except Exception as exc:  # the hub client raises many kinds; all mean "cannot load this"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise ModelLoadError(f"could not load the model folder {source}: {reason}") from None
        raise ModelLoadError(
            f"could not load {source!r} from the Hugging Face hub ({reason}); check the id and the network, "
            "or download the model elsewhere and pass its local folder"
        ) from None
    from explain.adapters.diffusers.families import UnsupportedPipelineError, family_of

    try:
        family_of(pipe)
    except UnsupportedPipelineError as exc:
        raise ModelLoadError(f"{source}: {exc}") from None
    if getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # it would blank images and costs time; explanations need the real output
    pipe.to(device, resolve_dtype(dtype, device, external=True) if isinstance(dtype, str) else dtype)
    return pipe


_ANNOUNCED: set[str] = set()


def _announce_once(message: str) -> None:
    if message not in _ANNOUNCED:
        _ANNOUNCED.add(message)
        print(message, file=sys.stderr, flush=True)
