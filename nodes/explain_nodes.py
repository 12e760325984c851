"""Explanation nodes: thin wrappers that resolve the trace of the run that made a LATENT and
call the core (`explain.methods.heatmaps`, `explain.methods.concepts`, `explain.methods.recovery`, `explain.methods.rise`,
`explain.methods.cam`, `explain.methods.guidance`, `explain.methods.faithfulness`, `explain.render`).

Every node takes the Tap's ``trace`` and the sampler's ``latent``: the latent makes ComfyUI run
the node after sampling and selects the run (see `nodes.runs`). Nodes are output nodes, so
they run and show their pictures even when nothing is connected downstream.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid

import torch

from explain import render
from explain.methods import concepts, defaults, heatmaps, recovery
from explain.trace import Trace

from . import environment
from .api import io
from .decode import decode_steps, to_uint8
from .images import to_comfy_image
from .tap_node import CATEGORY, TraceSocket

CAM_GUIDANCE_NOTE = (
    "the model carries a guidance patch (RescaleCFG, SAG, APG, SkipLayerGuidance...); DF-CAM combines the two "
    "branches' activations and gradients linearly, as the paper does, so it explains plain CFG at this cfg"
)


# ---------------------------------------------------------------------------- shared inputs
def trace_input():
    return TraceSocket.Input("trace", tooltip="From an Explain Tap (or Explain Load Trace).")


def latent_input():
    return io.Latent.Input("latent", tooltip="The sampler's LATENT output: runs this node after sampling and picks the run to explain.")


def item_input():
    return io.Int.Input("item", default=0, min=0, max=4096, tooltip="Which image of the batch (0 = the first).")


def image_input():
    return io.Image.Input("image", optional=True, tooltip="The decoded image to draw on (default: the trace's own final image).")


def model_inputs():
    """The MODEL and conditionings DF-RISE and DF-CAM re-run: the sampler's own."""
    return [
        io.Model.Input("model", tooltip="The MODEL the sampler used (the Tap's output, with any patches on it)."),
        io.Conditioning.Input("positive", tooltip="The sampler's positive conditioning."),
        io.Conditioning.Input("negative", tooltip="The sampler's negative conditioning."),
    ]


class ExplanationNode(io.ComfyNode):
    """What every explanation node shares: the pictures need matplotlib, checked when ComfyUI
    validates the prompt (before any sampling) and again when the node starts."""

    NEEDS: tuple[str, ...] = ("matplotlib",)

    @classmethod
    def validate_inputs(cls, trace):
        return environment.node_requirement_error(cls.NEEDS) or True

    @classmethod
    def check_requirements(cls) -> None:
        environment.require(cls.NEEDS)


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
    return heatmaps.parse_words(text) or None


def sanity_line(method_id: str, trace: Trace) -> str:
    """Whether ``method_id`` passes the sanity checks on the trace's model: the verdict cached for
    that model (`explain.methods.sanity.known_verdict`), or "not measured" with how to measure one."""
    from explain.explanations import sanity_verdict

    return sanity_verdict(method_id, trace.meta.get("model"))[1]


def as_image(array) -> torch.Tensor:
    return to_comfy_image(array)


