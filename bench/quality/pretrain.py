"""Reference pretraining of the tiny world model: ``python -m bench.quality.pretrain --out FILE``.

A plain loop after diffusers' text-to-image recipe (``examples/text_to_image/train_text_to_image.py``), with
diffusers' and transformers' own classes and none of our trainer (nothing from ``dreambooth.train`` is imported),
so that our trainer's conventions are checked against the ecosystem's, not against themselves:

1. an autoencoder (``AutoencoderKL``) learns to reconstruct world renders (the shape's pixels weighted up, so its
   colour and outline are learnt as early as the background), then its latent scale is set so that latents
   times the SD 1.x ``scaling_factor`` 0.18215 have unit variance (an exact reparametrisation of ``quant_conv``
   and ``post_quant_conv``), as SD's own VAE has;
2. the UNet and the CLIP text encoder learn together on captioned world renders: latents
   ``vae.encode(x).latent_dist.sample() * scaling_factor``, the DDPM schedule of the SD 1.x scheduler config,
   epsilon target, ``tokenizer(..., padding="max_length", max_length=77)`` and the last hidden state (clip skip
   1), one caption in ten dropped for classifier-free guidance. The shipped weights are the EMA of this stage.

The result is written as an SD 1.x single-file checkpoint in fp16 with its configs in the metadata. The run is
seeded: the same arguments rebuild the same model (up to the CPU's floating-point order).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth.families.architecture import CONFIGS_METADATA_KEY
from dreambooth.families.layout import join_ldm, normalize_diffusers_keys
from dreambooth.tiny import tiny_config, tiny_extras
from dreambooth.working import save_tensors

from . import stock
from .analyse import analyse
from .world import SIZE, random_caption, sample_world

log = logging.getLogger("bench.quality.pretrain")

SCALING_FACTOR = 0.18215
DEFAULTS = dict(seed=0, vae_steps=3000, vae_batch=16, vae_lr=3e-3, vae_images=20000, calibration_images=2000,
                steps=8000, batch=32, lr=6e-4, warmup=300, ema_decay=0.999, images=24000, caption_dropout=0.1)


def model_configs() -> dict[str, dict]:
    """SD 1.x's component configs with tiny widths (the block structure and key layout of the real model)."""
    unet = tiny_config("sd1", "unet")
    # four channels or more per normalisation group: with one, GroupNorm erases the flat colours the world is made of
    unet.update(block_out_channels=[24, 32, 48, 48], attention_head_dim=2, norm_num_groups=4)
    vae = tiny_config("sd1", "vae")
    vae.update(block_out_channels=[8, 16, 32, 32], norm_num_groups=2, scaling_factor=SCALING_FACTOR)
    return {"unet": unet, "vae": vae, "text_encoder": tiny_config("sd1", "text_encoder")}


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the recipe's normalisation."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# --- 1. the autoencoder ---------------------------------------------------------------------------------------

