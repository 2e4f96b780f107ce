"""Stand-in of modules/paths_internal.py; the test points data_path somewhere temporary via WEBUI_STANDIN_DATA."""

import os

script_path = os.environ.get("WEBUI_STANDIN_ROOT", os.getcwd())
data_path = os.environ.get("WEBUI_STANDIN_DATA", script_path)
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