def masks_of(maps: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([m.float().clamp(0, 1) for m in maps]) if maps else torch.zeros(1, 64, 64)


# ---------------------------------------------------------------------------- word heatmaps
class ExplainWordHeatmaps(ExplanationNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainWordHeatmaps",
            display_name="Explain Word Heatmaps",
            category=CATEGORY,
            description=(
                "Where the model looked for each prompt word: cross-attention averaged over the chosen steps, heads "
                "and layers, upsampled to the image. One overlay and one MASK per word. Steps: '' = all, '0:10', '-5:', '3'."
            ),
            is_output_node=True,
            inputs=[
                trace_input(),
                latent_input(),
                io.String.Input("words", default="", tooltip="Comma-separated words or phrases; empty = every prompt word."),
                io.String.Input("steps", default="", tooltip="'' all steps, '0:10', '10:', '-5:', '7' or '0,3,7'."),
                item_input(),
                io.Boolean.Input("negative", default=False, tooltip="Map the negative prompt's words instead."),
                io.Combo.Input(
                    "overlay", options=list(render.OVERLAY_MODES), default="paper",
                    tooltip="'paper': the map's colours weighted by its strength (the paper's display); 'alpha': a 50 % blend.",
                ),  # fmt: skip
                image_input(),
            ],
            outputs=[
                io.Image.Output("overlays", display_name="overlays", tooltip="One heatmap overlay per word, as an IMAGE batch."),
                io.Mask.Output("masks", display_name="masks", tooltip="One MASK per word (0..1, min-max normalised), image-sized."),
                io.Image.Output("grid", display_name="grid", tooltip="All words' overlays in one labelled picture."),
                io.String.Output("word_list", display_name="words", tooltip="The mapped words, in output order, as a JSON list."),
            ],
        )

    @classmethod
    def execute(cls, trace, latent, words, steps, item, negative, overlay, image=None):
        cls.check_requirements()
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        base = base_image(tr, item, image)
        size = tuple(render.as_uint8_image(base).shape[:2])
        maps = heatmaps.word_heatmaps(tr, parse_words(words), steps, item=item, negative=negative, size=size)
        overlays = [render.overlay(base, m, mode=overlay) for m in maps.values()]
        grid = render.heatmap_grid(base, maps, mode=overlay, title=f"steps {steps or 'all'}", columns=min(len(maps), 6))
        return io.NodeOutput(
            as_image(overlays), masks_of(list(maps.values())), as_image(grid), json.dumps(list(maps)),
            ui={**preview_ui(as_image(grid)), "text": [f"word heatmaps: {sanity_line('word_heatmap', tr)}"]},
        )


# ---------------------------------------------------------------------------- step previews
class ExplainStepPreviews(ExplanationNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainStepPreviews",
            display_name="Explain Step Previews (x0 and x_t)",
            category=CATEGORY,
            description=(
                "What the model predicted at each step: the decoded x0 (the clean image it aims at) and the noisy "
                "latent x_t entering the step, as IMAGE batches, plus a labelled grid."
            ),
            is_output_node=True,
            inputs=[
                trace_input(),
                latent_input(),
                io.Vae.Input("vae", tooltip="The VAE of the checkpoint, to decode the latents."),
                io.String.Input("steps", default="", tooltip="'' = `count` steps spread over the run; or '0:10', '0,5,9'."),
                io.Int.Input("count", default=8, min=1, max=1000, tooltip="How many steps to show when 'steps' is empty."),
                item_input(),
            ],
            outputs=[
                io.Image.Output("x0", display_name="x0", tooltip="Decoded x0 (the predicted clean image) of each chosen step."),
                io.Image.Output("x_t", display_name="x_t", tooltip="Decoded noisy latent x_t entering each chosen step."),
                io.Image.Output("grid", display_name="grid", tooltip="x0 and x_t of the chosen steps in one labelled picture."),
            ],
        )

    @classmethod
    def execute(cls, trace, latent, vae, steps, count, item):
        cls.check_requirements()
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
        return io.NodeOutput(x0, xt, grid, ui=preview_ui(grid))


# ---------------------------------------------------------------------------- concept scores
class ExplainConceptScores(ExplanationNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainConceptScores",
            display_name="Explain Concept Scores",
            category=CATEGORY,
            description=(
                "How much attention each prompt word gets at each step (the paper's per-step min-max, or the share "
                "of prompt-word attention, or the raw mass), when it emerges and how it trends; a plot and JSON."
            ),
            is_output_node=True,
            inputs=[
                trace_input(),
                latent_input(),
                io.String.Input("words", default="", tooltip="Comma-separated words or phrases; empty = every prompt word."),
                io.String.Input("steps", default="", tooltip="'' all steps, '0:10', '10:', '-5:', '7' or '0,3,7'."),
                io.Combo.Input(
                    "kind", options=["normalized", "share", "mass"], default="normalized",
                    tooltip="'normalized': the paper's per-step min-max over words; 'share': each word's part of the "
                    "prompt words' attention; 'mass': the raw attention mass.",
                ),  # fmt: skip
                item_input(),
                io.Boolean.Input("negative", default=False, tooltip="Score the negative prompt's words instead."),
            ],
            outputs=[
                io.Image.Output("plot", display_name="plot", tooltip="The chosen score of each word over the steps."),
                io.String.Output("json", display_name="json", tooltip="All scores per word and step, emergence steps and trends, as JSON."),
            ],
        )

    @classmethod
    def execute(cls, trace, latent, words, steps, kind, item, negative):
        cls.check_requirements()
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        scores = concepts.concept_scores(tr, parse_words(words), steps, item=item, negative=negative)
        plot = as_image(render.concept_curves(scores, kind=kind))
        text = json.dumps(scores.to_json())
        return io.NodeOutput(plot, text, ui={**preview_ui(plot), "text": [text]})


# ---------------------------------------------------------------------------- R1 recovery
class ExplainRecovery(ExplanationNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainRecovery",
            display_name="Explain Recovery (R1)",
            category=CATEGORY,
            description=(
                "R1, what is recovered when: how the x0 prediction changes from step to step, which pixels already "
                "match the final result, and the step at which each pixel settles. With a VAE it compares decoded "
                "images, otherwise latents."
            ),
            is_output_node=True,
            inputs=[
                trace_input(),
                latent_input(),
                io.Float.Input(
                    "tolerance", default=0.25, min=0.001, max=10.0, step=0.01,
                    tooltip="A pixel is recovered when within tolerance × std of the final.",
                ),  # fmt: skip
                io.Int.Input("count", default=6, min=1, max=100, tooltip="How many steps the grid shows."),
                item_input(),
                io.Vae.Input("vae", optional=True, tooltip="Compare decoded images instead of latents."),
            ],
            outputs=[
                io.Image.Output("grid", display_name="grid", tooltip="x0, change and recovered pixels at the chosen steps."),
                io.Image.Output("curves", display_name="curves", tooltip="Change between steps and recovered share over the run."),
                io.Mask.Output(
                    "recovery_step", display_name="recovery_step",
                    tooltip="The step at which each pixel settles, as a fraction of the run (0 = first step, 1 = never).",
                ),  # fmt: skip
                io.String.Output("json", display_name="json", tooltip="The curves and per-pixel recovery steps as JSON."),
            ],
        )

    @classmethod
    def execute(cls, trace, latent, tolerance, count, item, vae=None):
        from .decode import add_decoded_images

        cls.check_requirements()
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
        return io.NodeOutput(grid, curves, mask, text, ui={**preview_ui(torch.cat([grid])), "text": [f"R1 recovery view: {sanity_line('recovery', tr)}"]})


def _copy_trace(tr: Trace) -> Trace:
    import copy

    return copy.copy(tr)


# ---------------------------------------------------------------------------- DF-RISE
def rise_settings(n_masks, similarity, quantity, masks, p, centered, mask_seed) -> defaults.RiseSettings:
    """The node's DF-RISE settings: `defaults.RISE` with the node's widgets over it (the paper's
    algorithm: 500 masks, structure, x0, bernoulli, p 0.5, not centered; the json's ``method``
    then says ``df_rise:paper``)."""
    return dataclasses.replace(
        defaults.RISE, n_masks=int(n_masks), similarity=similarity, quantity=quantity, masks=masks, p=float(p),
        centered=bool(centered), seed=int(mask_seed),
    )  # fmt: skip


class ExplainRise(ExplanationNode):
    @classmethod
    def define_schema(cls):
        from explain import similarity
        from explain.methods import rise

        d = defaults.RISE
        return io.Schema(
            node_id="DiffusionExplainRise",
            display_name="Explain DF-RISE (saliency + AUC)",
            category=CATEGORY,
            description=(
                "DF-RISE at one step: which regions of the noisy latent the model's prediction rests on. Random masks "
                "keep parts of x_t, the model predicts from each, and the similarity to the unmasked prediction is "
                "averaged per pixel. Also plays the insertion and deletion games (AUCs of distance curves: a faithful "
                "map has a LOW insertion and a HIGH deletion AUC). Connect the same MODEL and conditionings as the sampler."
            ),
            is_output_node=True,
            inputs=[
                trace_input(),
                latent_input(),
                *model_inputs(),
                io.Int.Input("step", default=0, min=-1000, max=1000, tooltip="Step index in the run; -1 = last."),
                io.Int.Input("n_masks", default=d.n_masks, min=1, max=100000, tooltip="How many random masks (more: less noisy, slower)."),
                io.Combo.Input(
                    "similarity", options=list(similarity.SIMILARITIES), default=d.similarity,
                    tooltip="How a masked prediction is compared with the unmasked one ('structure': SSIM's structure term).",
                ),  # fmt: skip
                io.Combo.Input("quantity", options=["x0", "epsilon"], default=d.quantity, tooltip="Which prediction is compared: x0 or the noise."),
                io.Combo.Input(
                    "masks", options=["bernoulli", "grid"], default=d.masks,  # saved workflows know these two
                    tooltip="'bernoulli': each latent pixel kept with probability p; 'grid': RISE's upsampled coarse grids.",
                ),  # fmt: skip
                io.Float.Input("p", default=d.p, min=0.01, max=0.99, step=0.01, tooltip="Share of the latent each mask keeps."),
                io.Boolean.Input("centered", default=d.centered, tooltip="Subtract each pixel's mean similarity (less noisy)."),
                # not called "seed": the front end gives inputs of that name a randomize-after-run control
                io.Int.Input("mask_seed", default=d.seed, min=0, max=0xFFFFFFFF, tooltip="Seed of the random masks."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, tooltip="0 = the sampler's cfg."),
                item_input(),
                io.Boolean.Input("games", default=True, tooltip="Play the insertion/deletion games for the AUCs."),
                image_input(),
            ],
            outputs=[
                io.Image.Output("overlay", display_name="overlay", tooltip="The saliency map over the image."),
                io.Mask.Output("saliency", display_name="saliency", tooltip="The saliency map (0..1, min-max normalised), image-sized."),
                io.Float.Output(
                    "insertion_auc", display_name="insertion_auc",
                    tooltip="Area under the insertion curve (distance to the full prediction; lower = more faithful). NaN without games.",
                ),  # fmt: skip
                io.Float.Output(
                    "deletion_auc", display_name="deletion_auc",
                    tooltip="Area under the deletion curve (higher = more faithful). NaN without games.",
                ),  # fmt: skip
                io.String.Output("json", display_name="json", tooltip="Settings, step, noise level and AUCs as JSON."),
            ],
        )

    @classmethod
    def execute(cls, trace, latent, model, positive, negative, step, n_masks, similarity, quantity, masks, p, centered, mask_seed, cfg, item, games, image=None):
        from explain.methods import faithfulness, rise

        from .comfy_denoiser import guidance_of, memory_budget, run_with_denoiser

        cls.check_requirements()
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        step = tr.check_step(int(step))
        scale = guidance_of(tr, cfg)

        settings = rise_settings(n_masks, similarity, quantity, masks, p, centered, mask_seed)

        def work(denoiser):
            result = rise.df_rise(denoiser, tr, step, item, **settings.kwargs(), memory_budget=memory_budget(denoiser.device))
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
            "centered": result.centered, "cfg": scale, "item": item, "method": result.method,
            "sanity": sanity_line(result.method, tr),
            "insertion_auc": aucs.get("insertion"), "deletion_auc": aucs.get("deletion"),
            "auc_direction": "distance curves: lower insertion AUC and higher deletion AUC mean a more faithful map",
        }  # fmt: skip
        text = json.dumps(info)
        insertion, deletion = float(aucs.get("insertion", float("nan"))), float(aucs.get("deletion", float("nan")))
        return io.NodeOutput(overlay, mask.unsqueeze(0), insertion, deletion, text, ui={**preview_ui(overlay), "text": [text]})


