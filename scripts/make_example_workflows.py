"""Write the ComfyUI example workflows from one description each, in both formats:

* ``example_workflows/<name>.json``: UI format, as the front end saves them, so they open by
  drag-and-drop and appear under the pack's templates;
* ``example_workflows/api/<name>.json``: API format, what headless users and servers POST to
  ComfyUI's ``/prompt`` (as ``{"prompt": ...}``); not listed as templates.

    python scripts/make_example_workflows.py

Socket and widget lists of this pack's nodes come from their V3 schemas (read through ComfyUI's
``comfy_api`` when it is importable, else through the tests' stand-in, which records the same
arguments); those of the stock nodes used are written out below (ComfyUI a125cd84). The
integration tests regenerate both files inside ComfyUI and load them through its own node
definitions and prompt validation, so a mismatch fails there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WIDGETS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL = "control_after_generate"  # the front end's extra widget value after seeds (UI format only)

# Stock nodes: (sockets [(name, type)], widgets [names, with control values after seeds], outputs [(name, type)])
STOCK = {
    "CheckpointLoaderSimple": ([], ["ckpt_name"], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")]),
    "PrimitiveStringMultiline": ([], ["value"], [("STRING", "STRING")]),
    "CLIPTextEncode": ([("clip", "CLIP")], ["text"], [("CONDITIONING", "CONDITIONING")]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], [("LATENT", "LATENT")]),
    "KSampler": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent_image", "LATENT")],
        ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"],
        [("LATENT", "LATENT")],
    ),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [], [("IMAGE", "IMAGE")]),
    "SaveImage": ([("images", "IMAGE")], ["filename_prefix"], []),
    "KSamplerSelect": ([], ["sampler_name"], [("SAMPLER", "SAMPLER")]),
    "SamplerCustom": (
        [("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("sampler", "SAMPLER"),
         ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
        ["add_noise", "noise_seed", "control_after_generate", "cfg"],
        [("output", "LATENT"), ("denoised_output", "LATENT")],
    ),  # fmt: skip
}


def has_control_widget(name: str, options: dict) -> bool:
    """The front end follows these widgets with a "control after generate" value."""
    return bool(options.get("control_after_generate")) or name in ("seed", "noise_seed")


PACK_NODES: dict | None = None  # node id -> class; set by a caller that has the pack loaded (inside ComfyUI)


def pack_nodes() -> dict:
    if PACK_NODES is not None:
        return PACK_NODES
    from tests.nodes.stubs import install_comfy_api_stand_in

    install_comfy_api_stand_in()
    from nodes.pack import NODES_BY_ID

    return NODES_BY_ID


def pack_node_spec(class_type: str):
    """(sockets, widgets, outputs, defaults) of one of this pack's nodes, from its V3 schema."""
    schema = pack_nodes()[class_type].define_schema()
    sockets, widgets, defaults = [], [], {}
    for inp in schema.inputs:
        kind = str(inp.get_io_type())
        options = inp.as_dict()
        if kind in WIDGETS and not options.get("forceInput"):
            widgets.append(inp.id)
            choices = getattr(inp, "options", None)
            defaults[inp.id] = options.get("default", choices[0] if choices else None)
            if has_control_widget(inp.id, options):
                widgets.append(CONTROL)
        else:
            sockets.append((inp.id, kind))
    outputs = [(o.display_name or str(o.io_type), str(o.io_type)) for o in schema.outputs]
    return sockets, widgets, outputs, defaults


