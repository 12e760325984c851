"""Trace a diffusers text-to-image pipeline (the model families in `explain.adapters.diffusers.families`).

    with trace(pipe, keep_layers=False, previews=True) as tr:
        out = pipe("a red circle above a blue square", guidance_scale=5.0)
    tr.trace            # explain.trace.Trace: per-step x_t, x0, attention, tokens, words, meta

What the tap does while the ``with`` block is open, and undoes on exit (also after an
exception), leaving the pipeline exactly as it was:

* **Text attention.** The model's family installs capture processors (UNets: each ``attn2``
  layer gets one that computes the softmax explicitly, `explain.attention.attention_probs`, and
  reuses the probabilities for the layer's output); they hand the conditional rows (and, under classifier-free guidance, the
  unconditional ones, as ``attention_negative``) to a per-step accumulator: mean over heads and
  layers at latent resolution, only the context positions through the last end token.
  Self-attention (``attn1``) keeps its fast path. Layers whose processor is not one of diffusers'
  plain ones (IP-Adapter, say) are left alone, with a warning.
* **Which rows are which.** diffusers batches classifier-free guidance as ``[uncond, cond]``. The
  tap learns the number of images from ``encode_prompt``'s output and compares it with the UNet's
  batch: twice as many rows means guidance, as many means none (guidance 1).
* **x0 per step.** ``scheduler.step`` is wrapped: the sample entering it is ``x_t`` (in the
  scheduler's own latent space: x0 + σ·ε for Euler/Heun-type schedulers, √ᾱ·x0 + √(1-ᾱ)·ε for
  DDIM/DDPM/DPM-Solver/PNDM, see ``meta["latent_space"]``), and x0 is computed from the guided
  model output with `explain.noise` at the scheduler's own noise level, the same for every
  scheduler and for ε-, v- and sample-prediction. Schedulers that call the model more than
  once per step record only the call whose input is the latent entering the step: Heun's (and
  KDPM2's) first-order call, and for PNDM every call but the first step's correction; the extra
  calls' attention is dropped too, so there is exactly one record per step.
* **Prompts.** ``encode_prompt`` is wrapped to see the prompts, negative prompts and
  ``num_images_per_prompt``; tokens and words come from `explain.tokens` (first tokenizer; for
  SDXL both tokenizers give the same positions).
* **Images.** ``vae.decode`` is wrapped to keep the final images; previews of x0 and x_t per
  step are decoded after generation (optional, they cost one VAE decode per step and image).

Tensors are kept on the model's device during the run (no per-layer or per-step host syncs) and
moved to the CPU once, when the trace is built.
"""

from __future__ import annotations

import inspect
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from explain.adapters.diffusers.decode import decode_latents, to_uint8
from explain.adapters.diffusers.families import family_of
from explain.adapters.diffusers.schedules import diffusers_timesteps, latent_space_of
from explain.attention import (
    CAPTURE_METHODS,
    COND,
    UNCOND,
    StepAccumulator,
    branch_rows,
)
from explain.noise import x0_from_model_output
from explain.tokens import PromptTokens, pad_token_list, tokenize_prompt
from explain.trace import Trace, shareable_model_name

_ACTIVE: "weakref.WeakSet" = weakref.WeakSet()  # pipelines being traced (one tap at a time)

DEFAULT_PREVIEW_SIZE = 256


