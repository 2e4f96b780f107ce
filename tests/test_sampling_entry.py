"""The one sampling entry (``sample.Sampler``): previews, class images and "Generate samples now" all take the
config's clip skip, mixed precision and attention through it, and the VAE decodes in fp32 under mixed precision."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_training_model, train_here
from PIL import Image
from safetensors.torch import load_file

from dreambooth import sample as sample_module
from dreambooth.config import Concept, load_config
from dreambooth.create import create_model
from dreambooth.errors import UserError
from dreambooth.sample import Sampler, SampleSettings
from dreambooth.sample_job import sample_now
from dreambooth.train import models as models_module
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.models import load_models

SIZE = 64


@pytest.fixture(scope="module")
def tiny_models(tiny_checkpoint, tmp_path_factory):
    """family -> Models of a tiny model, made on first use."""
    cache = {}

    def get(family: str):
        if family not in cache:
            root = tmp_path_factory.mktemp(f"entry-{family}")
            md = create_model(tiny_checkpoint(family), f"tiny-{family}", root, compute_hash=False)
            cache[family] = load_models(md.working, family)
        return cache[family]

    return get


def concept(**changes) -> Concept:
    return Concept(**{"instance_prompt": "a photo of zwx disc", "n_samples": 1, "sample_steps": 2, "sample_seed": 3,
                      **changes})


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_vae_decodes_in_fp32_while_sampling_runs_under_mixed_precision(tiny_models, tmp_path, family):
    models = tiny_models(family)
    seen: dict[str, torch.dtype] = {}

    def record(name: str):
        def hook(module, args, out) -> None:
            seen.setdefault(name, out.dtype)
        return hook

    hooks = [models.unet.conv_out.register_forward_hook(record("unet")),
             models.vae.decoder.conv_out.register_forward_hook(record("vae"))]
    try:
        sampler = Sampler(models, torch.device("cpu"), SampleSettings("euler", autocast=torch.bfloat16))
        (path,) = sampler.previews([concept()], SIZE, tmp_path, lambda c, n: f"p{c}_{n}", {})
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {"unet": torch.bfloat16, "vae": torch.float32}  # the UNet in the run's precision, the VAE in fp32
    assert np.asarray(Image.open(path).convert("RGB")).std() > 0  # a real image, not a black one


@pytest.mark.parametrize(("held", "decoded"), [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_a_half_vae_never_decodes_in_fp16_and_is_given_back_as_it_was(tiny_models, tmp_path, held, decoded):
    """fp16 (which overflows for SDXL) is upcast to fp32 for the decode; bf16 (fp32's range) decodes as it is held;
    either way the VAE's weights come back bit for bit in their dtype."""
    models = tiny_models("sdxl")
    seen = []
    hook = models.vae.decoder.conv_out.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    models.vae.to(held)
    before = {k: v.clone() for k, v in models.vae.state_dict().items()}
    try:
        sampler = Sampler(models, torch.device("cpu"), SampleSettings("euler", autocast=torch.bfloat16))
        (path,) = sampler.previews([concept()], SIZE, tmp_path, lambda c, n: f"p{c}_{n}", {})
        after = models.vae.state_dict()
        assert all(after[k].dtype == held and torch.equal(after[k], v) for k, v in before.items())
    finally:
        hook.remove()
        models.vae.to(torch.float32)
    assert seen == [decoded]
    assert np.asarray(Image.open(path).convert("RGB")).std() > 0


def test_clip_skip_reaches_the_image(tiny_models, tmp_path):
    models = tiny_models("sd1")
    images = {}
    for skip in (1, 2):
        sampler = Sampler(models, torch.device("cpu"), SampleSettings("dpmpp_2m", clip_skip=skip))
        (path,) = sampler.previews([concept()], SIZE, tmp_path, lambda c, n, skip=skip: f"skip{skip}", {})
        images[skip] = Image.open(path)
        images[skip].load()
    assert json.loads(images[2].info["dreambooth"])["request"]["clip_skip"] == 2
    assert "Clip skip: 2" in images[2].info["parameters"]
    assert not np.array_equal(np.asarray(images[1]), np.asarray(images[2]))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_previews_condition_the_unet_as_training_does_with_clip_skip(tiny_models, tmp_path, family):
    """The UNet sees the same text conditioning in a preview as in a training step of the same prompt."""
    from dreambooth.data.prompts import tokenize_prompts
    from dreambooth.train.conditioning import encode_tokens

    models = tiny_models(family)
    seen = []
    hook = models.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs.get("encoder_hidden_states", args[2] if len(args) > 2
                                                            else None)), with_kwargs=True)
    try:
        sampler = Sampler(models, torch.device("cpu"), SampleSettings("euler", clip_skip=2))
        sampler.previews([concept(sample_steps=1)], SIZE, tmp_path, lambda c, n: "p", {})
    finally:
        hook.remove()
    prompt = concept().instance_prompt
    ids = [tokenize_prompts(tokenizer, [prompt], "truncate")[0] for tokenizer in models.tokenizers]
    with torch.no_grad():
        trained, _ = encode_tokens(models, ids, clip_skip=2)
        last, _ = encode_tokens(models, ids, clip_skip=1)
    conditional = seen[0][-1:]  # classifier-free guidance: [unconditional, conditional]
    torch.testing.assert_close(conditional, trained)
    assert not torch.allclose(conditional, last)  # clip skip 2 is not the last layer


