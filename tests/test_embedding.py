"""Textual Inversion: only the new token's rows train (the rest of every text encoder and the UNet stay bitwise
equal through real AdamW steps with weight decay), prompts expand, init words, refused tokens, files the WebUI
loads for each family, resume state, removal, and a training signal.

The WebUI loader test re-implements, independently of ``dreambooth.train.embedding``, the rules by which the WebUI
(v1.10, ``modules/textual_inversion/textual_inversion.py``, ``EmbeddingDatabase.load_from_file``) reads an
embedding ``.safetensors``: a dict with ``clip_l`` and ``clip_g`` is SDXL (its width is the sum of both); otherwise
the file must hold exactly one tensor (a 1-D one becomes one vector); the name is the file name; a width other than
the loaded model's text width is skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth.create import create_model
from dreambooth.data.prompts import tokenize_prompts
from dreambooth.errors import UserError
from dreambooth.train.conditioning import encode_tokens, sdxl_time_ids
from dreambooth.train.embedding import (
    EmbeddingSettings,
    TextualInversion,
    load_embedding,
    save_embedding,
)
from dreambooth.train.models import load_models

TOKEN = "zwx-style"


@pytest.fixture(scope="module")
def models_of(tiny_checkpoint, tmp_path_factory):
    """models_of(family) -> the tiny model's Models, loaded once per module (every test removes its TI again)."""
    cache = {}
    root = tmp_path_factory.mktemp("embedding-models")

    def get(family: str):
        if family not in cache:
            md = create_model(tiny_checkpoint(family), f"ti-{family}", root)
            cache[family] = load_models(md.working, family)
        return cache[family]

    return get


@pytest.fixture
def make_ti(models_of):
    """make_ti(family, **settings) -> (models, ti); removed after the test."""
    made: list[TextualInversion] = []

    def make(family: str, **settings):
        models = models_of(family)
        ti = TextualInversion(models, EmbeddingSettings(**{"token": TOKEN, **settings}))
        made.append(ti)
        return models, ti

    yield make
    for ti in made:
        ti.remove()


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _embedding_key(state: dict[str, torch.Tensor]) -> str:
    return next(k for k in state if k.endswith("token_embedding.weight"))


def _ids(models, prompts: list[str]) -> list[torch.Tensor]:
    return [tokenize_prompts(tok, prompts, "truncate")[0] for tok in models.tokenizers]


def _unet_loss(models, ti, prompts: list[str], target: torch.Tensor) -> torch.Tensor:
    hidden, pooled = encode_tokens(models, _ids(models, [ti.prompt(p) for p in prompts]))
    sample = torch.randn(len(prompts), models.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    kwargs = {}
    if models.is_sdxl:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled,
                                       "time_ids": sdxl_time_ids([(64, 64)] * len(prompts), sample.device,
                                                                 sample.dtype)}
    out = models.unet(sample, torch.tensor([500] * len(prompts)), hidden, **kwargs).sample
    return torch.nn.functional.mse_loss(out, target)


# --- settings and tokens -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(token=""), dict(token="zwx style"), dict(token="Zwx"),
                                    dict(token="zwx<1>"), dict(token="zwx", vectors=0),
                                    dict(token="zwx", vectors=76), dict(token="zwx", vectors=True),
                                    dict(token="zwx", init_word=3)])
def test_settings_are_validated(kwargs):
    with pytest.raises(UserError):
        EmbeddingSettings(**kwargs)


def test_a_word_of_the_vocabulary_or_a_used_token_is_refused(models_of, make_ti):
    models = models_of("sdxl")
    sizes = [len(t) for t in models.tokenizers]
    with pytest.raises(UserError, match="already a word"):
        TextualInversion(models, EmbeddingSettings(token="cat"))
    _, ti = make_ti("sdxl", vectors=2)
    with pytest.raises(UserError, match="already has the token"):
        TextualInversion(models, EmbeddingSettings(token=TOKEN))
    with pytest.raises(UserError, match="already has the token"):
        TextualInversion(models, EmbeddingSettings(token="zwx-style_1"))
    assert ti.attached and [len(t) for t in models.tokenizers] == [s + 2 for s in sizes]  # nothing half-added