# ---------------------------------------------------------------------------- per-run state
@dataclass
class _Run:
    """What one pipeline call produced (the tap starts a new one at each ``encode_prompt``)."""

    prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    prompt_tokens: list[PromptTokens] = field(default_factory=list)
    negative_tokens: list[PromptTokens] = field(default_factory=list)
    batch: int | None = None
    guided: bool | None = None
    context_length: int | None = None
    attention: StepAccumulator | None = None  # every row of the model batch
    cond_or_uncond: list[int] | None = None
    # Per step: (accumulator, its step index, the model batch's cond_or_uncond), split into
    # conditional / negative rows when the trace is built (the batch may change mid-run, e.g.
    # when a callback switches guidance off).
    attention_steps: list[tuple[StepAccumulator, int, list[int]]] = field(default_factory=list)
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
    ):
        if method not in ("auto", *CAPTURE_METHODS):
            raise ValueError(f"method must be 'auto' or one of {CAPTURE_METHODS}, got {method!r}")
        self.family = family_of(pipe)
        if keep_layers not in (False, True, "resolution"):
            raise ValueError(f"keep_layers must be False, True (every layer) or 'resolution', got {keep_layers!r}")
        self.pipe = pipe
        self.keep_layers = keep_layers
        self.previews = previews
        self.negative = negative
        self.preview_size = int(preview_size)
        self.seed = seed
        self.store_dtype = store_dtype
        self.full_context = full_context
        self.method = method
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

    # ------------------------------------------------------------------ install / remove
    def install(self) -> None:
        if self.pipe in _ACTIVE:
            raise RuntimeError("this pipeline is already being traced; nest no trace() blocks on one pipeline")
        try:
            method = "explicit" if self.method == "auto" else self.method
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

    def _start_run(self, arguments: dict, outputs) -> None:
        if self._run is not None and self._run.x_t:
            self._finish_run()
        embeds = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
        negative_embeds = outputs[1] if isinstance(outputs, (tuple, list)) and len(outputs) > 1 else None
        run = _Run()
        run.guidance_scale = getattr(self.pipe, "_guidance_scale", None)
        run.guidance_rescale = getattr(self.pipe, "_guidance_rescale", None)
        run.batch = int(embeds.shape[0])
        run.context_length = int(embeds.shape[1])
        per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        guided = arguments.get("do_classifier_free_guidance")
        run.guided = bool(guided) if guided is not None else negative_embeds is not None

        tokenizer = getattr(self.pipe, "tokenizer", None) or getattr(self.pipe, "tokenizer_2", None)
        prompt = arguments.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else None
        if prompts is not None and len(prompts) * per_prompt != run.batch:
            prompts = None  # embeddings were given alongside; their count wins
        if prompts is not None and tokenizer is not None:
            tokens = [tokenize_prompt(tokenizer, p, max_length=run.context_length, warn=True) for p in prompts]
            run.prompts = [p for p in prompts for _ in range(per_prompt)]
            run.prompt_tokens = [t for t in tokens for _ in range(per_prompt)]
        if run.guided and self.negative:
            neg = arguments.get("negative_prompt")
            n_prompts = run.batch // per_prompt
            if neg is None or isinstance(neg, str):
                negs = [neg or ""] * n_prompts
            else:
                negs = list(neg)
            if len(negs) == n_prompts and tokenizer is not None and arguments.get("negative_prompt_embeds") is None:
                tokens = [tokenize_prompt(tokenizer, p, max_length=run.context_length, what="negative prompt") for p in negs]
                run.negative_prompts = [p for p in negs for _ in range(per_prompt)]
                run.negative_tokens = [t for t in tokens for _ in range(per_prompt)]
        self._run = run

    def _new_accumulator(self, run: _Run) -> StepAccumulator:
        lengths = [len(t.tokens) for t in run.prompt_tokens + run.negative_tokens]
        unnamed = not run.prompt_tokens or (run.guided and self.negative and not run.negative_tokens)
        keep = run.context_length if unnamed or self.full_context else max(lengths)
        return StepAccumulator(
            latent_size=run.latent_size,
            tokens=min(keep, run.context_length),
            keep_layers=self.keep_layers is True,
            keep_resolutions=self.keep_layers == "resolution",
            store_dtype=self.store_dtype,
        )

    def _before_model(self, module, args, kwargs):
        sample, context = self.family.model_inputs(args, kwargs)
        if sample is None or context is None:
            return None
        if self._run is None:
            self._run = _Run(batch=None, context_length=int(context.shape[1]))
        run = self._run
        rows = int(sample.shape[0])
        if run.batch is None:
            guided = bool(getattr(self.pipe, "do_classifier_free_guidance", False)) and rows % 2 == 0
            run.batch = rows // 2 if guided else rows
            run.guided = guided
        if rows == 2 * run.batch:
            run.cond_or_uncond = [UNCOND, COND]  # diffusers' classifier-free guidance order
        elif rows == run.batch:
            run.cond_or_uncond = [COND]
        else:
            raise RuntimeError(
                f"the UNet got a batch of {rows} latents for {run.batch} images; the tap understands "
                "[uncond, cond] (guidance) or [cond] (no guidance) batches only (edit pipelines such as "
                "InstructPix2Pix are not supported)"
            )
        size = (int(sample.shape[-2]), int(sample.shape[-1]))
        if run.attention is None or run.latent_size != size:
            run.latent_size = size
            run.attention = self._new_accumulator(run)
        run.model_calls += 1
        return None

    def _record_attention(self, name: str, probs: torch.Tensor, grid) -> None:
        run = self._run
        if run is not None and run.attention is not None:
            run.attention.add(name, probs, grid)

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
        if run is None or run.attention is None:
            return
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        run.final_latent = prev.detach()
        if not starts_step:
            run.attention.discard_step()
            return
        model_output, timestep, sample = arguments["model_output"], arguments["timestep"], arguments["sample"]
        # The pipeline rebinds, never mutates, these tensors, so references suffice (no copies).
        run.x_t.append(sample)
        run.model_outputs.append(model_output)
        run.timesteps.append(timestep)
        run.sigmas.append(_table_sigma(scheduler))
        run.attention_steps.append((run.attention, run.attention.end_step(), list(run.cond_or_uncond)))

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

    def _build(self, run: _Run) -> Trace:
        steps = len(run.x_t)
        scheduler = self.pipe.scheduler
        timesteps = [float(t) for t in run.timesteps]
        sigmas = [float(sg) if sg is not None else _sigma_from_alphas(scheduler, t) for sg, t in zip(run.sigmas, timesteps)]
        space = latent_space_of(scheduler)
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        x0 = []
        for sample, output, sigma in zip(run.x_t, run.model_outputs, sigmas):
            x_vp = sample.float() / math.sqrt(1.0 + sigma * sigma) if space == "sigma" else sample.float()
            x0.append(x0_from_model_output(x_vp, output.float(), 1.0 / (1.0 + sigma * sigma), prediction_type))
        if len(run.attention_steps) != steps:
            raise RuntimeError(f"attention was recorded for {len(run.attention_steps)} of {steps} steps")
        cond_maps, negative_maps, layer_maps = [], [], {}
        for accumulator, index, cond_or_uncond in run.attention_steps:
            record, layers = accumulator.step_maps(index)  # rows as in the model batch
            rows = record.shape[0]
            cond = branch_rows(cond_or_uncond, rows, COND)
            uncond = branch_rows(cond_or_uncond, rows, UNCOND)
            cond_maps.append(record[cond])
            negative_maps.append(record[uncond] if self.negative and UNCOND in cond_or_uncond else None)
            for name, maps in layers.items():
                layer_maps.setdefault(name, []).append(maps[cond])
        t_len = max((len(t.tokens) for t in run.prompt_tokens), default=run.context_length)
        if self.full_context or not run.prompt_tokens:
            t_len = run.context_length
        attention = _stack_cpu(cond_maps, t_len, self.store_dtype)
        tokens, words, prompts = self._token_lists(run.prompt_tokens, run.prompts, run.batch, t_len)
        trace = Trace(
            prompts=prompts,
            tokens=tokens,
            words=words,
            timesteps=torch.tensor(timesteps, dtype=torch.float64),
            sigmas=torch.tensor(sigmas, dtype=torch.float64),
            x_t=torch.stack(run.x_t).float().cpu(),
            x0=torch.stack(x0).cpu(),
            attention=attention,
            attention_layers={
                name: _stack_cpu(maps, t_len, self.store_dtype) for name, maps in layer_maps.items() if len(maps) == steps
            },
            final_latent=run.final_latent.float().cpu() if run.final_latent is not None else None,
            images=run.images.cpu() if run.images is not None else None,
            meta=self._meta(run, steps),
        )
        if negative_maps and all(m is not None for m in negative_maps):
            n_len = max((len(t.tokens) for t in run.negative_tokens), default=run.context_length)
            if self.full_context or not run.negative_tokens:
                n_len = run.context_length
            trace.attention_negative = _stack_cpu(negative_maps, n_len, self.store_dtype)
            trace.negative_tokens, trace.negative_words, trace.negative_prompts = self._token_lists(
                run.negative_tokens, run.negative_prompts, run.batch, n_len
            )
        if self.previews and getattr(self.pipe, "vae", None) is not None:
            self._decoding = True
            try:
                trace.x0_previews = self._decode_previews(trace.x0, None)
                trace.x_t_previews = self._decode_previews(trace.x_t, trace.sigmas if trace.meta["latent_space"] == "sigma" else None)
            finally:
                self._decoding = False
        return trace.validate()

    @staticmethod
    def _token_lists(prompt_tokens: list[PromptTokens], prompts: list[str] | None, batch: int, length: int):
        if prompt_tokens:
            tokens = [pad_token_list(t.tokens, length) for t in prompt_tokens]
            words = [[w for w in t.words if max(w.token_indices) < length] for t in prompt_tokens]
            return tokens, words, list(prompts)
        # Embeddings were passed without text: positions have no names.
        tokens = [[f"<position {i}>" for i in range(length)] for _ in range(batch)]
        return tokens, [[] for _ in range(batch)], ["" for _ in range(batch)]

    def _meta(self, run: _Run, steps: int) -> dict[str, Any]:
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
            "prediction_type": scheduler.config.get("prediction_type", "epsilon"),
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
        dropped = sorted({word for t in run.prompt_tokens for word in t.dropped_words})
        if dropped:
            meta["truncated_words"] = dropped
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


