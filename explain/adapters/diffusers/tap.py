"""Trace a diffusers text-to-image pipeline (the model families in `explain.adapters.diffusers.families`).

    with trace(pipe, keep_layers=False, previews=True) as tr:
        out = pipe("a red circle above a blue square", guidance_scale=5.0)
    tr.trace            # explain.trace.Trace: per-step x_t, x0, attention, tokens, words, meta

What the tap does while the ``with`` block is open, and undoes on exit (also after an
exception), leaving the pipeline exactly as it was:

* **Text attention.** The model's family installs capture processors (UNets: each ``attn2``
  layer gets one that computes the softmax explicitly, `explain.attention.attention_probs`, and
  reuses the probabilities for the layer's output; SD3 / Flux: each joint attention keeps its
  stock kernel call and the image-query × text-key slice is computed on the side, see
  `families.joint`); they hand the conditional rows (and, under classifier-free guidance, the
  unconditional ones, as ``attention_negative``) to a per-step accumulator: mean over heads and
  layers at latent resolution, only the context positions through the last end token (of each
  text encoder's part: SD3's context is CLIP then T5). Self-attention (``attn1``) keeps its
  fast path. Layers whose processor is not one of diffusers' plain ones (IP-Adapter, say) are
  left alone, with a warning.
* **Which rows are which.** diffusers batches classifier-free guidance as ``[uncond, cond]``. The
  tap learns the number of images from ``encode_prompt``'s output and compares it with the
  denoiser's batch: twice as many rows means guidance, as many means none (guidance 1). Flux's
  true CFG encodes the negative prompt in a second ``encode_prompt`` call and runs the branches
  as two calls; the family tells them apart by the context tensor each call gets.
* **x0 per step.** ``scheduler.step`` is wrapped: the sample entering it is ``x_t`` (in the
  scheduler's own latent space: x0 + σ·ε for Euler/Heun-type schedulers, √ᾱ·x0 + √(1-ᾱ)·ε for
  DDIM/DDPM/DPM-Solver/PNDM, (1-σ)·x0 + σ·ε for flow matching, see ``meta["latent_space"]``),
  and x0 is computed from the guided model output with `explain.noise` at the scheduler's own
  noise level, the same for every scheduler and for ε-, v-, sample- and flow-prediction
  (x0 = x_t - σ·v). Packed latents (Flux) are stored unpacked, ``[B, C, h, w]``. Schedulers that call the model more than
  once per step record only the call whose input is the latent entering the step: Heun's (and
  KDPM2's) first-order call, and for PNDM every call but the first step's correction; the extra
  calls' attention is dropped too, so there is exactly one record per step.
* **Prompts.** ``encode_prompt`` is wrapped to see the prompts, negative prompts and
  ``num_images_per_prompt``; tokens and words come from `explain.tokens` (first tokenizer; for
  SDXL both tokenizers give the same positions).
* **Images.** ``vae.decode`` is wrapped to keep the final images; previews of x0 and x_t per
  step are decoded after generation (optional, they cost one VAE decode per step and image).

Tensors are kept on the model's device during the run (no per-layer or per-step host syncs) and
moved to the CPU once, when the trace is built. Per-layer maps (``keep_layers``) are the
exception, being far larger: only the conditional rows are kept, each step's maps move to the
CPU as ``layer_dtype`` (float16 by default) when the step ends (one wait for the device per step),
and their size is estimated (`explain.memory`) and printed at the model's first call, where a
run over ``memory_budget_mb`` is refused before any step. Rows the trace will not store are
dropped as layers report them (the negative branch when ``negative=False``).
"""

from __future__ import annotations

import inspect
import math
import sys
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from explain.adapters.diffusers.decode import decode_latents, to_uint8
from explain.adapters.diffusers.families import family_of
from explain.adapters.diffusers.families.joint import JointOptions
from explain.adapters.diffusers.schedules import diffusers_timesteps, latent_space_of, prediction_type_of
from explain.attention import (
    CAPTURE_METHODS,
    COND,
    UNCOND,
    StepAccumulator,
    branch_rows,
    select_rows,
)
from explain.memory import MapShapes, check_budget, estimate_memory
from explain.noise import x0_from_flow_output, x0_from_model_output
from explain.tokens import PromptTokens, concat_prompt_tokens, tokenize_prompt
from explain.trace import Trace, shareable_model_name

_ACTIVE: "weakref.WeakSet" = weakref.WeakSet()  # pipelines being traced (one tap at a time)

DEFAULT_PREVIEW_SIZE = 256


