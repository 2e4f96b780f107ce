"""Previews and class images on tiny models: schedulers, seeds, live modules, train mode, PNG chunks, class images."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from dreambooth.config import Concept
from dreambooth.create import create_model
from dreambooth.errors import UserError
from dreambooth.sample import (
    SCHEDULER_CLASSES,
    LMSScheduler,
    SampleRequest,
    build_pipeline,
    generate,
    generate_class_images,
    make_scheduler,
    sample_prompts,
    save_sample,
    scheduler_name,
)

SIZE = 64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the models are tiny: one thread is faster than two, and much faster on a busy machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load_modules(working: Path, family: str) -> dict[str, object]:
    modules: dict[str, object] = {
        "unet": UNet2DConditionModel.from_pretrained(working / "unet"),
        "vae": AutoencoderKL.from_pretrained(working / "vae"),
        "text_encoder": CLIPTextModel.from_pretrained(working / "text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(working / "tokenizer"),
    }
    if family == "sdxl":
        modules["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(working / "text_encoder_2")
        modules["tokenizer_2"] = CLIPTokenizer.from_pretrained(working / "tokenizer_2")
    for m in modules.values():
        if isinstance(m, torch.nn.Module):
            m.requires_grad_(False)
    return modules


def tiny_model(tiny_checkpoint, tmp_path_factory, family: str) -> tuple[dict[str, object], dict]:
    root = tmp_path_factory.mktemp(f"sample-{family}")
    working = create_model(tiny_checkpoint(family), f"tiny-{family}", root, compute_hash=False).working
    config = dict(DDPMScheduler.from_pretrained(working / "scheduler").config)
    return load_modules(working, family), config


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint, tmp_path_factory):
    modules, config = tiny_model(tiny_checkpoint, tmp_path_factory, "sd1")
    pipeline = build_pipeline("sd1", modules, make_scheduler("dpmpp_2m", config))
    return pipeline, modules, config


@pytest.fixture(scope="module")
def other_families(tiny_checkpoint, tmp_path_factory):
    """family -> (modules, scheduler config), made on first use."""
    cache: dict[str, tuple[dict[str, object], dict]] = {}

    def get(family: str) -> tuple[dict[str, object], dict]:
        if family not in cache:
            cache[family] = tiny_model(tiny_checkpoint, tmp_path_factory, family)
        return cache[family]

    return get


def request(**changes) -> SampleRequest:
    values = dict(prompt="a photo of ohwx dog", negative_prompt="blurry", seed=1234, steps=2, guidance_scale=7.5,
                  width=SIZE, height=SIZE, scheduler="dpmpp_2m")
    values.update(changes)
    return SampleRequest(**values)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------------------------------------------
# schedulers


@pytest.mark.parametrize("name", list(SCHEDULER_CLASSES))
def test_every_scheduler_makes_an_image_of_the_requested_size(sd1, name):
    pipeline, _, _ = sd1
    image = generate(pipeline, request(scheduler=name, width=SIZE, height=2 * SIZE))
    assert image.size == (SIZE, 2 * SIZE)
    assert scheduler_name(pipeline.scheduler) == name
    assert pixels(image).std() > 0


def test_make_scheduler_keeps_the_models_schedule_and_prediction_type(other_families):
    _, config = other_families("sd2v")
    assert config["prediction_type"] == "v_prediction"
    for name in SCHEDULER_CLASSES:
        scheduler = make_scheduler(name, config)
        assert scheduler.config.prediction_type == "v_prediction", name
        assert (scheduler.config.beta_start, scheduler.config.beta_end) == (0.00085, 0.012), name
        assert scheduler.config.beta_schedule == "scaled_linear", name
        assert scheduler_name(scheduler) == name
    dpm = make_scheduler("dpmpp_2m", config)
    assert (dpm.config.algorithm_type, dpm.config.solver_order) == ("dpmsolver++", 2)
    # a scheduler made from another one's config keeps the model's settings (DDIM must not clip latents)
    ddim = make_scheduler("ddim", make_scheduler("euler", config).config)
    assert ddim.config.clip_sample is False and ddim.config.prediction_type == "v_prediction"


def test_unknown_scheduler_is_a_user_error(sd1):
    pipeline, _, config = sd1
    with pytest.raises(UserError, match="unknown sample scheduler 'k_fancy'"):
        make_scheduler("k_fancy", config)
    with pytest.raises(UserError, match="k_fancy"):
        generate(pipeline, request(scheduler="k_fancy"))


def test_bad_size_and_steps_are_user_errors(sd1):
    pipeline, _, _ = sd1
    with pytest.raises(UserError, match="width 60"):
        generate(pipeline, request(width=60))
    with pytest.raises(UserError, match="steps"):
        generate(pipeline, request(steps=0))


def test_lms_coefficients_are_exact_integrals():
    lms = LMSScheduler.from_config(DDPMScheduler().config)
    lms.set_timesteps(10)
    sigmas = lms.sigmas.double().numpy()
    # order 1 is Euler's step
    assert lms.lms_coefficient(1, 0, 0) == pytest.approx(sigmas[1] - sigmas[0])
    # order 3 against a fine numerical integral of the Lagrange basis polynomial
    index = 4
    tau = np.linspace(sigmas[index], sigmas[index + 1], 20001)
    for which in range(3):
        basis = np.ones_like(tau)
        for k in range(3):
            if k != which:
                basis *= (tau - sigmas[index - k]) / (sigmas[index - which] - sigmas[index - k])
        integral = float(np.sum((basis[1:] + basis[:-1]) / 2 * np.diff(tau)))
        assert lms.lms_coefficient(3, index, which) == pytest.approx(integral, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# seeds, live modules, train mode


def test_same_seed_same_pixels_other_seed_other_pixels(sd1):
    pipeline, _, _ = sd1
    for scheduler in ("euler_a", "ddim"):  # euler_a draws fresh noise at every step
        a = generate(pipeline, request(seed=7, scheduler=scheduler))
        b = generate(pipeline, request(seed=7, scheduler=scheduler))
        c = generate(pipeline, request(seed=8, scheduler=scheduler))
        assert np.array_equal(pixels(a), pixels(b)), scheduler
        assert not np.array_equal(pixels(a), pixels(c)), scheduler
        assert a.info["seed"] == 7 and c.info["seed"] == 8


def test_seed_minus_one_draws_a_seed_and_records_it(sd1):
    pipeline, _, _ = sd1
    image = generate(pipeline, request(seed=-1))
    seed = image.info["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    again = generate(pipeline, request(seed=seed))
    assert np.array_equal(pixels(image), pixels(again))


def test_pipeline_uses_the_module_objects_it_was_given(sd1):
    pipeline, modules, _ = sd1
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        assert pipeline.components[name] is modules[name]
    unet = modules["unet"]
    before = generate(pipeline, request())
    saved = unet.conv_out.bias.detach().clone()
    try:
        with torch.no_grad():
            unet.conv_out.bias.add_(0.5)  # changed in place after the pipeline was built
        changed = generate(pipeline, request())
    finally:
        with torch.no_grad():
            unet.conv_out.bias.copy_(saved)
    assert not np.array_equal(pixels(before), pixels(changed))
    assert np.array_equal(pixels(before), pixels(generate(pipeline, request())))


def test_train_mode_and_gradient_checkpointing_are_restored(sd1):
    pipeline, modules, _ = sd1
    unet, text_encoder = modules["unet"], modules["text_encoder"]
    seen: list[bool] = []
    hook = unet.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    frozen_norm = next(m for m in text_encoder.modules() if isinstance(m, torch.nn.LayerNorm))
    try:
        unet.train()
        unet.enable_gradient_checkpointing()
        text_encoder.train()
        frozen_norm.eval()  # a submodule the trainer keeps in eval stays in eval
        generate(pipeline, request())
        assert seen and not any(seen)  # sampled in eval mode
        assert unet.training and all(m.training for m in unet.modules())
        assert unet.is_gradient_checkpointing
        assert text_encoder.training and not frozen_norm.training
        assert not modules["vae"].training
    finally:
        hook.remove()
        unet.disable_gradient_checkpointing()
        for m in (unet, text_encoder):
            m.eval()


def test_mixed_precision_modules_sample_under_autocast(sd1):
    pipeline, modules, config = sd1
    reference = generate(pipeline, request())
    half = {**modules, "text_encoder": copy.deepcopy(modules["text_encoder"]).to(torch.bfloat16),
            "vae": copy.deepcopy(modules["vae"]).to(torch.bfloat16)}  # the UNet stays fp32, as a trainer holds it
    image = generate(build_pipeline("sd1", half, make_scheduler("dpmpp_2m", config)), request())
    assert image.size == reference.size
    assert np.abs(pixels(image) - pixels(reference)).mean() < 4
    assert modules["unet"].dtype == torch.float32 and half["vae"].dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["sd2v", "sdxl"])
def test_other_families_build_and_generate(other_families, family):
    modules, config = other_families(family)
    pipeline = build_pipeline(family, modules, make_scheduler("euler", config))
    expected = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    assert isinstance(pipeline, expected)
    assert all(pipeline.components[name] is module for name, module in modules.items())
    assert pipeline.scheduler.config.prediction_type == ("v_prediction" if family == "sd2v" else "epsilon")
    a = generate(pipeline, request(scheduler="euler", width=2 * SIZE, height=SIZE))
    b = generate(pipeline, request(scheduler="euler", width=2 * SIZE, height=SIZE))
    assert a.size == (2 * SIZE, SIZE)
    assert np.array_equal(pixels(a), pixels(b))


def test_build_pipeline_needs_every_module(sd1):
    _, modules, config = sd1
    with pytest.raises(ValueError, match="text_encoder_2, tokenizer_2"):
        build_pipeline("sdxl", modules, make_scheduler("ddim", config))
    with pytest.raises(UserError, match="unknown model family"):
        build_pipeline("sd3", modules, make_scheduler("ddim", config))


# ----------------------------------------------------------------------------------------------------------------
# saving


def test_save_sample_writes_png_with_infotext_and_json(tmp_path):
    image = Image.new("RGB", (SIZE, SIZE), (10, 20, 30))
    image.info["seed"] = 98765  # what generate records for seed -1
    req = request(seed=-1, prompt="ohwx dog, in the snow", negative_prompt="blurry, ugly", clip_skip=2)
    path = save_sample(image, tmp_path / "samples", "sample_100_0", req,
                       {"step": "100", "model": "my-model", "note": "a, b"})
    assert path == tmp_path / "samples" / "sample_100_0.png"
    assert [p.name for p in path.parent.iterdir()] == ["sample_100_0.png"]  # no temporary file left
    with Image.open(path) as saved:
        assert saved.format == "PNG" and saved.size == (SIZE, SIZE)
        params = saved.text["parameters"]
        meta = json.loads(saved.text["dreambooth"])
    prompt, negative, items = params.split("\n")
    assert prompt == "ohwx dog, in the snow"
    assert negative == "Negative prompt: blurry, ugly"
    assert items.startswith("Steps: 2, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 98765, Size: 64x64, Clip skip: 2")
    assert "Step: 100" in items and "Model: my-model" in items and 'Note: "a, b"' in items
    assert meta["request"]["seed"] == 98765 and meta["request"]["prompt"] == req.prompt
    assert meta["request"]["scheduler"] == "dpmpp_2m"
    assert meta["extra"] == {"step": "100", "model": "my-model", "note": "a, b"}


def test_saved_sample_of_a_generated_image(sd1, tmp_path):
    pipeline, _, _ = sd1
    req = request(negative_prompt="", scheduler="euler")
    path = save_sample(generate(pipeline, req), tmp_path, "preview", req)
    with Image.open(path) as saved:
        params = saved.text["parameters"]
    assert params.startswith("a photo of ohwx dog\nSteps: 2, Sampler: Euler, ")
    assert "Seed: 1234" in params and "Negative prompt" not in params


# ----------------------------------------------------------------------------------------------------------------
# prompts


def test_sample_prompts(tmp_path):
    concept = Concept(instance_prompt="ohwx dog", sample_prompt="ohwx dog, [filewords], at the beach", n_samples=3)
    assert sample_prompts(concept, "fallback") == ["ohwx dog, at the beach"] * 3

    template = tmp_path / "prompts.txt"
    template.write_text("ohwx dog in the snow\n\n# a comment\n[filewords], ohwx dog on a sofa\n", encoding="utf-8")
    concept = Concept(sample_template_file=str(template), n_samples=5)
    assert sample_prompts(concept, "fallback") == ["ohwx dog in the snow", "ohwx dog on a sofa"] * 2 + [
        "ohwx dog in the snow"]

    concept = Concept(n_samples=2)
    assert sample_prompts(concept, "photo of ohwx dog [filewords]") == ["photo of ohwx dog"] * 2
    assert sample_prompts(Concept(n_samples=0), "x") == []

    missing = tmp_path / "nope.txt"
    with pytest.raises(UserError, match="nope.txt"):
        sample_prompts(Concept(sample_template_file=str(missing), n_samples=1), "x")


# ----------------------------------------------------------------------------------------------------------------
# class images


def class_concept(**changes) -> Concept:
    values = dict(instance_data_dir="/data/ohwx", class_prompt="photo of a dog, [filewords]",
                  class_negative_prompt="cartoon", class_guidance_scale=5.0, class_infer_steps=2)
    values.update(changes)
    return Concept(**values)


def test_class_images_are_generated_once_and_never_overwritten(sd1, tmp_path):
    pipeline, _, _ = sd1
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (8, 8)).save(class_dir / "user_photo.JPG", format="JPEG")  # counts as a class image
    (class_dir / "notes.txt").write_text("not an image", encoding="utf-8")
    calls: list[tuple[int, int]] = []
    new = generate_class_images(pipeline, class_concept(), class_dir, 4, scheduler="ddim", width=SIZE, height=SIZE,
                                seed=100, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert [p.name for p in new] == ["class_0_100.png", "class_1_101.png", "class_2_102.png"]
    assert calls == [(2, 3), (3, 3)]
    for p in new:
        with Image.open(p) as image:
            assert image.size == (SIZE, SIZE)
            params = image.text["parameters"]
            meta = json.loads(image.text["dreambooth"])
        assert params.startswith("photo of a dog\nNegative prompt: cartoon\nSteps: 2, Sampler: DDIM, CFG scale: 5,")
        assert f"Seed: {meta['request']['seed']}" in params and meta["extra"]["kind"] == "class"
    before = {p.name: p.read_bytes() for p in class_dir.iterdir()}

    # enough now: the next run makes nothing
    assert generate_class_images(pipeline, class_concept(), class_dir, 4, scheduler="ddim", width=SIZE, height=SIZE,
                                 seed=100) == []
    # more needed: numbering continues, nothing already there is touched
    more = generate_class_images(pipeline, class_concept(), class_dir, 5, scheduler="ddim", width=SIZE, height=SIZE,
                                 seed=100)
    assert [p.name for p in more] == ["class_3_103.png"]
    assert all((class_dir / name).read_bytes() == data for name, data in before.items())
    assert sorted(p.name for p in class_dir.iterdir() if p.name.startswith(".")) == []


def test_class_images_with_random_seed(sd1, tmp_path):
    pipeline, _, _ = sd1
    new = generate_class_images(pipeline, class_concept(), tmp_path, 2, scheduler="euler_a", width=SIZE,
                                height=SIZE, seed=-1)
    assert len(new) == 2
    for n, p in enumerate(new):
        prefix, seed = p.stem.rsplit("_", 1)
        assert prefix == f"class_{n}"
        with Image.open(p) as image:
            assert json.loads(image.text["dreambooth"])["request"]["seed"] == int(seed)


def test_class_images_need_a_class_prompt(sd1, tmp_path):
    pipeline, _, _ = sd1
    with pytest.raises(UserError, match="/data/ohwx"):
        generate_class_images(pipeline, class_concept(class_prompt=""), tmp_path / "c", 3, scheduler="ddim",
                              width=SIZE, height=SIZE, seed=0)
    with pytest.raises(UserError, match="filewords"):
        generate_class_images(pipeline, class_concept(class_prompt="[filewords]"), tmp_path / "c", 3,
                              scheduler="ddim", width=SIZE, height=SIZE, seed=0)
    assert not os.path.exists(tmp_path / "c") or not any((tmp_path / "c").iterdir())
    # no class images wanted: no prompt needed
    assert generate_class_images(pipeline, class_concept(class_prompt=""), tmp_path / "c", 0, scheduler="ddim",
                                 width=SIZE, height=SIZE, seed=0) == []
