"""The baseline: a training loop written the way the common recipes write it.

It follows the choices of the diffusers examples (``train_dreambooth.py``, ``train_dreambooth_lora.py`` and the
SDXL LoRA script), written here in our own words:

- the trained weights stay fp32 and the UNet runs under ``torch.autocast`` (fp16 with a GradScaler, as accelerate
  does for ``--mixed_precision=fp16``); the frozen VAE and text encoder(s) are cast to fp16 (the SDXL VAE stays
  fp32, as the SDXL script keeps it); for LoRA the frozen UNet is cast to fp16 too and the LoRA weights stay fp32;
- the images are loaded and the VAE and text encoder(s) run on every step (no caches);
- AdamW (lr 5e-6, betas 0.9/0.999, weight decay 1e-2, eps 1e-8) or bitsandbytes' AdamW8bit; gradients clipped to
  norm 1.0; a constant LR schedule; ``optimizer.zero_grad(set_to_none=...)``;
- optional gradient checkpointing through ``unet.enable_gradient_checkpointing()``; attention is diffusers' default
  (SDP on torch 2);
- ``loss.detach().item()`` every step, as their progress bar does (a host sync per step).

Two variants: ``baseline-default`` (the scripts' defaults with fp16) and ``baseline-lowmem`` (the README's
lowest-memory recipe: gradient checkpointing, 8-bit AdamW when bitsandbytes works, fp16, set_grads_to_none). For a
like-for-like comparison, :func:`like_settings` gives the recipe with one of our rows' gradient checkpointing,
mixed precision and optimizer (``--mixed_precision=bf16`` and ``--use_8bit_adam`` are the scripts' own options), and
for LoRA with our layers (every linear and 1x1 convolution of each transformer block, as kohya and the WebUI's LoRAs
have them, where the diffusers scripts adapt only the attention projections: about 2.5 times the LoRA work).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth.compat import grad_scaler
from dreambooth.config import TrainConfig
from dreambooth.train.optimizers import adamw_8bit_problem

from .matrix import Case
from .measure import StepClock
from .memory import Roles
from .models import PROMPT

log = logging.getLogger(__name__)

SEED = 1234
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the diffusers LoRA scripts' target modules
LORA_LAYERS = ("recipe", "ours")  # the scripts' targets; or ours: each Linear and 1x1 conv in a Transformer2DModel


@dataclass(frozen=True)
class BaselineSettings:
    mixed_precision: str  # "fp16" (autocast + GradScaler on a GPU, fp32 on the CPU), "bf16" (autocast) or "no"
    gradient_checkpointing: bool
    eight_bit_adam: bool
    set_grads_to_none: bool
    lora_layers: str = "recipe"  # LORA_LAYERS

    def like_key(self, method: str) -> tuple:
        """What a like-for-like comparison holds equal: checkpointing, precision, optimizer (and for LoRA, the
        adapted layers)."""
        key = (self.gradient_checkpointing, self.mixed_precision, self.eight_bit_adam)
        return (*key, self.lora_layers) if method == "lora" else key


def variant_settings(variant: str, eight_bit_ok: bool) -> BaselineSettings:
    if variant == "baseline-default":
        return BaselineSettings("fp16", gradient_checkpointing=False, eight_bit_adam=False, set_grads_to_none=False)
    if variant == "baseline-lowmem":
        return BaselineSettings("fp16", gradient_checkpointing=True, eight_bit_adam=eight_bit_ok,
                                set_grads_to_none=True)
    raise ValueError(f"unknown baseline variant {variant!r}")


def like_settings(ours: dict[str, object], eight_bit_ok: bool) -> BaselineSettings:
    """The recipe run with the gradient checkpointing, mixed precision and optimizer our row with ``ours`` (TrainConfig
    overrides) really uses: the recipe variant with that checkpointing (its zero_grad and clipping), and the
    precision, optimizer and LoRA layers changed to ours."""
    cfg = TrainConfig(**{k: v for k, v in ours.items() if k in TrainConfig.__dataclass_fields__})
    recipe = variant_settings("baseline-lowmem" if cfg.gradient_checkpointing else "baseline-default", eight_bit_ok)
    return BaselineSettings(cfg.mixed_precision, cfg.gradient_checkpointing,
                            eight_bit_adam=cfg.optimizer == "adamw_8bit" and eight_bit_ok,
                            set_grads_to_none=recipe.set_grads_to_none, lora_layers="ours")


def eight_bit_status(device: torch.device) -> tuple[bool, str]:
    """Whether bitsandbytes' AdamW8bit runs here (the trainer's own probe: one real step); else why not."""
    problem = adamw_8bit_problem(device.type)
    return (True, "") if problem is None else (False, f"8-bit AdamW not used: {problem}")


class LoraLayer(torch.nn.Module):
    """A frozen Linear or 1x1 convolution (SD 1.x's ``proj_in`` / ``proj_out``) plus a trainable low-rank update
    ``up(down(x)) * alpha / rank`` of the same kind (peft's LoRA math: gaussian down with std 1/rank, zero up)."""

    def __init__(self, base: torch.nn.Linear | torch.nn.Conv2d, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        device = base.weight.device
        if isinstance(base, torch.nn.Linear):
            self.down = torch.nn.Linear(base.in_features, rank, bias=False, device=device)
            self.up = torch.nn.Linear(rank, base.out_features, bias=False, device=device)
        else:
            self.down = torch.nn.Conv2d(base.in_channels, rank, 1, bias=False, device=device)
            self.up = torch.nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device)
        torch.nn.init.normal_(self.down.weight, std=1 / rank)
        torch.nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x)) * self.scale