def test_clip_skip_encodes_as_training_does(tiny_models):
    """Sampling's clip skip (encoded by us: diffusers' own reaches for an attribute transformers 5 dropped) gives the
    prompt embedding that training conditions on with the same clip skip."""
    from dreambooth.train.conditioning import encode_tokens

    models = tiny_models("sd1")
    pipeline = Sampler(models, torch.device("cpu"), SampleSettings("euler", clip_skip=2)).pipeline
    req = sample_module.SampleRequest(prompt="a photo of zwx disc", negative_prompt="blurry", seed=1, steps=2,
                                      guidance_scale=7.0, width=SIZE, height=SIZE, scheduler="euler", clip_skip=2)
    with torch.no_grad():
        ours = sample_module._prompt_arguments(pipeline, req, torch.device("cpu"))
        ids = pipeline.tokenizer(req.prompt, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids
        trained, _ = encode_tokens(models, [ids], clip_skip=2)
        last, _ = encode_tokens(models, [ids], clip_skip=1)
    assert set(ours) == {"prompt_embeds", "negative_prompt_embeds"}
    torch.testing.assert_close(ours["prompt_embeds"], trained)
    assert not torch.allclose(ours["prompt_embeds"], last)
    if hasattr(pipeline.text_encoder, "text_model"):  # transformers 4 (the WebUI's): diffusers' own clip skip agrees
        with torch.no_grad():  # (diffusers skips no layer for the negative prompt; the WebUI skips for both, as we do)
            theirs, _ = pipeline.encode_prompt(req.prompt, "cpu", 1, False, clip_skip=1)
            negative, _ = pipeline.encode_prompt(req.negative_prompt, "cpu", 1, False, clip_skip=1)
        torch.testing.assert_close(ours["prompt_embeds"], theirs)
        torch.testing.assert_close(ours["negative_prompt_embeds"], negative)


def test_previews_and_class_images_of_a_run_use_its_clip_skip_and_precision(tmp_path, tiny_checkpoint, monkeypatch):
    calls = []
    real = sample_module.generate_images

    def spy(pipeline, req, seeds, device=None, autocast=None):
        calls.append((req.prompt, req.clip_skip, autocast))
        return real(pipeline, req, seeds, device, autocast)

    monkeypatch.setattr(sample_module, "generate_images", spy)
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1, images=1, preview_every_n_epochs=1,
                             clip_skip=2, mixed_precision="bf16",
                             concept=dict(num_class_images_per=1, class_prompt="a photo of a disc"))
    Trainer(md, RunOptions(device="cpu", install_signal_handlers=False)).run()
    assert [c[0] for c in calls] == ["a photo of a disc", "a photo of zwx disc"]  # one class image, one preview
    assert all(c[1:] == (2, torch.bfloat16) for c in calls)