# ---------------------------------------------------------------------------- DF-CAM
class ExplainCam(ExplanationNode):
    @classmethod
    def define_schema(cls):
        from explain.methods import cam

        d = defaults.CAM
        return io.Schema(
            node_id="DiffusionExplainCam",
            display_name="Explain DF-CAM (Grad-CAM)",
            category=CATEGORY,
            description=(
                "DF-CAM at one step: Grad-CAM on the UNet's blocks (the paper's 43 modules, or all), or on the image "
                "tokens of every transformer block of an SD3/Flux-family model, from one forward and one backward pass. "
                "Runs with gradients outside ComfyUI's inference mode and leaves the model unchanged. Connect the same "
                "MODEL and conditionings as the sampler."
            ),
            is_output_node=True,
            inputs=[
                trace_input(),
                latent_input(),
                *model_inputs(),
                io.Int.Input("step", default=0, min=-1000, max=1000, tooltip="Step index in the run; -1 = last."),
                io.Combo.Input(
                    "layers", options=["paper", "all"], default=d.layers,
                    tooltip="'paper': the paper's 43 UNet modules; 'all': every block. SD3/Flux-family models: every "
                    "transformer block's image tokens either way.",
                ),  # fmt: skip
                io.Combo.Input(
                    "target", options=list(cam.TARGETS), default=d.target,
                    tooltip="What the gradients are taken of ('sum': the whole predicted output).",
                ),  # fmt: skip
                io.Combo.Input("quantity", options=["epsilon", "x0"], default=d.quantity, tooltip="Explain the predicted noise or x0."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, tooltip="0 = the sampler's cfg."),
                item_input(),
                image_input(),
            ],
            outputs=[
                io.Image.Output("overlay", display_name="overlay", tooltip="The Grad-CAM map over the image."),
                io.Mask.Output("saliency", display_name="saliency", tooltip="The Grad-CAM map (0..1, min-max normalised), image-sized."),
                io.String.Output("json", display_name="json", tooltip="Settings, step and modules used as JSON (and a note on guidance patches)."),
            ],
        )

    @classmethod
    def execute(cls, trace, latent, model, positive, negative, step, layers, target, quantity, cfg, item, image=None):
        from explain.methods import cam

        from .comfy_denoiser import guidance_of, run_with_denoiser
        from .joint_taps import with_image_token_probes

        cls.check_requirements()
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        step = tr.check_step(int(step))
        scale = guidance_of(tr, cfg)
        base = base_image(tr, item, image)
        size = tuple(render.as_uint8_image(base).shape[:2])
        # a DiT's blocks give token sequences: a clone shows each block's image tokens as a feature map
        probed, probes = with_image_token_probes(model, tr.latent_size)

        hosted = {}

        def work(denoiser):
            hosted["guidance"] = denoiser.guide_fn is not None
            chosen = layers
            if probes:
                denoiser.modules.update(probes)
                chosen = list(probes)  # the paper's layer list is UNet-specific: every block of a DiT plays that role
            return cam.df_cam(denoiser, tr, step, item, layers=chosen, target=target, quantity=quantity, image_size=size)

        result = run_with_denoiser(probed, positive, negative, tr, step, scale, work, separate_branches=True, backward=True)
        mask = heatmaps.normalize_map(result.display().float(), "minmax")
        overlay = as_image(render.overlay(base, mask))
        info = {"step": step, "timestep": float(tr.timesteps[step]), "layers": "image tokens of every transformer block" if probes else layers,
                "modules": len(result.layers), "target": target, "quantity": quantity, "cfg": scale, "item": item,
                "sanity": sanity_line("df_cam", tr)}  # fmt: skip
        if hosted.get("guidance"):
            info["note"] = CAM_GUIDANCE_NOTE
            logging.warning("DF-CAM: %s", CAM_GUIDANCE_NOTE)
        text = json.dumps(info)
        return io.NodeOutput(overlay, mask.unsqueeze(0), text, ui={**preview_ui(overlay), "text": [text]})


