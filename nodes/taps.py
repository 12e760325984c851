"""The ComfyUI tap: per-token cross-attention and x0 per step, recorded into a core `Trace`.

`install_tap(model, recorder)` patches a *clone* of a ComfyUI ``ModelPatcher`` (the model the
user loaded is never changed) with three things, all keyed ``"diffusion-explain"``:

* **an attn2 replace on every UNet cross-attention block** (``set_model_attn2_replace``). It
  computes the probabilities softmax(q kᵀ / √d) with `explain.attention` (an explicit float32
  softmax on a CPU; on a GPU the fused SDPA kernel, with an identity appended to the values so
  the probabilities come out too) and makes the layer output from the same call, which
  therefore equals ComfyUI's own attention up to float rounding. If
  another pack already replaced that block, its function still makes the output (we chain to
  it) and we only read the probabilities, with a warning. Rows are split into conditional and
  unconditional by ``transformer_options["cond_or_uncond"]``, never by position, because
  ComfyUI batches the two branches together or apart depending on free memory.
* **an OUTER_SAMPLE wrapper** that opens a fresh record for every sampling run and wraps the
  sampler's per-step callback ``(i, denoised, x, total_steps)``: ``x`` is the latent entering
  step ``i`` and ``denoised`` the guided x0, once per *step*, whatever the sampler.
* **a PREDICT_NOISE wrapper** that marks where each model evaluation begins. A step's
  attention is that of the last evaluation before the step's callback; the extra evaluations
  of Heun, DPM-2 or DPM++ SDE (made after the callback, for the correction) are discarded, so
  every sampler gives one attention record per step, at the noise level of ``x``.

Every patch and wrapper takes the arguments it uses and passes all others on as they came
(ComfyUI adds some over time: ``latent_shapes`` for OUTER_SAMPLE since late October 2025), and a
recording that goes wrong stops recording, never the user's sampling.

When the run ends, the recorder builds a `Trace` (latents in the model's own space,
``x = x0 + σ·ε``, ``meta["latent_space"] = "sigma"``) and files it in `nodes.runs.REGISTRY`
with the latents the sampler returned, so explanation nodes can find it by their LATENT.

ComfyUI is imported lazily (inside functions), so this module loads without it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from explain.attention import COND, UNCOND, StepAccumulator, attention_probs, attention_with_probs, branch_rows, merge_heads, select_rows, split_heads
from explain.tokens import PromptTokens, pad_token_list
from explain.trace import Trace

from .joint_taps import SUPPORTED, JointCallState, joint_family, require_override
from .joint_taps import install as install_joint
from .prompt_tokens import comfy_prompt_tokens, joint_context_tokens
from .runs import REGISTRY, Run, RunRegistry

log = logging.getLogger("diffusion-explain")

PATCH_KEY = "diffusion-explain"
_probing = 0  # > 0 while an explanation node re-runs the model: nothing is recorded then


def is_probing() -> bool:
    return _probing > 0


@contextlib.contextmanager
def probing():
    """Re-run a tapped model without recording (DF-RISE and DF-CAM probes)."""
    global _probing
    _probing += 1
    try:
        yield
    finally:
        _probing -= 1


# ---------------------------------------------------------------------------- prompts
@dataclass
class PromptInfo:
    """What the tap knows about one branch's prompt: its text, tokens/words and (optionally)
    the conditioning that text encodes to, to check the sampler really got that prompt."""

    text: str
    tokens: PromptTokens | None = None
    conditioning: torch.Tensor | None = None  # [1, T_ctx, dim] on the CPU
    # every token stream the CLIP made ("l", "g", "t5xxl"...) and its length in the context as
    # encoded (all chunks, padding included): joint-attention models concatenate several
    streams: dict[str, PromptTokens] = field(default_factory=dict)
    stream_lengths: dict[str, int] = field(default_factory=dict)


def clip_token_key(tokens: dict) -> str:
    """Which of ComfyUI's token streams names the context positions ("l" for SD1/SDXL)."""
    if not isinstance(tokens, dict) or not tokens:
        raise ValueError("clip.tokenize gave no token streams")
    for key in ("l", "h", "g"):
        if key in tokens:
            return key
    return next(iter(tokens))


