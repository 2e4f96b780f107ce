"""LoRA training with "also export a merged checkpoint": the checkpoint computes what base + LoRA computes."""

from __future__ import annotations

import torch
from conftest import make_training_model, working_files
from safetensors import safe_open

from dreambooth.create import create_model
from dreambooth.train.loop import RunOptions, Trainer
from dreambooth.train.lora import LoraNetwork, LoraSettings
from dreambooth.train.models import load_models
from dreambooth.train.resume import latest_state


def test_merged_checkpoint_equals_base_plus_lora(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), images=1, epochs=2, method="lora", lora_rank=4,
                             lora_alpha=2.0, lora_conv_rank=2, lora_conv_alpha=1.0, learning_rate=5e-2,
                             text_encoder_ratio=1.0, save_checkpoint=True, lora_merge_export=True,
                             export_dtype="fp32")
    before = working_files(md)
    trainer = Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, lora_dir=tmp_path / "Lora",
                                     export_dir=tmp_path / "Stable-diffusion"))
    trainer.run()
    assert working_files(md) == before  # the base working weights are unchanged
    merged_file = tmp_path / "Stable-diffusion" / f"m_{trainer.total_steps}.safetensors"
    with safe_open(str(merged_file), "pt") as fh:
        assert fh.metadata()["dreambooth.trained"] == "lora (merged)"
    assert (tmp_path / "Lora" / f"m_{trainer.total_steps}.safetensors").is_file()  # the LoRA itself, as before

    # base + the trained LoRA (fp32, from the resume state) applied on the fly
    base = load_models(md.working, "sd1")
    network = LoraNetwork(base, LoraSettings(4, 2.0, conv_rank=2, conv_alpha=1.0), "sd1")
    network.load_kohya_state_dict(latest_state(md.checkpoints).weights["lora"])
    assert any(v.abs().max() > 0 for k, v in network.state_dict().items() if "lora_up" in k)  # it trained
    merged = load_models(create_model(merged_file, "merged", tmp_path / "merged").working, "sd1")

    ids = base.tokenizers[0](["a photo of zwx disc"], padding="max_length", max_length=77,
                             return_tensors="pt").input_ids
    torch.manual_seed(0)
    latents, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        hidden_base = base.text_encoders[0](ids)[0]
        hidden_merged = merged.text_encoders[0](ids)[0]
        assert (hidden_base - hidden_merged).abs().max() <= 1e-4  # the text encoder LoRA is merged too
        out_base = base.unet(latents, t, hidden_base).sample
        out_merged = merged.unet(latents, t, hidden_base).sample
        network.multiplier = 0.0
        out_plain = base.unet(latents, t, hidden_base).sample
    assert (out_base - out_merged).abs().max() <= 1e-4
    assert (out_base - out_plain).abs().max() > 1e-3  # the LoRA does change the output: the comparison means something


def test_no_merged_checkpoint_unless_asked(tmp_path, tiny_checkpoint):
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), images=1, epochs=1, method="lora", lora_rank=2,
                             save_checkpoint=True)
    Trainer(md, RunOptions(device="cpu", install_signal_handlers=False, lora_dir=tmp_path / "Lora",
                           export_dir=tmp_path / "Stable-diffusion")).run()
    assert not (tmp_path / "Stable-diffusion").exists() or not list((tmp_path / "Stable-diffusion").iterdir())
    assert list((tmp_path / "Lora").iterdir())
