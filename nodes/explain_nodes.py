"""Explanation nodes: thin wrappers that resolve the trace of the run that made a LATENT and
call the core (`explain.methods.heatmaps`, `explain.methods.concepts`, `explain.methods.recovery`, `explain.methods.rise`,
`explain.methods.cam`, `explain.methods.faithfulness`, `explain.render`).

Every node takes the Tap's ``trace`` and the sampler's ``latent``: the latent makes ComfyUI run
the node after sampling and selects the run (see `nodes.runs`). Nodes are output nodes, so
they run and show their pictures even when nothing is connected downstream.
"""

from __future__ import annotations

import json
import logging
import os
import uuid

import torch

from explain import render

from explain.methods import concepts, heatmaps, recovery
from explain.trace import Trace

from .decode import decode_steps, to_uint8
from .images import to_comfy_image
from .tap_node import CATEGORY, TRACE_TYPE

CAM_GUIDANCE_NOTE = (
    "the model carries a guidance patch (RescaleCFG, SAG, APG, SkipLayerGuidance...); DF-CAM combines the two "
    "branches' activations and gradients linearly, as the paper does, so it explains plain CFG at this cfg"
)
TRACE_INPUTS = {
    "trace": (TRACE_TYPE, {"tooltip": "From an Explain Tap (or Explain Load Trace)."}),
}
LATENT_INPUT = {
    "latent": (
        "LATENT",
        {"tooltip": "The sampler's LATENT output: runs this node after sampling and picks the run to explain."},
    ),
}


# ---------------------------------------------------------------------------- shared helpers
def preview_ui(images: torch.Tensor, prefix: str = "diffusion-explain") -> dict:
    """Save IMAGE ``[B, H, W, 3]`` to ComfyUI's temp folder and describe them for the node's
    preview (what PreviewImage does)."""
    import folder_paths
    from PIL import Image

    folder = folder_paths.get_temp_directory()
    os.makedirs(folder, exist_ok=True)
    results = []
    for image in images:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}.png"
        Image.fromarray(to_uint8(image).cpu().numpy()).save(os.path.join(folder, name), compress_level=1)
        results.append({"filename": name, "subfolder": "", "type": "temp"})
    return {"images": results}


def base_image(trace: Trace, item: int, image: torch.Tensor | None):
    """The picture to overlay on: ``image`` (an IMAGE input, batch item ``item`` or its only
    image), else the trace's final image or preview, else a latent picture."""
    if image is not None:
        if image.ndim != 4:
            raise ValueError(f"image must be a ComfyUI IMAGE [B, H, W, 3], got shape {tuple(image.shape)}")
        return image[item if image.shape[0] > item else 0]
    return render.final_image(trace, item)


def check_item(trace: Trace, item: int) -> int:
    if not 0 <= item < trace.batch_size:
        raise ValueError(f"item {item} is outside the batch; this run has items 0..{trace.batch_size - 1}")
    return item


def parse_words(text: str) -> list[str] | None:
    """``"red, blue square"`` → ``["red", "blue square"]``; empty → None (every word)."""
    words = [w.strip() for w in (text or "").split(",") if w.strip()]
    return words or None


def as_image(array) -> torch.Tensor:
    return to_comfy_image(array)


def masks_of(maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([m.float().clamp(0, 1) for m in maps]) if maps else torch.zeros(1, 64, 64)


# ---------------------------------------------------------------------------- word heatmaps
class ExplainWordHeatmaps:
    DESCRIPTION = (
        "Where the model looked for each prompt word: cross-attention averaged over the chosen steps, heads and "
        "layers, upsampled to the image. One overlay and one MASK per word. Steps: '' = all, '0:10', '-5:', '3'."
    )
    CATEGORY = CATEGORY
    FUNCTION = "explain"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "MASK", "IMAGE", "STRING")
    RETURN_NAMES = ("overlays", "masks", "grid", "words")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **TRACE_INPUTS,
                **LATENT_INPUT,
                "words": ("STRING", {"default": "", "tooltip": "Comma-separated words or phrases; empty = every prompt word."}),
                "steps": ("STRING", {"default": "", "tooltip": "'' all steps, '0:10', '10:', '-5:', '7' or '0,3,7'."}),
                "item": ("INT", {"default": 0, "min": 0, "max": 4096, "tooltip": "Which image of the batch."}),
                "negative": ("BOOLEAN", {"default": False, "tooltip": "Map the negative prompt's words instead."}),
                "overlay": (list(render.OVERLAY_MODES), {"default": "paper"}),
            },
            "optional": {
                "image": ("IMAGE", {"tooltip": "The decoded image to draw on (default: the trace's own)."}),
            },
        }

    def explain(self, trace, latent, words, steps, item, negative, overlay, image=None):
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        base = base_image(tr, item, image)
        size = tuple(render.as_uint8_image(base).shape[:2])
        maps = heatmaps.word_heatmaps(tr, parse_words(words), steps, item=item, negative=negative, size=size)
        overlays = [render.overlay(base, m, mode=overlay) for m in maps.values()]
        grid = render.heatmap_grid(base, maps, mode=overlay, title=f"steps {steps or 'all'}", columns=min(len(maps), 6))
        out_images = as_image(overlays)
        return {
            "ui": preview_ui(as_image(grid)),
            "result": (out_images, masks_of(list(maps.values())), as_image(grid), json.dumps(list(maps))),
        }