# ---------------------------------------------------------------------------- guidance map
class ExplainGuidanceMap(ExplanationNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainGuidanceMap",
            display_name="Explain Guidance Map",
            category=CATEGORY,
            description=(
                "Where the prompt changes the model's x0 prediction at one step: the prediction with the positive "
                "conditioning minus the one with the negative, at the same latent (one model call, no masks; the "
                "identity path cancels). It passes the sanity checks on the embedded model; it shows where the "
                "conditioning acts, not which input pixels the prediction depends on. Needs cfg > 1 (two branches). "
                "Connect the same MODEL and conditionings as the sampler."
            ),
            is_output_node=True,
            inputs=[
                trace_input(),
                latent_input(),
                *model_inputs(),
                io.Int.Input("step", default=0, min=-1000, max=1000, tooltip="Step index in the run; -1 = last."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, tooltip="0 = the sampler's cfg."),
                item_input(),
                image_input(),
            ],
            outputs=[
                io.Image.Output("overlay", display_name="overlay", tooltip="The guidance map over the image."),
                io.Mask.Output("saliency", display_name="saliency", tooltip="The guidance map (0..1, min-max normalised), image-sized."),
                io.String.Output("json", display_name="json", tooltip="Step, cfg and the cached sanity verdict as JSON."),
            ],
        )

    @classmethod
    def execute(cls, trace, latent, model, positive, negative, step, cfg, item, image=None):
        from explain.methods import guidance

        from .comfy_denoiser import guidance_of, run_with_denoiser

        cls.check_requirements()
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        step = tr.check_step(int(step))
        scale = guidance_of(tr, cfg)
        if scale <= 1.0:
            raise ValueError(f"the guidance map compares the positive and negative branches, but cfg is {scale:g}: set cfg above 1")
        base = base_image(tr, item, image)
        size = tuple(render.as_uint8_image(base).shape[:2])
        result = run_with_denoiser(model, positive, negative, tr, step, scale, lambda den: guidance.guidance_map(den, tr, step, item))
        mask = heatmaps.normalize_map(result.display(size).float(), "minmax")
        overlay = as_image(render.overlay(base, mask))
        info = {"step": step, "timestep": float(tr.timesteps[step]), "against": result.against, "cfg": scale, "item": item,
                "sanity": sanity_line("guidance_map", tr)}  # fmt: skip
        text = json.dumps(info)
        return io.NodeOutput(overlay, mask.unsqueeze(0), text, ui={**preview_ui(overlay), "text": [text]})


