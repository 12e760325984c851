"""The DiT training script: its flow-matching loss, its noise levels, and tiny end-to-end runs
(a fresh one, then one continued from it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from explain.embedded import world

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_embedded_dit", ROOT / "scripts" / "train_embedded_dit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_target_is_the_velocity_the_flow_scheduler_integrates(train):
    """With the exact target as the model output, one Euler step of diffusers'
    FlowMatchEulerDiscreteScheduler from any σ lands on x0: the loss trains what the sampler uses."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 16, 16), torch.randn(3, 4, 16, 16)
    for s in (0.9, 0.5, 0.1):
        sigma = torch.full((3,), s)
        x_t, target = train.flow_matching_pair(x0, noise, sigma)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
        sched.set_timesteps(sigmas=[s], device="cpu")
        assert sched.sigmas.tolist() == pytest.approx([s, 0.0])
        landed = sched.step(target, sched.timesteps[0], x_t).prev_sample
        assert torch.allclose(landed, x0, atol=1e-5)
    x_one, _ = train.flow_matching_pair(x0, noise, torch.ones(3))
    assert torch.equal(x_one, noise)


class _Echo(torch.nn.Module):
    """A stand-in transformer that returns a fixed prediction and records what it was given."""

    def __init__(self, pred):
        super().__init__()
        self.pred, self.seen = pred, {}

    def forward(self, **kwargs):
        self.seen = kwargs
        return type("Out", (), {"sample": self.pred})()


class _Encoder(torch.nn.Module):
    def forward(self, ids, output_hidden_states=False):
        h = ids.float().unsqueeze(-1).expand(*ids.shape, 8)
        return type("Out", (tuple,), {"hidden_states": (h, h + 1, h + 2)})((ids.float()[:, :4],))


def test_loss_is_the_mse_to_noise_minus_x0_at_timestep_sigma_1000(train):
    torch.manual_seed(1)
    x0, noise, pred = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    sigma = torch.tensor([0.25, 0.75])
    ids = torch.randint(0, 9, (2, 5))
    model = _Echo(pred)
    loss = train.flow_matching_loss(model, (_Encoder(), _Encoder()), x0, noise, sigma, ids)
    assert loss == pytest.approx(((pred - (noise - x0)) ** 2).mean().item(), rel=1e-6)
    assert train.flow_matching_loss(_Echo(noise - x0), (_Encoder(), _Encoder()), x0, noise, sigma, ids) == 0
    assert torch.equal(model.seen["timestep"], sigma * 1000)  # the pipeline's timesteps are σ·1000
    assert model.seen["encoder_hidden_states"].shape == (2, 5, 16)  # penultimate states of both, side by side
    assert model.seen["pooled_projections"].shape == (2, 8)


def test_noise_levels_lean_high_with_a_positive_logit_mean(train):
    g = torch.Generator().manual_seed(0)
    plain = train.sample_sigmas(20_000, 0.0, 1.0, g, "cpu")
    leaned = train.sample_sigmas(20_000, 0.5, 1.0, g, "cpu")
    assert 0 < plain.min() and plain.max() < 1
    assert abs(plain.median().item() - 0.5) < 0.01
    assert abs(leaned.median().item() - torch.sigmoid(torch.tensor(0.5)).item()) < 0.01
    assert (leaned > 0.565).float().mean() > (plain > 0.565).float().mean() + 0.15


def test_bad_arguments_are_refused(train, tmp_path):
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--init-from", str(tmp_path)])  # no saved pipeline there
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--object-mix", "1,2"])
    with pytest.raises(SystemExit):
        train.parse_args(["--out", str(tmp_path), "--cond-drop", "1.5"])
    with pytest.raises(SystemExit):
        train.parse_args([])  # --out is required: the resume state must not land in the package by default


TINY = ["--device", "cpu", "--pool", "24", "--steps", "3", "--batch", "4", "--warmup", "2", "--num-layers", "1", "--bf16", "off"]