# ---------------------------------------------------------------------------- step previews
class ExplainStepPreviews:
    DESCRIPTION = (
        "What the model predicted at each step: the decoded x0 (the clean image it aims at) and the noisy latent "
        "x_t entering the step, as IMAGE batches, plus a labelled grid."
    )
    CATEGORY = CATEGORY
    FUNCTION = "explain"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "IMAGE", "IMAGE")
    RETURN_NAMES = ("x0", "x_t", "grid")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **TRACE_INPUTS,
                **LATENT_INPUT,
                "vae": ("VAE",),
                "steps": ("STRING", {"default": "", "tooltip": "'' = `count` steps spread over the run; or '0:10', '0,5,9'."}),
                "count": ("INT", {"default": 8, "min": 1, "max": 1000}),
                "item": ("INT", {"default": 0, "min": 0, "max": 4096}),
            }
        }

    def explain(self, trace, latent, vae, steps, count, item):
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        chosen = heatmaps.select_steps(tr, steps) if steps.strip() else render.pick_steps(tr.num_steps, count)
        x0 = decode_steps(vae, tr, "x0", chosen, item)
        xt = decode_steps(vae, tr, "x_t", chosen, item)
        shown = Trace(
            prompts=tr.prompts, tokens=tr.tokens, words=tr.words, timesteps=tr.timesteps, sigmas=tr.sigmas,
            x_t=tr.x_t, x0=tr.x0, meta=tr.meta,
        )  # fmt: skip
        s, b = tr.num_steps, tr.batch_size
        full_x0 = torch.zeros(s, b, *x0.shape[1:], dtype=torch.uint8)
        full_xt = torch.zeros_like(full_x0)
        full_x0[chosen, item] = to_uint8(x0)
        full_xt[chosen, item] = to_uint8(xt)
        shown.x0_previews, shown.x_t_previews = full_x0, full_xt
        grid = as_image(render.step_grid(shown, steps=chosen, item=item))
        return {"ui": preview_ui(grid), "result": (x0, xt, grid)}


# ---------------------------------------------------------------------------- concept scores
class ExplainConceptScores:
    DESCRIPTION = (
        "How much attention each prompt word gets at each step (the paper's per-step min-max, or the share of "
        "prompt-word attention, or the raw mass), when it emerges and how it trends; a plot and JSON."
    )
    CATEGORY = CATEGORY
    FUNCTION = "explain"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("plot", "json")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **TRACE_INPUTS,
                **LATENT_INPUT,
                "words": ("STRING", {"default": "", "tooltip": "Comma-separated; empty = every prompt word."}),
                "steps": ("STRING", {"default": ""}),
                "kind": (["normalized", "share", "mass"], {"default": "normalized"}),
                "item": ("INT", {"default": 0, "min": 0, "max": 4096}),
                "negative": ("BOOLEAN", {"default": False}),
            }
        }

    def explain(self, trace, latent, words, steps, kind, item, negative):
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        scores = concepts.concept_scores(tr, parse_words(words), steps, item=item, negative=negative)
        plot = as_image(render.concept_curves(scores, kind=kind))
        text = json.dumps(scores.to_json())
        return {"ui": {**preview_ui(plot), "text": [text]}, "result": (plot, text)}