def object_weights(x: torch.Tensor, weight: float = 5.0) -> torch.Tensor:
    """Per-pixel loss weights [N, 1, H, W]: ``weight`` on the shape (pixels away from the corner's background
    colour), 1 elsewhere."""
    return 1 + (weight - 1) * ((x - x[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.3).float()


def train_vae(config: dict, steps: int, batch: int, lr: float, seed: int, images: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool, _, _ = sample_world(images, seed=seed + 4)
    vae = AutoencoderKL.from_config(config)
    with torch.no_grad():  # start with a small posterior spread, as SD's trained VAE has: the decoder can read the
        vae.quant_conv.bias[config["latent_channels"]:] = -10.0  # latents from the first step on
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 100) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    start = time.time()
    for step in range(steps):
        x = to_pixels(pool[rng.integers(0, len(pool), size=batch)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / (4 * (SIZE // 8) ** 2)
        w = object_weights(x)
        loss = ((recon - x).square() * w).mean() + 0.5 * ((recon - x).abs() * w).mean() + 1e-6 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.4f (%.0f s)", step, steps, loss.item(), time.time() - start)
    return vae.eval()


@torch.no_grad()
def calibrate_latent_scale(vae, images: np.ndarray) -> float:
    """Rescale the latent space so that ``latents * scaling_factor`` has unit standard deviation (SD's VAE
    convention): the mean half of ``quant_conv`` is multiplied by c (the log-variance moves by 2 log c) and
    ``post_quant_conv`` divides by c, so decoding is unchanged. Returns c."""
    mean = torch.cat([vae.encode(to_pixels(images[i:i + 256])).latent_dist.mean for i in range(0, len(images), 256)])
    c = 1.0 / (float(mean.std()) * vae.config.scaling_factor)
    channels = vae.config.latent_channels
    vae.quant_conv.weight[:channels] *= c
    vae.quant_conv.bias[:channels] *= c
    vae.quant_conv.bias[channels:] += 2 * math.log(c)
    vae.post_quant_conv.weight /= c
    return c


@torch.no_grad()
def reconstruction_report(vae, count: int = 200, seed: int = 99) -> dict[str, float]:
    """How well the analyser reads the autoencoder's reconstructions of held-out renders (one-coloured shapes)."""
    images, _, scenes = sample_world(count, seed=seed)
    recon = vae.decode(vae.encode(to_pixels(images)).latent_dist.mode()).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    readings = [analyse(r) for r in recon]
    report = {a: float(np.mean([getattr(r, a) == getattr(s, a) for r, s in zip(readings, scenes, strict=True)
                                if a != "colour" or not s.colour2]))
              for a in ("background", "colour", "shape", "size", "position")}
    report["mean_abs_error"] = float(np.abs(recon.astype(np.float32) - images).mean())
    return report


# --- 2. the UNet and the text encoder ------------------------------------------------------------------------

class Captions:
    """Tokenised captions, each distinct caption tokenised once (the recipe's padding and truncation)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.cache = tokenizer, {}

    def ids(self, captions: list[str]) -> torch.Tensor:
        for text in set(captions) - self.cache.keys():
            self.cache[text] = self.tokenizer(text, padding="max_length", max_length=self.tokenizer.model_max_length,
                                              truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self.cache[c] for c in captions])


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


def train_denoiser(vae, configs: dict, tokenizer, args: argparse.Namespace, eval_pipe_folder: Path):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dreambooth import assets_api

    torch.manual_seed(args.seed + 1)
    rng = np.random.default_rng(args.seed + 1)
    images, _, scenes = sample_world(args.images, seed=args.seed + 2)
    with torch.no_grad():
        dists = [vae.encode(to_pixels(images[i:i + 256])).latent_dist for i in range(0, len(images), 256)]
    mean = torch.cat([d.mean for d in dists])
    std = torch.cat([d.std for d in dists])
    del images
    log.info("latents: %s, std of latents x scaling factor %.3f", tuple(mean.shape),
             float(mean.std()) * vae.config.scaling_factor)

    unet = UNet2DConditionModel.from_config(configs["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in configs["text_encoder"].items()
                                                   if not k.startswith("_")}))
    scheduler = DDPMScheduler.from_config(assets_api.family_config("sd1", "scheduler"))
    captions = Captions(tokenizer)
    params = [*unet.parameters(), *text_encoder.parameters()]
    log.info("unet %.2fM, text encoder %.2fM parameters", sum(p.numel() for p in unet.parameters()) / 1e6,
             sum(p.numel() for p in text_encoder.parameters()) / 1e6)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    # constant after the warm-up (the recipe's default), so nothing depends on the step count: the model after N
    # steps of a longer run is the model a run of N steps ships
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup))
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    unet.train()
    text_encoder.train()
    start, running = time.time(), []
    for step in range(args.steps):
        idx = rng.integers(0, len(scenes), size=args.batch)
        texts = ["" if rng.random() < args.caption_dropout else random_caption(scenes[i], rng) for i in idx]
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape)) * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden = text_encoder(captions.ids(texts), return_dict=False)[0]
        target = noise if scheduler.config.prediction_type == "epsilon" else \
            scheduler.get_velocity(latents, noise, timesteps)
        pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_unet, unet, decay)
        ema_update(ema_text, text_encoder, decay)
        running.append(loss.item())
        if step % 100 == 0 or step == args.steps - 1:
            log.info("step %d/%d loss %.4f (%.0f s)", step, args.steps, float(np.mean(running)), time.time() - start)
            running = []
        if args.eval_every and (step + 1) % args.eval_every == 0:
            log.info("step %d: red circle on blue in %.0f%% of samples", step + 1,
                     100 * red_circle_on_blue(vae, ema_text, tokenizer, ema_unet, eval_pipe_folder))
            if args.snapshots:
                write_checkpoint(args.snapshots / f"step{step + 1}.safetensors", configs, vae, ema_text, ema_unet,
                                 {**recipe(args), "steps": step + 1})
    return ema_unet, ema_text


def red_circle_on_blue(vae, text_encoder, tokenizer, unet, config_folder: Path, count: int = 16) -> float:
    """Share of stock-pipeline samples of "a red circle on a blue background" that the analyser reads so."""
    from diffusers import StableDiffusionPipeline
    from diffusers.schedulers import PNDMScheduler

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_pretrained(config_folder / "scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    reads = [analyse(i) for i in stock.sample(pipe, "a red circle on a blue background", count, seed=0)]
    return float(np.mean([r.colour == "red" and r.shape == "circle" and r.background == "blue" for r in reads]))


def write_checkpoint(path: Path, configs: dict, vae, text_encoder, unet, recipe: dict) -> Path:
    components = {
        "unet": normalize_diffusers_keys("unet", unet.state_dict()),
        "vae": normalize_diffusers_keys("vae", vae.state_dict()),
        "text_encoder": normalize_diffusers_keys("text_encoder", text_encoder.state_dict()),
    }
    state = join_ldm(components, tiny_extras("sd1", torch.Generator()), "sd1")
    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v.detach() for k, v in state.items()}
    save_tensors(path, state, {CONFIGS_METADATA_KEY: json.dumps(configs), "bench.quality.recipe": json.dumps(recipe)})
    return path


def recipe(args: argparse.Namespace) -> dict:
    return {k: getattr(args, k) for k in DEFAULTS}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.quality.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    for key, value in DEFAULTS.items():
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--eval-every", type=int, default=500, help="log the red-circle share every N steps (0: never)")
    p.add_argument("--final-samples", type=int, default=32, help="samples of the final red-circle check (0: none)")
    p.add_argument("--snapshots", type=Path, default=None, help="also write the model at each evaluation here")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (the recipe's numbers are reproducible at the same thread count)")
    p.add_argument("--save-vae", type=Path, default=None, help="also keep the autoencoder stage here")
    p.add_argument("--load-vae", type=Path, default=None, help="skip stage 1: use this autoencoder stage")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    if args.snapshots:
        args.snapshots.mkdir(parents=True, exist_ok=True)
    import tempfile

    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer

    configs = model_configs()
    with tempfile.TemporaryDirectory() as tmp:
        folder = stock.write_config_folder(Path(tmp) / "config", configs)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        if args.load_vae:
            vae = AutoencoderKL.from_pretrained(args.load_vae).eval()
        else:
            vae = train_vae(configs["vae"], args.vae_steps, args.vae_batch, args.vae_lr, args.seed, args.vae_images)
            calibration, _, _ = sample_world(args.calibration_images, seed=args.seed + 3)
            log.info("latent scale calibrated by x%.4f", calibrate_latent_scale(vae, calibration))
            log.info("autoencoder reconstructions read back: %s",
                     reconstruction_report(vae, count=min(200, args.calibration_images)))
            if args.save_vae:
                vae.save_pretrained(args.save_vae)
        vae.requires_grad_(False)
        unet, text_encoder = train_denoiser(vae, configs, tokenizer, args, folder)
        if args.final_samples:
            share = red_circle_on_blue(vae, text_encoder, tokenizer, unet, folder, count=args.final_samples)
            log.info("final: red circle on blue in %.0f%% of %d samples", 100 * share, args.final_samples)
    write_checkpoint(args.out, configs, vae, text_encoder, unet, recipe(args))
    log.info("wrote %s (%.1f MB)", args.out, args.out.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
