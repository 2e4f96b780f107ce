"""Stand-in of modules/sd_models.py: the checkpoint list, the loaded model, unload/reload, list refresh.

As in v1.10.1: ``unload_model_weights()`` moves the model to the CPU (``send_model_to_cpu``);
``reload_model_weights()`` returns at once when the selected checkpoint is the one loaded, so it does NOT bring an
unloaded model back; ``send_model_to_device(model)`` does (the WebUI's own "reload checkpoint" action).
"""

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
        """As the WebUI's: the first access loads the selected checkpoint."""
        if self.sd_model is None:
            load_model()
        return self.sd_model


class FakeModel:
    def __init__(self, info):
        self.sd_checkpoint_info = info
        self.sd_model_checkpoint = info.filename
        self.device = "cuda"
        self.lowvram = False


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


def select_checkpoint():
    """The checkpoint chosen in the settings, else the first listed one."""
    info = checkpoints_list.get(shared.opts.data.get("sd_model_checkpoint"))
    if info is None and checkpoints_list:
        info = next(iter(checkpoints_list.values()))
    return info


def load_model(checkpoint_info=None):
    calls.append("load_model")
    info = checkpoint_info or select_checkpoint()
    model_data.sd_model = FakeModel(info)
    shared.opts.data["sd_model_checkpoint"] = info.title
    return model_data.sd_model


def _to_cpu(model):
    model.device = "cpu"


def _to_device(model):
    model.device = "cuda"


def send_model_to_cpu(m):
    calls.append("send_model_to_cpu")
    if m is not None:
        _to_cpu(m)


def send_model_to_device(m):
    calls.append("send_model_to_device")
    _to_device(m)


def unload_model_weights(sd_model=None, info=None):
    """As v1.10.1: send_model_to_cpu(sd_model or shared.sd_model)."""
    calls.append("unload_model_weights")
    _to_cpu(sd_model or shared.sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """As v1.10.1: nothing happens (the model stays where it is) when the checkpoint is the one loaded."""
    calls.append("reload_model_weights")
    checkpoint_info = info or select_checkpoint()
    sd_model = sd_model or model_data.sd_model
    if sd_model is None:
        return load_model(checkpoint_info)
    if sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
        return sd_model
    sd_model.sd_checkpoint_info, sd_model.sd_model_checkpoint = checkpoint_info, checkpoint_info.filename
    _to_device(sd_model)
    return sd_model