# ---------------------------------------------------------------------------- R1 recovery
class ExplainRecovery:
    DESCRIPTION = (
        "R1, what is recovered when: how the x0 prediction changes from step to step, which pixels already match "
        "the final result, and the step at which each pixel settles. With a VAE it compares decoded images, "
        "otherwise latents."
    )
    CATEGORY = CATEGORY
    FUNCTION = "explain"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("grid", "curves", "recovery_step", "json")

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **TRACE_INPUTS,
                **LATENT_INPUT,
                "tolerance": ("FLOAT", {"default": 0.25, "min": 0.001, "max": 10.0, "step": 0.01,
                                        "tooltip": "A pixel is recovered when within tolerance × std of the final."}),
                "count": ("INT", {"default": 6, "min": 1, "max": 100}),
                "item": ("INT", {"default": 0, "min": 0, "max": 4096}),
            },
            "optional": {"vae": ("VAE", {"tooltip": "Compare decoded images instead of latents."})},
        }  # fmt: skip

    def explain(self, trace, latent, tolerance, count, item, vae=None):
        from .decode import add_decoded_images

        tr = trace.resolve(latent)
        item = check_item(tr, item)
        space = "latent"
        if vae is not None:
            tr = add_decoded_images(_copy_trace(tr), vae, previews=True, noisy=False)
            space = "preview"
        view = recovery.trace_recovery(tr, space=space, tol=float(tolerance))
        grid = as_image(render.recovery_grid(view, tr, item=item, count=count))
        curves = as_image(render.recovery_curves(view, item=item))
        steps_map = view.recovery_step[item].float() / max(view.num_steps, 1)
        size = tr.image_size if space == "latent" else tuple(steps_map.shape)
        mask = heatmaps.upsample(steps_map, size, mode="nearest").unsqueeze(0)
        text = json.dumps(view.to_json())
        return {"ui": preview_ui(torch.cat([grid])), "result": (grid, curves, mask, text)}


def _copy_trace(tr: Trace) -> Trace:
    import copy

    return copy.copy(tr)


# ---------------------------------------------------------------------------- DF-RISE
class ExplainRise:
    DESCRIPTION = (
        "DF-RISE at one step: which regions of the noisy latent the model's prediction rests on. Random masks "
        "keep parts of x_t, the model predicts from each, and the similarity to the unmasked prediction is "
        "averaged per pixel. Also plays the insertion and deletion games (AUCs of distance curves: a faithful "
        "map has a LOW insertion and a HIGH deletion AUC). Connect the same MODEL and conditionings as the sampler."
    )
    CATEGORY = CATEGORY
    FUNCTION = "explain"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "MASK", "FLOAT", "FLOAT", "STRING")
    RETURN_NAMES = ("overlay", "saliency", "insertion_auc", "deletion_auc", "json")

    @classmethod
    def INPUT_TYPES(cls):
        from explain import similarity

        from explain.methods import rise

        return {
            "required": {
                **TRACE_INPUTS,
                **LATENT_INPUT,
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "step": ("INT", {"default": 0, "min": -1000, "max": 1000, "tooltip": "Step index in the run; -1 = last."}),
                "n_masks": ("INT", {"default": 256, "min": 1, "max": 100000}),
                "similarity": (list(similarity.SIMILARITIES), {"default": "structure"}),
                "quantity": (["x0", "epsilon"], {"default": "x0"}),
                "masks": (list(rise.MASK_KINDS), {"default": "bernoulli"}),
                "p": ("FLOAT", {"default": 0.5, "min": 0.01, "max": 0.99, "step": 0.01}),
                "centered": ("BOOLEAN", {"default": True, "tooltip": "Subtract each pixel's mean similarity (less noisy)."}),
                # not called "seed": the front end gives inputs of that name a randomize-after-run control
                "mask_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip": "Seed of the random masks."}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "0 = the sampler's cfg."}),
                "item": ("INT", {"default": 0, "min": 0, "max": 4096}),
                "games": ("BOOLEAN", {"default": True, "tooltip": "Play the insertion/deletion games for the AUCs."}),
            },
            "optional": {"image": ("IMAGE",)},
        }

    def explain(self, trace, latent, model, positive, negative, step, n_masks, similarity, quantity, masks, p, centered, mask_seed, cfg, item, games, image=None):
        from explain.methods import faithfulness, rise

        from .comfy_denoiser import guidance_of, memory_budget, run_with_denoiser

        tr = trace.resolve(latent)
        item = check_item(tr, item)
        step = tr.check_step(int(step))
        scale = guidance_of(tr, cfg)

        def work(denoiser):
            result = rise.df_rise(
                denoiser, tr, step, item, n_masks=int(n_masks), quantity=quantity, masks=masks, p=float(p),
                similarity=similarity, centered=bool(centered), seed=int(mask_seed), memory_budget=memory_budget(denoiser.device),
            )  # fmt: skip
            budget = memory_budget(denoiser.device)  # ComfyUI's count, after DF-RISE's batches
            played = faithfulness.insertion_deletion(denoiser, tr, step, result.saliency, item, seed=int(mask_seed), memory_budget=budget) if games else {}
            return result, played

        result, played = run_with_denoiser(model, positive, negative, tr, step, scale, work)
        shown = result.display()
        base = base_image(tr, item, image)
        size = tuple(render.as_uint8_image(base).shape[:2])
        mask = heatmaps.normalize_map(heatmaps.upsample(shown, size), "minmax")
        overlay = as_image(render.overlay(base, mask))
        aucs = {mode: game.latent_auc for mode, game in played.items()}
        info = {
            "step": step, "timestep": float(tr.timesteps[step]), "sigma": float(tr.sigmas[step]), "n_masks": result.n_masks,
            "similarity": result.similarity, "quantity": result.quantity, "masks": result.mask_kind, "p": result.p,
            "centered": result.centered, "cfg": scale, "item": item,
            "insertion_auc": aucs.get("insertion"), "deletion_auc": aucs.get("deletion"),
            "auc_direction": "distance curves: lower insertion AUC and higher deletion AUC mean a more faithful map",
        }  # fmt: skip
        text = json.dumps(info)
        return {
            "ui": {**preview_ui(overlay), "text": [text]},
            "result": (overlay, mask.unsqueeze(0), float(aucs.get("insertion", float("nan"))), float(aucs.get("deletion", float("nan"))), text),
        }


