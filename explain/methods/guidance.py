"""Guidance maps: where the prompt, or one word of it, changes the model's prediction.

At one step the same latent x_t is denoised twice: with the prompt and without it (the
classifier-free guidance's unconditional branch), or with one word removed (its token
positions masked, or a counterfactual denoiser on an edited prompt, e.g. the word swapped).
The map is the per-position size of the difference of the two x0 predictions, the norm over
latent channels. DiffEdit (Couairon et al. 2022) reads edit masks the same way from two noise
predictions.

Why it is here: pixel DF-RISE scores x0, whose identity path x0 = (x_t − σ ε̂)/α keeps pixel i
similar whenever pixel i is kept, whatever the network does (issue 12). Here both predictions
see the *same* x_t, so the identity path cancels exactly: what is left is only what the network
does with the conditioning. A model that ignores its conditioning (the sanity suite's null
models) gives an all-zero map, and a randomised network a different one. There are no masks,
so the map is deterministic (seed-to-seed correlation 1) at the cost of two or three guided
evaluations.

What it is not: it says where the prompt changes the prediction at this step, not which input
pixels the prediction depends on (that is the question DF-RISE asks).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from explain.denoiser import GuidedDenoiser, NoiseLevel


@dataclass
class GuidanceMap:
    """The map ``latent`` ``[h, w]`` (norm over latent channels of the x0 difference) of
    ``against`` (``"unconditional"``, ``"without <words>"`` or ``"counterfactual"``) at ``step``."""

    latent: torch.Tensor
    step: int
    against: str

    def display(self, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The map min-max scaled to 0..1 (all zeros when it is constant), optionally resized."""
        m = self.latent.float()
        if size is not None and tuple(m.shape[-2:]) != tuple(size):
            m = F.interpolate(m[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
        span = float(m.max() - m.min())
        return (m - m.min()) / span if span > 0 else torch.zeros_like(m)


def difference_map(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The per-position Euclidean norm over channels of ``a - b`` (``[1, C, h, w]`` or
    ``[C, h, w]``) as ``[h, w]``."""
    d = (a.float() - b.float()).reshape(-1, *a.shape[-2:])
    return d.pow(2).sum(0).sqrt().cpu()


def _token_positions(trace, words, item: int) -> tuple[str, list[int]]:
    from explain.methods.heatmaps import resolve_words

    return resolve_words(trace, words, item)


def guidance_map(
    denoiser: GuidedDenoiser,
    trace,
    step: int,
    item: int = 0,
    *,
    words=None,
    counterfactual: GuidedDenoiser | None = None,
) -> GuidanceMap:
    """Where the conditioning changes the x0 prediction at ``step`` of ``trace``.

    * default: the conditional against the unconditional branch of ``denoiser`` (the prompt as a
      whole; the denoiser must be guided);
    * ``words`` (a word, several, or a phrase of the prompt): the guided prediction against the
      guided prediction with those words' tokens masked (``denoiser.token_model_fn``);
    * ``counterfactual``: the guided prediction against ``counterfactual``'s (the same model on
      an edited prompt, which keeps the prompt in distribution for a causal text encoder whose
      later tokens still carry a masked word)."""
    if words is not None and counterfactual is not None:
        raise ValueError("pass either words (masked tokens) or a counterfactual denoiser, not both")
    step = trace.check_step(step)
    if not 0 <= item < trace.batch_size:
        raise IndexError(f"item {item} is outside the trace's batch of {trace.batch_size}")
    x = trace.x_t[step, item : item + 1].float()
    if denoiser.device is not None:
        x = x.to(denoiser.device)
    level = NoiseLevel.from_trace(trace, step)
    with torch.no_grad():
        if counterfactual is not None:
            return GuidanceMap(difference_map(denoiser.predict(x, level, "x0"), counterfactual.predict(x, level, "x0")), step, "counterfactual")
        if words is not None:
            if denoiser.token_model_fn is None:
                raise ValueError("masking words needs a denoiser with a token_model_fn; pass a counterfactual denoiser instead")
            label, positions = _token_positions(trace, words, item)
            tokens = len(trace.tokens[item]) if item < len(trace.tokens) and trace.tokens[item] else 1 + max(positions)
            keep = torch.ones(1, tokens, device=x.device)
            keep[:, positions] = 0
            return GuidanceMap(difference_map(denoiser.predict(x, level, "x0"), denoiser.predict_tokens(x, level, keep, "x0")), step, f"without {label}")
        uncond, cond = denoiser.branches(x, level, "x0")
    if uncond is None:
        raise ValueError(
            "this denoiser has no unconditional branch (guidance scale 1): compare against words=... (masked) or a counterfactual denoiser"
        )
    return GuidanceMap(difference_map(cond, uncond), step, "unconditional")