def prompt_info_from_clip(clip, text: str, verify: bool = True) -> PromptInfo:
    """Tokenize ``text`` with a ComfyUI CLIP object the way CLIPTextEncode does, name its
    tokens and words, and (with ``verify``) encode it once for the conditioning check."""
    tokens = clip.tokenize(text, return_word_ids=True)
    key = clip_token_key(tokens)
    info = PromptInfo(text=text, tokens=comfy_prompt_tokens(tokens[key], _inv_vocab(clip, key), prompt=text))
    for name, chunks in tokens.items():
        try:
            info.streams[name] = info.tokens if name == key else comfy_prompt_tokens(chunks, _inv_vocab(clip, name), prompt=text)
            info.stream_lengths[name] = sum(len(chunk) for chunk in chunks)
        except (TypeError, ValueError):  # an empty or unreadable stream: it names no positions
            info.streams.pop(name, None)
    if verify:
        try:
            cond = clip.encode_from_tokens(clip.tokenize(text))
            info.conditioning = cond.detach().float().cpu()
        except Exception as exc:  # noqa: BLE001 - the check is a courtesy; naming tokens still works
            log.warning("diffusion-explain: could not encode the prompt to check it against the sampler's (%s)", exc)
    return info


def _inv_vocab(clip, stream: str):
    """Token id -> string of one of a CLIP's token streams (``clip_l``, ``clip_g``, ``t5xxl``...)."""
    tokenizer = getattr(clip, "tokenizer", None)
    inner = getattr(tokenizer, f"clip_{stream}", None) or getattr(tokenizer, stream, None)
    return getattr(inner, "inv_vocab", None)


# ---------------------------------------------------------------------------- attention patch
class AttentionTap:
    """``set_model_attn2_replace`` function for one transformer block."""

    def __init__(self, recorder: "TapRecorder", name: str, previous: Callable | None = None):
        self.recorder = recorder
        self.name = name
        self.previous = previous

    def __deepcopy__(self, memo):
        return self  # ModelPatcher.clone deep-copies model_options; the recorder must stay shared

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict, *args, **kwargs) -> torch.Tensor:
        # ComfyUI calls attn2 replace patches as (q, k, v, extra_options); anything it adds later
        # is passed on to a chained patch untouched.
        heads = int(extra_options["n_heads"])
        run = self.recorder.active
        if run is None or _probing or run.failed:
            return self._plain(q, k, v, extra_options, heads, *args, **kwargs)
        dim_head = q.shape[-1] // heads
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options, *args, **kwargs)
            try:
                probs = attention_probs(split_heads(q, heads), split_heads(k, heads), scale=dim_head**-0.5)
            except Exception as exc:  # noqa: BLE001 - the other pack's output stands; only the recording stops
                run.fail(f"the attention of {self.name} could not be read ({type(exc).__name__}: {exc})")
                return out
        else:
            try:
                # On a GPU the probabilities come out of the fused SDPA kernel (the same kernel ComfyUI
                # uses by default); on a CPU the explicit float32 softmax is as fast and exact.
                method = "sdpa" if q.is_cuda else "explicit"
                qh, kh, vh = split_heads(q, heads), split_heads(k, heads), split_heads(v, heads)
                out, probs = attention_with_probs(qh, kh, vh, scale=dim_head**-0.5, method=method, upcast=True)
                out = merge_heads(out)
            except Exception as exc:  # noqa: BLE001 - never fail the user's sampling because of the tap
                run.fail(f"the attention of {self.name} could not be recorded ({type(exc).__name__}: {exc})")
                return self._plain(q, k, v, extra_options, heads, *args, **kwargs)
        try:
            run.add_attention(self.name, probs, extra_options)  # [B, H, N, T]
        except Exception as exc:  # noqa: BLE001
            run.fail(f"the attention of {self.name} could not be recorded ({type(exc).__name__}: {exc})")
        return out

    def _plain(self, q, k, v, extra_options, heads, *args, **kwargs):
        if self.previous is not None:
            return self.previous(q, k, v, extra_options, *args, **kwargs)
        from comfy.ldm.modules.attention import optimized_attention

        options = {"attn_precision": extra_options.get("attn_precision")}
        if _takes_transformer_options(optimized_attention):
            options["transformer_options"] = extra_options  # for an optimized_attention_override (ComfyUI >= 0.3.60)
        return optimized_attention(q, k, v, heads, **options)


