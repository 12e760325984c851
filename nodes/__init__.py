"""The ComfyUI adapter of diffusion-explain: node classes and the tap that records into the
core's `explain.trace.Trace`. Nothing here imports ComfyUI at import time."""

from .explain_nodes import (
    ExplainCam,
    ExplainConceptScores,
    ExplainRecovery,
    ExplainRise,
    ExplainStepPreviews,
    ExplainWordHeatmaps,
)
from .sigmas import ExplainExponentialSigmas
from .tap_node import ExplainTap
from .trace_io import ExplainLoadTrace, ExplainSaveTrace

NODE_CLASS_MAPPINGS = {
    "DiffusionExplainTap": ExplainTap,
    "DiffusionExplainWordHeatmaps": ExplainWordHeatmaps,
    "DiffusionExplainStepPreviews": ExplainStepPreviews,
    "DiffusionExplainConceptScores": ExplainConceptScores,
    "DiffusionExplainRise": ExplainRise,
    "DiffusionExplainCam": ExplainCam,
    "DiffusionExplainRecovery": ExplainRecovery,
    "DiffusionExplainExponentialSigmas": ExplainExponentialSigmas,
    "DiffusionExplainSaveTrace": ExplainSaveTrace,
    "DiffusionExplainLoadTrace": ExplainLoadTrace,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "DiffusionExplainTap": "Explain Tap (attention + x0 per step)",
    "DiffusionExplainWordHeatmaps": "Explain Word Heatmaps",
    "DiffusionExplainStepPreviews": "Explain Step Previews (x0 and x_t)",
    "DiffusionExplainConceptScores": "Explain Concept Scores",
    "DiffusionExplainRise": "Explain DF-RISE (saliency + AUC)",
    "DiffusionExplainCam": "Explain DF-CAM (Grad-CAM)",
    "DiffusionExplainRecovery": "Explain Recovery (R1)",
    "DiffusionExplainExponentialSigmas": "Explain Exponential Sigmas (early / latter)",
    "DiffusionExplainSaveTrace": "Explain Save Trace",
    "DiffusionExplainLoadTrace": "Explain Load Trace",
}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
