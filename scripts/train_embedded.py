#!/usr/bin/env python
"""Train the embedded shapes-world model: VAE first, then text encoder + UNet together.

    python scripts/train_embedded.py --out explain/models/shapes-64            # CUDA if present
    python scripts/train_embedded.py --out /tmp/m --vae-steps 20 --unet-steps 20 --device cpu  # smoke run

Seeded and reproducible for a fixed number of steps (``--max-minutes`` is only a guard: the
steps actually run are written to ``training.json`` next to the weights, with the whole
configuration and the world generator's version). On a GPU it trains under bf16 autocast.
Weights are saved as fp16 safetensors; the text encoder's config asks for float32 (see
`load_text_encoder_in_float32`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import random
import sys
import tarfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from explain import embedded  # noqa: E402

from explain.embedded import world  # noqa: E402
from explain.embedded.vocabulary import write_clip_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(embedded.MODEL_DIR), help="folder for the trained pipeline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--pool", type=int, default=100_000, help="training scenes drawn up front")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--vae-batch", type=int, default=128)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--unet-steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--text-lr", type=float, default=2e-4)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument(
        "--init-from",
        default=None,
        help="continue from a pipeline saved by this script: its VAE is kept as it is (no VAE stage) and its "
        "UNet and text encoder are trained further; the earlier run's record is kept in training.json",
    )
    p.add_argument("--cond-drop", type=float, default=0.1, help="share of empty captions (for guidance)")
    p.add_argument(
        "--ground-weight",
        type=float,
        default=0.0,
        help="weight of the grounding loss: the cross-attention of each object's words (size, colour, shape) is "
        "pulled inside that object's mask, as TokenCompose (Wang et al., CVPR 2024) does with segmentation masks",
    )
    p.add_argument(
        "--object-mix",
        default=None,
        help="shares of 1-, 2- and 3-object scenes in the pool, e.g. 0.1,0.5,0.4 (default: the world's own mix); "
        "a continuation can lean on the compositions the model gets wrong",
    )
    p.add_argument(
        "--high-noise-share",
        type=float,
        default=0.0,
        help="share of each batch whose timestep is drawn from [--high-noise-from, 1000) instead of [0, 1000): "
        "layout, count and colour binding are settled at high noise",
    )
    p.add_argument("--high-noise-from", type=int, default=400)
    p.add_argument("--save-minutes", type=float, default=None, help="checkpoint the EMA weights this often")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="fit the UNet stage into this much wall time: after 50 steps the step count is cut to what fits "
        "(the learning-rate schedule follows; the count used is recorded, so a rerun with --unet-steps reproduces it)",
    )
    p.add_argument("--archive", default=None, help="also pack the result into <archive>.partN tar chunks (GPU runs)")
    p.add_argument("--log", default=None)
    p.add_argument("--log-every", type=int, default=200)
    args = p.parse_args(argv)
    try:
        args.object_mix = parse_object_mix(args.object_mix)
    except ValueError as err:
        p.error(str(err))
    if not 0 <= args.high_noise_share <= 1:
        p.error(f"--high-noise-share must be in [0, 1], got {args.high_noise_share}")
    if not 0 <= args.high_noise_from < 1000:
        p.error(f"--high-noise-from must be in [0, 1000), got {args.high_noise_from}")
    return args


def parse_object_mix(text: str | None) -> list[float] | None:
    """``"0.1,0.5,0.4"`` -> shares of 1-, 2- and 3-object scenes summing to 1."""
    if text is None:
        return None
    try:
        shares = [float(v) for v in text.split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"--object-mix takes three non-negative shares for 1, 2 and 3 objects, like 0.1,0.5,0.4; got {text!r}")
    return [v / sum(shares) for v in shares]


def draw_pool(n: int, seed: int, object_mix: list[float] | None) -> list:
    """Training scenes: the world's own mix of object counts, or ``object_mix``'s shares
    (each count drawn from its own seeded stream, then interleaved by a seeded shuffle)."""
    if object_mix is None:
        return world.scenes(n, seed=seed, split="train")
    counts = [round(n * share) for share in object_mix]
    counts[1] += n - sum(counts)
    pool = [s for k, c in enumerate(counts, start=1) if c for s in world.scenes(c, seed=seed * 10 + k, split="train", num_objects=k)]
    random.Random(seed).shuffle(pool)
    return pool


def sample_timesteps(batch: int, high_share: float, high_from: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform training timesteps, with ``high_share`` of the batch drawn from ``[high_from, 1000)``."""
    t = torch.randint(0, 1000, (batch,), generator=generator, device=device)
    if high_share > 0:
        high = torch.randint(high_from, 1000, (batch,), generator=generator, device=device)
        pick = torch.rand(batch, generator=generator, device=device) < high_share
        t = torch.where(pick, high, t)
    return t