def _lora_layers(unet: torch.nn.Module, layers: str) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, layer) of every layer to adapt: the scripts' attention projections, or ours."""
    found = []
    if layers == "recipe":
        for module in list(unet.modules()):
            if hasattr(module, "to_q"):
                for name in LORA_TARGETS:
                    parent, attr = (module.to_out, "0") if name == "to_out.0" else (module, name)
                    found.append((parent, attr, parent.get_submodule(attr)))
    elif layers == "ours":
        for block in [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]:
            for path, layer in list(block.named_modules()):
                if isinstance(layer, torch.nn.Linear) or (
                        isinstance(layer, torch.nn.Conv2d) and layer.kernel_size == (1, 1)):
                    parent_path, _, attr = path.rpartition(".")
                    found.append((block.get_submodule(parent_path), attr, layer))
    else:
        raise ValueError(f"unknown LoRA layers {layers!r}, expected one of {LORA_LAYERS}")
    return found


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, layers: str = "recipe") -> list[torch.nn.Parameter]:
    """Wrap the layers of ``unet`` that ``layers`` names (:data:`LORA_LAYERS`) with fp32 LoRA layers; returns the
    trainable parameters."""
    params: list[torch.nn.Parameter] = []
    for parent, attr, base in _lora_layers(unet, layers):
        if not isinstance(base, torch.nn.Linear | torch.nn.Conv2d):
            continue
        lora = LoraLayer(base, rank, alpha)
        setattr(parent, attr, lora)  # a ModuleList / Sequential takes its index as the name
        params += [lora.down.weight, lora.up.weight]
    return params


class ImageDataset(torch.utils.data.Dataset):
    """The instance images, resized (shorter side, bilinear), centre-cropped and scaled to [-1, 1], and the prompt's
    token ids per tokenizer; read from disk on every access, as the recipes' datasets do."""

    def __init__(self, folder: Path, resolution: int, tokenizers: list) -> None:
        self.paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        self.resolution = resolution
        self.token_ids = [tok(PROMPT, truncation=True, padding="max_length", max_length=tok.model_max_length,
                              return_tensors="pt").input_ids[0] for tok in tokenizers]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict:
        img = Image.open(self.paths[index]).convert("RGB")
        res = self.resolution
        scale = res / min(img.size)
        img = img.resize((max(res, round(img.width * scale)), max(res, round(img.height * scale))),
                         Image.Resampling.BILINEAR)
        left, top = (img.width - res) // 2, (img.height - res) // 2
        img = img.crop((left, top, left + res, top + res))
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return {"pixel_values": pixels, "input_ids": self.token_ids}


def _collate(examples: list[dict]) -> dict:
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
            "input_ids": [torch.stack(ids) for ids in zip(*(e["input_ids"] for e in examples), strict=True)]}