class Workflow:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.widget_values: dict[int, dict] = {}  # node id -> {widget name: value}, for the API format

    def add(self, class_type: str, pos, widgets: dict | None = None, size=(320, 160), title: str | None = None) -> dict:
        widgets = dict(widgets or {})
        if class_type in STOCK:
            sockets, widget_names, outputs = STOCK[class_type]
            defaults = {}
        else:
            sockets, widget_names, outputs, defaults = pack_node_spec(class_type)
        values, named = [], {}
        for name in widget_names:
            if name == CONTROL:
                values.append("fixed")
                continue
            if name in widgets:
                named[name] = widgets.pop(name)
            elif name in defaults:
                named[name] = defaults[name]
            else:
                raise KeyError(f"{class_type}: no value for widget {name!r}")
            values.append(named[name])
        if widgets:
            raise KeyError(f"{class_type} has no widgets {sorted(widgets)}")
        node = {
            "id": len(self.nodes) + 1,
            "type": class_type,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": len(self.nodes),
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in sockets],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outputs)],
            "properties": {"Node name for S&R": class_type},
            "widgets_values": values,
        }
        if title:
            node["title"] = title
        self.nodes.append(node)
        self.widget_values[node["id"]] = named
        return node

    def connect(self, src: dict, slot: int, dst: dict, name: str) -> None:
        kind = src["outputs"][slot]["type"]
        link_id = len(self.links) + 1
        target = next((i for i in dst["inputs"] if i["name"] == name), None)
        if target is None:  # a widget turned into an input socket
            target = {"name": name, "type": kind, "widget": {"name": name}, "link": None}
            dst["inputs"].append(target)
        target["link"] = link_id
        src["outputs"][slot]["links"].append(link_id)
        self.links.append([link_id, src["id"], slot, dst["id"], dst["inputs"].index(target), kind])

    def to_api(self) -> dict:
        """The same graph in API format: ``{id: {"class_type", "inputs", "_meta"}}``, a link as
        ``[source id, output slot]``, a linked widget (a widget turned into a socket) by its link."""
        prompt = {}
        for node in self.nodes:
            inputs = dict(self.widget_values[node["id"]])
            for socket in node["inputs"]:
                if socket["link"] is not None:
                    _, src, slot, _, _, _ = self.links[socket["link"] - 1]
                    inputs[socket["name"]] = [str(src), slot]
            prompt[str(node["id"])] = {
                "class_type": node["type"],
                "inputs": inputs,
                "_meta": {"title": node.get("title", node["type"])},
            }
        return prompt

    def to_json(self) -> dict:
        return {
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": [],
            "config": {},
            "extra": {"ds": {"scale": 0.7, "offset": [0, 0]}},
            "version": 0.4,
        }


PROMPT = "a photo of a red apple on a wooden table, blue sky in the background"
NEGATIVE = "blurry, low quality"
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"


def _prompting(wf: Workflow, loader=None, prompt: str = PROMPT, negative_prompt: str = NEGATIVE):
    """Prompt boxes, their encoders and the Tap on ``loader`` (default: a checkpoint loader)."""
    if loader is None:
        loader = wf.add("CheckpointLoaderSimple", (0, 0), {"ckpt_name": CHECKPOINT}, size=(320, 100))
    text = wf.add("PrimitiveStringMultiline", (0, 160), {"value": prompt}, title="Prompt", size=(320, 120))
    negative_text = wf.add("PrimitiveStringMultiline", (0, 320), {"value": negative_prompt}, title="Negative prompt", size=(320, 100))
    positive = wf.add("CLIPTextEncode", (360, 160), {"text": ""}, size=(300, 80))
    negative = wf.add("CLIPTextEncode", (360, 320), {"text": ""}, size=(300, 80))
    for enc, source in ((positive, text), (negative, negative_text)):
        wf.connect(loader, 1, enc, "clip")
        wf.connect(source, 0, enc, "text")
    tap = wf.add("DiffusionExplainTap", (360, -260), size=(320, 200))
    wf.connect(loader, 0, tap, "model")
    wf.connect(loader, 1, tap, "clip")
    wf.connect(text, 0, tap, "prompt")
    wf.connect(negative_text, 0, tap, "negative_prompt")
    return loader, positive, negative, tap


def sample_and_explain(wf: Workflow, loader, positive, negative, tap, latent, sampler_widgets: dict, *, previews: int, step: int, n_masks: int, prefix: str) -> None:
    """KSampler on the tapped model, decode and save, and every explanation node wired to the
    Tap's trace (the txt2img example's layout)."""
    sampler = wf.add("KSampler", (720, 0), sampler_widgets, size=(300, 270))
    wf.connect(tap, 0, sampler, "model")
    wf.connect(positive, 0, sampler, "positive")
    wf.connect(negative, 0, sampler, "negative")
    wf.connect(latent, 0, sampler, "latent_image")
    decode = wf.add("VAEDecode", (1060, 0), size=(220, 50))
    wf.connect(sampler, 0, decode, "samples")
    wf.connect(loader, 2, decode, "vae")
    save = wf.add("SaveImage", (1060, 100), {"filename_prefix": f"diffusion-explain/{prefix}"}, size=(300, 300))
    wf.connect(decode, 0, save, "images")

    def explanation(class_type, pos, widgets=None, size=(340, 330)):
        node = wf.add(class_type, pos, widgets, size=size)
        wf.connect(tap, 1, node, "trace")
        wf.connect(sampler, 0, node, "latent")
        return node

    heat = explanation("DiffusionExplainWordHeatmaps", (1400, -480), size=(360, 440))
    wf.connect(decode, 0, heat, "image")
    steps = explanation("DiffusionExplainStepPreviews", (1400, 10), {"count": previews}, size=(360, 470))
    wf.connect(loader, 2, steps, "vae")
    explanation("DiffusionExplainConceptScores", (1400, 530), size=(360, 450))
    recovery = explanation("DiffusionExplainRecovery", (1810, 690), size=(360, 470))
    wf.connect(loader, 2, recovery, "vae")
    for class_type, pos, widgets in (
        ("DiffusionExplainRise", (1810, -480), {"step": step, "n_masks": n_masks}),
        ("DiffusionExplainCam", (1810, 170), {"step": step}),
    ):
        node = explanation(class_type, pos, widgets, size=(360, 620 if class_type.endswith("Rise") else 470))
        wf.connect(tap, 0, node, "model")
        wf.connect(positive, 0, node, "positive")
        wf.connect(negative, 0, node, "negative")
        wf.connect(decode, 0, node, "image")
    guidance = explanation("DiffusionExplainGuidanceMap", (2260, -480), {"step": step}, size=(360, 470))
    onset = explanation("DiffusionExplainConceptOnset", (2260, 40), size=(360, 470))
    for node in (guidance, onset):
        wf.connect(tap, 0, node, "model")
        wf.connect(positive, 0, node, "positive")
        wf.connect(negative, 0, node, "negative")
    wf.connect(decode, 0, guidance, "image")
    wf.connect(loader, 1, onset, "clip")
    wf.connect(loader, 2, onset, "vae")
    trace_prefix = "trace" if prefix == "image" else f"{prefix}-trace"
    saver = explanation("DiffusionExplainSaveTrace", (1060, 460), {"filename_prefix": f"diffusion-explain/{trace_prefix}"}, size=(300, 130))
    wf.connect(loader, 2, saver, "vae")


