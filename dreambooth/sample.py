"""The one sampling entry: previews during training, class images for prior preservation, and "Generate samples
now" all make their images through :class:`Sampler`, with every setting that changes an image (:class:`SampleSettings`:
scheduler, clip skip, the run's mixed precision; the attention is set on the models) taken from the config in one
place.

The pipeline is assembled from the very module objects the trainer is training (no reload from disk, no copy of
any weight), so a preview shows exactly the weights of that step. Sampling runs under ``torch.no_grad`` with every
module in eval mode, and each module's train/eval flags (down to every submodule) are put back afterwards, so the
trainer's UNet with gradient checkpointing continues as it was.

Every image is written atomically as a PNG carrying the WebUI's infotext in its ``parameters`` text chunk (so the
WebUI's *PNG Info* tab reads it) plus a ``dreambooth`` chunk with the request as JSON.

Images are decoded with autocast off, never in fp16: an fp32 VAE decodes in fp32 even when sampling runs under fp16
autocast, and an fp16 VAE is upcast to fp32 for the decode (the SDXL VAE overflows in fp16: black or NaN images; the
WebUI's ``--no-half-vae``). A bf16 VAE (bf16 weight precision) decodes in bf16: bf16 has fp32's exponent range, so
it cannot overflow where fp16 does (ComfyUI decodes in bf16 by default for that reason), and upcasting it would add
its fp32 weights and double the decoder's activation memory during previews, exactly in the runs that chose bf16
weights to save memory. (Offloading moves the VAE between devices and never changes its dtype.)

Seeds: ``seed = -1`` draws a random seed; every image returned by :func:`generate` carries the seed it was really
made with in ``image.info["seed"]`` (an int), which :func:`save_sample` writes in place of -1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UniPCMultistepScheduler,
)
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .atomic import clean_stale_temps, fault_point, write_with
from .config import Concept, TrainConfig
from .data.images import IMAGE_EXTENSIONS, list_images
from .errors import UserError
from .families import SDXL, get_family

log = logging.getLogger(__name__)

SEED_LIMIT = 2**32
FILEWORDS = re.compile(r"\[filewords\]", re.IGNORECASE)
CLASS_IMAGE_NAME = re.compile(r"^class_(\d+)_")


# ----------------------------------------------------------------------------------------------------------------
# schedulers


class LMSScheduler(EulerDiscreteScheduler):
    """Linear multistep (k-diffusion's ``lms``, order 4) without scipy.

    diffusers' ``LMSDiscreteScheduler`` needs scipy, which the standalone install does not have. This one shares
    Euler's sigmas, timesteps and input scaling (the same as LMSDiscreteScheduler's) and replaces the update by
    the multistep one. The Lagrange coefficients are integrals of polynomials, so they are computed exactly here
    instead of by numerical quadrature.
    """

    lms_order = 4
    lms_derivatives: list[torch.Tensor]  # the last ``lms_order`` derivatives, newest last; reset by set_timesteps

    # no __init__ of its own: diffusers reads the config keys off Euler's signature
    def set_timesteps(self, *args: Any, **kwargs: Any) -> None:
        super().set_timesteps(*args, **kwargs)
        self.lms_derivatives = []

    def lms_coefficient(self, order: int, index: int, which: int) -> float:
        """Integral from sigma[index] to sigma[index + 1] of the Lagrange basis polynomial of point ``which``."""
        sigmas = self.sigmas.double().cpu().numpy()
        basis = np.polynomial.Polynomial([1.0])
        for k in range(order):
            if k != which:
                basis *= np.polynomial.Polynomial([-sigmas[index - k], 1.0]) / (sigmas[index - which]
                                                                                 - sigmas[index - k])
        antiderivative = basis.integ()
        return float(antiderivative(sigmas[index + 1]) - antiderivative(sigmas[index]))

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any,
             return_dict: bool = True, **kwargs: Any) -> Any:
        # Euler's step gives the denoised estimate for any prediction type and advances the step index
        euler = super().step(model_output, timestep, sample, return_dict=True)
        index = self.step_index - 1
        x0 = euler.pred_original_sample
        derivative = (sample.to(torch.float32) - x0.to(torch.float32)) / float(self.sigmas[index])
        self.lms_derivatives.append(derivative)
        if len(self.lms_derivatives) > self.lms_order:
            self.lms_derivatives.pop(0)
        order = min(index + 1, self.lms_order)
        coefficients = [self.lms_coefficient(order, index, j) for j in range(order)]
        prev = sample.to(torch.float32)
        for coefficient, d in zip(coefficients, reversed(self.lms_derivatives), strict=True):
            prev = prev + coefficient * d
        prev = prev.to(model_output.dtype)
        if not return_dict:
            return (prev, x0)
        return type(euler)(prev_sample=prev, pred_original_sample=x0)


SCHEDULER_CLASSES: dict[str, type] = {  # each of config.SAMPLE_SCHEDULERS -> its diffusers class
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
_SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {
    "dpmpp_2m": {"algorithm_type": "dpmsolver++", "solver_order": 2},
}
# the WebUI's names, so its PNG Info tab and "send to txt2img" pick the same sampler
WEBUI_SAMPLER_NAMES = {"ddim": "DDIM", "pndm": "PLMS", "lms": "LMS", "euler": "Euler", "euler_a": "Euler a",
                       "dpmpp_2m": "DPM++ 2M", "unipc": "UniPC"}


def _check_scheduler_name(name: str) -> None:
    if name not in SCHEDULER_CLASSES:
        raise UserError(f"unknown sample scheduler {name!r}", f"use one of: {', '.join(SCHEDULER_CLASSES)}")


def make_scheduler(name: str, scheduler_config: Mapping[str, Any]) -> Any:
    """A fresh ``name`` scheduler from the model's own scheduler config (betas, prediction type, ... are kept)."""
    _check_scheduler_name(name)
    return SCHEDULER_CLASSES[name].from_config(dict(scheduler_config), **_SCHEDULER_OVERRIDES.get(name, {}))


