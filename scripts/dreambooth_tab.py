"""WebUI entry: loads the core under a private module name and registers with the WebUI. Nothing else.

The WebUI imports every ``scripts/*.py`` with the extension folder on ``sys.path``; another extension (the old
DreamBooth extension) also ships a top-level ``dreambooth`` package. So we never ``import dreambooth`` here: the
package is loaded from this extension's own folder under ``CORE_ALIAS``, whatever the folder is named, and all
imports inside it are relative.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

CORE_ALIAS = "sd_webui_dreambooth_trainer"
EXTENSION_DIR = Path(__file__).resolve().parent.parent


def load_core():
    """Import ``<extension>/dreambooth`` as ``CORE_ALIAS`` (once)."""
    if CORE_ALIAS in sys.modules:
        return sys.modules[CORE_ALIAS]
    package_dir = EXTENSION_DIR / "dreambooth"
    spec = importlib.util.spec_from_file_location(CORE_ALIAS, package_dir / "__init__.py",
                                                  submodule_search_locations=[str(package_dir)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[CORE_ALIAS] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[CORE_ALIAS]
        raise
    return module


load_core()
importlib.import_module(f"{CORE_ALIAS}.host.webui").register()
