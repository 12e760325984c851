#!/usr/bin/env python
"""Train the embedded DiT (explain/models/shapes-dit-64) with the rectified-flow loss.

    python scripts/train_embedded_dit.py --out /work/dit-train/run1 --max-minutes 80 --log run1.log
    python scripts/train_embedded_dit.py --out /work/dit-train/run2 --init-from /work/dit-train/run1 ...
    python scripts/train_embedded_dit.py --out /tmp/m --steps 5 --pool 64 --batch 4   # smoke run
    python scripts/train_embedded_dit.py --ship-from /work/dit-train/run2 --out explain/models/shapes-dit-64

The transformer starts from scratch (adaLN-Zero); both text encoders start from the shipped UNet
model's trained text encoder (``shapes-64/text_encoder``) and train along; the VAE is the shipped
one, frozen. Scenes, captions and the object mix come from ``scripts/train_embedded.py``. The
loss is plain flow matching, as SD3 trains: ``x_t = (1 - σ) x_0 + σ ε``, the transformer
predicts ``ε - x_0``, MSE; ``σ`` is drawn logit-normal, leaning to high noise
(``--logit-mean`` > 0), where layout, count and colour binding are decided. There is **no
grounding loss**: the attention maps of this model were never trained to point.

Every run is seeded. ``--init-from`` continues a run saved by this script: its EMA weights,
raw weights and AdamW state (``train_state/``, safetensors) are picked up, the seed moves on by
one unless given, and the earlier run's record is kept in ``training.json`` under "continues".
``--max-minutes`` stops the run cleanly in time; ``--save-minutes`` checkpoints on the way.
1 CPU thread by default (OMP_WAIT_POLICY=PASSIVE); on CUDA it trains under bf16 autocast.
The pipeline is saved as fp16 safetensors; ``train_state/`` is for resuming only (not shipped).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: an active OpenMP spin stalls a shared machine

import argparse  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from explain.embedded import dit, model, world  # noqa: E402


def _load_unet_script():
    """scripts/train_embedded.py (not a package): its pool, captions and training helpers."""
    spec = importlib.util.spec_from_file_location("train_embedded", Path(__file__).with_name("train_embedded.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


unet_script = _load_unet_script()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the trained pipeline and its train_state/ (keep it outside the package)")
    p.add_argument(
        "--ship-from",
        default=None,
        help="copy this run's pipeline and training.json (not its train_state/) into --out, e.g. explain/models/shapes-dit-64, and stop",
    )
    p.add_argument("--seed", type=int, default=None, help="default: 0, or the continued run's seed + 1")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (2 stall on a loaded machine)")
    p.add_argument(
        "--bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help="bf16 autocast; auto: on CUDA, and on CPUs with bf16 kernels (a batch-32 step took 0.85 s instead of 1.21 s)",
    )
    p.add_argument("--pool", type=int, default=40_000, help="training scenes drawn up front")
    p.add_argument("--pool-seed", type=int, default=0, help="seed of the scene pool (kept across continuations, so its latents can be cached)")
    p.add_argument("--latent-cache", default=None, help="folder caching the pool's VAE latents (encoding 40k scenes takes ~14 CPU minutes)")
    p.add_argument("--object-mix", default="0.1,0.5,0.4", help="shares of 1-, 2- and 3-object scenes ('world' for the world's own)")
    p.add_argument("--steps", type=int, default=100_000, help="optimiser steps (--max-minutes usually ends the run first)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--text-lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=300, help="learning-rate warm-up steps (a fresh optimiser only)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--cond-drop", type=float, default=0.1, help="share of empty captions (for guidance)")
    p.add_argument("--logit-mean", type=float, default=0.5, help="σ = sigmoid(N(mean, std)); > 0 leans to high noise")
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--num-layers", type=int, default=4, help="transformer blocks (heads follow; a fresh run only)")
    p.add_argument("--max-tokens", type=int, default=dit.DIT_MAX_TOKENS, help="tokenizer model_max_length (a fresh run only)")
    p.add_argument("--text-encoder-from", default=str(model.MODEL_DIR / "text_encoder"), help="CLIPTextModel warm-starting both encoders")
    p.add_argument("--vae-from", default=str(model.MODEL_DIR / "vae"), help="the frozen 4-channel VAE")
    p.add_argument("--init-from", default=None, help="continue from a folder saved by this script")
    p.add_argument("--save-minutes", type=float, default=15.0, help="checkpoint this often")
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this much wall time")
    p.add_argument("--log", default=None)
    p.add_argument("--log-every", type=int, default=100)
    args = p.parse_args(argv)
    try:
        args.object_mix = None if args.object_mix == "world" else unet_script.parse_object_mix(args.object_mix)
    except ValueError as err:
        p.error(str(err))
    if not 0 <= args.cond_drop < 1:
        p.error(f"--cond-drop must be in [0, 1), got {args.cond_drop}")
    if args.logit_std <= 0:
        p.error(f"--logit-std must be positive, got {args.logit_std}")
    if args.ship_from and not (Path(args.ship_from) / "model_index.json").is_file():
        p.error(f"--ship-from {args.ship_from} holds no saved pipeline (model_index.json)")
    if args.init_from and not (Path(args.init_from) / "model_index.json").is_file():
        p.error(f"--init-from {args.init_from} holds no saved pipeline (model_index.json); give a folder this script wrote")
    return args


# ---------------------------------------------------------------------------- the loss
def sample_sigmas(batch: int, mean: float, std: float, generator: torch.Generator, device) -> torch.Tensor:
    """Logit-normal noise levels in (0, 1) (SD3's choice; ``mean`` > 0 puts more at high noise)."""
    return torch.sigmoid(mean + std * torch.randn(batch, generator=generator, device=device))


def flow_matching_pair(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rectified-flow input and target: ``x_t = (1 - σ) x0 + σ ε`` and the velocity ``ε - x0``
    (what ``FlowMatchEulerDiscreteScheduler.step`` integrates: ``x += (σ_next - σ) v``)."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def flow_matching_loss(transformer, text_encoders, x0, noise, sigma, ids) -> torch.Tensor:
    """MSE between the transformer's velocity and ``ε - x0``, conditioned as the pipeline conditions."""
    noisy, target = flow_matching_pair(x0, noise, sigma)
    seq, pooled = dit.encode_text(text_encoders, ids)
    # the pipeline feeds the scheduler's timesteps, σ·1000
    pred = transformer(hidden_states=noisy, encoder_hidden_states=seq, pooled_projections=pooled, timestep=sigma * 1000).sample
    return ((pred.float() - target) ** 2).mean()


# ---------------------------------------------------------------------------- checkpoints
TRAINED = ("transformer", "text_encoder", "text_encoder_2")


def save_pipeline(comps: dict, ema: dict, out: Path, info: dict) -> None:
    """The EMA weights as an fp16 ``StableDiffusion3Pipeline`` plus ``training.json``."""
    parts = {k: v for k, v in comps.items() if k not in TRAINED}
    parts["vae"] = copy.deepcopy(comps["vae"]).to("cpu", torch.float16)
    for k in TRAINED:
        parts[k] = copy.deepcopy(ema[k]).to("cpu", torch.float16)
    pipe = dit.assemble(parts)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True, max_shard_size="12MB")
    text_encoders_load_in_float32(out)
    (out / "training.json").write_text(json.dumps(info, indent=2))


def text_encoders_load_in_float32(folder: Path) -> None:
    """Stock ``from_pretrained`` would load the fp16-stored text encoders in fp16 (transformers
    >= 5 follows the config's dtype) next to an fp32 transformer and fail on the CPU; the configs
    ask for float32, the weights stay fp16 (see train_embedded.load_text_encoder_in_float32)."""
    for name in ("text_encoder", "text_encoder_2"):
        unet_script.load_text_encoder_in_float32(folder / name / "config.json")


def save_train_state(comps: dict, opt: torch.optim.Optimizer, out: Path, state: dict) -> None:
    """Raw (non-EMA) fp32 weights and AdamW's moments, safetensors only, for ``--init-from``."""
    from safetensors.torch import save_file

    folder = out / "train_state"
    folder.mkdir(parents=True, exist_ok=True)
    raw = {f"{k}.{n}": p.detach().float().cpu().contiguous() for k in TRAINED for n, p in comps[k].named_parameters()}
    save_file(raw, str(folder / "raw.safetensors"))
    sd = opt.state_dict()
    moments = {f"{i}.{key}": v.detach().cpu().contiguous() for i, s in sd["state"].items() for key, v in s.items() if torch.is_tensor(v)}
    save_file(moments, str(folder / "optimizer.safetensors"))
    groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
    (folder / "state.json").write_text(json.dumps({**state, "param_groups": groups}, indent=2))


def load_run(folder: Path, device) -> tuple[dict, dict]:
    """A saved run's components (EMA weights in fp32) and its training record."""
    pipe = dit.load_dit_pipeline(folder, device="cpu", dtype=torch.float32)
    comps = {k: getattr(pipe, k) for k in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")}
    comps.update(text_encoder_3=None, tokenizer_3=None)
    record = json.loads((folder / "training.json").read_text()) if (folder / "training.json").is_file() else {}
    return comps, record


def load_train_state(folder: Path, comps: dict, opt: torch.optim.Optimizer) -> dict | None:
    """Put a run's raw weights into ``comps`` and its AdamW state into ``opt``; None when absent."""
    from safetensors.torch import load_file

    folder = folder / "train_state"
    if not (folder / "state.json").is_file():
        return None
    state = json.loads((folder / "state.json").read_text())
    raw = load_file(str(folder / "raw.safetensors"))
    for k in TRAINED:
        missing = comps[k].load_state_dict({n[len(k) + 1 :]: v for n, v in raw.items() if n.startswith(k + ".")}, strict=False)
        if missing.missing_keys and any(n in dict(comps[k].named_parameters()) for n in missing.missing_keys):
            raise ValueError(f"{folder}: raw weights of {k} lack {missing.missing_keys[:3]}")
    moments = load_file(str(folder / "optimizer.safetensors"))
    per_param: dict[int, dict] = {}
    for name, v in moments.items():
        i, key = name.split(".", 1)
        per_param.setdefault(int(i), {})[key] = v
    opt.load_state_dict({"state": per_param, "param_groups": state["param_groups"]})
    return state


# ---------------------------------------------------------------------------- data
def pool_key(pool: list, vae) -> str:
    """What the pool's latents depend on: every caption and scene, and the VAE's weights."""
    import hashlib

    h = hashlib.sha256(world.GENERATOR_VERSION.encode())
    for scene in pool:
        h.update(repr(scene).encode())
    for p in vae.state_dict().values():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def pool_latents(pool: list, vae, args, device, log) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every pool scene, from ``--latent-cache`` when it has them."""
    from safetensors.torch import load_file, save_file

    path = Path(args.latent_cache) / f"pool-{len(pool)}-{pool_key(pool, vae)}.safetensors" if args.latent_cache else None
    if path is not None and path.is_file():
        cached = load_file(str(path))
        log(f"pool latents from {path}")
        return cached["mean"].to(device), cached["std"].to(device)
    params = world.scene_parameters(pool)
    # fp32 on a CPU: the data should not carry bf16 rounding; bf16 on CUDA as the UNet script does
    mean, std = unet_script.encode_pool(vae, params, device, device.type == "cuda")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"mean": mean.cpu().contiguous(), "std": std.cpu().contiguous()}, str(path))
        log(f"pool latents cached in {path}")
    return mean, std


# ---------------------------------------------------------------------------- training
def make_optimizer(comps: dict, args, device) -> torch.optim.Optimizer:
    text_params = list(comps["text_encoder"].parameters()) + list(comps["text_encoder_2"].parameters())
    return torch.optim.AdamW(
        [{"params": list(comps["transformer"].parameters()), "lr": args.lr}, {"params": text_params, "lr": args.text_lr}],
        weight_decay=args.weight_decay,
        fused=device.type == "cuda",
    )


def total_samples(record: dict | None) -> int:
    return int(record.get("samples_seen", 0)) if record else 0


def ship(run: Path, out: Path) -> None:
    """The files a user needs, fp16 safetensors and configs, without the resume state."""
    import shutil

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(run, out, ignore=shutil.ignore_patterns("train_state"))
    text_encoders_load_in_float32(out)  # runs saved before this fix


def main(argv=None):
    args = parse_args(argv)
    if args.ship_from:
        ship(Path(args.ship_from), Path(args.out))
        return
    torch.set_num_threads(args.threads)
    log = unet_script.Log(args.log)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = args.bf16 == "on" or (args.bf16 == "auto" and (device.type == "cuda" or torch.ops.mkldnn._is_mkldnn_bf16_supported()))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)

    earlier = None
    if args.init_from:
        comps, earlier = load_run(Path(args.init_from), device)
    if args.seed is None:
        args.seed = int(earlier.get("seed", -1)) + 1 if earlier else 0
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    if earlier is None:
        tok_dir = dit.write_tokenizer(out / "tokenizer", args.max_tokens)
        comps = dit.build_dit_components(tok_dir, args.text_encoder_from, args.vae_from, num_layers=args.num_layers, seed=args.seed)
    max_tokens = comps["tokenizer"].model_max_length
    for k in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        comps[k].to(device)
    vae = comps["vae"].requires_grad_(False).eval()
    ema = {k: copy.deepcopy(comps[k]).eval().requires_grad_(False) for k in TRAINED}  # saved weights = EMA
    opt = make_optimizer(comps, args, device)
    resumed = load_train_state(Path(args.init_from), comps, opt) if args.init_from else None
    for k in TRAINED:
        comps[k].to(device).train()
    log(f"device {device}, torch {torch.__version__}, {args.threads} thread(s), bf16 autocast {amp}; "
        f"{'continuing ' + args.init_from + (' with its optimiser state' if resumed else ' (EMA weights, fresh optimiser)') if earlier is not None else 'fresh run'}; seed {args.seed}")

    pool = unet_script.draw_pool(args.pool, args.pool_seed, args.object_mix)
    ids = unet_script.fast_token_ids([s.caption for s in pool], comps["tokenizer"], length=max_tokens).to(device)
    empty = comps["tokenizer"]("", padding="max_length", max_length=max_tokens, return_tensors="pt").input_ids.to(device)
    lat_mean, lat_std = pool_latents(pool, vae, args, device, log)
    sf, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    log(f"{len(pool)} training scenes encoded (latent scale {sf:.4f})")

    info = {
        "model": "shapes-dit-64",
        "generator_version": world.GENERATOR_VERSION,
        "seed": args.seed,
        "args": vars(args),
        "loss": "flow matching: MSE(v, noise - x0), x_t = (1 - sigma) x0 + sigma noise, sigma ~ logit-normal(logit_mean, logit_std)",
        "grounding_loss": None,
        "latent_scaling_factor": sf,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "bf16_autocast": amp,
        "held_out_modulus": world.HELD_OUT_MODULUS,
        "samples_seen": total_samples(earlier),
    }
    if earlier is not None:
        info["continues"] = earlier
    warm = args.warmup if resumed is None else 0
    prior_steps = int(resumed.get("optimizer_steps", 0)) if resumed else 0

    def checkpoint(steps: int, loss_avg: float | None):
        info.update(steps_done=steps, samples_seen=total_samples(earlier) + steps * args.batch, recent_loss=loss_avg,
                    train_seconds=round(time.time() - log.start, 1))
        save_pipeline(comps, ema, out, info)
        save_train_state(comps, opt, out, {"optimizer_steps": prior_steps + steps, "seed": args.seed})
        log(f"saved {out} ({steps} steps, {info['samples_seen']} samples seen in all)")

    g = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    gd = torch.Generator(device=device).manual_seed(args.seed + 3)
    encoders = (comps["text_encoder"], comps["text_encoder_2"])
    all_params = [p for k in TRAINED for p in comps[k].parameters()]
    base_lrs = [args.lr, args.text_lr]
    start = last_save = time.time()
    recent: list[float] = []
    step = 0
    while step < args.steps:
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            log(f"--max-minutes {args.max_minutes} reached after {step} steps")
            break
        idx = torch.randint(0, len(pool), (args.batch,), generator=g).to(device)
        x0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gd, device=device) - shift) * sf
        tokens = ids[idx].clone()
        drop = (torch.rand(args.batch, generator=g) < args.cond_drop).to(device)
        tokens[drop] = empty[0]
        noise = torch.randn(x0.shape, generator=gd, device=device)
        sigma = sample_sigmas(args.batch, args.logit_mean, args.logit_std, gd, device)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * min(1.0, (step + 1) / warm) if warm else base
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = flow_matching_loss(comps["transformer"], encoders, x0, noise, sigma, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        # a fresh run's EMA starts short so early checkpoints are not mostly the random init
        decay = args.ema if earlier is not None else min(args.ema, (1 + step) / (10 + step))
        for k in TRAINED:
            unet_script.ema_update(ema[k], comps[k], decay)
        recent = (recent + [loss.item()])[-200:]
        if step % args.log_every == 0:
            log(f"step {step} loss {loss.item():.4f} (mean of last {len(recent)}: {sum(recent) / len(recent):.4f}) "
                f"lr {opt.param_groups[0]['lr']:.2e}")
        step += 1
        if time.time() - last_save > 60 * args.save_minutes:
            checkpoint(step, sum(recent) / len(recent))
            last_save = time.time()
    checkpoint(step, sum(recent) / len(recent) if recent else None)


if __name__ == "__main__":
    main()
