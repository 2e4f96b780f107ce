"""Stand-in of modules/sd_models.py: the checkpoint list, the loaded model, unload/reload, list refresh."""

import os

from modules import paths_internal, shared


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.basename(filename)
        self.title = f"{self.name} [0123456789]"
        self.hash = self.sha256 = self.shorthash = "0123456789"
        self.metadata = {}


class ModelData:
    def __init__(self):
        self.sd_model = None  # None until a model is loaded

    def get_sd_model(self):
        return self.sd_model


class FakeModel:
    def __init__(self, info):
        self.sd_checkpoint_info = info
        self.device = "cuda"


checkpoints_list: dict[str, CheckpointInfo] = {}
model_data = ModelData()
calls: list[str] = []  # what the extension asked of the WebUI, in order


def list_models():
    calls.append("list_models")
    checkpoints_list.clear()
    folder = shared.cmd_opts.ckpt_dir or os.path.join(paths_internal.models_path, "Stable-diffusion")
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith((".safetensors", ".ckpt")):
                info = CheckpointInfo(os.path.join(folder, name))
                checkpoints_list[info.title] = info


def unload_model_weights(sd_model=None, info=None):
    calls.append("unload_model_weights")
    if model_data.sd_model is not None:
        model_data.sd_model.device = "cpu"


def reload_model_weights(sd_model=None, info=None):
    calls.append("reload_model_weights")
    if model_data.sd_model is not None:
        model_data.sd_model.device = "cuda"