# ---------------------------------------------------------------------------- per-run state
@dataclass
class _Run:
    """What one pipeline call produced (the tap starts a new one at each ``encode_prompt``)."""

    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    # per batch item, one PromptTokens per text segment (`families.TextSegment`)
    prompt_parts: list[list[PromptTokens]] = field(default_factory=list)
    negative_parts: list[list[PromptTokens]] = field(default_factory=list)
    segments: list = field(default_factory=list)
    batch: int | None = None
    guided: bool | None = None
    context_length: int | None = None
    positive_embeds: torch.Tensor | None = None  # the contexts encode_prompt returned (for branch identification)
    negative_embeds: torch.Tensor | None = None
    call_arguments: dict = field(default_factory=dict)  # the pipeline call's own arguments a family asked for
    # (kind, cond_or_uncond) -> accumulator of one branch layout; kind "attention" (word maps) or "concepts"
    accumulators: dict = field(default_factory=dict)
    current: tuple[int, ...] | None = None  # cond_or_uncond of the denoiser call running now (None: not recorded)
    calls_this_step: int = 0
    kept: list[int] | None = None  # per segment, the context positions the accumulators keep
    # Per step: [(kind, cond_or_uncond, accumulator, its step index)], split into conditional /
    # negative rows when the trace is built (the batch may change mid-run, e.g. when a callback
    # switches guidance off).
    attention_steps: list[list[tuple]] = field(default_factory=list)
    latent_size: tuple[int, int] | None = None
    # Per step, kept as the pipeline's own (device) tensors until the trace is built, so that
    # recording needs no device-to-host sync: x_t, the guided model output, the timestep, and
    # σ (a float from the scheduler's CPU table, a tensor, or None = look it up from ᾱ).
    x_t: list[torch.Tensor] = field(default_factory=list)
    model_outputs: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[Any] = field(default_factory=list)
    sigmas: list[Any] = field(default_factory=list)
    final_latent: torch.Tensor | None = None
    images: torch.Tensor | None = None
    model_calls: int = 0
    memory_checked: bool = False  # the memory estimate and budget were checked at the first model call
    # read when the call starts: a later call in the same block, or a callback that switches
    # guidance off mid-run, changes the pipeline's attributes
    guidance_scale: float | None = None
    guidance_rescale: float | None = None