# ---------------------------------------------------------------------------- causal onset (R2)
def encode_like(clip, text: str, positive) -> list:
    """``text`` encoded as CLIPTextEncode does, each entry carrying the extra fields of the
    sampler's positive conditioning (FluxGuidance's guidance, SDXL's sizes...), so an edited
    prompt differs from the positive only in its text."""
    tokens = clip.tokenize(text)
    if hasattr(clip, "encode_from_tokens_scheduled"):
        encoded = clip.encode_from_tokens_scheduled(tokens)
    else:  # older ComfyUI
        cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
        encoded = [[cond, {"pooled_output": pooled}]]
    extra = {k: v for k, v in (positive[0][1] if positive else {}).items() if k != "pooled_output"}
    return [[cond, {**extra, **meta}] for cond, meta in encoded]


def same_conditioning(a, b) -> bool:
    """Whether two conditioning lists hold the same tensors, entry by entry."""
    if len(a) != len(b):
        return False
    for (ca, _), (cb, _) in zip(a, b):
        if not (torch.is_tensor(ca) and torch.is_tensor(cb)) or ca.shape != cb.shape or not torch.equal(ca.detach().cpu(), cb.detach().cpu()):
            return False
    return True


def onset_reference(clip, prompt: str, positive) -> tuple[list, str]:
    """The conditioning the edited prompts are compared with: the sampler's positive when the
    Tap's prompt re-encodes to it, else the re-encoded prompt (a positive that was combined,
    restricted to an area or a timestep range, or encoded from other text would make every
    effect include that difference too), with a note that says which."""
    reencoded = encode_like(clip, prompt, positive)
    if same_conditioning(reencoded, positive):
        return positive, "the sampler's positive conditioning"
    return reencoded, (
        f"the Tap's prompt re-encoded: the sampler's positive ({len(positive)} entr{'y' if len(positive) == 1 else 'ies'}) is not that prompt's plain "
        "encoding (combined, area, timestep-range or other text), so each edit is compared with the plain encoding and differs from it only in the word"
    )


