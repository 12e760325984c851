import pytest
import torch
import torch.nn.functional as F

from explain.adapters.diffusers import from_pipeline
from explain.denoiser import GuidedDenoiser
from explain.methods.cam import (
    aggregate,
    all_layers,
    df_cam,
    grad_cam,
    guidance_combine,
    paper_layers,
    resolve_layers,
)
from explain.testing import tiny_sd_pipeline, tiny_sdxl_pipeline
from explain.trace import Trace
from tests.explain.generation import run_and_trace

W = 3.0


class ToyNet(torch.nn.Module):
    """conv3×3 -> ReLU (the hooked features) -> 1×1 conv: Grad-CAM of the output sum is known."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU())
        self.head = torch.nn.Conv2d(6, 4, 1)
        self.unused = torch.nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.head(self.features(x))


def toy_denoiser(net: ToyNet, guidance=W) -> GuidedDenoiser:
    shift = torch.linspace(-1, 1, 4).view(1, 4, 1, 1)

    def model_fn(x, level):
        if guidance == 1.0:
            return None, net(x + shift)
        out = net(torch.cat([x, x + shift]))  # [uncond; cond] in one batch, as the pipelines
        u, c = out.chunk(2)
        return u, c

    return GuidedDenoiser(model_fn, "epsilon", guidance, modules=dict(net.named_modules()))


def toy_trace(size=6) -> Trace:
    g = torch.Generator().manual_seed(1)
    return Trace(
        prompts=["p"],
        tokens=[["<s>", "p", "</s>"]],
        words=[[]],
        timesteps=torch.tensor([500.0, 300.0]),
        sigmas=torch.tensor([2.0, 1.0]),
        x_t=torch.randn(2, 1, 4, size, size, generator=g),
        x0=torch.zeros(2, 1, 4, size, size),
        meta={"height": size * 2, "width": size * 2},
    )


def test_grad_cam_of_a_toy_net_by_hand():
    net, trace = ToyNet(), toy_trace()
    result = df_cam(toy_denoiser(net), trace, 0, layers="features")
    x = trace.x_t[0]
    shift = torch.linspace(-1, 1, 4).view(1, 4, 1, 1)
    with torch.no_grad():
        a_u, a_c = net.features(x), net.features(x + shift)
    # d(sum of the output)/dA = Σ_o W_head[o, c] everywhere, in both branches
    alpha = net.head.weight.detach()[:, :, 0, 0].sum(0).view(1, 6, 1, 1)
    a = a_u + W * (a_c - a_u)
    expected = F.relu((alpha * a).sum(1))[0]
    assert torch.allclose(result.layers["features"], expected, atol=1e-5)
    assert result.latent.shape == (6, 6) and result.image.shape == (12, 12)
    lo, hi = expected.min(), expected.max()
    assert torch.allclose(result.latent, (expected - lo) / (hi - lo), atol=1e-5)


def test_guidance_combination_of_activations_and_gradients():
    a = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    assert torch.equal(guidance_combine(a, 2.0, True), a[:1] + 2.0 * (a[1:] - a[:1]))
    assert torch.equal(guidance_combine(a, 2.0, False), a)
    g = torch.ones(2, 3, 2, 2)
    g[1] = 2.0
    cam = grad_cam(a, g, 2.0, True)  # G' = 1 + 2 (2 - 1) = 3 for every channel
    assert torch.allclose(cam, 3.0 * guidance_combine(a, 2.0, True).sum(1))
    with pytest.raises(ValueError, match="feature maps"):
        grad_cam(torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))


def test_all_layers_in_one_pass_equal_one_pass_per_layer():
    pipe = tiny_sd_pipeline()
    trace = run_and_trace(pipe, "a red circle", steps=2)
    denoiser = from_pipeline(pipe, trace)
    names = paper_layers(denoiser.modules)
    together = df_cam(denoiser, trace, 1, layers=names)
    for name in (names[0], names[len(names) // 2], names[-1]):
        alone = df_cam(denoiser, trace, 1, layers=[name])
        assert torch.allclose(together.layers[name], alone.layers[name], rtol=1e-4, atol=1e-6), name
    projection = df_cam(denoiser, trace, 1, layers=names, target="guided_projection")
    assert not torch.allclose(projection.latent, together.latent)
    raw = df_cam(denoiser, trace, 1, layers=names, normalize=False)
    assert torch.allclose(raw.latent, aggregate(together.layers, trace.latent_size, normalize=False))


def test_works_inside_inference_mode_and_leaves_the_model_as_it_was():
    with torch.inference_mode():
        pipe = tiny_sd_pipeline()  # weights made here are inference tensors, as in ComfyUI
        trace = run_and_trace(pipe, "a red circle", steps=2)
        denoiser = from_pipeline(pipe, trace)
        params = dict(pipe.unet.named_parameters())
        flags = {k: p.requires_grad for k, p in params.items()}
        assert all(p.is_inference() for p in params.values())
        result = df_cam(denoiser, trace, 0, layers="all")
    assert torch.isfinite(result.latent).all() and float(result.latent.max()) > 0
    after = dict(pipe.unet.named_parameters())
    assert all(after[k] is params[k] for k in params)
    assert all(p.requires_grad == flags[k] for k, p in after.items())
    assert all(p.grad is None for p in after.values())
    assert all(not m._forward_hooks for m in pipe.unet.modules())


def test_no_hooks_or_gradients_left_after_an_error():
    net, trace = ToyNet(), toy_trace()
    denoiser = toy_denoiser(net)
    with pytest.raises(ValueError, match="did not take part"):
        df_cam(denoiser, trace, 0, layers=["features", "unused"])
    assert all(not m._forward_hooks for m in net.modules())
    assert all(p.requires_grad and p.grad is None for p in net.parameters())
    df_cam(denoiser, trace, 1, layers=["features", "head"])
    assert all(p.grad is None for p in net.parameters())


def test_clear_errors():
    net, trace = ToyNet(), toy_trace()
    denoiser = toy_denoiser(net)
    with pytest.raises(KeyError, match="valid names"):
        df_cam(denoiser, trace, 0, layers=["down_blocks.9"])
    with pytest.raises(ValueError, match="target"):
        df_cam(denoiser, trace, 0, layers="features", target="max")
    with pytest.raises(IndexError, match="outside the trace"):
        df_cam(denoiser, trace, 5, layers="features")
    with pytest.raises(ValueError, match="not a feature map"):
        flat = GuidedDenoiser(lambda x, lv: (None, lin(x.flatten(1)).view_as(x)), "epsilon", 1.0, modules={"lin": (lin := torch.nn.Linear(144, 144))})
        df_cam(flat, trace, 0, layers="lin")
    with pytest.raises(ValueError, match="no layers"):
        resolve_layers(dict(net.named_modules()), "all")  # a toy net has no UNet blocks


def test_cond_only_guidance():
    net, trace = ToyNet(), toy_trace()
    result = df_cam(toy_denoiser(net, guidance=1.0), trace, 0, layers="features")
    assert torch.isfinite(result.latent).all()


def test_a_module_run_on_another_batch_is_refused_not_broadcast():
    """Two conditional entries (ComfyUI's Conditioning Combine) run the module on 3 rows, not 2."""
    net, trace = ToyNet(), toy_trace()
    shift = torch.linspace(-1, 1, 4).view(1, 4, 1, 1)

    def model_fn(x, level):
        u = net(x)
        c = net(torch.cat([x + shift, x - shift])).mean(0, keepdim=True)  # one cond output from two entries
        return u, c

    combined = GuidedDenoiser(model_fn, "epsilon", W, modules=dict(net.named_modules()))
    with pytest.raises(ValueError, match=r"module 'features' ran on a batch of 3, but DF-CAM needs 2"):
        df_cam(combined, trace, 0, layers="features")
    assert all(not m._forward_hooks for m in net.modules())


def test_paper_layers_of_stable_diffusion_are_the_43():
    from diffusers import UNet2DConditionModel

    config = dict(
        sample_size=64,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768,
        attention_head_dim=8,
    )
    with torch.device("meta"):  # structure only, no memory
        unet = UNet2DConditionModel(**config)
    modules = dict(unet.named_modules())
    assert len(paper_layers(modules)) == 43
    assert len(all_layers(modules)) == 44 and "mid_block.attentions.0" in all_layers(modules)


def test_sdxl_all_layers():
    pipe = tiny_sdxl_pipeline()
    trace = run_and_trace(pipe, "a blue square", steps=2)
    result = df_cam(from_pipeline(pipe, trace), trace, 1, layers="all")
    assert len(result.layers) == len(all_layers(dict(pipe.unet.named_modules())))
    assert torch.isfinite(result.image).all()
