"""The WebUI entry loads our core under a private name, whatever the extension folder is called, without
colliding with another extension's top-level ``dreambooth`` package, and without importing torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "webui_standin"


def _install_extension(tmp_path: Path, folder_name: str) -> Path:
    ext = tmp_path / "extensions" / folder_name
    shutil.copytree(ROOT / "dreambooth", ext / "dreambooth", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "scripts", ext / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    return ext


def test_entry_loads_beside_another_dreambooth_package(tmp_path):
    ext = _install_extension(tmp_path, "some folder-name")
    # the old DreamBooth extension: another top-level package called `dreambooth`, imported first
    other = tmp_path / "extensions" / "sd_dreambooth_extension"
    (other / "dreambooth").mkdir(parents=True)
    (other / "dreambooth" / "__init__.py").write_text("OWNER = 'old extension'\n")
    code = textwrap.dedent(f"""
        import importlib.util, json, sys, time
        sys.path[:0] = [{str(STANDIN)!r}, {str(other)!r}]
        import dreambooth as other
        sys.path.insert(0, {str(ext)!r})  # the WebUI puts the extension dir on sys.path while importing scripts
        start = time.perf_counter()
        spec = importlib.util.spec_from_file_location("dreambooth_tab", {str(ext / "scripts" / "dreambooth_tab.py")!r})
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        elapsed = time.perf_counter() - start
        from modules import script_callbacks, shared
        script_callbacks.ui_settings_callback()
        core = sys.modules[module.CORE_ALIAS]
        print(json.dumps({{
            "other_owner": sys.modules["dreambooth"].OWNER,
            "core_file": core.__file__,
            "settings": sorted(shared.opts.data_labels),
            "torch_imported": "torch" in sys.modules,
            "seconds": elapsed,
        }}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["other_owner"] == "old extension"
    assert Path(result["core_file"]).parent == ext / "dreambooth"
    assert "dreambooth_models_root" in result["settings"]
    assert result["torch_imported"] is False


def test_core_never_imports_itself_by_name_or_the_webui():
    for path in (ROOT / "dreambooth").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for line in text.splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("import dreambooth", "from dreambooth")), f"{path}: {line}"
            if "host" not in path.relative_to(ROOT / "dreambooth").parts:
                assert not stripped.startswith(("import modules", "from modules")), f"{path}: {line}"
