"""The node pack as ComfyUI's V3 extension: the list of nodes and ``comfy_entrypoint``."""

from __future__ import annotations

from .api import ComfyExtension
from .explain_nodes import ExplainCam, ExplainConceptOnset, ExplainConceptScores, ExplainGuidanceMap, ExplainRecovery, ExplainRise, ExplainStepPreviews, ExplainWordHeatmaps
from .sigmas import ExplainExponentialSigmas
from .tap_node import ExplainTap
from .trace_io import ExplainLoadTrace, ExplainSaveTrace

# Saved workflows name nodes by these ids: never change one (a test checks each class's schema says the same).
NODES_BY_ID = {
    "DiffusionExplainTap": ExplainTap,
    "DiffusionExplainWordHeatmaps": ExplainWordHeatmaps,
    "DiffusionExplainStepPreviews": ExplainStepPreviews,
    "DiffusionExplainConceptScores": ExplainConceptScores,
    "DiffusionExplainRise": ExplainRise,
    "DiffusionExplainCam": ExplainCam,
    "DiffusionExplainGuidanceMap": ExplainGuidanceMap,
    "DiffusionExplainConceptOnset": ExplainConceptOnset,
    "DiffusionExplainRecovery": ExplainRecovery,
    "DiffusionExplainExponentialSigmas": ExplainExponentialSigmas,
    "DiffusionExplainSaveTrace": ExplainSaveTrace,
    "DiffusionExplainLoadTrace": ExplainLoadTrace,
}
NODES = list(NODES_BY_ID.values())


class DiffusionExplainExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> DiffusionExplainExtension:
    return DiffusionExplainExtension()
