"""The embedded models and the synthetic world they were trained on.

This subpackage sits above the core: it uses `explain` (tokens, traces) and the core never
imports it. ``world`` draws scenes with ground-truth masks and captions, ``vocabulary`` writes
the offline CLIP tokenizer of the world's grammar, ``checker`` reads attributes back from an
image, and ``model`` builds and loads the shipped pipeline.

    from explain import embedded
    pipe = embedded.load_pipeline()
"""

from explain.embedded.model import (
    DEFAULT_GUIDANCE,
    DEFAULT_PROMPT,
    DEFAULT_STEPS,
    IMAGE_SIZE,
    MODEL_DIR,
    MODEL_ID,
    SCHEDULER_CONFIG,
    TEXT_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
    EmbeddedModelMissing,
    build_components,
    check_prompt,
    is_available,
    load_pipeline,
    training_info,
    vocabulary,
)

__all__ = [
    "DEFAULT_GUIDANCE",
    "DEFAULT_PROMPT",
    "DEFAULT_STEPS",
    "IMAGE_SIZE",
    "MODEL_DIR",
    "MODEL_ID",
    "SCHEDULER_CONFIG",
    "TEXT_CONFIG",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "EmbeddedModelMissing",
    "build_components",
    "check_prompt",
    "is_available",
    "load_pipeline",
    "training_info",
    "vocabulary",
]