@pytest.fixture(scope="module")
def runs(train, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dit-runs")
    cache = root / "cache"
    train.main(["--out", str(root / "a"), "--latent-cache", str(cache), *TINY])
    train.main(["--out", str(root / "b"), "--init-from", str(root / "a"), "--latent-cache", str(cache), *TINY, "--steps", "2"])
    return root


def test_tiny_run_writes_a_loadable_pipeline_and_its_record(runs):
    from diffusers import StableDiffusion3Pipeline

    from explain import embedded

    out = runs / "a"
    record = json.loads((out / "training.json").read_text())
    assert record["steps_done"] == 3 and record["samples_seen"] == 12
    assert record["generator_version"] == world.GENERATOR_VERSION
    assert record["grounding_loss"] is None and record["seed"] == 0
    assert record["args"]["num_layers"] == 1
    pipe = embedded.load_pipeline(out, device="cpu")
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.transformer.config.num_layers == 1 and pipe.tokenizer.model_max_length == 32
    # saved in fp16, the resume state beside it in safetensors only
    from safetensors import safe_open

    for name in ("text_encoder", "text_encoder_2"):
        assert json.loads((out / name / "config.json").read_text())["dtype"] == "float32"  # the load dtype
        with safe_open(str(out / name / "model.safetensors"), framework="pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # the stored one
    assert sorted(p.name for p in (out / "train_state").iterdir()) == ["optimizer.safetensors", "raw.safetensors", "state.json"]
    g = torch.Generator().manual_seed(0)
    image = pipe("a red circle on the left", num_inference_steps=2, generator=g, output_type="np", **embedded.call_kwargs(pipe)).images
    assert image.shape == (1, 64, 64, 3)
    # stock diffusers, nothing of ours in between: all fp32 on load (the weights are fp16 on disk)
    stock = StableDiffusion3Pipeline.from_pretrained(str(out), text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    assert {m.dtype for m in (stock.transformer, stock.vae, stock.text_encoder, stock.text_encoder_2)} == {torch.float32}
    stock.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    again = stock("a red circle on the left", num_inference_steps=2, generator=g, output_type="np", max_sequence_length=0).images
    np.testing.assert_allclose(again, image, rtol=0, atol=1e-6)
    assert len(list((runs / "cache").iterdir())) == 1  # the continued run found its pool's latents


def test_continued_run_keeps_the_earlier_record_and_the_optimiser(runs):
    first = json.loads((runs / "a" / "training.json").read_text())
    second = json.loads((runs / "b" / "training.json").read_text())
    assert second["continues"] == first
    assert second["seed"] == first["seed"] + 1  # fresh batches and noise, the same scene pool
    assert second["samples_seen"] == first["samples_seen"] + 2 * 4
    assert json.loads((runs / "b" / "train_state" / "state.json").read_text())["optimizer_steps"] == 5
    from safetensors.torch import load_file

    moments_a = load_file(str(runs / "a" / "train_state" / "optimizer.safetensors"))
    moments_b = load_file(str(runs / "b" / "train_state" / "optimizer.safetensors"))
    assert moments_a.keys() == moments_b.keys()
    assert float(moments_b["0.step"]) == float(moments_a["0.step"]) + 2  # AdamW's count went on, not restarted


def test_ship_copies_the_pipeline_without_the_resume_state(train, runs, tmp_path):
    from explain import embedded

    dest = tmp_path / "shapes-dit-64"
    train.main(["--ship-from", str(runs / "b"), "--out", str(dest)])
    assert not (dest / "train_state").exists()
    assert json.loads((dest / "training.json").read_text()) == json.loads((runs / "b" / "training.json").read_text())
    assert embedded.is_available(dest)
    with pytest.raises(SystemExit):
        train.parse_args(["--ship-from", str(tmp_path / "nothing"), "--out", str(dest)])


def test_load_train_state_restores_raw_weights_and_moments(train, runs):
    comps, _ = train.load_run(runs / "b", "cpu")
    args = train.parse_args(["--out", str(runs / "unused"), *TINY])
    opt = train.make_optimizer(comps, args, torch.device("cpu"))
    state = train.load_train_state(runs / "b", comps, opt)
    assert state["optimizer_steps"] == 5
    from safetensors.torch import load_file

    raw = load_file(str(runs / "b" / "train_state" / "raw.safetensors"))
    name, param = next(iter(comps["transformer"].named_parameters()))
    assert torch.equal(param.detach(), raw["transformer." + name])
    assert len(opt.state) == len(list(p for g in opt.param_groups for p in g["params"]))
