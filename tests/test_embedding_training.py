"""Textual inversion as a training method: only the new word's vectors train; the WebUI embedding file appears."""

from __future__ import annotations

import pytest
import torch
from conftest import cancelled_at, make_training_model, working_files
from safetensors.torch import load_file

from dreambooth.errors import UserError
from dreambooth.train import batch as batch_module
from dreambooth.train.loop import RunOptions, Trainer

CONCEPT = {"instance_prompt": "a photo of zwx-style disc", "sample_prompt": "zwx-style"}


def _run(md, tmp_path, **opts):
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False,
                                     embeddings_dir=tmp_path / "embeddings", **opts))
    trainer.run()
    return trainer


def test_only_the_embedding_trains_and_the_webui_file_appears(tmp_path, tiny_checkpoint, monkeypatch):
    prompts = []
    real = batch_module.tokenize_prompts
    monkeypatch.setattr(batch_module, "tokenize_prompts", lambda tok, batch, mode: prompts.extend(batch) or
                        real(tok, batch, mode))
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), method="textual_inversion",
                             embedding_token="zwx-style", embedding_vectors=2, embedding_init_word="disc",
                             learning_rate=5e-3, epochs=2, save_checkpoint=True, preview_every_n_epochs=2,
                             concept=CONCEPT)
    before = working_files(md)
    trainer = _run(md, tmp_path)
    assert working_files(md) == before  # the model is bitwise unchanged
    assert all("zwx-style zwx-style_1" in p for p in prompts)  # the word stands for both vectors
    exported = load_file(str(tmp_path / "embeddings" / "zwx-style.safetensors"))
    assert list(exported) == ["emb_params"] and exported["emb_params"].shape == (2, 32)
    init = trainer.models.text_encoders[0].get_input_embeddings().weight[
        trainer.models.tokenizers[0]("disc", add_special_tokens=False).input_ids].mean(0)
    assert not torch.allclose(exported["emb_params"][0], init.detach())  # it trained
    assert trainer.previews == [8]


def test_a_missing_word_is_a_clear_error(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), method="textual_inversion", epochs=1)
    with pytest.raises(UserError, match="needs the word"):
        _run(md, tmp_path)


def test_embedding_resume_continues_the_same_run(tmp_path, tiny_checkpoint):
    settings = dict(method="textual_inversion", embedding_token="zwx-style", learning_rate=5e-3, epochs=2,
                    save_every_n_epochs=1, concept=CONCEPT)
    reference = make_training_model(tmp_path / "ref", tiny_checkpoint("sd1"), **settings)
    _run(reference, tmp_path / "ref")
    md = make_training_model(tmp_path / "run", tiny_checkpoint("sd1"), save_on_cancel=True, **settings)
    with cancelled_at(3):
        _run(md, tmp_path / "run")
    assert _run(md, tmp_path / "run", resume=True).step == 8
    a = load_file(str(reference.path / "embeddings" / "zwx-style.safetensors"))["emb_params"]
    b = load_file(str(md.path / "embeddings" / "zwx-style.safetensors"))["emb_params"]
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