def test_prompt_expands_the_token_to_all_its_vectors(make_ti):
    models, ti = make_ti("sd1", vectors=12)
    full = " ".join([TOKEN] + [f"{TOKEN}_{i}" for i in range(1, 12)])
    assert ti.names == full.split()
    assert ti.prompt(f"a photo of {TOKEN}, (ZWX-Style:1.2)") == f"a photo of {full}, ({full}:1.2)"
    assert ti.prompt(ti.prompt(f"{TOKEN} art")) == f"{full} art"  # idempotent
    assert ti.prompt(f"{TOKEN}s {TOKEN}_1 my-{TOKEN}") == f"{TOKEN}s {TOKEN}_1 my-{TOKEN}"  # not inside a word
    ids = models.tokenizers[0](ti.prompt(f"a {TOKEN} photo"), add_special_tokens=False).input_ids
    assert ids[1:-1] == ti.token_ids()["clip_l"] and len(set(ids[1:-1])) == 12  # _10, _11 are not _1 + digits


def test_prompt_of_one_vector_is_the_token(make_ti):
    _, ti = make_ti("sd1")
    assert ti.prompt(f"a {TOKEN.upper()} photo") == f"a {TOKEN} photo"


# --- initialisation ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_init_from_a_word_equals_its_embedding(make_ti, family):
    models, ti = make_ti(family, vectors=3, init_word="cat")
    for key, encoder, tokenizer in zip(ti.keys, models.text_encoders, models.tokenizers, strict=True):
        (cat,) = tokenizer("cat", add_special_tokens=False).input_ids
        weight = encoder.get_input_embeddings().weight
        assert torch.equal(ti.vectors()[key], weight[cat].detach().expand(3, -1))
        assert torch.equal(weight[ti.token_ids()[key]].detach(), ti.vectors()[key])


def test_init_from_several_tokens_averages_or_cycles(models_of):
    models = models_of("sd1")
    tokenizer, weight = models.tokenizers[0], models.text_encoders[0].get_input_embeddings().weight.detach()
    ids = tokenizer("photo of", add_special_tokens=False).input_ids
    assert len(ids) == 2
    for vectors, expected in ((1, weight[ids].mean(0, keepdim=True)), (2, weight[ids]),
                              (3, weight[[ids[0], ids[1], ids[0]]])):
        ti = TextualInversion(models, EmbeddingSettings(token=TOKEN, vectors=vectors, init_word="photo of"))
        try:
            assert torch.allclose(ti.vectors()["clip_l"], expected, atol=1e-7)
        finally:
            ti.remove()


def test_random_init_is_small_and_seeded(models_of):
    models = models_of("sd1")
    got = []
    for seed in (0, 0, 1):
        ti = TextualInversion(models, EmbeddingSettings(token=TOKEN, vectors=4, init_word="", seed=seed))
        got.append(ti.vectors()["clip_l"])
        ti.remove()
    assert torch.equal(got[0], got[1]) and not torch.equal(got[0], got[2])
    assert 0 < got[0].std() < 0.05