def scheduler_name(scheduler: Any) -> str | None:
    """The name in :data:`SCHEDULER_CLASSES` that ``scheduler`` is, or None."""
    for name, cls in SCHEDULER_CLASSES.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v
                                          for k, v in _SCHEDULER_OVERRIDES.get(name, {}).items()):
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------
# pipeline and generation


def build_pipeline(family: str, modules: Mapping[str, object], scheduler: Any) -> Any:
    """A Stable Diffusion (XL) pipeline around the in-memory ``modules`` the trainer holds.

    ``modules`` maps ``unet``, ``vae``, ``text_encoder``, ``tokenizer`` (and for SDXL ``text_encoder_2``,
    ``tokenizer_2``) to the objects themselves: unwrapped (no DDP / compile wrapper) and on one device. Nothing is
    loaded or copied; a change to a module's weights shows in the next image.
    """
    fam = get_family(family)
    needed = (*fam.components, *fam.tokenizers)
    missing = [name for name in needed if modules.get(name) is None]
    if missing:
        raise ValueError(f"build_pipeline({family!r}) needs modules {', '.join(missing)}")
    parts = {name: modules[name] for name in needed}
    if fam.id == SDXL:
        pipeline = StableDiffusionXLPipeline(**parts, scheduler=scheduler, add_watermarker=False)
    else:
        pipeline = StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@dataclass
class SampleRequest:
    prompt: str
    negative_prompt: str
    seed: int  # -1: random; the seed used is in the image's info["seed"]
    steps: int
    guidance_scale: float
    width: int
    height: int
    scheduler: str
    clip_skip: int = 1  # the WebUI's meaning: 1 = last text encoder layer, 2 = the one before it


def _modules(pipeline: Any) -> list[torch.nn.Module]:
    return [m for m in pipeline.components.values() if isinstance(m, torch.nn.Module)]