class DiffusersTap:
    """The object ``trace(...)`` yields; ``.trace`` is the last run's `Trace` (``.traces`` all)."""

    def __init__(
        self,
        pipe,
        keep_layers: bool | str = False,
        previews: bool = True,
        negative: bool = True,
        preview_size: int = DEFAULT_PREVIEW_SIZE,
        seed: int | None = None,
        store_dtype: torch.dtype = torch.float32,
        full_context: bool = False,
        method: str = "auto",
        maps: str = "attention",
        concepts: list[str] | None = None,
        joint_rows: str = "renormalized",
        layer_dtype: torch.dtype = torch.float16,
        memory_budget_mb: float | None = None,
    ):
        if method not in ("auto", *CAPTURE_METHODS):
            raise ValueError(f"method must be 'auto' or one of {CAPTURE_METHODS}, got {method!r}")
        self.family = family_of(pipe)
        if keep_layers not in (False, True, "resolution"):
            raise ValueError(f"keep_layers must be False, True (every layer) or 'resolution', got {keep_layers!r}")
        if not (isinstance(layer_dtype, torch.dtype) and layer_dtype.is_floating_point):
            raise TypeError(f"layer_dtype must be a floating-point torch dtype such as torch.float16, got {layer_dtype!r}")
        if memory_budget_mb is not None and (isinstance(memory_budget_mb, bool) or not (isinstance(memory_budget_mb, (int, float)) and memory_budget_mb > 0)):
            raise ValueError(f"memory_budget_mb must be a positive number of megabytes (or None for no budget), got {memory_budget_mb!r}")
        if isinstance(concepts, str):
            raise TypeError(f"concepts must be a list of words, e.g. concepts=[{concepts!r}]")
        self.options = JointOptions(maps=maps, joint_rows=joint_rows, concepts=list(concepts or []))
        if not self.family.joint and (maps != "attention" or self.options.concepts or joint_rows != "renormalized"):
            raise ValueError(
                f"maps='output', concepts and joint_rows are for joint-attention models (SD3, Flux); "
                f"{self.family.description} has cross-attention, whose maps are the attention probabilities"
            )
        self.pipe = pipe
        self.keep_layers = keep_layers
        self.previews = previews
        self.negative = negative
        self.preview_size = int(preview_size)
        self.seed = seed
        self.store_dtype = store_dtype
        self.full_context = full_context
        self.method = method
        self.layer_dtype = layer_dtype
        self.memory_budget_mb = memory_budget_mb
        self.memory_estimate = None  # explain.memory.MemoryEstimate of the last run, when one was made
        self.traces: list[Trace] = []
        self._run: _Run | None = None
        self._undo: list = []
        self._decoding = False

    # ------------------------------------------------------------------ results
    @property
    def trace(self) -> Trace:
        if self._run is not None and self._run.x_t:
            raise RuntimeError("the trace is built when the `with trace(pipe)` block ends; read tr.trace after it")
        if not self.traces:
            raise RuntimeError(
                "nothing was traced: call the pipeline inside the `with trace(pipe) as tr:` block "
                "(and let it run at least one denoising step)"
            )
        return self.traces[-1]

    def held_layer_maps(self) -> list[torch.Tensor]:
        """The per-layer maps of the running call's finished steps, as the tap holds them now
        (read from a step-end callback: on the CPU, in ``layer_dtype``, conditional rows only)."""
        run = self._run
        if run is None:
            return []
        held = []
        for accumulator in run.accumulators.values():
            if accumulator.moves_layers:
                for index in range(accumulator.num_steps):
                    held += list(accumulator.layer_maps(index).values())
        return held

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        if self.pipe in _ACTIVE:
            raise RuntimeError("this pipeline is already being traced; nest no trace() blocks on one pipeline")
        try:
            method = "explicit" if self.method == "auto" else self.method
            if self.family.joint:
                self._undo.extend(self.family.install_capture(self.pipe, self._record_attention, method, self.options))
            else:
                self._undo.extend(self.family.install_capture(self.pipe, self._record_attention, method))
            self._patch(self.pipe, "encode_prompt", self._wrap_encode_prompt(self.pipe.encode_prompt))
            self._patch(self.pipe.scheduler, "step", self._wrap_step(self.pipe.scheduler))
            if getattr(self.pipe, "vae", None) is not None:
                self._patch(self.pipe.vae, "decode", self._wrap_decode(self.pipe.vae.decode))
            handle = self.family.denoiser(self.pipe).register_forward_pre_hook(self._before_model, with_kwargs=True)
            self._undo.append(handle.remove)
        except BaseException:
            self.remove()
            raise
        _ACTIVE.add(self.pipe)

    def remove(self) -> None:
        errors = []
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as exc:  # noqa: BLE001 - keep restoring the rest
                errors.append(exc)
        _ACTIVE.discard(self.pipe)
        if errors:
            raise RuntimeError(f"restoring the pipeline failed: {errors[0]!r}") from errors[0]

    def _patch(self, obj, attr: str, replacement) -> None:
        had_own = attr in vars(obj)
        original = vars(obj).get(attr)
        setattr(obj, attr, replacement)

        def undo():
            if had_own:
                setattr(obj, attr, original)
            else:
                delattr(obj, attr)

        self._undo.append(undo)

    # ------------------------------------------------------------------ hooks
    def _wrap_encode_prompt(self, original):
        signature = inspect.signature(type(self.pipe).encode_prompt)

        def encode_prompt(*args, **kwargs):
            out = original(*args, **kwargs)
            try:
                bound = signature.bind_partial(self.pipe, *args, **kwargs).arguments
            except TypeError:
                bound = dict(kwargs)
            self._start_run(bound, out)
            return out

        return encode_prompt

    def _pipeline_call_arguments(self) -> dict:
        """The pipeline call's own arguments that the family asked for (``pipeline_arguments``),
        read from the ``__call__`` frame that runs ``encode_prompt``: Flux keeps
        ``true_cfg_scale`` nowhere else."""
        names = self.family.pipeline_arguments
        if not names:
            return {}
        frame = inspect.currentframe()
        try:
            while frame is not None:
                if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is self.pipe:
                    return {n: frame.f_locals[n] for n in names if n in frame.f_locals}
                frame = frame.f_back
        finally:
            del frame
        return {}

    def _segment_texts(self, segment, arguments: dict, negative: bool):
        for name in segment.negative_arguments if negative else segment.prompt_arguments:
            if arguments.get(name) is not None:
                return arguments[name]
        return None

    def _tokenize(self, run: _Run, arguments: dict, negative: bool, per_prompt: int, items: int, warn: bool, what: str | None = None):
        """Per batch item, one PromptTokens per segment (None where the texts are unknown)."""
        what = what or ("negative prompt" if negative else "prompt")
        per_segment = []
        for seg in run.segments:
            text = self._segment_texts(seg, arguments, negative)
            if text is None and negative:
                text = ""  # diffusers' default negative prompt
            texts = [text] if isinstance(text, str) else list(text) if text is not None else None
            if texts is not None and len(texts) == 1 and items > 1:
                texts = texts * items
            if texts is None or len(texts) != items:
                return None
            if seg.tokenizer is None:
                per_segment.append([PromptTokens(prompt=t, tokens=[], words=[]) for t in texts])
            else:
                per_segment.append([tokenize_prompt(seg.tokenizer, t, max_length=seg.length, warn=warn, what=what) for t in texts])
        return [[parts[i] for parts in per_segment] for i in range(items) for _ in range(per_prompt)]

    def _start_run(self, arguments: dict, outputs) -> None:
        run = self._run
        if (
            self.family.separate_negative_encoding and run is not None and run.model_calls == 0
            and run.positive_embeds is not None and run.negative_embeds is None
        ):
            self._add_negative(run, arguments, outputs)
            return
        if run is not None and run.x_t:
            self._finish_run()
        encoding = self.family.read_encoding(self.pipe, arguments, outputs)
        embeds = encoding.embeds
        run = _Run()
        run.guidance_scale = getattr(self.pipe, "_guidance_scale", None)
        run.guidance_rescale = getattr(self.pipe, "_guidance_rescale", None)
        run.call_arguments = self._pipeline_call_arguments()
        run.batch = int(embeds.shape[0])
        run.context_length = int(embeds.shape[1])
        run.positive_embeds, run.negative_embeds = embeds, encoding.negative_embeds
        run.segments = self.family.text_segments(self.pipe, run.context_length)
        per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        run.guided = bool(encoding.guided)

        prompt = arguments.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else None
        if prompts is not None and len(prompts) * per_prompt != run.batch:
            prompts = None  # embeddings were given alongside; their count wins
        if prompts is not None:
            parts = self._tokenize(run, arguments, False, per_prompt, len(prompts), warn=True)
            if parts is not None:
                run.prompts = [p for p in prompts for _ in range(per_prompt)]
                run.prompt_parts = parts
        if run.guided and self.negative and arguments.get("negative_prompt_embeds") is None:
            n_prompts = run.batch // per_prompt
            parts = self._tokenize(run, arguments, True, per_prompt, n_prompts, warn=True)
            if parts is not None:
                neg = arguments.get("negative_prompt")
                negs = [neg or ""] * n_prompts if neg is None or isinstance(neg, str) else list(neg)
                run.negative_prompts = [p for p in negs for _ in range(per_prompt)]
                run.negative_parts = parts
        self._run = run

    def _add_negative(self, run: _Run, arguments: dict, outputs) -> None:
        """A second ``encode_prompt`` before any denoiser call (Flux's true CFG): the negative prompt."""
        encoding = self.family.read_encoding(self.pipe, arguments, outputs)
        run.negative_embeds = encoding.embeds
        run.guided = True
        if not self.negative or arguments.get("prompt_embeds") is not None:
            return
        per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        prompt = arguments.get("prompt")
        negs = [prompt or ""] if prompt is None or isinstance(prompt, str) else list(prompt)
        if len(negs) == 1 and run.batch // per_prompt > 1:
            negs = negs * (run.batch // per_prompt)
        if len(negs) * per_prompt != run.batch:
            return
        parts = self._tokenize(run, {**arguments, "prompt": negs}, False, per_prompt, len(negs), warn=True, what="negative prompt")
        if parts is not None:
            run.negative_prompts = [p for p in negs for _ in range(per_prompt)]
            run.negative_parts = parts

    def _kept_positions(self, run: _Run) -> list[int]:
        """Per segment, how many of its positions the accumulators keep: through the last end
        token of every prompt and negative prompt, all of them when the texts are unknown (or
        ``full_context``), none of a segment no tokenizer names."""
        unnamed = not run.prompt_parts or (run.guided and self.negative and not run.negative_parts)
        kept = []
        for k, seg in enumerate(run.segments):
            if self.full_context or unnamed:
                kept.append(seg.length)
            elif seg.tokenizer is None:
                kept.append(0)
            else:
                kept.append(min(seg.length, max(len(parts[k].tokens) for parts in run.prompt_parts + run.negative_parts)))
        return kept

    def _kept_branches(self, branches: tuple[int, ...], kind: str) -> tuple[int, ...]:
        """The branches of a denoiser call whose rows the trace stores: the conditional one, and
        the negative one for word maps when ``negative`` asks for them."""
        return tuple(b for b in branches if b == COND or (kind == "attention" and self.negative))

    def _new_accumulator(self, run: _Run, kind: str, branches: tuple[int, ...]) -> StepAccumulator:
        if run.kept is None:
            run.kept = self._kept_positions(run)
        if kind == "concepts":
            tokens = None
        elif len(run.segments) == 1 and run.segments[0].start == 0:
            tokens = run.kept[0]
        else:
            tokens = [seg.start + i for seg, n in zip(run.segments, run.kept) for i in range(n)]
        layers = self.keep_layers if kind == "attention" and COND in branches else False
        layer_rows = layer_tokens = None
        if layers:
            # Per-layer maps: the conditional rows over the conditional prompt's own positions,
            # exactly what the trace stores (the mean keeps both branches' union of positions).
            rows = len(branches) * run.batch
            layer_rows = branch_rows(branches, rows, COND)
            layer_rows = None if layer_rows == slice(0, rows) else layer_rows
            _, cond_index = self._axis(run, run.prompt_parts)
            layer_tokens = None if cond_index == list(range(sum(run.kept))) else cond_index
        return StepAccumulator(
            latent_size=run.latent_size,
            tokens=tokens,
            keep_layers=layers is True,
            keep_resolutions=layers == "resolution",
            store_dtype=self.store_dtype,
            layer_rows=layer_rows,
            layer_tokens=layer_tokens,
            layer_dtype=self.layer_dtype,
            layer_device="cpu",
        )

    def memory_shapes(self, run: _Run) -> MapShapes:
        """What decides the size of this run's maps, known at its first model call (`explain.memory`)."""
        if run.kept is None:
            run.kept = self._kept_positions(run)
        _, cond_index = self._axis(run, run.prompt_parts)
        negative = len(self._axis(run, run.negative_parts)[1]) if self.negative and run.guided else 0
        return MapShapes(
            latent_size=tuple(run.latent_size),
            layer_grids=self.family.layer_grids(self.pipe, run.latent_size, self.options),
            steps=_planned_steps(self.pipe.scheduler),
            images=int(run.batch),
            tokens=len(cond_index),
            negative_tokens=negative,
            kept_tokens=sum(run.kept),
            keep_layers=self.keep_layers,
            store_dtype=self.store_dtype,
            layer_dtype=self.layer_dtype,
            notes={"full_context": bool(self.full_context), "t5": self.family.name in ("sd3", "flux")},
        )

    def _check_memory(self, run: _Run) -> None:
        """Estimate the run's maps, print the estimate when per-layer maps are kept, and refuse a
        run over the budget; called once per run, at the first model call, before any step."""
        run.memory_checked = True
        if not self.keep_layers and self.memory_budget_mb is None:
            return
        estimate = self.memory_estimate = estimate_memory(self.memory_shapes(run))
        if self.keep_layers:
            print(estimate.describe(), file=sys.stderr, flush=True)
        check_budget(estimate, self.memory_budget_mb)

    def _before_model(self, module, args, kwargs):
        sample, context = self.family.model_inputs(args, kwargs)
        if sample is None or context is None:
            return None
        if self._run is None:
            self._run = _Run(batch=None, context_length=int(context.shape[1]))
            self._run.segments = self.family.text_segments(self.pipe, self._run.context_length)
        run = self._run
        rows = int(sample.shape[0])
        if run.batch is None:
            guided = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and rows % 2 == 0
            run.batch = rows // 2 if guided else rows
            run.guided = guided
        run.model_calls += 1
        branches = self.family.call_branches(self.pipe, run, rows, context, kwargs)
        run.calls_this_step += 1
        run.current = tuple(branches) if branches else None
        if run.current is None:
            return None
        size = self.family.latent_size(self.pipe, sample, kwargs)
        if run.latent_size != size:
            run.latent_size = size
            run.accumulators = {}
        if not run.memory_checked:
            self._check_memory(run)
        return None

    def _record_attention(self, name: str, probs: torch.Tensor, grid, kind: str = "attention") -> None:
        run = self._run
        if run is None or run.current is None or run.latent_size is None:
            return
        branches = self._kept_branches(run.current, kind)
        if not branches:
            return
        if branches != run.current:  # drop the rows the trace will not store before anything is summed
            probs = select_rows(probs, branch_rows(run.current, probs.shape[0], COND))
        key = (kind, branches)
        accumulator = run.accumulators.get(key)
        if accumulator is None:
            accumulator = run.accumulators[key] = self._new_accumulator(run, kind, branches)
        accumulator.add(name, probs, grid)

    def _wrap_step(self, scheduler):
        original = scheduler.step
        # Bind against the class's method: ``original`` may itself be someone's (*args, **kwargs) wrapper.
        signature = inspect.signature(type(scheduler).step)

        def step(*args, **kwargs):
            starts_step = _call_starts_step(scheduler)
            out = original(*args, **kwargs)
            bound = signature.bind_partial(scheduler, *args, **kwargs).arguments
            self._after_step(scheduler, bound, out, starts_step)
            return out

        return step

    def _after_step(self, scheduler, arguments: dict, out, starts_step: bool) -> None:
        run = self._run
        if run is None or run.latent_size is None:
            return
        run.calls_this_step = 0
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        run.final_latent = prev.detach()
        if not starts_step:
            for accumulator in run.accumulators.values():
                accumulator.discard_step()
            return
        records = [(kind, branches, acc, acc.end_step()) for (kind, branches), acc in run.accumulators.items() if acc.pending]
        if not any(kind == "attention" for kind, *_ in records):
            raise RuntimeError(
                "no text attention was recorded during this step; is another attention processor "
                "replacing the tap's, or does the model have no cross-attention?"
            )
        model_output, timestep, sample = arguments["model_output"], arguments["timestep"], arguments["sample"]
        # The pipeline rebinds, never mutates, these tensors, so references suffice (no copies).
        run.x_t.append(sample)
        run.model_outputs.append(model_output)
        run.timesteps.append(timestep)
        run.sigmas.append(_table_sigma(scheduler))
        run.attention_steps.append(records)

    def _wrap_decode(self, original):
        def decode(*args, **kwargs):
            out = original(*args, **kwargs)
            if not self._decoding and self._run is not None and self._run.x_t:
                sample = out[0] if isinstance(out, tuple) else out.sample
                self._run.images = to_uint8(sample.detach())
            return out

        return decode

    # ------------------------------------------------------------------ building the trace
    def _finish_run(self) -> None:
        run, self._run = self._run, None
        if run is None or not run.x_t:
            return
        self.traces.append(self._build(run))

    @staticmethod
    def _record_of(records: list[tuple], kind: str, branch: int):
        """(branches, accumulator, step index) of the first record of ``kind`` with ``branch``'s rows, or None."""
        for k, branches, accumulator, index in records:
            if k == kind and branch in branches:
                return branches, accumulator, index
        return None

    def _branch_maps(self, run: _Run, kind: str, branch: int) -> list[torch.Tensor | None]:
        """Per step, the ``branch`` rows of the first record of ``kind`` that has them (None where none)."""
        maps = []
        for records in run.attention_steps:
            found = self._record_of(records, kind, branch)
            if found is None:
                maps.append(None)
                continue
            branches, accumulator, index = found
            record = accumulator.step_map(index)  # rows of the kept branches, in the model batch's order
            maps.append(record[branch_rows(branches, record.shape[0], branch)])
        return maps

    def _take_layer_maps(self, run: _Run) -> dict[str, list[torch.Tensor]]:
        """name → per step, the conditional per-layer maps (already cut, on the CPU), which the
        accumulators then no longer hold."""
        layers: dict[str, list[torch.Tensor]] = {}
        for records in run.attention_steps:
            found = self._record_of(records, "attention", COND)
            if found is not None:
                _, accumulator, index = found
                for name, m in accumulator.take_layer_maps(index).items():
                    layers.setdefault(name, []).append(m)
        return layers

    def _axis(self, run: _Run, parts: list[list[PromptTokens]]) -> tuple[list[int], list[int]]:
        """Per segment, how many positions a branch's maps keep (through its own prompts' end
        tokens), and their indices in the accumulators' kept axis."""
        kept = run.kept if run.kept is not None else self._kept_positions(run)
        lengths, index, offset = [], [], 0
        for k, (seg, n) in enumerate(zip(run.segments, kept)):
            if self.full_context or not parts:
                length = n
            elif seg.tokenizer is None:
                length = 0
            else:
                length = min(n, max(len(p[k].tokens) for p in parts))
            lengths.append(length)
            index += list(range(offset, offset + length))
            offset += n
        return lengths, index

    def _build(self, run: _Run) -> Trace:
        steps = len(run.x_t)
        scheduler = self.pipe.scheduler
        timesteps = [float(t) for t in run.timesteps]
        space = latent_space_of(scheduler)
        if space == "flow":
            sigmas = [float(sg) for sg in run.sigmas]
        else:
            sigmas = [float(sg) if sg is not None else _sigma_from_alphas(scheduler, t) for sg, t in zip(run.sigmas, timesteps)]
        prediction_type = prediction_type_of(scheduler)
        unpack = lambda x: self.family.unpack(x, run.latent_size)  # noqa: E731
        x_t = [unpack(sample) for sample in run.x_t]
        x0 = []
        for sample, output, sigma in zip(x_t, run.model_outputs, sigmas):
            output = unpack(output).float()
            if space == "flow":
                x0.append(x0_from_flow_output(sample.float(), output, sigma, prediction_type))
                continue
            x_vp = sample.float() / math.sqrt(1.0 + sigma * sigma) if space == "sigma" else sample.float()
            x0.append(x0_from_model_output(x_vp, output, 1.0 / (1.0 + sigma * sigma), prediction_type))
        if len(run.attention_steps) != steps:
            raise RuntimeError(f"attention was recorded for {len(run.attention_steps)} of {steps} steps")
        cond_maps = self._branch_maps(run, "attention", COND)
        if any(m is None for m in cond_maps):
            raise RuntimeError("a step has no conditional attention; the tap saw no conditional branch there")
        negative_maps = self._branch_maps(run, "attention", UNCOND) if self.negative else [None]
        cond_lengths, cond_index = self._axis(run, run.prompt_parts)
        attention = _stack_cpu(cond_maps, cond_index, self.store_dtype)
        # One layer at a time, so the per-step pieces of a layer are freed once it is stacked.
        layer_steps = self._take_layer_maps(run) if self.keep_layers else {}
        attention_layers = {}
        for name in list(layer_steps):
            maps = layer_steps.pop(name)
            if len(maps) == steps:
                attention_layers[name] = torch.stack(maps)
            del maps
        tokens, words, prompts = self._token_lists(run, run.prompt_parts, run.prompts, cond_lengths)
        trace = Trace(
            prompts=prompts,
            tokens=tokens,
            words=words,
            timesteps=torch.tensor(timesteps, dtype=torch.float64),
            sigmas=torch.tensor(sigmas, dtype=torch.float64),
            x_t=torch.stack(x_t).float().cpu(),
            x0=torch.stack(x0).cpu(),
            attention=attention,
            attention_layers=attention_layers,
            final_latent=unpack(run.final_latent).float().cpu() if run.final_latent is not None else None,
            images=run.images.cpu() if run.images is not None else None,
            meta=self._meta(run, steps, cond_lengths, cond_index),
        )
        if negative_maps and all(m is not None for m in negative_maps):
            neg_lengths, neg_index = self._axis(run, run.negative_parts)
            trace.attention_negative = _stack_cpu(negative_maps, neg_index, self.store_dtype)
            trace.negative_tokens, trace.negative_words, trace.negative_prompts = self._token_lists(
                run, run.negative_parts, run.negative_prompts, neg_lengths
            )
        if self.options.concepts:
            concept_maps = self._branch_maps(run, "concepts", COND)
            if any(m is None for m in concept_maps):
                raise RuntimeError("concept maps are missing for some steps; the model ran no block the concept stream can go through")
            trace.concepts = list(self.options.concepts)
            trace.concept_maps = torch.stack(concept_maps).to(device="cpu", dtype=self.store_dtype)
        if self.previews and getattr(self.pipe, "vae", None) is not None:
            self._decoding = True
            try:
                trace.x0_previews = self._decode_previews(trace.x0, None)
                trace.x_t_previews = self._decode_previews(trace.x_t, trace.sigmas if trace.meta["latent_space"] == "sigma" else None)
            finally:
                self._decoding = False
        return trace.validate()

    def _token_lists(self, run: _Run, parts: list[list[PromptTokens]], prompts: list[str] | None, lengths: list[int]):
        length = sum(lengths)
        if parts:
            pads = [seg.pad for seg in run.segments]
            joined = [concat_prompt_tokens(p, lengths, pads) for p in parts]
            return [j.tokens for j in joined], [j.words for j in joined], list(prompts)
        # Embeddings were passed without text: positions have no names.
        batch = run.batch
        tokens = [[f"<position {i}>" for i in range(length)] for _ in range(batch)]
        return tokens, [[] for _ in range(batch)], ["" for _ in range(batch)]

    def _meta(self, run: _Run, steps: int, lengths: list[int], index: list[int]) -> dict[str, Any]:
        pipe = self.pipe
        scheduler = pipe.scheduler
        h, w = run.latent_size
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        guidance = run.guidance_scale
        meta: dict[str, Any] = {
            "source": "diffusers",
            "family": self.family.name,
            "model": _model_name(pipe),
            "pipeline": type(pipe).__name__,
            "scheduler": type(scheduler).__name__,
            "prediction_type": prediction_type_of(scheduler),
            "latent_space": latent_space_of(scheduler),
            "height": h * factor,
            "width": w * factor,
            "vae_scale_factor": factor,
            "steps": steps,
            "model_calls": run.model_calls,
            "guided": bool(run.guided),
            "attention_layers": "per layer" if self.keep_layers is True else "per resolution" if self.keep_layers else "none",
        }
        if guidance is not None:
            meta["guidance_scale"] = float(guidance)
            meta["guidance"] = float(guidance)
        rescale = run.guidance_rescale
        if run.guided and rescale:  # diffusers applies it to guided steps only
            meta["guidance_rescale"] = float(rescale)
        if self.seed is not None:
            meta["seed"] = int(self.seed)
        if run.negative_prompts:
            meta["negative_prompt"] = run.negative_prompts[0]
        dropped = sorted({word for parts in run.prompt_parts for t in parts for word in t.dropped_words})
        if dropped:
            meta["truncated_words"] = dropped
        if self.family.joint:
            meta["maps"] = self.options.maps
            if self.options.maps == "attention":
                meta["joint_rows"] = self.options.joint_rows
            if self.options.concepts:
                meta["concept_maps"] = self.options.maps
            meta["text_layout"] = [[seg.name, n] for seg, n in zip(run.segments, lengths)]
            kept = run.kept if run.kept is not None else self._kept_positions(run)
            positions = [seg.start + i for seg, n in zip(run.segments, kept) for i in range(n)]
            meta["text_positions"] = [positions[i] for i in index]
        meta.update(self.family.run_meta(pipe, run))
        return meta

    @torch.no_grad()
    def _decode_previews(self, latents: torch.Tensor, sigmas: torch.Tensor | None, chunk: int = 8) -> torch.Tensor:
        """[S, B, C, h, w] latents → [S, B, Hp, Wp, 3] uint8 through the pipeline's VAE."""
        s, b = latents.shape[:2]
        flat = latents.reshape(s * b, *latents.shape[2:])
        if sigmas is not None:  # x0 + σε → the unit-variance latent the VAE can read
            scale = (1.0 + sigmas.double() ** 2).rsqrt().float().repeat_interleave(b).view(-1, 1, 1, 1)
            flat = flat * scale
        images = [to_uint8(decode_latents(self.pipe.vae, flat[i : i + chunk]), self.preview_size) for i in range(0, flat.shape[0], chunk)]
        out = torch.cat(images)
        return out.view(s, b, *out.shape[1:])

# ---------------------------------------------------------------------------- helpers
def _call_starts_step(scheduler) -> bool:
    """Whether this ``scheduler.step`` call is the one that starts a denoising step from the
    latent entering it (False for Heun's/KDPM2's second-order call and PNDM's correction)."""
    if hasattr(scheduler, "state_in_first_order"):
        return bool(scheduler.state_in_first_order)
    if hasattr(scheduler, "prk_timesteps") and hasattr(scheduler, "counter"):
        counter = int(scheduler.counter)
        if not scheduler.config.skip_prk_steps and counter < len(scheduler.prk_timesteps):
            return counter % 4 == 0  # Runge-Kutta warm-up: four model calls per step
        # Linear multistep: the second call redoes the first step with an averaged derivative.
        return not (scheduler.config.skip_prk_steps and counter == 1)
    return True


def _planned_steps(scheduler) -> int:
    """How many denoising steps the scheduler was set up for (one trace record each)."""
    steps = getattr(scheduler, "num_inference_steps", None)
    if steps:
        return int(steps)
    timesteps = getattr(scheduler, "timesteps", None)
    return int(len(timesteps) // max(int(getattr(scheduler, "order", 1)), 1)) if timesteps is not None else 0


def _stack_cpu(maps: list[torch.Tensor], index: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Per-step ``[B, T, h, w]`` maps → ``[S, B, len(index), h, w]`` on the CPU (one transfer),
    keeping the token positions ``index`` (a prefix costs no copy)."""
    if index == list(range(len(index))):
        return torch.stack([m[:, : len(index)] for m in maps]).to(device="cpu", dtype=dtype)
    picked = torch.tensor(index, dtype=torch.long, device=maps[0].device)
    return torch.stack([m.index_select(1, picked) for m in maps]).to(device="cpu", dtype=dtype)


def _table_sigma(scheduler):
    """σ of the step just taken from the scheduler's own table, read right after ``step`` (Euler,
    Heun, DPM-Solver: ``sigmas[step_index - 1]``); a float when the table is on the CPU (no
    sync), a 0-d tensor otherwise, None for schedulers without one (DDIM, DDPM, PNDM)."""
    index = getattr(scheduler, "step_index", None)
    sigmas = getattr(scheduler, "sigmas", None)
    if index is None or not isinstance(sigmas, torch.Tensor) or not 0 < int(index) <= sigmas.shape[0]:
        return None
    value = sigmas[int(index) - 1]
    return float(value) if value.device.type == "cpu" else value.detach().clone()


def _sigma_from_alphas(scheduler, timestep: float) -> float:
    """σ = sqrt((1-ᾱ)/ᾱ) at ``timestep`` (log-σ interpolated between integer timesteps)."""
    ac = scheduler.alphas_cumprod.double().cpu()
    lo = min(max(int(math.floor(timestep)), 0), ac.shape[0] - 1)
    hi = min(lo + 1, ac.shape[0] - 1)
    frac = timestep - lo
    log_sigma = lambda a: 0.5 * math.log((1 - a) / a)  # noqa: E731
    return math.exp((1 - frac) * log_sigma(float(ac[lo])) + frac * log_sigma(float(ac[hi])))


def _model_name(pipe) -> str:
    """The pipeline's hub id or, for a local folder, the folder's name (a trace is shared; a path is not)."""
    for source in (getattr(pipe, "name_or_path", None), getattr(getattr(pipe, "config", None), "_name_or_path", None)):
        if source:
            return shareable_model_name(str(source))
    model = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    model_name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return shareable_model_name(str(model_name)) if model_name else type(pipe).__name__


# ---------------------------------------------------------------------------- public API
@contextmanager
def trace(
    pipe,
    keep_layers: bool | str = False,
    previews: bool = True,
    negative: bool = True,
    preview_size: int = DEFAULT_PREVIEW_SIZE,
    seed: int | None = None,
    store_dtype: torch.dtype = torch.float32,
    full_context: bool = False,
    method: str = "auto",
    maps: str = "attention",
    concepts: list[str] | None = None,
    joint_rows: str = "renormalized",
    layer_dtype: torch.dtype = torch.float16,
    memory_budget_mb: float | None = None,
):
    """Trace every call of ``pipe`` inside the block; ``tr.trace`` is the last call's `Trace`.

    ``keep_layers``: also keep each cross-attention layer's own maps (True, keyed by module
    path) or each resolution's (``"resolution"``, keyed like ``"16x16"``) in
    ``trace.attention_layers``, conditional rows only, as ``layer_dtype`` (float16 by default:
    `Trace.save` writes attention maps as float16 anyway), each step moved to the CPU when it
    ends; their estimated size is printed at the model's first call. ``memory_budget_mb``:
    refuse, at the model's first call and before any step, a run whose attention maps (mean
    and per-layer, see `explain.memory`) would take more megabytes; the error says what would
    fit. ``previews``: decode x0 and x_t of every step (longer side at most ``preview_size``)
    after generation. ``negative``: record the unconditional branch's maps
    as ``attention_negative``. ``seed`` is only written to ``meta``. ``full_context`` keeps every
    context position (padding included, 77 for CLIP) instead of cutting after the last end
    token. ``store_dtype`` is the attention maps' dtype in the trace. ``method`` picks how
    probabilities are computed (`explain.attention.attention_with_probs`): "explicit" softmax,
    "sdpa" (fused kernel with an identity appended to the values), or "auto" (explicit, which
    dispatches the fewest operations).

    Joint-attention models (SD3, Flux; see `families.joint`): ``maps="attention"`` records the
    image-query × text-key slice of the joint softmax, rows renormalised over the text
    (``joint_rows="renormalized"``: each pixel's distribution over text positions, like a UNet's
    cross-attention) or as the raw share of the joint attention (``"raw"``); ``maps="output"``
    records ConceptAttention's output-space maps instead. ``concepts=["circle", ...]`` runs a
    concept stream that leaves the image unchanged and stores per-concept maps (of the kind
    ``maps`` names) as ``trace.concepts`` / ``trace.concept_maps``; the concepts need not be in the prompt."""
    tap = DiffusersTap(pipe, keep_layers, previews, negative, preview_size, seed, store_dtype, full_context, method, maps, concepts, joint_rows,
                       layer_dtype, memory_budget_mb)
    tap.install()
    try:
        yield tap
    except BaseException:
        tap._run = None
        tap.remove()
        raise
    else:
        try:
            tap.remove()
        finally:
            tap._finish_run()


def generate(
    pipe,
    prompt: str | list[str],
    negative_prompt: str | list[str] | None = None,
    steps: int = 20,
    guidance: float = 7.5,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    schedule: str = "uniform",
    lam: int = 60,
    previews: bool = True,
    keep_layers: bool | str = False,
    maps: str = "attention",
    concepts: list[str] | None = None,
    memory_budget_mb: float | None = None,
    **pipe_kwargs,
):
    """Generate with ``pipe`` under a tap; returns ``(trace, images)`` (PIL images, or whatever
    ``output_type`` asks for). ``schedule`` is "uniform", "early" or "latter" (the paper's
    exponential time steps with shift ``lam``; needs a scheduler that takes custom timesteps, or
    for flow matching custom sigmas, see `explain.adapters.diffusers.schedules`).

    ``guidance`` is the classifier-free guidance scale; for Flux it is the true-CFG scale (an
    empty negative prompt is used when none is given), or the embedded guidance of a
    guidance-distilled model. SD3 and Flux get a T5 ``max_sequence_length`` that fits the prompt
    (0 for SD3 without T5) unless ``pipe_kwargs`` sets one. ``maps``, ``concepts`` and
    ``memory_budget_mb``: see `trace`."""
    from explain.adapters.diffusers.families import family_of
    from explain.schedules import normalize_schedule

    schedule = normalize_schedule(schedule)
    step_kwargs = diffusers_timesteps(pipe.scheduler, int(steps), schedule, int(lam))
    call_kwargs = family_of(pipe).call_kwargs(pipe, prompt, negative_prompt, float(guidance), pipe_kwargs)
    generator = torch.Generator("cpu").manual_seed(int(seed))  # the same noise on every device
    tap_kwargs = {"maps": maps, "concepts": concepts} if (maps != "attention" or concepts) else {}
    with trace(pipe, keep_layers=keep_layers, previews=previews, seed=seed, memory_budget_mb=memory_budget_mb, **tap_kwargs) as tap:
        out = pipe(
            prompt,
            height=height,
            width=width,
            generator=generator,
            **call_kwargs,
            **step_kwargs,
            **pipe_kwargs,
        )
    result = tap.trace
    result.meta.update(schedule=schedule, lam=int(lam), seed=int(seed))
    images = out.images if hasattr(out, "images") else out[0]
    return result, images
