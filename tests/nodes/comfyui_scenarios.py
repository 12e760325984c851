"""Scenarios the ComfyUI harness runs in one ComfyUI process; each returns JSON-able facts that
test_comfyui_integration.py asserts on. Imported only inside the harness (ComfyUI loaded)."""

from __future__ import annotations

from pathlib import Path

from comfyui_harness import CHECKPOINT_NAME, load_workflow, pack_module, workflow_to_prompt

PROMPT = "a red circle above a blue square"
NEGATIVE = "blurry"


def _trace_facts(path: str) -> dict:
    from explain.trace import Trace

    trace = Trace.load(path)
    return {
        "steps": trace.num_steps,
        "batch": trace.batch_size,
        "latent_size": list(trace.latent_size),
        "image_size": list(trace.image_size),
        "tokens": trace.tokens[0],
        "words": [w.text for w in trace.words[0]],
        "attention_shape": list(trace.attention.shape) if trace.attention is not None else None,
        "attention_negative_shape": list(trace.attention_negative.shape) if trace.attention_negative is not None else None,
        "attention_row_sums": [float(trace.attention.sum(2).min()), float(trace.attention.sum(2).max())],
        "sigmas": trace.sigmas.tolist(),
        "timesteps": trace.timesteps.tolist(),
        "meta": trace.meta,
        "has_images": trace.images is not None,
        "has_previews": trace.x0_previews is not None,
        "layers": sorted(trace.attention_layers),
    }


def _saved_paths(result: dict, node_id: str) -> list[str]:
    return list(result.get("outputs", {}).get(node_id, {}).get("text", []))


def basic_prompt(sampler="euler", steps=3, cfg=5.0, width=64, height=64, batch=1, seed=1) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "4": {
            "class_type": "DiffusionExplainTap",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "prompt": PROMPT, "negative_prompt": NEGATIVE},
        },
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
                "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0,
            },
        },  # fmt: skip
        "7": {
            "class_type": "DiffusionExplainSaveTrace",
            "inputs": {"trace": ["4", 1], "latent": ["6", 0], "filename_prefix": "explain-test/basic"},
        },
    }


def _run_and_read(runner, prompt: dict, save_node: str = "7") -> dict:
    result = runner.run(prompt)
    facts = {"result": result}
    if result["ok"]:
        paths = _saved_paths(result, save_node)
        if paths:
            import folder_paths

            facts["trace"] = _trace_facts(str(Path(folder_paths.get_output_directory()) / paths[0]))
    return facts


# ---------------------------------------------------------------------------- scenarios
def smoke(runner, nodes_module, work) -> dict:
    return _run_and_read(runner, basic_prompt())


SCENARIOS = {
    "smoke": smoke,
}