def _stack_cpu(maps: list[torch.Tensor], tokens: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-step ``[B, T, h, w]`` maps → ``[S, B, tokens, h, w]`` on the CPU (one transfer)."""
    return torch.stack([m[:, :tokens] for m in maps]).to(device="cpu", dtype=dtype)


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
):
    """Trace every call of ``pipe`` inside the block; ``tr.trace`` is the last call's `Trace`.

    ``keep_layers``: also keep each cross-attention layer's own maps (True, keyed by module
    path) or each resolution's (``"resolution"``, keyed like ``"16x16"``) in
    ``trace.attention_layers``. ``previews``: decode x0 and x_t of every step (longer side at
    most ``preview_size``) after generation. ``negative``: record the unconditional branch's maps
    as ``attention_negative``. ``seed`` is only written to ``meta``. ``full_context`` keeps every
    context position (padding included, 77 for CLIP) instead of cutting after the last end
    token. ``store_dtype`` is the attention maps' dtype in the trace. ``method`` picks how
    probabilities are computed (`explain.attention.attention_with_probs`): "explicit" softmax,
    "sdpa" (fused kernel with an identity appended to the values), or "auto" (explicit, which
    dispatches the fewest operations)."""
    tap = DiffusersTap(pipe, keep_layers, previews, negative, preview_size, seed, store_dtype, full_context, method)
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
    **pipe_kwargs,
):
    """Generate with ``pipe`` under a tap; returns ``(trace, images)`` (PIL images, or whatever
    ``output_type`` asks for). ``schedule`` is "uniform", "early" or "latter" (the paper's
    exponential time steps with shift ``lam``; needs a scheduler that takes custom timesteps)."""
    from explain.schedules import normalize_schedule

    schedule = normalize_schedule(schedule)
    step_kwargs = diffusers_timesteps(pipe.scheduler, int(steps), schedule, int(lam))
    generator = torch.Generator("cpu").manual_seed(int(seed))  # the same noise on every device
    with trace(pipe, keep_layers=keep_layers, previews=previews, seed=seed) as tap:
        out = pipe(
            prompt,
            negative_prompt=negative_prompt,
            guidance_scale=float(guidance),
            height=height,
            width=width,
            generator=generator,
            **step_kwargs,
            **pipe_kwargs,
        )
    result = tap.trace
    result.meta.update(schedule=schedule, lam=int(lam), seed=int(seed))
    images = out.images if hasattr(out, "images") else out[0]
    return result, images