class Log:
    def __init__(self, path):
        self.file = open(path, "a") if path else None
        self.start = time.time()

    def __call__(self, msg):
        line = f"[{time.time() - self.start:7.1f}s] {msg}"
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


def fast_token_ids(captions: list[str], tokenizer, length: int = 77) -> torch.Tensor:
    """Token ids for grammar captions, padded to ``length``: every word is one token, so a
    dictionary lookup suffices (checked against the real tokenizer on a sample)."""
    vocab = tokenizer.get_vocab()
    word_id = {w: vocab[w + "</w>"] for w in world.vocabulary()}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids = torch.full((len(captions), length), eos, dtype=torch.long)
    for i, c in enumerate(captions):
        toks = [bos] + [word_id[w] for w in c.replace(",", " ,").split()] + [eos]
        ids[i, : len(toks)] = torch.tensor(toks)
    sample = captions[:: max(1, len(captions) // 50)]
    ref = tokenizer(sample, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ref, ids[:: max(1, len(captions) // 50)][: len(sample)]), "fast tokenization disagrees"
    return ids


def token_objects(pool: list, ids: torch.Tensor) -> torch.Tensor:
    """``[N, 3, 77]`` bool: token ``t`` of caption ``n`` names object ``k`` (its size, colour or
    shape word). Every grammar word is one token, so word ``i`` is token ``i + 1`` (after BOS)."""
    out = torch.zeros(len(pool), 3, ids.shape[1], dtype=torch.bool)
    for n, scene in enumerate(pool):
        for k, words in enumerate(world.object_word_indices(scene)):
            out[n, k, [i + 1 for i in words]] = True
    return out


class GroundingAttnProcessor:
    """Cross-attention with an explicit softmax whose probabilities are kept, with their graph,
    for the grounding loss (the embedded UNet's attn2 has no norms, masks or residual inside)."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        b, n, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(encoder_hidden_states)
        v = attn.to_v(encoder_hidden_states)
        h = attn.heads
        q, k, v = (x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2) for x in (q, k, v))
        probs = (q @ k.transpose(-1, -2) * attn.scale).float().softmax(-1)  # [B, heads, N, T]
        self.store.append(probs)
        out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def grounding_loss(store: list, covers: torch.Tensor, token_obj: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss on head-averaged maps: for every object word, (1 - share of its
    attention inside the object's mask)^2, averaged over words and layers.

    covers: ``[B, 3, H, W]`` object coverage at image size; token_obj: ``[B, 3, T]`` bool."""
    assigned = token_obj.any(1)  # [B, T]
    if not assigned.any():
        return covers.new_zeros(())
    losses = []
    for probs in store:
        side = int(round(probs.shape[2] ** 0.5))
        mask = F.adaptive_avg_pool2d(covers, side).flatten(2)  # [B, 3, N]
        amap = probs.mean(1)  # [B, N, T]
        inside = torch.einsum("bnt,bkn,bkt->bt", amap, mask, token_obj.float())
        share = inside / amap.sum(1).clamp_min(1e-8)
        losses.append(((1 - share) ** 2)[assigned].mean())
    return torch.stack(losses).mean()


def ema_update(ema_model, model, decay):
    with torch.no_grad():
        torch._foreach_lerp_(list(ema_model.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


def lr_factor(step, total, warmup=200):
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train_vae(vae, params, args, device, amp, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    n = params["base"].shape[0]
    g = torch.Generator(device="cpu").manual_seed(args.seed + 1)
    vae.train()
    for step in range(args.vae_steps):
        idx = torch.randint(0, n, (args.vae_batch,), generator=g)
        x = world.render_parameters({k: v[idx].to(device) for k, v in params.items()}) * 2 - 1
        for group in opt.param_groups:
            group["lr"] = args.vae_lr * lr_factor(step, args.vae_steps, warmup=100)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        recon = recon.float()
        l1 = (recon - x).abs().mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + 0.5 * F.mse_loss(recon, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} l1 {l1.item():.4f} kl {kl.item():.4f}")
    vae.eval()
    return float(l1.item())


@torch.no_grad()
def latent_scale(vae, params, device, n=2048):
    idx = torch.arange(min(n, params["base"].shape[0]))
    x = world.render_parameters({k: v[idx].to(device) for k, v in params.items()}) * 2 - 1
    z = torch.cat([vae.encode(c).latent_dist.mode() for c in x.split(256)])
    return float(1.0 / z.float().std())


@torch.no_grad()
def encode_pool(vae, params, device, amp, batch=1024):
    """Posterior mean and std of every pool scene's latent (the pool is fixed, so encoding it once
    saves the VAE encoder in every UNet step)."""
    n = params["base"].shape[0]
    means, stds = [], []
    for i in range(0, n, batch):
        x = world.render_parameters({k: v[i : i + batch].to(device) for k, v in params.items()}) * 2 - 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            dist = vae.encode(x).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def train_unet(comps, params, ids, token_obj, args, device, amp, log, save_fn):
    from diffusers import DDPMScheduler

    unet, text, vae = comps["unet"], comps["text_encoder"], comps["vae"]
    lat_mean, lat_std = encode_pool(vae, params, device, amp)
    ids = ids.to(device)
    log(f"encoded {lat_mean.shape[0]} pool latents")
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    noise_sched = DDPMScheduler(**{k: v for k, v in embedded.SCHEDULER_CONFIG.items() if k not in ("algorithm_type", "solver_order")})
    alphas = noise_sched.alphas_cumprod.to(device)
    sf = vae.config.scaling_factor
    empty = comps["tokenizer"]("", padding="max_length", max_length=77, return_tensors="pt").input_ids.to(device)
    opt = torch.optim.AdamW(
        [{"params": unet.parameters(), "lr": args.lr}, {"params": text.parameters(), "lr": args.text_lr}],
        weight_decay=0.01,
        fused=device.type == "cuda",
    )
    base_lrs = [args.lr, args.text_lr]
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text).eval()
    for m in (ema_unet, ema_text):
        m.requires_grad_(False)
    n = params["base"].shape[0]
    g = torch.Generator(device="cpu").manual_seed(args.seed + 2)
    gd = torch.Generator(device=device).manual_seed(args.seed + 3)
    attn_store: list = []
    if args.ground_weight > 0:
        unet.set_attn_processor(
            {name: GroundingAttnProcessor(attn_store) if "attn2" in name else proc for name, proc in unet.attn_processors.items()}
        )
    unet.train()
    text.train()
    start = time.time()
    last_save = start
    save_seconds = 60 * args.save_minutes if args.save_minutes else 90
    steps_done = 0
    total = args.unet_steps
    step = 0
    marks: dict[int, float] = {}
    while step < total:
        if args.max_minutes and (step in (20, 70) or (step > 70 and step % 100 == 0)):
            # time from step 20 on: the first steps include cuDNN autotuning and would overestimate;
            # re-fit every 100 steps, as a shared machine's speed drifts
            if device.type == "cuda":
                torch.cuda.synchronize()
            marks.setdefault(20, time.time())
            if step >= 70:
                now = time.time()
                per_step = (now - marks[20]) / (step - 20)
                fits = step + int((args.max_minutes * 60 - (now - start)) / (per_step * 1.03))
                fitted = min(args.unet_steps, max(fits, 100 if step == 70 else step + 1))
                if fitted != total and (step == 70 or abs(fitted - total) > 0.02 * total):
                    log(f"{per_step * 1000:.1f} ms per step: running {fitted} UNet steps to fit {args.max_minutes} min")
                total = fitted
        idx = torch.randint(0, n, (args.batch,), generator=g).to(device)
        z = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gd, device=device)) * sf
        tokens = ids[idx]
        drop = torch.rand(args.batch, generator=g) < args.cond_drop
        tokens[drop.to(device)] = empty[0]
        noise = torch.randn(z.shape, generator=gd, device=device)
        t = sample_timesteps(args.batch, args.high_noise_share, args.high_noise_from, gd, device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        if device.type == "cuda":
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        for group, base in zip(opt.param_groups, base_lrs):
            group["lr"] = base * lr_factor(step, total, warmup=args.warmup)
        attn_store.clear()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            enc = text(tokens)[0]
            pred = unet(noisy, t, enc).sample
        # min-SNR-5 weighting: faster convergence than plain epsilon MSE
        snr = a.view(-1) / (1 - a.view(-1))
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (weight * ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        ground = torch.zeros((), device=device)
        if args.ground_weight > 0:
            covers = world.coverage_parameters({k: v[idx.cpu()].to(device) for k, v in params.items()})
            objs = token_obj[idx.cpu()].to(device) & ~drop.to(device).view(-1, 1, 1)
            ground = grounding_loss(attn_store, covers, objs)
            loss_total = loss + args.ground_weight * ground
        else:
            loss_total = loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(list(unet.parameters()) + list(text.parameters()), 1.0)
        opt.step()
        decay = args.ema if args.init_from else min(args.ema, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text, decay)
        steps_done = step + 1
        if step % args.log_every == 0:
            log(f"unet step {step} loss {loss.item():.4f} grounding {ground.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
        step += 1
        now = time.time()
        if save_fn and now - last_save > save_seconds:
            save_fn(ema_unet, ema_text, steps_done)
            last_save = now
    return ema_unet, ema_text, steps_done, float(loss.item())


def save_pipeline(comps, unet, text, out: Path, info: dict, archive: str | None, log):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(comps["vae"]).to("cpu", torch.float16),
        text_encoder=copy.deepcopy(text).to("cpu", torch.float16),
        tokenizer=comps["tokenizer"],
        unet=copy.deepcopy(unet).to("cpu", torch.float16),
        scheduler=comps["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True, max_shard_size="12MB")
    load_text_encoder_in_float32(out / "text_encoder" / "config.json")
    (out / "training.json").write_text(json.dumps(info, indent=2))
    if archive:
        Path(archive).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(archive + ".tar")
        with tarfile.open(tmp, "w") as tar:
            tar.add(str(out), arcname=out.name)
        data = tmp.read_bytes()
        tmp.unlink()
        chunk = 15 * 1024 * 1024
        for old in Path(archive).parent.glob(Path(archive).name + ".part*"):
            old.unlink()
        for i in range(0, len(data), chunk):
            Path(f"{archive}.part{i // chunk}").write_bytes(data[i : i + chunk])
    log(f"saved pipeline to {out} ({info.get('unet_steps_done')} UNet steps)")


def load_text_encoder_in_float32(config_path: Path) -> None:
    """Make a stock ``StableDiffusionPipeline.from_pretrained(folder)`` load the text encoder in fp32.

    transformers >= 5 loads a model in its config's ``dtype`` (which ``save_pretrained`` sets to
    the fp16 the weights are stored in), while diffusers loads the UNet and VAE in fp32: the UNet's
    first cross-attention then multiplies fp16 by fp32 and fails on the CPU. The weights stay fp16
    (half the bytes; fp16 -> fp32 is exact), only the load dtype changes."""
    config = json.loads(config_path.read_text())
    config["dtype"] = "float32"
    if "torch_dtype" in config:  # the key's name before transformers 4.56
        config["torch_dtype"] = "float32"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_weights(comps, folder: Path) -> dict:
    """Load a saved pipeline's VAE, text encoder and UNet weights into ``comps``; return its record."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    comps["vae"] = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True).float()
    comps["unet"] = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True).float()
    comps["text_encoder"] = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True).float()
    path = folder / "training.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def main(argv=None):
    args = parse_args(argv)
    log = Log(args.log)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda"
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    tok_dir = write_clip_tokenizer(world.vocabulary(), out / "tokenizer")
    comps = embedded.build_components(tok_dir, seed=args.seed)
    earlier = None
    if args.init_from:
        earlier = load_weights(comps, Path(args.init_from))
    for k in ("vae", "text_encoder", "unet"):
        comps[k].to(device)
    log(f"device {device}, torch {torch.__version__}; drawing {args.pool} training scenes")
    pool = draw_pool(args.pool, args.seed, args.object_mix)
    params = world.scene_parameters(pool)
    ids = fast_token_ids([s.caption for s in pool], comps["tokenizer"])
    token_obj = token_objects(pool, ids) if args.ground_weight > 0 else None
    log("scenes ready")

    if earlier is None:
        vae_l1 = train_vae(comps["vae"], params, args, device, amp, log)
        sf = latent_scale(comps["vae"], params, device)
        comps["vae"].register_to_config(scaling_factor=sf)
        log(f"latent scaling factor {sf:.4f}")
    else:
        vae_l1, sf = earlier.get("vae_final_l1"), comps["vae"].config.scaling_factor
        log(f"continuing from {args.init_from} (latent scaling factor {sf:.4f})")
    comps["vae"].requires_grad_(False)
    comps["vae"].eval()

    info = {
        "generator_version": world.GENERATOR_VERSION,
        "seed": args.seed,
        "args": vars(args),
        "vae_final_l1": vae_l1,
        "latent_scaling_factor": sf,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if amp else platform.processor() or "cpu",
        "held_out_modulus": world.HELD_OUT_MODULUS,
    }
    if earlier is not None:
        info["continues"] = earlier

    def checkpoint(unet, text, steps):
        info["unet_steps_done"] = steps
        save_pipeline(comps, unet, text, out, info, args.archive, log)

    saving = args.archive or args.save_minutes
    unet, text, steps, loss = train_unet(comps, params, ids, token_obj, args, device, amp, log, checkpoint if saving else None)
    info["unet_final_loss"] = loss
    info["train_seconds"] = round(time.time() - log.start, 1)
    checkpoint(unet, text, steps)
    if args.archive:
        save_samples(out, Path(args.archive).parent / "samples.png", device, log)


def save_samples(model_dir: Path, path: Path, device, log, n=32):
    """A grid of held-out captions (top) and their generations (bottom), for a first look."""
    import numpy as np
    from PIL import Image

    pipe = embedded.load_pipeline(model_dir, device=device)
    held = world.scenes(n, seed=123, split="held_out")
    gen = torch.Generator(device=device).manual_seed(0)
    images = pipe([s.caption for s in held], num_inference_steps=20, guidance_scale=embedded.DEFAULT_GUIDANCE, generator=gen, output_type="np").images
    truth = np.stack([world.render(s)[0] for s in held]).astype(np.float32) / 255
    rows = [np.concatenate(list(truth[i : i + 8]), 1) for i in range(0, n, 8)]
    rows += [np.concatenate(list(images[i : i + 8]), 1) for i in range(0, n, 8)]
    Image.fromarray((np.concatenate(rows, 0) * 255).round().astype("uint8")).save(path)
    (path.parent / "samples.txt").write_text("\n".join(s.caption for s in held))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
