"""The embedded models and the synthetic world they were trained on.

This subpackage sits above the core: it uses `explain` (tokens, traces) and the core never
imports it. ``world`` draws scenes with ground-truth masks and captions, ``vocabulary`` writes
the offline CLIP tokenizer of the world's grammar, ``checker`` reads attributes back from an
image, ``model`` builds and loads the shipped pipelines and ``dit`` holds the MMDiT one's
configuration and builder.

    from explain import embedded
    pipe = embedded.load_pipeline()            # the UNet model (shapes-64)
    dit = embedded.load_pipeline("dit")        # the MMDiT model (shapes-dit-64)
    dit(prompt, **embedded.call_kwargs(dit))   # max_sequence_length=0: no T5 padding tokens
"""

from explain.embedded.dit import (
    DIT_DEFAULT_GUIDANCE,
    DIT_DEFAULT_STEPS,
    DIT_MAX_TOKENS,
    DIT_MODEL_DIR,
    DIT_MODEL_ID,
    DIT_SCHEDULER_CONFIG,
    DIT_TRANSFORMER_CONFIG,
    build_dit_components,
    call_kwargs,
)
from explain.embedded.model import (
    DEFAULT_GUIDANCE,
    DEFAULT_PROMPT,
    DEFAULT_STEPS,
    IMAGE_SIZE,
    MODEL_DIR,
    MODEL_ID,
    MODEL_NAMES,
    SCHEDULER_CONFIG,
    TEXT_CONFIG,
    UNET_CONFIG,
    VAE_CONFIG,
    EmbeddedModelMissing,
    build_components,
    check_prompt,
    is_available,
    load_pipeline,
    model_dir_for,
    training_info,
    vocabulary,
)

__all__ = [
    "DIT_DEFAULT_GUIDANCE",
    "DIT_DEFAULT_STEPS",
    "DIT_MAX_TOKENS",
    "DIT_MODEL_DIR",
    "DIT_MODEL_ID",
    "DIT_SCHEDULER_CONFIG",
    "DIT_TRANSFORMER_CONFIG",
    "build_dit_components",
    "call_kwargs",
    "model_dir_for",
    "MODEL_NAMES",
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
