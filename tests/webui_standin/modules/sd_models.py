"""Stand-in of modules/sd_models.py: the checkpoint list, the loaded model, unload/reload, list refresh.

As in v1.10.1: ``unload_model_weights()`` moves the model to the CPU (``send_model_to_cpu``);
``reload_model_weights()`` returns at once when the selected checkpoint is the one loaded, so it does NOT bring an
unloaded model back; ``send_model_to_device(model)`` does (the WebUI's own "reload checkpoint" action).
"""

import hashlib
import os

from modules import paths_internal, shared


def checkpoint_folder():
    return shared.cmd_opts.ckpt_dir or os.path.join(paths_internal.models_path, "Stable-diffusion")


class CheckpointInfo:
    """As v1.10.1's: ``name`` is the path inside the checkpoint folder; ``title`` is ``name [shorthash]`` once the
    file's sha256 is known (hashed when first loaded, then cached across starts), else just ``name``."""

    def __init__(self, filename):
        self.filename = filename
        self.name = os.path.relpath(filename, checkpoint_folder()).replace(os.sep, "/")
        if self.name.startswith(".."):
            self.name = os.path.basename(filename)
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(self.name.replace("/", "_"))[0]
        self.hash = "01234567"
        self.sha256 = sha256_cache.get(filename)
        self.shorthash = self.sha256[:10] if self.sha256 else None
        self.title = f"{self.name} [{self.shorthash}]" if self.shorthash else self.name
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]" if self.shorthash else self.name_for_extra
        self.metadata = {}

    @property
    def ids(self):
        ids = [self.model_name, self.title, self.name, self.name_for_extra]
        if self.shorthash:
            ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]", self.short_title]
        return ids

    def register(self):
        checkpoints_list[self.title] = self
        for alias in self.ids:
            checkpoint_aliases[alias] = self

    def calculate_shorthash(self):
        """Hash the file (the WebUI does when it loads it) and re-register under the title with the hash."""
        with open(self.filename, "rb") as fh:
            self.sha256 = sha256_cache[self.filename] = hashlib.sha256(fh.read()).hexdigest()
        checkpoints_list.pop(self.title, None)
        self.shorthash = self.sha256[:10]
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        self.register()
        return self.shorthash


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


checkpoints_list: dict[str, CheckpointInfo] = {}  # title -> info, what the WebUI's checkpoint dropdown shows
checkpoint_aliases: dict[str, CheckpointInfo] = {}  # title, name, hash, ... -> info
sha256_cache: dict[str, str] = {}  # file -> sha256, the WebUI's cache.json
model_data = ModelData()
calls: list[str] = []  # what the extension asked of the WebUI, in order


def list_models():
    """The WebUI calls this once at start, before extensions load, and again from its refresh button."""
    calls.append("list_models")
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    folder = checkpoint_folder()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            if name.endswith((".safetensors", ".ckpt")):
                CheckpointInfo(os.path.join(root, name)).register()


def select_checkpoint():
    """The checkpoint chosen in the settings, else the first listed one."""
    info = checkpoint_aliases.get(shared.opts.data.get("sd_model_checkpoint"))
    if info is None and checkpoints_list:
        info = next(iter(checkpoints_list.values()))
    return info


def load_model(checkpoint_info=None):
    calls.append("load_model")
    info = checkpoint_info or select_checkpoint()
    info.calculate_shorthash()
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