def _takes_transformer_options(fn) -> bool:
    """ComfyUI's attention functions take ``transformer_options`` since 0.3.60 (before, the keyword
    is a TypeError)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "transformer_options" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def cross_attention_blocks(diffusion_model) -> list[tuple[str, int, int]]:
    """``(block_name, number, transformer_index)`` of every cross-attention transformer block
    of a ComfyUI UNet (SD1.x, SD2.x, SDXL), in model order."""
    found = []
    groups = [("input", list(getattr(diffusion_model, "input_blocks", [])))]
    middle = getattr(diffusion_model, "middle_block", None)
    if middle is not None:
        groups.append(("middle", [middle]))
    groups.append(("output", list(getattr(diffusion_model, "output_blocks", []))))
    for block_name, blocks in groups:
        for number, block in enumerate(blocks):
            for layer in block:
                if type(layer).__name__ != "SpatialTransformer":
                    continue
                for index, tblock in enumerate(layer.transformer_blocks):
                    if getattr(tblock, "attn2", None) is not None:
                        found.append((block_name, number, index))
    return found


# ---------------------------------------------------------------------------- one run
class _RunState:
    """What one sampling run has recorded so far."""

    def __init__(self, recorder: "TapRecorder", latent_shape, sigmas: torch.Tensor, context_lengths: dict[int, int | None]):
        self.recorder = recorder
        self.batch = int(latent_shape[0])
        self.latent_size = (int(latent_shape[-2]), int(latent_shape[-1]))
        self.sigmas = sigmas.detach().double().cpu()
        self.context_lengths = context_lengths
        self.notes: set[str] = set()
        # per branch: the context positions kept (a count from the start, or a list for joint
        # models' several token streams), the tokens naming them and the streams they came from
        self.token_limits: dict[int, int | list[int] | None] = {}
        self.prompt_tokens: dict[int, PromptTokens | None] = {}
        self.text_layout: dict[int, list[list]] = {}
        for branch, info in ((COND, recorder.positive), (UNCOND, recorder.negative)):
            self.token_limits[branch], self.prompt_tokens[branch], self.text_layout[branch] = recorder.context_tokens(
                info, context_lengths.get(branch), self.notes
            )
        branches = [COND] + ([UNCOND] if recorder.record_negative else [])
        self.acc = {b: StepAccumulator(latent_size=self.latent_size, keep_resolutions=recorder.keep_resolutions) for b in branches}
        self.attn_index: dict[int, list[int | None]] = {b: [] for b in branches}
        self.x_t: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []
        self.step_ids: list[int] = []
        self.step_sigmas: list[float] = []
        self.evaluations = 0
        self.output: torch.Tensor | None = None  # what the sampler returned (its LATENT, VAE space)
        self.failed: str | None = None  # why recording stopped (sampling itself goes on unchanged)

    def fail(self, reason: str) -> None:
        if self.failed is None:
            self.failed = reason
            log.warning("diffusion-explain: recording stopped, sampling goes on: %s", reason)

    # ComfyUI calls, in order: begin_evaluation, add_attention (per layer and batch chunk), on_step
    def begin_evaluation(self) -> None:
        self.evaluations += 1
        for acc in self.acc.values():
            acc.discard_step()

    def add_attention(self, name: str, probs: torch.Tensor, extra_options: dict, layer_size: tuple[int, int] | None = None) -> None:
        """One layer's probabilities ``[B, heads, N, T]`` or head-averaged ``[B, N, T]`` of a model
        call; ``layer_size`` is its image grid (UNet layers: from ``extra_options``)."""
        if layer_size is None:
            original = extra_options.get("original_shape")
            if original is not None and tuple(int(s) for s in original[-2:]) != self.latent_size:
                self.notes.add("model calls on a cropped area (area conditioning) were left out of the attention maps")
                return
            activations = extra_options.get("activations_shape")
            layer_size = (int(activations[-2]), int(activations[-1])) if activations is not None else None
        cond_or_uncond = list(extra_options.get("cond_or_uncond") or [COND])
        rows_per_chunk = probs.shape[0] // max(len(cond_or_uncond), 1)
        if rows_per_chunk != self.batch:
            self.notes.add(f"model calls with {rows_per_chunk} rows per chunk (not the batch of {self.batch}) were left out")
            return
        for branch, acc in self.acc.items():
            rows = branch_rows(cond_or_uncond, probs.shape[0], branch)
            if isinstance(rows, list) and not rows:
                continue
            p = select_rows(probs, rows)
            chunks = p.shape[0] // self.batch
            if chunks > 1:  # several conditionings of one branch (e.g. Conditioning Combine): their mean
                p = p.view(chunks, self.batch, *p.shape[1:]).mean(0)
            p = keep_positions(fold_repeated_context(p, self.context_lengths.get(branch)), self.token_limits.get(branch))
            acc.add(name, p, layer_size)

    def on_step(self, i: int, denoised: torch.Tensor, x: torch.Tensor) -> None:
        self.x_t.append(x.detach().float().cpu().clone())
        self.x0.append(denoised.detach().float().cpu().clone())
        self.step_ids.append(int(i))
        index = min(int(i), self.sigmas.shape[0] - 1)
        self.step_sigmas.append(float(self.sigmas[index]))
        for branch, acc in self.acc.items():
            if acc.pending:
                acc.end_step()
                self.attn_index[branch].append(acc.num_steps - 1)
            else:
                self.attn_index[branch].append(None)

    def attention(self, branch: int) -> tuple[torch.Tensor | None, list[int]]:
        """``[S, B, T, h, w]`` for ``branch`` and the steps that had no evaluation of their own
        (filled with the previous step's maps); None if the branch was never evaluated."""
        acc = self.acc.get(branch)
        if acc is None:
            return None, []
        records = acc.records()
        if records is None:
            return None, []
        index = self.attn_index[branch]
        filled: list[torch.Tensor] = []
        missing: list[int] = []
        last = None
        for step, idx in enumerate(index):
            if idx is None:
                missing.append(step)
                if last is None:
                    return None, missing  # the first step has nothing to borrow from
                filled.append(last)
            else:
                last = records[idx]
                filled.append(last)
        return torch.stack(filled), missing


def fold_repeated_context(probs: torch.Tensor, length: int | None) -> torch.Tensor:
    """Undo ComfyUI's padding of a shorter context by repetition (when cond and uncond of
    different lengths share a batch): a key repeated n times gets 1/n of the attention in each
    copy, so summing the copies gives exactly the probabilities of the unpadded context."""
    t = probs.shape[-1]
    if not length or t == length or t % length:
        return probs
    return probs.reshape(*probs.shape[:-1], t // length, length).sum(-2)


def keep_positions(probs: torch.Tensor, kept: int | list[int] | None) -> torch.Tensor:
    """The kept context positions of ``probs [..., T]``: the first ``kept``, or the listed ones
    (when they fit this context; a longer list means another context, kept whole)."""
    if kept is None:
        return probs
    if isinstance(kept, int):
        return probs[..., :kept]
    if not kept or max(kept) >= probs.shape[-1]:
        return probs
    return probs.index_select(-1, torch.as_tensor(kept, dtype=torch.long, device=probs.device))


# OUTER_SAMPLE's arguments in the order CFGGuider.sample passes them; newer ComfyUI adds more
# after these (as keywords), which the wrapper passes on without knowing them.
OUTER_SAMPLE_ARGUMENTS = ("noise", "latent_image", "sampler", "sigmas", "denoise_mask", "callback", "disable_pbar", "seed")


def outer_sample_argument(args: tuple, kwargs: dict, name: str, default=None):
    """Argument ``name`` of an OUTER_SAMPLE call, given positionally or by keyword."""
    index = OUTER_SAMPLE_ARGUMENTS.index(name)
    return args[index] if index < len(args) else kwargs.get(name, default)


def with_outer_sample_argument(args: tuple, kwargs: dict, name: str, value) -> tuple[tuple, dict]:
    """The same call with argument ``name`` set to ``value`` where the caller put it (positional
    or keyword); every other argument stays as it was."""
    index = OUTER_SAMPLE_ARGUMENTS.index(name)
    if index < len(args):
        return (*args[:index], value, *args[index + 1 :]), dict(kwargs)
    return tuple(args), {**kwargs, name: value}


# ---------------------------------------------------------------------------- the recorder
class TapRecorder:
    """Shared by every patch and wrapper of one Tap node output; files finished runs under
    ``tap_key`` in ``registry``."""

    def __init__(
        self,
        tap_key: str | None = None,
        positive: PromptInfo | None = None,
        negative: PromptInfo | None = None,
        record_negative: bool = True,
        keep_resolutions: bool = False,
        registry: RunRegistry | None = None,
    ):
        self.tap_key = tap_key or uuid.uuid4().hex
        self.positive = positive
        self.negative = negative
        self.record_negative = record_negative
        self.keep_resolutions = keep_resolutions
        self.registry = registry if registry is not None else REGISTRY
        self.active: _RunState | None = None
        self.chained: list[str] = []
        self.last_error: str | None = None
        self.family = None  # a nodes.joint_taps.JointFamily for joint-attention (DiT) models, set by install_tap
        self.joint_state = None  # nodes.joint_taps.JointCallState, shared by the DiT block wrappers and override

    def context_tokens(self, info: PromptInfo | None, context_length: int | None, notes: set[str]):
        """``(kept positions, PromptTokens naming them, text layout)`` of one branch's context of
        ``context_length`` positions. UNets: the prompt's CLIP tokens from the start. Joint models:
        the token streams whose lengths add up to the context (SD3: CLIP then T5), each through its
        end token; positions are named by number when they add up to nothing."""
        if info is None or info.tokens is None:
            return None, None, []
        if self.family is None:
            return len(info.tokens.tokens), info.tokens, []
        picked = joint_context_tokens(info.streams, info.stream_lengths, self.family.context_parts, context_length) if context_length else None
        if picked is None:
            notes.add(
                f"the prompt's token streams ({', '.join(f'{k}: {n}' for k, n in info.stream_lengths.items())}) do not make up the "
                f"conditioning's {context_length} context positions (another text encoder or an edited conditioning?); "
                "positions are shown by number"
            )
            return None, None, []
        tokens, positions, layout = picked
        return positions, tokens, layout

    def __deepcopy__(self, memo):
        return self

    # ------------------------------------------------------------------ wrappers
    def outer_sample(self, executor, *args, **kwargs):
        """OUTER_SAMPLE wrapper. ComfyUI adds arguments over time (``latent_shapes`` since late
        October 2025), so this reads the few it needs, swaps in its step callback and passes
        every argument on as it came."""
        if _probing or self.active is not None:
            return executor(*args, **kwargs)
        guider = executor.class_obj
        noise, sigmas = outer_sample_argument(args, kwargs, "noise"), outer_sample_argument(args, kwargs, "sigmas")
        sampler, seed = outer_sample_argument(args, kwargs, "sampler"), outer_sample_argument(args, kwargs, "seed")
        run = _RunState(self, noise.shape, sigmas, context_lengths(getattr(guider, "conds", None) or getattr(guider, "original_conds", {})))
        outer_callback = outer_sample_argument(args, kwargs, "callback")

        def step_callback(i, denoised, x, *more, **named):  # ComfyUI: (i, denoised, x, total_steps)
            if self.active is run and not run.failed:
                try:
                    run.on_step(i, denoised, x)
                except Exception as exc:  # noqa: BLE001 - never fail the user's sampling because of the tap
                    run.fail(f"step {i} could not be recorded ({type(exc).__name__}: {exc})")
            if outer_callback is not None:
                return outer_callback(i, denoised, x, *more, **named)

        args, kwargs = with_outer_sample_argument(args, kwargs, "callback", step_callback)
        self.active = run
        try:
            output = executor(*args, **kwargs)
        finally:
            self.active = None
        try:
            self._file(run, guider, output, sampler, seed)
            self.last_error = None
        except Exception as exc:  # noqa: BLE001 - never fail the user's sampling because of the tap
            self.last_error = str(exc)
            log.warning("diffusion-explain: this run could not be recorded: %s", exc)
        return output

    def predict_noise(self, executor, *args, **kwargs):
        """PREDICT_NOISE wrapper ((x, timestep, model_options, seed) today): marks where a model
        evaluation begins and passes every argument on."""
        run = self.active
        if run is not None and not _probing and not run.failed:
            run.begin_evaluation()
        return executor(*args, **kwargs)

    # ------------------------------------------------------------------ building the trace
    def _file(self, run: _RunState, guider, output: torch.Tensor, sampler, seed) -> None:
        if run.failed:
            raise RuntimeError(run.failed)
        if not run.x_t:
            raise RuntimeError("the sampler never called its step callback, so no step was recorded")
        model = guider.model_patcher.model
        run.output = output.detach().float().cpu()
        trace = self.build_trace(run, model, guider, sampler, seed)
        outputs = [run.output]
        try:
            outputs.append(model.process_latent_out(trace.x0[-1].clone()).float().cpu())  # SamplerCustom's denoised_output
        except Exception:  # noqa: BLE001
            pass
        self.registry.add(Run(self.tap_key, trace, outputs))
        for note in sorted(run.notes):
            log.warning("diffusion-explain: %s", note)

    def build_trace(self, run: _RunState, model, guider=None, sampler=None, seed=None) -> Trace:
        steps = len(run.x_t)
        attention, missing = run.attention(COND)
        if attention is None:
            raise RuntimeError(
                "no text attention was recorded; is the MODEL given to the sampler the Tap's output, and one the Tap "
                f"supports ({SUPPORTED})?"
            )
        negative, missing_negative = run.attention(UNCOND)
        sigmas = torch.tensor(run.step_sigmas, dtype=torch.float64)
        timesteps = _timesteps(model, sigmas)
        tokens, words, prompts = token_lists(run.prompt_tokens[COND], self.positive, run.batch, attention.shape[2])
        x_t = torch.stack(run.x_t)
        trace = Trace(
            prompts=prompts,
            tokens=tokens,
            words=words,
            timesteps=timesteps,
            sigmas=sigmas,
            x_t=x_t,
            x0=torch.stack(run.x0),
            attention=attention,
            attention_layers=run.acc[COND].layer_records(),
            final_latent=_final_latent(model, run),
            meta=self._meta(run, model, guider, sampler, seed, steps),
        )
        if missing:
            trace.meta["attention_borrowed_steps"] = missing
        if negative is not None:
            trace.attention_negative = negative
            trace.negative_tokens, trace.negative_words, trace.negative_prompts = token_lists(
                run.prompt_tokens[UNCOND], self.negative, run.batch, negative.shape[2]
            )
            if missing_negative:
                trace.meta["attention_negative_borrowed_steps"] = missing_negative
        check = prompt_check(self.positive, guider)
        if check is not None:
            trace.meta["prompt_matches_conditioning"] = check
            if not check:
                log.warning(
                    "diffusion-explain: the prompt text given to the Tap does not encode to the sampler's positive "
                    "conditioning (different text or CLIP, or an edited conditioning); word labels may be wrong"
                )
        if run.notes:
            trace.meta["notes"] = sorted(run.notes)
        return trace.validate()

    def _meta(self, run: _RunState, model, guider, sampler, seed, steps: int) -> dict[str, Any]:
        h, w = run.latent_size
        factor = int(getattr(getattr(model, "latent_format", None), "spacial_downscale_ratio", 8) or 8)
        latent_format = getattr(model, "latent_format", None)
        cfg = float(getattr(guider, "cfg", 1.0)) if guider is not None else 1.0
        meta: dict[str, Any] = {
            "source": "comfyui",
            "family": self.family.name if self.family is not None else "unet",
            "model": type(getattr(model, "model_config", model)).__name__,
            "prediction_type": _prediction_type(model),
            "latent_space": latent_space_of(model),
            "latent_scale_factor": float(getattr(latent_format, "scale_factor", 1.0)),
            "latent_shift_factor": float(getattr(latent_format, "shift_factor", 0.0) or 0.0),
            "height": h * factor,
            "width": w * factor,
            "vae_scale_factor": factor,
            "steps": steps,
            "step_indices": list(run.step_ids),
            "schedule_steps": int(run.sigmas.shape[0]) - 1,
            "model_calls": run.evaluations,
            "guided": not math.isclose(cfg, 1.0),
            "guidance_scale": cfg,
            "guidance": cfg,
            "sampler": _sampler_name(sampler),
            "attention_layers": "per resolution" if self.keep_resolutions else "none",
            "tap_key": self.tap_key,
        }
        if seed is not None:
            meta["seed"] = int(seed)
        if self.negative is not None:
            meta["negative_prompt"] = self.negative.text
        if self.chained:
            meta["chained_attention_patches"] = list(self.chained)
        if self.family is not None:
            meta["maps"] = "attention"
            meta["joint_rows"] = "renormalized"  # each pixel's softmax over the text keys of the joint key set
            meta["text_layout"] = run.text_layout[COND]
            for key, branch in (("text_positions", COND), ("negative_text_positions", UNCOND)):
                kept = run.token_limits[branch]
                if isinstance(kept, list):
                    meta[key] = list(kept)
        return meta


def token_lists(named: PromptTokens | None, info: PromptInfo | None, batch: int, length: int):
    """Trace ``tokens``, ``words`` and ``prompts`` for ``batch`` items sharing one prompt,
    cut or padded to the recorded ``length`` context positions (``named``: the tokens naming
    them, see `TapRecorder.context_tokens`)."""
    if named is not None:
        tokens = pad_token_list(named.tokens, length)
        words = [w for w in named.words if max(w.token_indices) < length]
        return [list(tokens) for _ in range(batch)], [list(words) for _ in range(batch)], [info.text if info else named.prompt] * batch
    text = info.text if info is not None else ""
    return [[f"<position {i}>" for i in range(length)] for _ in range(batch)], [[] for _ in range(batch)], [text] * batch


def context_lengths(conds: dict) -> dict[int, int | None]:
    """Context length of the positive (COND) and negative (UNCOND) conditioning, from a
    guider's conds (``{"positive": [{"cross_attn": [1, T, dim], ...}], ...}``)."""
    out: dict[int, int | None] = {COND: None, UNCOND: None}
    for branch, key in ((COND, "positive"), (UNCOND, "negative")):
        entries = conds.get(key) if isinstance(conds, dict) else None
        lengths = set()
        for entry in entries or []:
            tensor = entry.get("cross_attn") if isinstance(entry, dict) else None
            if isinstance(tensor, torch.Tensor) and tensor.ndim == 3:
                lengths.add(int(tensor.shape[1]))
        if len(lengths) == 1:
            out[branch] = lengths.pop()
    return out


def prompt_check(info: PromptInfo | None, guider) -> bool | None:
    """Does the Tap's prompt encode to the sampler's positive conditioning? None if unknown."""
    if info is None or info.conditioning is None or guider is None:
        return None
    conds = getattr(guider, "original_conds", {}) or {}
    entries = conds.get("positive") or []
    tensors = [e.get("cross_attn") for e in entries if isinstance(e, dict) and isinstance(e.get("cross_attn"), torch.Tensor)]
    if not tensors:
        return None
    mine = info.conditioning
    for t in tensors:
        theirs = t.detach().float().cpu()
        if theirs.shape == mine.shape and torch.allclose(theirs, mine, rtol=1e-3, atol=1e-3 * max(float(mine.abs().max()), 1e-3)):
            return True
    return False


def _final_latent(model, run: "_RunState") -> torch.Tensor | None:
    """The sampler's result in the model's latent space (like ``x_t``), or None."""
    if run.output is None:
        return None
    try:
        return model.process_latent_in(run.output.clone()).float().cpu()
    except Exception:  # noqa: BLE001 - a model without latent processing: keep the trace without it
        return None


def _timesteps(model, sigmas: torch.Tensor) -> torch.Tensor:
    sampling = getattr(model, "model_sampling", None)
    if sampling is None or not hasattr(sampling, "timestep"):
        return sigmas.clone()
    try:
        return sampling.timestep(sigmas.float()).double().cpu()
    except Exception:  # noqa: BLE001 - a model sampling without a discrete timestep axis
        return sigmas.clone()


def _prediction_type(model) -> str:
    kind = getattr(getattr(model, "model_type", None), "name", "")
    names = {"EPS": "epsilon", "V_PREDICTION": "v_prediction", "V_PREDICTION_EDM": "v_prediction", "FLOW": "flow", "FLUX": "flow"}
    return names.get(kind, kind.lower() or "epsilon")


def latent_space_of(model) -> str:
    """The latent space of a ComfyUI BaseModel's sampling (see `sampling_space`)."""
    return sampling_space(getattr(model, "model_sampling", None))


def sampling_space(model_sampling) -> str:
    """``"flow"`` for ComfyUI's flow-matching model sampling (CONST: x = (1-σ)·x0 + σ·ε; SD3,
    Flux...), else ``"sigma"`` (x = x0 + σ·ε)."""
    names = {c.__name__ for c in type(model_sampling).__mro__} if model_sampling is not None else set()
    return "flow" if "CONST" in names else "sigma"


def _sampler_name(sampler) -> str:
    fn = getattr(sampler, "sampler_function", None)
    name = getattr(fn, "__name__", None) or type(sampler).__name__
    return name[len("sample_") :] if name.startswith("sample_") else name


# ---------------------------------------------------------------------------- installing
def install_tap(model, recorder: TapRecorder):
    """A clone of ComfyUI ``model`` (a ModelPatcher) with the tap installed; ``model`` itself is
    left unchanged."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if diffusion_model is None:
        raise ValueError("the MODEL has no diffusion model to tap; connect a loaded checkpoint's MODEL output")
    blocks = cross_attention_blocks(diffusion_model)
    family = joint_family(diffusion_model) if not blocks else None
    if not blocks and family is None:
        raise ValueError(
            f"{type(diffusion_model).__name__} has neither UNet cross-attention blocks nor joint-attention blocks the "
            f"Explain Tap knows; it supports {SUPPORTED}"
        )
    if family is not None:
        require_override(family)  # before anything is cloned: DiT taps need ComfyUI >= 0.3.60
    patched = model.clone()
    if family is not None:
        recorder.family, recorder.joint_state = family, JointCallState()
        recorder.chained.extend(install_joint(patched, diffusion_model, family, recorder))
        if recorder.chained:
            log.warning(
                "diffusion-explain: the Tap chains to what another node installed (%s) and records softmax(q·k) of "
                "the q and k it is handed", ", ".join(recorder.chained[:4]) + ("…" if len(recorder.chained) > 4 else "")
            )
        return _add_wrappers(patched, recorder)
    replace = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    for block_name, number, index in blocks:
        previous = replace.get((block_name, number, index)) or replace.get((block_name, number))
        if isinstance(previous, AttentionTap):
            previous = previous.previous  # tapping a tapped model: replace our own patch, keep theirs
        name = f"{block_name}.{number}.{index}"
        if previous is not None:
            recorder.chained.append(name)
        patched.set_model_attn2_replace(AttentionTap(recorder, name, previous), block_name, number, index)
    if recorder.chained:
        log.warning(
            "diffusion-explain: another node already replaces cross-attention in %d block(s) (%s); the Tap chains to it "
            "and records softmax(q·k) of the q and k it receives",
            len(recorder.chained),
            ", ".join(recorder.chained[:4]) + ("…" if len(recorder.chained) > 4 else ""),
        )
    return _add_wrappers(patched, recorder)


def _add_wrappers(patched, recorder: TapRecorder):
    from comfy.patcher_extension import WrappersMP

    patched.remove_wrappers_with_key(WrappersMP.OUTER_SAMPLE, PATCH_KEY)
    patched.remove_wrappers_with_key(WrappersMP.PREDICT_NOISE, PATCH_KEY)
    patched.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, PATCH_KEY, recorder.outer_sample)
    patched.add_wrapper_with_key(WrappersMP.PREDICT_NOISE, PATCH_KEY, recorder.predict_noise)
    return patched
