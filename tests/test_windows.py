"""Windows: the WebUI entry, the tab, the API, the jobs and the worker load with the Unix-only modules missing and the
platform reported as Windows; an import failure reaches the tab with its real cause; and the calls that differ on
Windows (is-it-alive, cancel, renames onto open files, device names) take their Windows path."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_jobs import fake_model

from dreambooth import jobs, platform_compat
from dreambooth.errors import StoreError, UserError
from dreambooth.store import validate_name
from dreambooth.train import status as st

ROOT = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).resolve().parent / "webui_standin"
UNIX_ONLY = ("resource", "fcntl", "termios", "pwd", "grp", "pty", "tty", "syslog", "crypt", "spwd", "posix")

# Run in a fresh interpreter. Third-party libraries and the standard modules that choose their Windows half at import
# time (asyncio, subprocess) load first with the real platform: they are not under test, and their Windows halves need
# Windows' own C modules. To load every library the worker uses, the worker's modules are imported once under their
# plain name `dreambooth` (a separate copy, never used again). Then the Unix-only modules become unimportable and the
# platform says Windows, and only then is our code run again, through the WebUI entry script as the WebUI does (under
# its private name, so every module of ours executes anew). os.name stays "posix": pathlib picks Windows paths by it,
# and those cannot be used on Linux.
WINDOWS_SCRIPT = """
import importlib, importlib.util, json, logging, platform, sys, traceback
from pathlib import Path
sys.path.insert(0, STANDIN)
sys.path.insert(0, EXT)
import asyncio, subprocess, signal, ctypes, fastapi  # noqa
import dreambooth.api, dreambooth.cli, dreambooth.train.loop, dreambooth.ui.tab  # noqa: the libraries they use
import dreambooth.ui.compat
dreambooth.ui.compat.gradio()  # gradio as our tab imports it (with its huggingface_hub shim under gradio 4)
for name in [n for n in sys.modules if n == "dreambooth" or n.startswith("dreambooth.")]:
    del sys.modules[name]
for name in UNIX_ONLY:
    sys.modules[name] = None  # `import resource` now raises ModuleNotFoundError, as on Windows
sys.platform = "win32"
platform.system = lambda: "Windows"
logging.basicConfig(level=logging.ERROR, format="%(message)s", stream=sys.stdout)

result = {}
spec = importlib.util.spec_from_file_location("dreambooth_tab", EXT + "/scripts/dreambooth_tab.py")
entry = importlib.util.module_from_spec(spec)
spec.loader.exec_module(entry)
core = entry.CORE_ALIAS
from modules import script_callbacks
script_callbacks.ui_settings_callback()

app = fastapi.FastAPI()
try:
    for callback in script_callbacks.callbacks_app_started:
        callback(None, app)
except Exception as err:
    result["api_error"] = f"{type(err).__name__}: {err}"
result["api_routes"] = sorted(r.path for r in app.routes if r.path.startswith("/dreambooth"))
result["tabs"] = [title for callback in script_callbacks.callbacks_ui_tabs for _, title, _ in callback()]

webui = sys.modules[core + ".host.webui"]
handlers = importlib.import_module(core + ".ui.handlers").TabHandlers(webui.host())
try:
    handlers.cancel("m")
except Exception as err:
    result["tab_cancel"] = f"{type(err).__name__}: {err}"

try:
    jobs = importlib.import_module(core + ".jobs")
    store = importlib.import_module(core + ".store")
    pc = importlib.import_module(core + ".platform_compat")
    model = store.model_dir("m", MODELS)
    result["worker_command"] = jobs.worker_command(model, models_root=Path(MODELS), resume=True, device="cuda",
                                                   export_dir=Path(MODELS), attention_default="sdp")
    result["popen"] = pc.new_process_group()
    result["cancel_signals"] = [int(s) for s in pc.cancel_signals()]
    result["graceful_sigterm"] = pc.signals_stop_gracefully()
    for name in ("cli", "train.loop"):  # the worker: `python -m dreambooth train ...` runs cli, which runs the loop
        importlib.import_module(core + "." + name)
    result["worker_imports"] = True
except Exception:
    result["jobs_error"] = traceback.format_exc()
