"""Stand-in of modules/shared.py: cmd_opts, opts with add_option/OptionInfo (modules/options.py), the progress
state, and the ``sd_model`` property."""

import argparse
import sys
import types

from modules import options

OptionInfo = options.OptionInfo
Options = options.Options
options_section = options.options_section


class State:
    """The WebUI's progress state (modules/shared_state.py of v1.10.1).

    It belongs to whatever the WebUI runs: a txt2img calls ``begin(job=<task id>)``, sets ``job_count``,
    ``sampling_steps`` and ``sampling_step`` as it goes, and ``end()`` when done; ``job == ""`` and ``job_count == 0``
    mean the WebUI is idle.
    """

    def __init__(self):
        self.job = ""
        self.job_count = 0
        self.job_no = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.interrupted = False
        self.skipped = False
        self.current_image = None
        self.time_start = None

    def begin(self, job="(unknown)"):
        import time

        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.job_no = 0
        self.current_image = None
        self.skipped = False
        self.interrupted = False
        self.textinfo = None
        self.job = job

    def end(self):
        import time

        time.time() - self.time_start  # the real end() fails like this when begin() was never called
        self.job = ""
        self.job_count = 0


cmd_opts = argparse.Namespace(xformers=False, opt_sdp_attention=False, opt_sdp_no_mem_attention=False, medvram=False,
                              lowvram=False, api_auth=None, ckpt_dir=None, lora_dir=None, embeddings_dir=None,
                              hypernetwork_dir=None,
                              data_dir=None, nowebui=False)
opts = Options()
state = State()
hypernetworks: dict[str, str] = {}


def reload_hypernetworks():
    """The WebUI's list of hypernetworks: every .pt under the hypernetworks folder, by file stem."""
    import os
    from pathlib import Path

    from modules import paths_internal

    global hypernetworks
    folder = Path(cmd_opts.hypernetwork_dir or os.path.join(paths_internal.models_path, "hypernetworks"))
    hypernetworks = {p.stem: str(p) for p in sorted(folder.rglob("*.pt"))}


class _Shared(types.ModuleType):
    """As the WebUI's modules.shared: ``sd_model`` is a property that loads the selected model on first access."""

    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()


sys.modules[__name__].__class__ = _Shared