def txt2img_explain() -> Workflow:
    """Stock txt2img (KSampler) with the Tap and every explanation node."""
    wf = Workflow()
    ckpt, positive, negative, tap = _prompting(wf)
    latent = wf.add("EmptyLatentImage", (360, 460), {"width": 512, "height": 512, "batch_size": 1}, size=(300, 110))
    sampler_widgets = {"seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}
    sample_and_explain(wf, ckpt, positive, negative, tap, latent, sampler_widgets, previews=8, step=10, n_masks=256, prefix="image")
    return wf


def sampler_custom_exponential() -> Workflow:
    """SamplerCustom driven by the paper's exponential sigmas, tapped and explained."""
    wf = Workflow()
    ckpt, positive, negative, tap = _prompting(wf)
    latent = wf.add("EmptyLatentImage", (360, 460), {"width": 512, "height": 512, "batch_size": 1}, size=(300, 110))
    select = wf.add("KSamplerSelect", (360, 600), {"sampler_name": "dpmpp_2m"}, size=(300, 60))
    sigmas = wf.add("DiffusionExplainExponentialSigmas", (360, 700), {"steps": 20, "schedule": "early", "lam": 60}, size=(300, 130))
    wf.connect(ckpt, 0, sigmas, "model")
    sampler = wf.add("SamplerCustom", (720, 0), {"add_noise": True, "noise_seed": 42, "cfg": 7.0}, size=(300, 250))
    wf.connect(tap, 0, sampler, "model")
    wf.connect(positive, 0, sampler, "positive")
    wf.connect(negative, 0, sampler, "negative")
    wf.connect(select, 0, sampler, "sampler")
    wf.connect(sigmas, 0, sampler, "sigmas")
    wf.connect(latent, 0, sampler, "latent_image")
    decode = wf.add("VAEDecode", (1060, 0), size=(220, 50))
    wf.connect(sampler, 0, decode, "samples")
    wf.connect(ckpt, 2, decode, "vae")
    save = wf.add("SaveImage", (1060, 100), {"filename_prefix": "diffusion-explain/early"}, size=(300, 300))
    wf.connect(decode, 0, save, "images")
    concept = wf.add("DiffusionExplainConceptScores", (1400, 0), size=(360, 450))
    heat = wf.add("DiffusionExplainWordHeatmaps", (1400, 500), size=(360, 440))
    saver = wf.add("DiffusionExplainSaveTrace", (1060, 460), {"filename_prefix": "diffusion-explain/early-trace"}, size=(300, 130))
    for node in (concept, heat, saver):
        wf.connect(tap, 1, node, "trace")
        wf.connect(sampler, 0, node, "latent")
    wf.connect(decode, 0, heat, "image")
    wf.connect(ckpt, 2, saver, "vae")
    return wf


WORKFLOWS = {
    "txt2img_explain.json": txt2img_explain,
    "sampler_custom_exponential_sigmas.json": sampler_custom_exponential,
}


def outputs() -> dict[Path, dict]:
    """Every file this script writes (relative to the repository) and its content."""
    files = {}
    for name, build in WORKFLOWS.items():
        wf = build()
        files[Path("example_workflows") / name] = wf.to_json()
        files[Path("example_workflows") / "api" / name] = wf.to_api()
    return files


def main() -> None:
    for relative, content in outputs().items():
        path = REPO / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=1) + "\n")
        print(path)


if __name__ == "__main__":
    main()