class ExplainConceptOnset(ExplanationNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DiffusionExplainConceptOnset",
            display_name="Explain Concept Onset (causal)",
            category=CATEGORY,
            description=(
                "When each prompt word starts to shape the prediction: the Tap's prompt is re-encoded with the word swapped "
                "for a contrasting value of its kind (another colour, the other size, the opposite relation; removed where it "
                "has none), and at every step the traced latent is denoised with the sampler's positive and with each edited "
                "one. The effect is the difference of the two x0 predictions (decoded when a VAE is connected); the onset is "
                "the first step at half the largest effect. One model call per word and step. Needs the prompt text on the Tap."
            ),
            is_output_node=True,
            inputs=[
                trace_input(),
                latent_input(),
                *model_inputs(),
                io.Clip.Input("clip", tooltip="The CLIP the prompt was encoded with: it encodes the edited prompts."),
                io.String.Input("words", default="", tooltip="Comma-separated prompt words to edit; empty = every prompt word."),
                io.Float.Input("cfg", default=0.0, min=0.0, max=100.0, step=0.1, tooltip="0 = the sampler's cfg."),
                item_input(),
                io.Vae.Input("vae", optional=True, tooltip="Measure the effect on the decoded predictions (default: in the latent)."),
            ],
            outputs=[
                io.Image.Output("plot", display_name="plot", tooltip="Each word's effect per step, scaled to its largest, onset marked."),
                io.String.Output("json", display_name="json", tooltip="Effects, onset and peak steps, the edit and edited prompt of each word."),
            ],
        )

    @classmethod
    def execute(cls, trace, latent, model, positive, negative, clip, words, cfg, item, vae=None):
        from explain.explanations import onset_evidence
        from explain.methods import defaults as method_defaults
        from explain.methods import timing
        from explain.sweep.words import counterfactual_prompts

        from .comfy_denoiser import guidance_of, run_with_denoiser
        from .decode import decode, vae_space

        cls.check_requirements()
        tr = trace.resolve(latent)
        item = check_item(tr, item)
        prompt = tr.prompts[item] if item < len(tr.prompts) else ""
        if not prompt:
            raise ValueError("the trace has no prompt text to edit: connect the prompt text to the Explain Tap's prompt input")
        scale = guidance_of(tr, cfg)
        chosen = parse_words(words)
        every = [w for w in heatmaps.prompt_words(tr, item) if w.token_indices]
        texts = [w.text for w in every]
        edits = counterfactual_prompts(prompt, texts)
        unknown = [w for w in chosen or () if w.lower() not in texts]
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a word of the prompt; choose from {', '.join(dict.fromkeys(texts))}")
        picked = range(len(every)) if chosen is None else [texts.index(w.lower()) for w in chosen]
        steps = list(range(tr.num_steps))

        def predictions(den):
            out = []
            for j in steps:
                x = tr.x_t[j, item : item + 1].float()
                out.append(den.predict(x.to(den.device) if den.device is not None else x, timing.step_level(tr, j), "x0").float().cpu())
            return torch.cat(out)

        def seen(latents):
            return decode(vae, vae_space(tr, latents)) if vae is not None else latents

        against, reference_note = onset_reference(clip, prompt, positive)
        reference = seen(run_with_denoiser(model, against, negative, tr, 0, scale, predictions))
        effect = torch.zeros(len(picked), len(steps), dtype=torch.float64)
        for row, k in enumerate(picked):
            edited = seen(run_with_denoiser(model, encode_like(clip, edits[k][1], positive), negative, tr, 0, scale, predictions))
            effect[row] = torch.stack([timing.edit_effect(reference[j : j + 1], edited[j : j + 1])[0] for j in steps])
        nth = [texts[: k + 1].count(texts[k]) for k in range(len(texts))]  # as the core labels repeated words: "a", "a (2)"
        labels = [texts[k] if nth[k] == 1 else f"{texts[k]} ({nth[k]})" for k in picked]
        onset = timing.onset_from_effect(labels, [every[k].token_indices for k in picked], effect, method_defaults.ONSET.threshold, "decoded" if vae is not None else "latent")
        plot = as_image(render.onset_curves(onset))
        info = {**onset.to_json(), "edits": [edits[k][0] for k in picked], "edited_prompts": [edits[k][1] for k in picked], "cfg": scale, "item": item,
                "reference": reference_note, "evidence": onset_evidence(tr.meta.get("model"))}  # fmt: skip
        text = json.dumps(info)
        return io.NodeOutput(plot, text, ui={**preview_ui(plot), "text": [text]})