def test_generate_now_samples_with_the_configs_attention_and_precision(tmp_path, tiny_checkpoint, monkeypatch):
    attention, calls = [], []
    real_attention, real_generate = models_module.set_attention, sample_module.generate_images
    monkeypatch.setattr(models_module, "set_attention", lambda m, mode: attention.append(mode) or
                        real_attention(m, mode))
    monkeypatch.setattr(sample_module, "generate_images", lambda p, req, seeds, device=None, autocast=None:
                        calls.append((req.clip_skip, autocast, {m.dtype for m in (p.unet, p.vae, p.text_encoder)}))
                        or real_generate(p, req, seeds, device, autocast))
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), clip_skip=2, mixed_precision="bf16",
                             attention="default")
    written = sample_now(md, load_config(md.path), "cpu", attention_default="sdp")
    assert [p.name.startswith("now_step000000_") for p in written] == [True]
    # bf16 mixed precision: the weights are held in bf16 too (sampling needs no fp32 masters: half the memory)
    assert attention == ["default"] and calls == [(2, torch.bfloat16, {torch.bfloat16})]
    cfg = load_config(md.path)
    cfg.attention = "auto"
    sample_now(md, cfg, "cpu", attention_default="sdp")
    assert attention[-1] == "sdp"  # auto: the host's choice


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("settings", [
    dict(method="lora", learning_rate=5e-2),
    dict(method="lora", learning_rate=5e-2, text_encoder_ratio=1.0),  # adapters on the text encoder too
    dict(method="hypernetwork", hypernetwork_layer_structure="1, 2, 1", hypernetwork_activation="relu",
         hypernetwork_layer_norm=False, learning_rate=1.0),
], ids=["lora", "lora-text-encoder", "hypernetwork"])
def test_generate_now_shows_what_the_method_trained_not_the_base_model(tmp_path, tiny_checkpoint, settings):
    """A LoRA or a hypernetwork is not in the working weights: "Generate samples now" puts the last save's on them,
    so its image is the trainer's own last preview (same seed), not the base model's."""
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1, images=2, preview_every_n_epochs=1,
                             **settings)
    trainer = train_here(md, lora_dir=tmp_path / "Lora", embeddings_dir=tmp_path / "embeddings",
                         hypernetworks_dir=tmp_path / "hypernetworks")
    trained = _pixels(md.samples / f"step{trainer.previews[-1]:06d}_c0_0.png")
    cfg = load_config(md.path)
    now = _pixels(sample_now(md, cfg, "cpu", attention_default="sdp")[0])
    base = _pixels(sample_now(md, dataclasses.replace(cfg, method="dreambooth"), "cpu", attention_default="sdp")[0])
    moved = np.abs(base - trained).mean()
    assert moved > 1.0, f"training changed the preview by {moved:.3f} of 255 only: the test shows nothing"
    assert np.abs(now - trained).mean() < moved / 10
    other = "hypernetwork" if settings["method"] == "lora" else "lora"
    with pytest.raises(UserError, match=f"holds no {other} weights: it was made with another training method"):
        sample_now(md, dataclasses.replace(cfg, method=other), "cpu", attention_default="sdp")


def test_generate_now_samples_a_textual_inversion_with_its_saved_vectors(tmp_path, tiny_checkpoint, monkeypatch):
    """The tiny model's image hardly depends on its prompt, so this one looks at the prompt and the vectors the
    text encoder is given: the word expanded to its tokens, and each token's vector the one the run saved."""
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1, images=2, method="textual_inversion",
                             embedding_token="zwx-style", embedding_vectors=2, embedding_init_word="disc",
                             learning_rate=5e-2, save_checkpoint=True,
                             concept=dict(instance_prompt="a photo of zwx-style"))
    train_here(md, embeddings_dir=tmp_path / "embeddings")
    saved = load_file(str(tmp_path / "embeddings" / "zwx-style.safetensors"))["emb_params"].float()
    seen, real = [], sample_module.generate_images

    def spy(p, req, seeds, device=None, autocast=None):
        ids = p.tokenizer.convert_tokens_to_ids(["zwx-style", "zwx-style_1"])
        with torch.no_grad():
            seen.append((req.prompt, p.text_encoder.get_input_embeddings()(torch.tensor([ids]))[0].float()))
        return real(p, req, seeds, device, autocast)

    monkeypatch.setattr(sample_module, "generate_images", spy)
    sample_now(md, load_config(md.path), "cpu", attention_default="sdp")
    [(prompt, vectors)] = seen
    assert prompt == "a photo of zwx-style zwx-style_1"
    assert torch.allclose(vectors, saved, atol=1e-3), (vectors - saved).abs().max()
    base = load_models(md.working, "sd1")
    disc = base.text_encoders[0].get_input_embeddings().weight[base.tokenizers[0]("disc", add_special_tokens=False)
                                                                 .input_ids].mean(0)
    assert (saved - disc).abs().max() > 1e-2  # it trained away from the word it started from