result["blocked"] = [name for name in UNIX_ONLY if sys.modules.get(name, "gone") is None]
print("RESULT " + json.dumps(result))
"""


def install_extension(tmp_path: Path) -> Path:
    ext = tmp_path / "extensions" / "sd-webui-dreambooth"
    shutil.copytree(ROOT / "dreambooth", ext / "dreambooth", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "scripts", ext / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    return ext


def run_as_windows(tmp_path: Path, ext: Path) -> tuple[dict, str]:
    models = tmp_path / "models"  # the stand-in WebUI's models path: our models root
    if not (models / "dreambooth" / "m").exists():
        fake_model(models)
    header = "".join(f"{name} = {value!r}\n" for name, value in (
        ("STANDIN", str(STANDIN)), ("EXT", str(ext)), ("MODELS", str(models)), ("UNIX_ONLY", UNIX_ONLY)))
    env = {**os.environ, "WEBUI_STANDIN_DATA": str(tmp_path), "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", header + textwrap.dedent(WINDOWS_SCRIPT)], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(lines[-1][len("RESULT "):]), proc.stdout


def test_entry_tab_api_jobs_and_worker_load_on_windows(tmp_path):
    result, _ = run_as_windows(tmp_path, install_extension(tmp_path))
    assert result["blocked"] == list(UNIX_ONLY)  # still unimportable at the end: nothing put them back
    assert "api_error" not in result and "jobs_error" not in result, result
    assert "/dreambooth/models" in result["api_routes"] and any("cancel" in p for p in result["api_routes"])
    assert result["tabs"] == ["Dreambooth"]
    assert result["tab_cancel"] == "UserError: no training of m is running (there is nothing to cancel)"
    cmd = result["worker_command"]
    assert cmd[1:5] == ["-m", "dreambooth", "train", "m"] and "--resume" in cmd and cmd[cmd.index("--device") + 1] == \
        "cuda"
    # a new process group the Windows way (start_new_session is POSIX-only), and no SIGTERM as a polite request
    assert result["popen"] == {"creationflags": 0x200} and result["graceful_sigterm"] is False
    assert int(signal.SIGTERM) in result["cancel_signals"] and int(signal.SIGINT) in result["cancel_signals"]
    assert result["worker_imports"] is True


def test_an_import_failure_reaches_the_tab_and_the_log_with_its_real_cause(tmp_path):
    """The bug this guards against: train/status.py imported `resource`; on Windows the API never registered and the
    tab said "dreambooth/jobs.py is missing". Put that import back into a copy and look at what the user sees."""
    ext = install_extension(tmp_path)
    status_py = ext / "dreambooth" / "train" / "status.py"
    text = status_py.read_text()
    status_py.write_text(text.replace("import json\n", "import json\nimport resource  # noqa\n", 1))
    line = text[:text.index("import json\n")].count("\n") + 2
    result, stdout = run_as_windows(tmp_path, ext)
    cause = f"ModuleNotFoundError: import of resource halted; None in sys.modules (at dreambooth/train/status.py, " \
            f"line {line})"
    assert cause in result["tab_cancel"] and "jobs.py is missing" not in result["tab_cancel"]
    assert result["tab_cancel"].startswith("UserError: training is not available: importing the jobs module failed")
    assert f"the HTTP API is not available: {cause}" in stdout and result["api_routes"] == []


# ---------------------------------------------------------------------------------------------------------------
# the Windows branches, one by one, in this process


@pytest.fixture()
def as_windows(monkeypatch):
    monkeypatch.setattr(sys, "platform", "win32")


def test_is_alive_never_signals_on_windows(as_windows, monkeypatch):
    def no_kill(pid, sig):
        raise AssertionError(f"os.kill({pid}, {sig}) would terminate the process on Windows")

    monkeypatch.setattr(os, "kill", no_kill)
    asked = []
    monkeypatch.setattr(platform_compat, "_windows_pid_alive", lambda pid: asked.append(pid) or True)
    monkeypatch.setattr(platform_compat, "_windows_creation_time", lambda pid: 133_000_000_000_000_000)
    assert platform_compat.pid_alive(4242) and asked == [4242]
    assert abs(platform_compat.process_started_at(4242) - (133_000_000_000_000_000 / 1e7 - 11_644_473_600)) < 1e-3
    assert platform_compat.new_process_group() == {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP
                                                   if hasattr(subprocess, "CREATE_NEW_PROCESS_GROUP") else 0x200}


def test_the_worker_starts_in_a_new_process_group_the_windows_way(tmp_path, monkeypatch, as_windows):
    started = []

    class Popen:
        pid = 999_999

        def __init__(self, cmd, **kwargs):
            started.append(kwargs)

        def poll(self):
            return 0

    monkeypatch.setattr(jobs.subprocess, "Popen", Popen)
    jobs.start(fake_model(tmp_path), models_root=tmp_path)
    assert started[0]["creationflags"] == 0x200 and "start_new_session" not in started[0]  # POSIX-only argument


def _windows_cancel(monkeypatch, after: float) -> list[int]:
    """jobs.cancel as on Windows (SIGTERM would kill): returns the pids it ended."""
    monkeypatch.setattr(platform_compat, "signals_stop_gracefully", lambda: False)
    monkeypatch.setattr(jobs, "CANCEL_KILL_AFTER_S", after)
    monkeypatch.setattr(jobs, "_signal", lambda pid, sig: pytest.fail(f"signal {sig} sent to {pid}"))
    ended: list[int] = []
    real_kill = platform_compat.kill
    monkeypatch.setattr(platform_compat, "kill", lambda pid: (ended.append(pid), real_kill(pid)))
    return ended


def test_windows_cancel_of_a_starting_worker_asks_first_and_ends_it_only_after_a_timeout(tmp_path, monkeypatch,
                                                                                        stand_in):
    ended = _windows_cancel(monkeypatch, after=1.0)
    stand_in("import time; time.sleep(60)")  # a worker that never gets to its first step
    md = fake_model(tmp_path)
    pid = jobs.start(md, models_root=tmp_path)
    jobs.cancel(md)
    assert (md.path / st.CANCEL_FILE).exists() and ended == [] and jobs.running(md)  # asked, not killed
    final = jobs.wait(md, timeout=30)
    assert ended == [pid] and final["state"] == "cancelled" and not final["running"]


def test_windows_cancel_lets_a_worker_that_began_stop_by_itself(tmp_path, monkeypatch, stand_in):
    ended = _windows_cancel(monkeypatch, after=1.0)
    md = fake_model(tmp_path)
    stand_in(f"""
        import json, os, time
        from pathlib import Path
        model = Path({str(md.path)!r})
        status = model / "status.json"
        while json.loads(status.read_text()).get("pid") is None:  # jobs.start writes it once Popen returned
            time.sleep(0.05)
        while not (model / "cancel.request").exists():
            time.sleep(0.05)
        time.sleep(0.3)  # jobs.cancel marks the starting status right after the request
        status.write_text(json.dumps({{"state": "running", "pid": os.getpid(), "started_at": time.time()}}))
        time.sleep(2.0)  # a save on cancel: longer than the timeout, and no kill may cut it off
        status.write_text(json.dumps({{"state": "cancelled", "pid": os.getpid(), "started_at": time.time()}}))
    """)
    pid = jobs.start(md, models_root=tmp_path)
    jobs.cancel(md)
    final = jobs.wait(md, timeout=30)
    assert final["state"] == "cancelled" and ended == [], final
    assert jobs.exit_code(pid, wait=10) == 0, (md.logs / "worker.log").read_text()  # it ended by itself


@pytest.fixture()
def stand_in(monkeypatch):
    def use(script: str) -> None:
        monkeypatch.setattr(jobs, "worker_command", lambda model, **kw: [sys.executable, "-c", textwrap.dedent(script)])

    return use


def test_renames_onto_an_open_file_are_retried_on_windows(tmp_path, monkeypatch, as_windows):
    real_replace = os.replace
    failures = [PermissionError(13, "Access is denied")] * 3

    def replace(src, dst):
        if failures:
            raise failures.pop()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    (tmp_path / "a").write_text("new")
    platform_compat.replace(tmp_path / "a", tmp_path / "b")  # the tab had status.json open three times in a row
    assert (tmp_path / "b").read_text() == "new" and failures == []

    monkeypatch.setattr(platform_compat, "SHARING_RETRY_SECONDS", 0.3)
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(PermissionError(13, "denied", dst)))
    start = time.monotonic()
    with pytest.raises(PermissionError, match="another program keeps it open"):
        platform_compat.replace(tmp_path / "a", tmp_path / "b")
    assert time.monotonic() - start >= 0.3


def test_a_permission_error_is_not_retried_elsewhere(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "replace", lambda src, dst: calls.append(1) or (_ for _ in ()).throw(PermissionError()))
    with pytest.raises(PermissionError):
        platform_compat.replace(tmp_path / "a", tmp_path / "b")
    assert calls == [1]  # on Linux it means no permission: retrying changes nothing


def test_status_read_while_the_worker_replaces_it_is_retried_on_windows(tmp_path, monkeypatch, as_windows):
    md = fake_model(tmp_path)
    md.status_path.write_text('{"state": "running"}')
    real = Path.read_bytes
    failures = [PermissionError(13, "The process cannot access the file")] * 2

    def read_bytes(self):
        if self == md.status_path and failures:
            raise failures.pop()
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert st.read_status(md) == {"state": "running"} and failures == []


@pytest.mark.parametrize("name", ["con", "NUL.txt", "com1", "lpt9.old", "Aux"])
def test_windows_device_names_are_refused_as_model_names_and_embedding_words(name):
    from dreambooth.train.embedding import EmbeddingSettings

    with pytest.raises(StoreError, match="reserved device name on Windows"):
        validate_name(name)
    word = name.strip().lower()
    with pytest.raises(UserError, match="device name on Windows"):
        EmbeddingSettings(token=word)
    EmbeddingSettings(token=f"my{word}")  # a longer word is fine