def _load(working: Path, sdxl: bool) -> tuple:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    names = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    tokenizers = [CLIPTokenizer.from_pretrained(working / n.replace("text_encoder", "tokenizer")) for n in names]
    encoders = []
    for n in names:
        arch = json.loads((working / n / "config.json").read_text(encoding="utf-8")).get("architectures", [])
        cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in arch else CLIPTextModel
        encoders.append(cls.from_pretrained(working / n, torch_dtype=torch.float32))
    vae = AutoencoderKL.from_pretrained(working / "vae", torch_dtype=torch.float32)
    unet = UNet2DConditionModel.from_pretrained(working / "unet", torch_dtype=torch.float32)  # fp32, as the recipes
    scheduler = DDPMScheduler.from_pretrained(working / "scheduler")
    return tokenizers, encoders, vae, unet, scheduler


def _encode_prompt(encoders: list, input_ids: list[torch.Tensor], sdxl: bool, device: torch.device
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not sdxl:
        return encoders[0](input_ids[0].to(device))[0], None
    hidden, pooled = [], None
    for encoder, ids in zip(encoders, input_ids, strict=True):
        out = encoder(ids.to(device), output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def run_baseline(working: Path, case: Case, settings: BaselineSettings, images: Path, device: torch.device,
                 clock: StepClock) -> dict:
    """Train with the recipe loop until ``clock`` has its steps; the timing and what was used."""
    torch.manual_seed(SEED)
    sdxl = case.family == "sdxl"
    tokenizers, encoders, vae, unet, scheduler = _load(working, sdxl)
    use_fp16 = settings.mixed_precision == "fp16" and device.type == "cuda"  # fp16 autocast needs a GPU, as ours
    autocast = torch.float16 if use_fp16 else torch.bfloat16 if settings.mixed_precision == "bf16" else None
    weight_dtype = autocast or torch.float32  # the frozen models in the autocast dtype, as the scripts do
    notes = ["attention diffusers default"]
    if settings.mixed_precision == "fp16" and not use_fp16:
        notes.append("fp16 needs a GPU: fp32 on the CPU")

    vae.requires_grad_(False)
    vae.to(device, dtype=torch.float32 if sdxl else weight_dtype)
    for encoder in encoders:
        encoder.requires_grad_(False)
        encoder.to(device, dtype=weight_dtype)
    if case.method == "lora":
        unet.requires_grad_(False)
        unet.to(device, dtype=weight_dtype)
        params = add_lora(unet, case.lora_rank, float(case.lora_rank), settings.lora_layers)
        notes.append(f"LoRA on {'our layers' if settings.lora_layers == 'ours' else 'the attention projections'}")
    else:
        unet.to(device)
        params = [p for p in unet.parameters() if p.requires_grad]
    unet.train()
    if settings.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    clock.roles = lambda: Roles([unet, vae, *encoders], params, optimizer)

    if settings.eight_bit_adam:
        import bitsandbytes as bnb

        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    notes.append(f"optimizer {optimizer_cls.__name__}")
    optimizer = optimizer_cls(params, lr=5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = grad_scaler(device.type) if use_fp16 else None

    data = ImageDataset(images, case.resolution, tokenizers)
    loader = torch.utils.data.DataLoader(data, batch_size=case.batch, shuffle=True, collate_fn=_collate,
                                         num_workers=0, generator=torch.Generator().manual_seed(SEED))
    res = case.resolution
    last_loss = None
    for batch in itertools.chain.from_iterable(itertools.repeat(loader)):
        clock.before_step()
        pixel_values = batch["pixel_values"].to(device, dtype=vae.dtype)
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bsz,), device=device).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        hidden, pooled = _encode_prompt(encoders, batch["input_ids"], sdxl, device)
        added = None
        if sdxl:
            time_ids = torch.tensor([[res, res, 0, 0, res, res]] * bsz, device=device, dtype=hidden.dtype)
            added = {"text_embeds": pooled, "time_ids": time_ids}
        # (no disabled autocast context: torch 2.1 refuses fp16 CPU autocast even when it is not enabled)
        with torch.autocast(device.type, dtype=autocast) if autocast else contextlib.nullcontext():
            pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        target = scheduler.get_velocity(latents, noise, timesteps) \
            if scheduler.config.prediction_type == "v_prediction" else noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=settings.set_grads_to_none)
        last_loss = loss.detach().item()  # the recipes' progress bar: one host sync per step
        if clock.after_step():
            break
    return {**clock.result(case.batch), "last_loss": last_loss, "notes": notes,
            "optimizer_ran": "adamw_8bit" if settings.eight_bit_adam else "adamw"}