@contextlib.contextmanager
def _eval_mode(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Every module in eval mode inside; afterwards each submodule's own train/eval flag as it was."""
    flags = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, training in flags:
            sub.training = training


def _autocast(modules: list[torch.nn.Module], device: torch.device, dtype: torch.dtype | None = None
              ) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` (the run's mixed precision); without one, to the half dtype when the modules' dtypes
    differ (a mixed-precision trainer's modules), else nothing."""
    if dtype is not None:
        return torch.autocast(device.type, dtype=dtype)
    dtypes = {p.dtype for m in modules for p in m.parameters() if p.is_floating_point()}
    halves = dtypes & {torch.float16, torch.bfloat16}
    if len(dtypes) > 1 and halves:
        return torch.autocast(device.type, dtype=torch.bfloat16 if torch.bfloat16 in halves else torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _decoding_dtype(vae: torch.nn.Module) -> Iterator[torch.dtype]:
    """The dtype the VAE decodes in (see the module docstring): an fp16 VAE is upcast to fp32 for the block and cast
    back after (exact: every value came from fp16); fp32 and bf16 stay as they are."""
    dtype = next(vae.parameters()).dtype
    if dtype is not torch.float16:
        yield dtype
        return
    vae.to(torch.float32)
    try:
        yield torch.float32
    finally:
        vae.to(dtype)


def _decode(pipeline: Any, latents: torch.Tensor) -> list[Image.Image]:
    """The pipeline's latents as images: autocast off, in fp32 or bf16 (see the module docstring)."""
    vae = pipeline.vae
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    with torch.autocast(latents.device.type, enabled=False), _decoding_dtype(vae) as dtype:
        latents = latents.float()
        if mean is not None and std is not None:  # SDXL-style configs that normalise their latents
            shape = (1, len(mean), 1, 1)
            latents = latents * torch.tensor(std, device=latents.device).view(shape) / config.scaling_factor \
                + torch.tensor(mean, device=latents.device).view(shape)
        else:
            latents = latents / config.scaling_factor
        pixels = vae.decode(latents.to(dtype), return_dict=False)[0]
    return pipeline.image_processor.postprocess(pixels.float(), output_type="pil")


def _generator(device: torch.device, seed: int) -> torch.Generator:
    # mps generators are not reproducible across runs; sample the noise on the CPU there
    gen_device = "cpu" if device.type == "mps" else device
    return torch.Generator(device=gen_device).manual_seed(seed)


def _check_request(pipeline: Any, req: SampleRequest) -> None:
    _check_scheduler_name(req.scheduler)
    multiple = int(getattr(pipeline, "vae_scale_factor", 8))
    for label, value in (("width", req.width), ("height", req.height)):
        if value <= 0 or value % multiple:
            raise UserError(f"sample {label} {value} is not a positive multiple of {multiple}",
                            f"use e.g. {max(multiple, round(max(value, 1) / multiple) * multiple)}")
    if req.steps < 1:
        raise UserError(f"sample steps {req.steps} must be at least 1", "use e.g. 20")
    if req.clip_skip < 1:
        raise UserError(f"clip skip {req.clip_skip} must be at least 1", "1 uses the last text encoder layer")


def random_seed() -> int:
    return secrets.randbelow(SEED_LIMIT)


def generate_images(pipeline: Any, req: SampleRequest, seeds: list[int], device: torch.device | str | None = None,
                    autocast: torch.dtype | None = None) -> list[Image.Image]:
    """One image per seed for ``req`` in one batch; each image's ``info["seed"]`` is its seed.

    ``device`` is where the noise generators live; by default the pipeline's device. The modules are not moved: they
    must all be on the pipeline's device already. Sampling runs under ``autocast`` (the run's mixed precision);
    without it, under autocast when the modules' dtypes differ (fp32 UNet beside a bf16 VAE and text encoder, as a
    trainer with bf16 weights holds them). The VAE decodes outside autocast.
    """
    _check_request(pipeline, req)
    if not seeds:
        return []
    seeds = [random_seed() if s == -1 else int(s) % SEED_LIMIT for s in seeds]
    module_device = torch.device(pipeline.device)
    generator_device = torch.device(device) if device is not None else module_device
    if scheduler_name(pipeline.scheduler) != req.scheduler:
        pipeline.scheduler = make_scheduler(req.scheduler, pipeline.scheduler.config)
    generators = [_generator(generator_device, s) for s in seeds]
    modules = _modules(pipeline)
    with _eval_mode(modules), torch.no_grad():
        with _autocast(modules, module_device, autocast):
            result = pipeline(**_prompt_arguments(pipeline, req, module_device),
                              num_inference_steps=req.steps, guidance_scale=req.guidance_scale, width=req.width,
                              height=req.height, num_images_per_prompt=len(seeds),
                              generator=generators if len(generators) > 1 else generators[0],
                              latents=_initial_noise(pipeline, req, generators, module_device), output_type="latent")
        images = _decode(pipeline, result.images)
    for image, seed in zip(images, seeds, strict=True):
        image.info["seed"] = seed
    return images


def _prompt_arguments(pipeline: Any, req: SampleRequest, device: torch.device) -> dict[str, Any]:
    """The pipeline's prompt arguments for ``req``. SDXL pipelines take clip skip themselves. For SD 1.x/2.x with clip
    skip the prompts are encoded here, as the WebUI does (the N-th last layer, then the final layer norm): diffusers'
    own clip skip reaches for ``text_encoder.text_model``, which transformers 5 no longer has."""
    negative = req.negative_prompt or None
    if req.clip_skip <= 1 or hasattr(pipeline, "text_encoder_2"):
        return {"prompt": req.prompt, "negative_prompt": negative,
                "clip_skip": req.clip_skip - 1 if req.clip_skip > 1 else None}
    embeds = {"prompt_embeds": _clip_skipped(pipeline, req.prompt, req.clip_skip, device)}
    if req.guidance_scale > 1:
        embeds["negative_prompt_embeds"] = _clip_skipped(pipeline, negative or "", req.clip_skip, device)
    return embeds


def _clip_skipped(pipeline: Any, prompt: str, clip_skip: int, device: torch.device) -> torch.Tensor:
    """[1, 77, D]: the ``clip_skip``-th last text encoder layer of ``prompt`` with the final layer norm applied."""
    tokenizer, encoder = pipeline.tokenizer, pipeline.text_encoder
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    hidden = encoder(ids, output_hidden_states=True).hidden_states[-clip_skip]
    return getattr(encoder, "text_model", encoder).final_layer_norm(hidden)


def _initial_noise(pipeline: Any, req: SampleRequest, generators: list[torch.Generator],
                   device: torch.device) -> torch.Tensor:
    """Each seed's starting noise, drawn in fp32 as diffusers draws it for fp32 models: the same seed gives the same
    noise whatever dtype the text encoder has (diffusers draws in the text encoder's dtype, and torch 2.1 draws a
    different sequence in bf16 than in fp32)."""
    shape = (1, pipeline.unet.config.in_channels, req.height // pipeline.vae_scale_factor,
             req.width // pipeline.vae_scale_factor)
    noise = [torch.randn(shape, generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.cat(noise).to(device)


def generate(pipeline: Any, req: SampleRequest, device: torch.device | str | None = None,
             autocast: torch.dtype | None = None) -> Image.Image:
    """One image for ``req``: the same seed gives the same pixels; seed -1 records the drawn one in info["seed"]."""
    return generate_images(pipeline, req, [req.seed], device, autocast)[0]


# ----------------------------------------------------------------------------------------------------------------
# saving


def _quote(value: str) -> str:
    """The WebUI's infotext quoting: values with a comma, colon or newline go in JSON quotes."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def infotext(req: SampleRequest, seed: int, extra: Mapping[str, str] | None = None) -> str:
    """The WebUI's ``parameters`` text for an image."""
    lines = [req.prompt]
    if req.negative_prompt:
        lines.append(f"Negative prompt: {req.negative_prompt}")
    items = {"Steps": str(req.steps), "Sampler": WEBUI_SAMPLER_NAMES.get(req.scheduler, req.scheduler),
             "CFG scale": f"{req.guidance_scale:g}", "Seed": str(seed), "Size": f"{req.width}x{req.height}"}
    if req.clip_skip > 1:
        items["Clip skip"] = str(req.clip_skip)
    for key, value in (extra or {}).items():
        items.setdefault(key.replace("_", " ").capitalize(), str(value))
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in items.items()))
    return "\n".join(lines)


def save_sample(image: Image.Image, folder: Path, stem: str, req: SampleRequest,
                extra: Mapping[str, str] | None = None) -> Path:
    """Write ``folder/<stem>.png`` atomically with ``parameters`` (WebUI infotext) and ``dreambooth`` (JSON) chunks.

    The seed written is ``image.info["seed"]`` when present (the one really used), else ``req.seed``.
    """
    if not stem or Path(stem).name != stem:
        raise ValueError(f"sample file stem {stem!r} must be a plain file name")
    seed = int(image.info.get("seed", req.seed))
    request = {**dataclasses.asdict(req), "seed": seed}
    extra = {str(k): str(v) for k, v in (extra or {}).items()}
    info = PngInfo()
    info.add_text("parameters", infotext(req, seed, extra))
    info.add_text("dreambooth", json.dumps({"request": request, "extra": extra}, ensure_ascii=False))
    path = Path(folder) / f"{stem}.png"
    write_with(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
    return path


# ----------------------------------------------------------------------------------------------------------------
# prompts and class images


def strip_filewords(prompt: str) -> str:
    """``prompt`` without ``[filewords]`` and the commas and spaces it leaves behind."""
    text = FILEWORDS.sub("", prompt)
    parts = [" ".join(part.split()) for part in text.split(",")]
    return ", ".join(part for part in parts if part)


def concept_label(concept: Concept) -> str:
    """How a concept is named in messages: its instance folder, else its prompt."""
    return concept.instance_data_dir or concept.instance_prompt or concept.class_prompt or "(unnamed concept)"


def sample_prompts(concept: Concept, instance_prompt_fallback: str) -> list[str]:
    """The ``n_samples`` preview prompts of ``concept``, cycled.

    From its sample prompt, else the non-empty lines of its template file (lines starting with ``#`` are
    comments), else ``instance_prompt_fallback``; ``[filewords]`` is removed.
    """
    if concept.n_samples <= 0:
        return []
    if concept.sample_prompt.strip():
        prompts = [concept.sample_prompt]
        if concept.sample_template_file:
            log.info("sample prompt is set; template file %s is not used", concept.sample_template_file)
    elif concept.sample_template_file:
        path = Path(concept.sample_template_file).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"sample template file {path} does not exist",
                            f"fix the path or clear the field (concept {concept_label(concept)})") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"sample template file {path} cannot be read: {err}",
                            "save it as a UTF-8 text file with one prompt per line") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not prompts:
            raise UserError(f"sample template file {path} holds no prompts", "write one prompt per line")
    else:
        prompts = [instance_prompt_fallback]
    prompts = [strip_filewords(p) for p in prompts]
    if not any(prompts):
        log.warning("concept %s has no sample prompt; previews are unconditional", concept_label(concept))
    return [prompts[i % len(prompts)] for i in range(concept.n_samples)]


def count_images(folder: Path) -> int:
    """Images directly in ``folder`` (not in subfolders; hidden and temporary files are not counted)."""
    if not folder.is_dir():
        return 0
    return sum(1 for f in folder.iterdir()
               if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_EXTENSIONS)


def generate_class_images(pipeline: Any, concept: Concept, class_dir: Path, needed: int, *, scheduler: str, width: int,
                          height: int, seed: int, batch_size: int = 1, clip_skip: int = 1,
                          autocast: torch.dtype | None = None,
                          progress: Callable[[int, int], None] | None = None) -> list[Path]:
    """Make ``class_dir`` hold at least ``needed`` images; returns the paths of the new ones.

    Image number n gets seed ``seed + n`` (random when ``seed`` is -1) and the name ``class_<n>_<seed>.png``;
    numbering continues after the highest one already there, so nothing is overwritten and a deleted image is not
    made again. Each image is written as soon as it is made, so an interrupted run keeps what it made and the next
    run makes only the rest. ``progress(done, total)`` is called after each batch.
    """
    if needed > 0 and not concept.class_prompt.strip():
        raise UserError(f"concept {concept_label(concept)} needs {needed} class images but has no class prompt",
                        "set its class prompt, or set class images per instance image to 0")
    if batch_size < 1:
        raise UserError(f"class image batch size {batch_size} must be at least 1", "use 1 or more")
    class_dir = Path(class_dir)
    missing = needed - count_images(class_dir)
    if missing <= 0:
        log.info("%s already holds %d class images or more", class_dir, needed)
        return []
    prompt = strip_filewords(concept.class_prompt)
    if not prompt:
        raise UserError(f"concept {concept_label(concept)}: class prompt {concept.class_prompt!r} is empty without "
                        "[filewords]", "write a class prompt such as 'photo of a dog'")
    req = SampleRequest(prompt=prompt, negative_prompt=strip_filewords(concept.class_negative_prompt), seed=seed,
                        steps=concept.class_infer_steps, guidance_scale=concept.class_guidance_scale, width=width,
                        height=height, scheduler=scheduler, clip_skip=clip_skip)
    _check_request(pipeline, req)
    class_dir.mkdir(parents=True, exist_ok=True)
    used = [int(m.group(1)) for f in class_dir.iterdir() if (m := CLASS_IMAGE_NAME.match(f.name))]
    number = max(used, default=-1) + 1
    log.info("generating %d class images for concept %s in %s", missing, concept_label(concept), class_dir)
    written: list[Path] = []
    while len(written) < missing:
        count = min(batch_size, missing - len(written))
        numbers = list(range(number, number + count))
        number += count
        seeds = [random_seed() if seed == -1 else (seed + n) % SEED_LIMIT for n in numbers]
        images = generate_images(pipeline, req, seeds, autocast=autocast)
        for n, image in zip(numbers, images, strict=True):
            stem = f"class_{n}_{image.info['seed']}"
            if (class_dir / f"{stem}.png").exists():  # never overwrite, even a file that appeared meanwhile
                stem = f"{stem}_{secrets.token_hex(4)}"
            written.append(save_sample(image, class_dir, stem, dataclasses.replace(req, seed=image.info["seed"]),
                                       {"kind": "class", "concept": concept_label(concept), "number": str(n)}))
        if progress is not None:
            progress(len(written), missing)
    return written


# ----------------------------------------------------------------------------------------------------------------
# the one entry: previews, class images, "Generate samples now"


@dataclass(frozen=True)
class SampleSettings:
    """Every setting that changes how the extension samples, from the config (the attention is set on the models
    when they are loaded: the trainer's setup, :func:`sample_job.sample_now`)."""

    scheduler: str = "dpmpp_2m"
    clip_skip: int = 1  # as training encodes the prompts
    autocast: torch.dtype | None = None  # the run's mixed precision

    @classmethod
    def from_config(cls, cfg: TrainConfig, autocast: torch.dtype | None) -> SampleSettings:
        return cls(scheduler=cfg.sample_scheduler, clip_skip=cfg.clip_skip, autocast=autocast)


class Sampler:
    """Images from the models in memory (see the module docstring), for previews and class images.

    ``expand`` turns a prompt into what the text encoders must see (a textual-inversion word's vectors)."""

    def __init__(self, models: Any, device: torch.device, settings: SampleSettings,
                 expand: Callable[[str], str] | None = None) -> None:
        self.device = device
        self.settings = settings
        self.expand = expand or (lambda prompt: prompt)
        scheduler = make_scheduler(settings.scheduler, models.scheduler_config)
        self.pipeline = build_pipeline(models.family.id, models.modules_for_pipeline(), scheduler)

    def request(self, concept: Concept, prompt: str, seed: int, size: int) -> SampleRequest:
        return SampleRequest(self.expand(prompt), concept.sample_negative_prompt, seed, concept.sample_steps,
                             concept.sample_guidance_scale, size, size, self.settings.scheduler,
                             self.settings.clip_skip)

    def previews(self, concepts: list[Concept], size: int, folder: Path, stem: Callable[[int, int], str],
                 extra: Mapping[str, str], after_each: Callable[[], None] | None = None) -> list[Path]:
        """Each concept's preview images (:func:`sample_prompts`), written as ``folder/<stem(concept, n)>.png``."""
        written = []
        for index, concept in enumerate(concepts):
            for n, prompt in enumerate(sample_prompts(concept, concept.instance_prompt)):
                seed = concept.sample_seed if concept.sample_seed >= 0 else random.randrange(SEED_LIMIT)
                req = self.request(concept, prompt, seed + n, size)
                image = generate(self.pipeline, req, self.device, self.settings.autocast)
                if after_each is not None:
                    after_each()
                written.append(save_sample(image, folder, stem(index, n), req, extra))
        return written

    def class_images(self, concept: Concept, folder: Path, needed: int, size: int, seed: int,
                     progress: Callable[[int, int], None] | None = None) -> list[Path]:
        """See :func:`generate_class_images`."""
        return generate_class_images(self.pipeline, concept, folder, needed, scheduler=self.settings.scheduler,
                                     width=size, height=size, seed=seed, clip_skip=self.settings.clip_skip,
                                     autocast=self.settings.autocast, progress=progress)


def fill_class_folders(concepts: list[Concept], folders: list[Path], sampler: Callable[[], Sampler], size: int,
                       seed: int, report: Callable[[str, bool], None]) -> None:
    """Generate what the class folders lack: ``num_class_images_per`` per instance image for each concept with prior
    preservation. ``sampler()`` is called once, when the first image is missing; ``report(message, starting)``
    tells the run what happens (``starting``: a concept's generation begins)."""
    made: Sampler | None = None
    for index, (concept, folder) in enumerate(zip(concepts, folders, strict=True)):
        if concept.num_class_images_per <= 0:
            continue
        needed = concept.num_class_images_per * len(list_images(concept.instance_data_dir))
        clean_stale_temps(folder, r"class_\d+_\d+(_[0-9a-f]+)?\.png")  # images cut off by a crash
        missing = needed - count_images(folder)
        if missing <= 0:
            continue
        report(f"generating {missing} class images for concept {index}", True)
        made = made or sampler()

        def progress(done: int, total: int, index: int = index) -> None:
            report(f"generated {done} of {total} class images for concept {index}", False)
            fault_point("class")  # test hook: a batch of class images written

        made.class_images(concept, folder, needed, size, seed, progress)