# --- training ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_only_the_new_rows_change_through_adamw_steps(make_ti, family):
    models, ti = make_ti(family, vectors=2, init_word="cat")
    encoders_before = [_snapshot(e) for e in models.text_encoders]
    unet_before = _snapshot(models.unet)
    start = ti.vectors()
    # what a trainer would do: everything that requires grad, plus the embedding, weight decay on
    trainable = [p for m in (models.unet, *models.text_encoders) for p in m.parameters() if p.requires_grad]
    assert trainable == []
    optimizer = torch.optim.AdamW(trainable + ti.parameters(), lr=1e-2, weight_decay=0.5)
    target = torch.randn(2, models.unet.config.out_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(4):
        loss = _unet_loss(models, ti, [f"a photo of {TOKEN}", "a photo of a cat"], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ti.after_step()

    assert all(p.grad is None for p in models.unet.parameters())
    assert all(torch.equal(v, unet_before[k]) for k, v in models.unet.state_dict().items())
    for key, encoder, before in zip(ti.keys, models.text_encoders, encoders_before, strict=True):
        after = encoder.state_dict()
        emb = _embedding_key(after)
        assert [k for k in after if not torch.equal(after[k], before[k])] == [emb]
        ids = ti.token_ids()[key]
        new = torch.zeros(after[emb].shape[0], dtype=torch.bool)
        new[ids] = True
        assert torch.equal(after[emb][~new], before[emb][~new])  # every old row, bitwise
        assert not torch.equal(ti.vectors()[key], start[key])  # the new ones trained...
        assert torch.equal(after[emb][ids], ti.vectors()[key])  # ...and after_step put them into the matrix


def test_sdxl_pools_at_the_end_of_text_token(make_ti):
    models, ti = make_ti("sdxl", vectors=2)
    ids = _ids(models, [ti.prompt(f"a {TOKEN} photo")])[1]
    eos = int((ids[0] == models.tokenizers[1].eos_token_id).int().argmax())
    assert int(ids[0].argmax()) != eos  # a placeholder has the largest id: plain CLIP would pool there
    encoder = models.text_encoders[1]
    with torch.no_grad():
        out = encoder(ids)
    assert torch.equal(out.text_embeds[0], encoder.text_projection(out.last_hidden_state[0, eos]))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_few_steps_on_the_embedding_reduce_a_loss_through_the_text_encoder(make_ti, family):
    models, ti = make_ti(family, vectors=2)
    prompts = [f"a photo of {TOKEN}"]
    with torch.no_grad():  # the target: what the encoder gives for a real word where the token stands
        target, _ = encode_tokens(models, _ids(models, ["a photo of red cat"]))
    optimizer = torch.optim.AdamW(ti.parameters(), lr=0.05, weight_decay=0.01)
    losses = []
    for _ in range(25):
        hidden, _ = encode_tokens(models, _ids(models, [ti.prompt(p) for p in prompts]))
        loss = torch.nn.functional.mse_loss(hidden, target)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ti.after_step()
    assert losses[-1] < 0.5 * losses[0], losses


# --- state, removal ------------------------------------------------------------------------------------------------

def test_state_dict_round_trip_keeps_the_parameters(make_ti):
    _, ti = make_ti("sdxl", vectors=3)
    params = ti.parameters()
    state = {k: torch.randn_like(v) for k, v in ti.state_dict().items()}
    assert sorted(state) == ["clip_g", "clip_l"]
    ti.load_state_dict(state)
    assert ti.parameters() == params and all(torch.equal(ti.vectors()[k], state[k]) for k in state)
    with pytest.raises(UserError, match="shape"):
        ti.load_state_dict({k: v[:2] for k, v in state.items()})
    with pytest.raises(UserError, match="needs"):
        ti.load_state_dict({"clip_l": state["clip_l"]})


def test_remove_gives_the_models_back_as_they_were(models_of):
    models = models_of("sdxl")
    before = [_snapshot(e) for e in models.text_encoders]
    ids_before = [t(f"a {TOKEN}", add_special_tokens=False).input_ids for t in models.tokenizers]
    ids = _ids(models, ["a photo"])
    with torch.no_grad():
        out_before = models.text_encoders[1](ids[1]).text_embeds
    ti = TextualInversion(models, EmbeddingSettings(token=TOKEN, vectors=3))
    assert not any(p.requires_grad for p in models.unet.parameters())
    ti.remove()
    ti.remove()  # idempotent
    assert not ti.attached
    assert all(p.requires_grad for p in models.unet.parameters())  # the flags come back
    for encoder, snap in zip(models.text_encoders, before, strict=True):
        after = encoder.state_dict()
        assert after.keys() == snap.keys() and all(torch.equal(after[k], snap[k]) for k in snap)
    assert [t(f"a {TOKEN}", add_special_tokens=False).input_ids for t in models.tokenizers] == ids_before
    with torch.no_grad():
        assert torch.equal(models.text_encoders[1](ids[1]).text_embeds, out_before)


# --- files ---------------------------------------------------------------------------------------------------------

def webui_load(path: Path, expected_width: int) -> dict | None:
    """The WebUI's rules for an embedding .safetensors: None where it would skip the file."""
    data = load_file(str(path), device="cpu")
    name = os.path.splitext(os.path.basename(path))[0]
    if "clip_g" in data and "clip_l" in data:  # SDXL
        vec = {k: v.float() for k, v in data.items()}
        shape = data["clip_g"].shape[-1] + data["clip_l"].shape[-1]
        vectors = data["clip_g"].shape[0]
    else:
        assert len(data) == 1, "embedding file has multiple terms in it"
        emb = next(iter(data.values()))
        if emb.dim() == 1:
            emb = emb.unsqueeze(0)
        vec = emb.float()
        shape, vectors = vec.shape[-1], vec.shape[0]
    if shape != expected_width:
        return None
    return {"name": name, "vec": vec, "vectors": vectors}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_saved_file_loads_in_the_webui_and_back(make_ti, models_of, tmp_path, family):
    models, ti = make_ti(family, vectors=3, init_word="cat")
    ti.load_state_dict({k: torch.randn_like(v) for k, v in ti.state_dict().items()})
    path = save_embedding(tmp_path / f"{TOKEN}.safetensors", ti, 120, family, metadata={"note": "x", "step": "9"})
    width = sum(e.get_input_embeddings().weight.shape[1] for e in models.text_encoders)  # the WebUI's expected width

    loaded = webui_load(path, width)
    assert loaded is not None and loaded["name"] == TOKEN and loaded["vectors"] == 3
    if family == "sdxl":
        assert {k: list(v.shape) for k, v in loaded["vec"].items()} == {"clip_l": [3, 32], "clip_g": [3, 32]}
        assert all(torch.equal(loaded["vec"][k], ti.vectors()[k]) for k in ("clip_l", "clip_g"))
    else:
        assert list(load_file(str(path))) == ["emb_params"] and list(loaded["vec"].shape) == [3, 32]
        assert torch.equal(loaded["vec"], next(iter(ti.vectors().values())))
    assert webui_load(path, width + 1) is None  # another model's width: skipped

    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    arch = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
    assert meta["modelspec.architecture"] == f"{arch[family]}/textual-inversion"
    assert (meta["name"], meta["step"], meta["vectors"], meta["base_model_family"]) == (TOKEN, "120", "3", family)
    assert meta["note"] == "x" and meta["format"] == "pt"

    tensors = load_embedding(path, family)
    assert sorted(tensors) == (["clip_g", "clip_l"] if family == "sdxl" else ["emb_params"])
    state = ti.state_dict()
    ti.remove()
    fresh = TextualInversion(models, EmbeddingSettings(token=TOKEN, vectors=3))
    try:
        fresh.load_state_dict(tensors)  # the file resumes an embedding
        assert all(torch.equal(fresh.vectors()[k], state[k]) for k in state)
    finally:
        fresh.remove()
    with pytest.raises(UserError):
        load_embedding(path, "sd1" if family == "sdxl" else "sdxl")


def test_load_embedding_checks_the_layout(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(5)}, str(tmp_path / "one.safetensors"))
    assert list(load_embedding(tmp_path / "one.safetensors")["emb_params"].shape) == [1, 5]
    save_file({"a": torch.zeros(1, 4), "b": torch.zeros(1, 4)}, str(tmp_path / "two.safetensors"))
    save_file({"clip_l": torch.zeros(2, 4), "clip_g": torch.zeros(3, 8)}, str(tmp_path / "xl.safetensors"))
    save_file({"emb": torch.zeros(2, 3, 4)}, str(tmp_path / "3d.safetensors"))
    for name in ("two", "xl", "3d", "missing"):
        with pytest.raises(UserError):
            load_embedding(tmp_path / f"{name}.safetensors")


def test_save_refuses_another_family_or_suffix(make_ti, tmp_path):
    _, ti = make_ti("sd1")
    with pytest.raises(ValueError):
        save_embedding(tmp_path / "e.safetensors", ti, 1, "sdxl")
    with pytest.raises(ValueError):
        save_embedding(tmp_path / "e.pt", ti, 1, "sd1")
