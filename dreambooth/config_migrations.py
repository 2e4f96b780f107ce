"""Keys and values of older configs (ours before v1, or the old DreamBooth extension's) and what they are now;
``config_load.config_from_dict`` applies them when it reads a config."""

from __future__ import annotations

# key in an older config (ours before v1, or the old DreamBooth extension's) -> key now
RENAMED_KEYS = {
    "num_train_epochs": "epochs",
    "epoch_pause_frequency": "pause_every_n_epochs",
    "epoch_pause_time": "pause_seconds",
    "save_embedding_every": "save_every_n_epochs",
    "save_preview_every": "preview_every_n_epochs",
    "stop_text_encoder": "text_encoder_ratio",
    "learning_rate_txt": "text_encoder_learning_rate",
    "half_model": "export_dtype",
    "use_8bit_adam": "optimizer",
    "src": "source_checkpoint",
    "model_type": "family",
}
CONCEPT_RENAMED_KEYS = {
    "save_sample_prompt": "sample_prompt",
    "save_sample_negative_prompt": "sample_negative_prompt",
    "save_sample_template": "sample_template_file",
    "n_save_sample": "n_samples",
    "save_guidance_scale": "sample_guidance_scale",
    "save_infer_steps": "sample_steps",
    "num_repeats": "repeats",
}
# settings taken out -> why (an old config that has one still loads: the value is dropped with a note)
REMOVED_KEYS = {
    "pin_memory": "removed: it changed nothing measurable (a batch is cached latents already on the GPU; a pinned "
                  "copy used at once overlaps nothing)",
}
VALUE_MIGRATIONS = {
    # old key -> function(old value) giving the new key's value
    "half_model": lambda v: "fp16" if v else "fp32",
    "use_8bit_adam": lambda v: "adamw_8bit" if v else "adamw",
}
