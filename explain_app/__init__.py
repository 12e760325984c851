"""The Gradio app over the ``explain`` core; `gradio_app.py` at the repository root serves it.

Named ``explain_app`` rather than ``app``: ComfyUI has a top-level ``app`` package of its own,
and this repository is also a ComfyUI custom-node folder.

Modules: `inputs` (limits and checks), `session` (per-tab state, the model cache), `views`
(pictures and tables of a trace), `actions` (generate, open, DF-RISE, DF-CAM, the guidance map, the causal onset, downloads), `ui`
(the Blocks). Everything above `ui` takes and returns plain values, so tests need no browser.
"""

from explain_app.actions import (
    CAM_GROUPS,
    MapView,
    RiseView,
    cam_layer_choices,
    cam_view,
    generate,
    guidance_view,
    model_for_trace,
    model_size_choices,
    model_status,
    native_size,
    onset_view,
    open_trace,
    rise_settings,
    rise_view,
    save_report,
    save_trace_file,
    size_choices,
)
from explain_app.inputs import (
    CURVE_KINDS,
    DEFAULT_MASKS,
    DEFAULT_MODEL,
    DISPLAY_SIDE,
    MAX_GUIDANCE,
    MAX_LAM,
    MAX_MASKS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    SIZES,
    InputError,
    check_float,
    check_int,
    check_prompt,
    check_step_range,
    parse_size,
)
from explain_app.session import MODELS, ModelCache, Session, close_session
from explain_app.views import (
    concept_colors,
    concept_frame,
    content_words,
    default_word,
    enlarge,
    final_view,
    recovery_verdict,
    recovery_views,
    step_view,
    summary,
    verdict_markdown,
    word_view,
)

__all__ = [
    "CAM_GROUPS", "CURVE_KINDS", "MapView", "DEFAULT_MASKS", "DEFAULT_MODEL", "DISPLAY_SIDE", "MAX_GUIDANCE", "MAX_LAM",
    "MAX_MASKS", "MAX_PROMPT_CHARS", "MAX_SEED", "MAX_STEPS", "MODELS", "SIZES", "InputError", "ModelCache",
    "RiseView", "Session", "cam_layer_choices", "cam_view", "check_float", "check_int", "check_prompt",
    "check_step_range", "close_session", "concept_colors", "concept_frame", "content_words", "default_word", "enlarge",
    "final_view", "generate", "guidance_view", "model_for_trace", "model_size_choices", "model_status", "native_size", "onset_view", "open_trace", "parse_size", "recovery_verdict", "recovery_views", "rise_settings", "rise_view",
    "save_report", "save_trace_file", "size_choices", "step_view", "summary", "verdict_markdown", "word_view",
]
