"""Independent references for the joint-attention taps: the image-query × text-key slice of an
explicit float64 softmax over the joint keys, recomputed from each attention layer's inputs by
hooks on an *untapped* pipeline (queries, keys, norms and, for Flux, the rotary embedding by
hand), and a flow-matching Euler check of x0."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, f = t.shape
    return t.view(b, s, heads, f // heads).transpose(1, 2).double()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on ``[B, H, S, D]`` with interleaved (real, imaginary) pairs, written out by hand."""
    real, imag = x[..., 0::2], x[..., 1::2]
    turned = torch.stack([-imag, real], dim=-1).flatten(-2)
    return x * cos.double()[None, None] + turned * sin.double()[None, None]


def slice_maps(q: torch.Tensor, k: torch.Tensor, image: slice, text: slice, renormalize: bool) -> torch.Tensor:
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    part = probs[:, :, image, text]
    if renormalize:
        part = part / part.sum(-1, keepdim=True)
    return part.mean(1)  # [B, N, T]


class JointReference:
    """Per denoiser call, ``{layer name: [B, N, T]}`` from the explicit softmax (and the token grid)."""

    def __init__(self, pipe, family: str, renormalize: bool = True, rotate_keys: bool = True):
        self.pipe, self.family, self.renormalize, self.rotate_keys = pipe, family, renormalize, rotate_keys
        self.calls: list[dict[str, torch.Tensor]] = []
        self.text_length = None
        self.handles = []

    def __enter__(self):
        transformer = self.pipe.transformer

        def start(module, args, kwargs):
            self.calls.append({})
            self.text_length = kwargs["encoder_hidden_states"].shape[1]

        self.handles.append(transformer.register_forward_pre_hook(start, with_kwargs=True))
        if self.family == "sd3":
            for i, block in enumerate(transformer.transformer_blocks):
                self.handles.append(block.attn.register_forward_pre_hook(self._sd3(f"transformer_blocks.{i}.attn"), with_kwargs=True))
        else:
            for i, block in enumerate(transformer.transformer_blocks):
                self.handles.append(block.attn.register_forward_pre_hook(self._flux(f"transformer_blocks.{i}.attn"), with_kwargs=True))
            for i, block in enumerate(transformer.single_transformer_blocks):
                self.handles.append(block.attn.register_forward_pre_hook(self._flux(f"single_transformer_blocks.{i}.attn"), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _sd3(self, name):
        def hook(attn, args, kwargs):
            x, c = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
            h = attn.heads
            q, k = _heads(attn.to_q(x), h), _heads(attn.to_k(x), h)
            cq, ck = _heads(attn.add_q_proj(c), h), _heads(attn.add_k_proj(c), h)
            if attn.norm_q is not None:
                q, k = attn.norm_q(q.float()).double(), attn.norm_k(k.float()).double()
                cq, ck = attn.norm_added_q(cq.float()).double(), attn.norm_added_k(ck.float()).double()
            n = x.shape[1]
            self.calls[-1][name] = slice_maps(torch.cat([q, cq], 2), torch.cat([k, ck], 2), slice(0, n), slice(n, None), self.renormalize)

        return hook

    def _flux(self, name):
        def hook(attn, args, kwargs):
            x = kwargs["hidden_states"]
            c = kwargs.get("encoder_hidden_states")
            h = attn.heads
            q = attn.norm_q(attn.to_q(x).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2).double()
            k = attn.norm_k(attn.to_k(x).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2).double()
            if c is not None:
                cq = attn.norm_added_q(attn.add_q_proj(c).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2).double()
                ck = attn.norm_added_k(attn.add_k_proj(c).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2).double()
                q, k = torch.cat([cq, q], 2), torch.cat([ck, k], 2)
            cos, sin = kwargs["image_rotary_emb"]
            if self.rotate_keys:
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            t = self.text_length
            assert q.shape[1] == h
            self.calls[-1][name] = slice_maps(q, k, slice(t, None), slice(0, t), self.renormalize)

        return hook

    def step_map(self, call: int, latent_size, positions, rows=slice(None)) -> torch.Tensor:
        """The trace's ``attention[s]``: layer mean at the token grid, bilinear to the latent grid,
        the kept context positions."""
        layers = self.calls[call]
        mean = torch.stack(list(layers.values())).mean(0)[rows]  # [B, N, T]
        h, w = latent_size
        n = mean.shape[1]
        p = int(round(math.sqrt(h * w / n)))
        grid = mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], h // p, w // p)
        up = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)
        return up[:, list(positions)].float()


def euler_flow_residual(trace) -> float:
    """max |x_{s+1} - (x_s + (σ_{s+1} - σ_s)·v_s)| with v_s = (x_s - x0_s)/σ_s: FlowMatchEuler's
    own update, run from the trace's x0 (the last step lands on final_latent at σ = 0)."""
    worst = 0.0
    nexts = list(trace.x_t[1:]) + [trace.final_latent]
    sig = trace.sigmas.tolist() + [0.0]
    for s in range(trace.num_steps):
        v = (trace.x_t[s] - trace.x0[s]) / sig[s]
        predicted = trace.x_t[s] + (sig[s + 1] - sig[s]) * v
        worst = max(worst, float((predicted - nexts[s]).abs().max()))
    return worst