# ---------------------------------------------------------------------------- DF-CAM
class ExplainCam:
    DESCRIPTION = (
        "DF-CAM at one step: Grad-CAM on the UNet's blocks (the paper's 43 modules, or all), from one forward and "
        "one backward pass. Runs with gradients outside ComfyUI's inference mode and leaves the model unchanged. "
        "Connect the same MODEL and conditionings as the sampler."
    )
    CATEGORY = CATEGORY
    FUNCTION = "explain"
    OUTPUT_NODE = True
    RETURN_TYPES = ("IMAGE", "MASK", "STRING")
    RETURN_NAMES = ("overlay", "saliency", "json")

    @classmethod
    def INPUT_TYPES(cls):
        from explain.methods import cam

        return {
            "required": {
                **TRACE_INPUTS,
                **LATENT_INPUT,
                "model": ("MODEL",),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "step": ("INT", {"default": 0, "min": -1000, "max": 1000, "tooltip": "Step index in the run; -1 = last."}),
                "layers": (["paper", "all"], {"default": "paper"}),
                "target": (list(cam.TARGETS), {"default": "sum"}),
                "quantity": (["epsilon", "x0"], {"default": "epsilon"}),
                "cfg": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "0 = the sampler's cfg."}),
                "item": ("INT", {"default": 0, "min": 0, "max": 4096}),
            },
            "optional": {"image": ("IMAGE",)},
        }

    def explain(self, trace, latent, model, positive, negative, step, layers, target, quantity, cfg, item, image=None):
        from explain.methods import cam

        from .comfy_denoiser import guidance_of, run_with_denoiser

        tr = trace.resolve(latent)
        item = check_item(tr, item)
        step = tr.check_step(int(step))
        scale = guidance_of(tr, cfg)
        base = base_image(tr, item, image)
        size = tuple(render.as_uint8_image(base).shape[:2])

        hosted = {}

        def work(denoiser):
            hosted["guidance"] = denoiser.guide_fn is not None
            return cam.df_cam(denoiser, tr, step, item, layers=layers, target=target, quantity=quantity, image_size=size)

        result = run_with_denoiser(model, positive, negative, tr, step, scale, work, separate_branches=True, backward=True)
        mask = heatmaps.normalize_map(result.display().float(), "minmax")
        overlay = as_image(render.overlay(base, mask))
        info = {"step": step, "timestep": float(tr.timesteps[step]), "layers": layers, "modules": len(result.layers),
                "target": target, "quantity": quantity, "cfg": scale, "item": item}  # fmt: skip
        if hosted.get("guidance"):
            info["note"] = CAM_GUIDANCE_NOTE
            logging.warning("DF-CAM: %s", CAM_GUIDANCE_NOTE)
        text = json.dumps(info)
        return {"ui": {**preview_ui(overlay), "text": [text]}, "result": (overlay, mask.unsqueeze(0), text)}
