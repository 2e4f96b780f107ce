"""The training lock and the worker jobs: start returns at once, status follows the worker, crashes are reported."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import make_training_model

from dreambooth import jobs, lock, platform_compat
from dreambooth.config import Concept, TrainConfig
from dreambooth.demo import make_concept_images
from dreambooth.errors import ConfigError, UserError
from dreambooth.run_states import ACTIVE_STATES, STATES
from dreambooth.store import ModelDir, model_dir
from dreambooth.ui import output


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, **content) -> Path:
    path = folder / lock.LOCK_FILE
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def fake_model(root: Path, name: str = "m", concepts: bool = True) -> ModelDir:
    """A model dir with a valid config and concept (no weights: the stand-in workers below never load any)."""
    md = model_dir(name, root)
    md.working.mkdir(parents=True)
    cfg = TrainConfig(model_name=name)
    if concepts:
        if not (root / "images").is_dir():
            make_concept_images(root / "images", count=1)
        cfg.concepts = [Concept(instance_data_dir=str(root / "images"), instance_prompt="a photo of zwx")]
    cfg.save(md.path)
    return md


@pytest.fixture()
def stand_in(monkeypatch):
    """Replace the worker by a small Python script (its source is given per test)."""

    def use(script: str) -> None:
        def command(model, **kwargs):
            return [sys.executable, "-c", textwrap.dedent(script)]

        monkeypatch.setattr(jobs, "worker_command", command)

    return use


# ---------------------------------------------------------------------------------------------------------------
# lock


def test_acquire_writes_pid_time_and_host_and_release_removes_it(tmp_path):
    held = lock.acquire(tmp_path)
    data = json.loads((tmp_path / "train.lock").read_text())
    assert data["pid"] == os.getpid() and data["host"] and abs(data["started_at"] - time.time()) < 60
    assert lock.holder(tmp_path)["pid"] == os.getpid()
    held.release()
    assert not (tmp_path / "train.lock").exists() and lock.holder(tmp_path) is None


def test_a_live_holder_is_refused_and_the_context_manager_releases(tmp_path):
    with lock.acquire(tmp_path):
        with pytest.raises(lock.Locked, match=rf"is already training \(pid {os.getpid()}\)") as info:
            lock.acquire(tmp_path)
        assert info.value.hint and info.value.holder["pid"] == os.getpid()
    assert lock.holder(tmp_path) is None
    lock.acquire(tmp_path).release()


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, started_at=time.time() - 100, host=lock.socket.gethostname())
    assert lock.holder(tmp_path) is None
    with caplog.at_level(logging.WARNING):
        held = lock.acquire(tmp_path)
    assert held.pid == os.getpid() and json.loads((tmp_path / "train.lock").read_text())["pid"] == os.getpid()
    assert any("stale" in r.getMessage() and str(pid) in r.getMessage() for r in caplog.records)
    held.release()


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe", b'{"pid": "12"}', b"[1, 2]", b'{"pid": true}'])
def test_unreadable_lock_is_taken_over(tmp_path, caplog, content):
    path = tmp_path / "train.lock"
    path.write_bytes(content)
    old = time.time() - 60
    os.utime(path, (old, old))  # not one being written this very moment
    assert lock.holder(tmp_path) is None
    with caplog.at_level(logging.WARNING):
        lock.acquire(tmp_path).release()
    assert any("unreadable" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_reused_pid_and_zombie_count_as_dead(tmp_path):
    write_lock(tmp_path, pid=os.getpid(), started_at=0, host=lock.socket.gethostname(),
               start_ticks=platform_compat.process_start_ticks(os.getpid()) - 1)
    assert lock.holder(tmp_path) is None  # our pid, but the lock's process started at another time
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=proc.pid, started_at=0, host=lock.socket.gethostname(),
                   start_ticks=platform_compat.process_start_ticks(proc.pid))
        assert lock.holder(tmp_path)["pid"] == proc.pid
        proc.kill()
        deadline = time.time() + 10
        while not platform_compat.is_zombie(proc.pid) and time.time() < deadline:
            time.sleep(0.01)
        assert lock.holder(tmp_path) is None  # exited but not reaped: os.kill(pid, 0) alone would say alive
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_another_machine_counts_as_held(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), started_at=0, host="some-other-machine")
    with pytest.raises(lock.Locked, match="on some-other-machine"):
        lock.acquire(tmp_path)


def test_token_hands_the_lock_to_the_worker_and_release_spares_a_foreign_lock(tmp_path, monkeypatch):
    launcher = lock.acquire(tmp_path)
    monkeypatch.setenv(lock.TOKEN_ENV, launcher.token)
    worker = lock.acquire(tmp_path)  # a live holder, but it carries the token this process was given
    assert worker.token == launcher.token
    monkeypatch.delenv(lock.TOKEN_ENV)
    with pytest.raises(lock.Locked):
        lock.acquire(tmp_path)
    worker.release()
    other = lock.acquire(tmp_path)
    assert other.token != launcher.token
    launcher.release()  # not ours any more: left alone
    assert lock.holder(tmp_path)["token"] == other.token
    other.release()


def test_only_one_of_many_simultaneous_acquires_wins(tmp_path):
    results: list[object] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        try:
            results.append(lock.acquire(tmp_path))
        except lock.Locked as err:
            results.append(err)

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if isinstance(r, lock.Lock)]
    assert len(won) == 1 and len(results) == 8
    won[0].release()


# ---------------------------------------------------------------------------------------------------------------
# jobs with stand-in workers


def test_bad_config_is_refused_before_any_process_starts(tmp_path, stand_in):
    stand_in("raise SystemExit(0)")
    md = fake_model(tmp_path, concepts=False)
    with pytest.raises(ConfigError, match="no concepts"):
        jobs.start(md, models_root=tmp_path)
    md.config_path.write_text('{"learning_rate": "fast"}')
    with pytest.raises(ConfigError, match="learning_rate"):
        jobs.start(md, models_root=tmp_path)
    with pytest.raises(UserError, match="attention default 'fast'"):
        jobs.start(fake_model(tmp_path, "n"), models_root=tmp_path, attention_default="fast")
    assert not md.status_path.exists() and not (md.logs / "worker.log").exists()
    assert not (md.path / "train.lock").exists()


def test_a_crashing_worker_is_reported_failed_with_the_log_tail(tmp_path, stand_in):
    stand_in("""
        import sys, time
        time.sleep(0.5)
        print("loading weights")
        print("Traceback (most recent call last):", file=sys.stderr)
        print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", file=sys.stderr)
        sys.exit(1)
    """)
    md = fake_model(tmp_path)
    t0 = time.monotonic()
    pid = jobs.start(md, models_root=tmp_path)
    assert time.monotonic() - t0 < 5
    first = jobs.status(md)
    assert first["state"] == "starting" and first["running"] and first["pid"] == pid
    assert json.loads(md.status_path.read_text())["state"] == "starting"
    final = jobs.wait(md, timeout=30)
    assert final["state"] == "failed" and not final["running"]
    assert "exit code 1" in final["message"] and "worker.log" in final["message"]
    assert "CUDA out of memory" in final["log_tail"] and "loading weights" in final["log_tail"]
    assert not jobs.running(md) and lock.holder(md.path) is None
    # the next start is allowed (the crashed worker's lock is stale) and appends to the log
    stand_in("print('second run')")
    jobs.start(md, models_root=tmp_path)
    jobs.wait(md, timeout=30)
    text = (md.logs / "worker.log").read_text()
    assert "CUDA out of memory" in text and "second run" in text


def test_second_start_is_refused_while_running_and_cancel_ends_a_starting_worker(tmp_path, stand_in):
    stand_in("import time; time.sleep(60)")
    md = fake_model(tmp_path)
    pid = jobs.start(md, models_root=tmp_path)
    assert jobs.running(md) and lock.holder(md.path)["pid"] == pid
    with pytest.raises(jobs.AlreadyRunning, match=f"pid {pid}"):
        jobs.start(md, models_root=tmp_path)
    jobs.pause(md)
    assert (md.path / "pause.request").exists()
    jobs.unpause(md)
    assert not (md.path / "pause.request").exists()
    jobs.cancel(md)  # still "starting": the request file and SIGTERM
    final = jobs.wait(md, timeout=30)
    assert final["state"] == "cancelled" and not final["running"]
    for control in (jobs.cancel, jobs.pause, jobs.unpause):
        with pytest.raises(jobs.NotRunning, match="not training"):
            control(md)


def test_worker_runs_this_copy_of_the_package_in_its_own_session(tmp_path, monkeypatch):
    md = fake_model(tmp_path)
    script = ("import os, sys, json, dreambooth; print(json.dumps({'file': dreambooth.__file__, 'cwd': os.getcwd(), "
              "'sid': os.getsid(0), 'token': os.environ.get('DREAMBOOTH_LOCK_TOKEN')}))")
    monkeypatch.setattr(jobs, "worker_command", lambda model, **kw: [sys.executable, "-c", script])
    monkeypatch.setenv("PYTHONSAFEPATH", "1")
    pid = jobs.start(md, models_root=tmp_path)
    jobs.wait(md, timeout=30)
    line = (md.logs / "worker.log").read_text().strip().splitlines()[-1]
    seen = json.loads(line)
    package = Path(jobs.__file__).resolve().parent
    assert Path(seen["file"]).resolve() == package / "__init__.py" and Path(seen["cwd"]) == package.parent
    assert seen["sid"] == pid and seen["sid"] != os.getsid(0)
    assert seen["token"] == json.loads((md.path / "train.lock").read_text())["token"]


def test_a_trainer_run_without_the_lock_counts_by_the_pid_in_its_status(tmp_path, stand_in):
    stand_in("raise SystemExit(0)")
    md = fake_model(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        time.sleep(0.2)
        md.status_path.write_text(json.dumps({"state": "running", "pid": proc.pid, "started_at": time.time()}))
        assert jobs.running(md) and jobs.status(md)["state"] == "running"
        with pytest.raises(jobs.AlreadyRunning, match=f"pid {proc.pid}"):
            jobs.start(md, models_root=tmp_path)
        assert not (md.path / "train.lock").exists()
        jobs.cancel(md)
        assert (md.path / "cancel.request").exists() and proc.poll() is None  # a request, no signal: it is running
        (md.path / "cancel.request").unlink()
        if platform_compat.process_started_at(proc.pid) is not None:  # the pid: a process younger than the run
            md.status_path.write_text(json.dumps({"state": "running", "pid": proc.pid, "started_at": 1000.0}))
            assert not jobs.running(md)
    finally:
        proc.kill()
        proc.wait()
    md.status_path.write_text(json.dumps({"state": "paused", "pid": proc.pid, "started_at": time.time()}))
    assert not jobs.running(md) and jobs.status(md)["state"] == "failed"


@pytest.mark.parametrize("state", ACTIVE_STATES)
def test_a_run_in_any_active_state_counts_as_running_and_as_failed_once_its_process_is_gone(tmp_path, state):
    md = fake_model(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        md.status_path.write_text(json.dumps({"state": state, "pid": proc.pid, "started_at": time.time() - 1}))
        assert jobs.running(md) and jobs.status(md)["state"] == state
        assert output.status_html(jobs.status(md), True, "m").count(state.replace("_", " ")) >= 1
    finally:
        proc.kill()
        proc.wait()
    gone = jobs.status(md)
    assert not gone["running"] and gone["state"] == "failed" and f"while {state}" in gone["message"], gone
    assert "stopped" in output.status_html(json.loads(md.status_path.read_text()), False, "m")


def test_every_state_the_code_writes_is_one_declared_in_run_states():
    package = Path(jobs.__file__).resolve().parent
    written: set[str] = set()
    for path in package.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        written |= set(re.findall(r"""\bstate=["']([a-z_]+)["']""", text))
        written |= set(re.findall(r"""["']state["']\s*:\s*["']([a-z_]+)["']""", text))
        if path.name != "run_states.py":
            assert not re.search(r"^(ACTIVE|FINAL)_STATES\s*=", text, re.M), f"{path} declares its own list"
    assert {"caching", "sampling", "running", "done"} <= written
    assert written - {"idle", "stopped"} <= set(STATES), written - set(STATES)


def test_command_line_of_the_real_worker(tmp_path):
    md = fake_model(tmp_path)
    cmd = jobs.worker_command(md, models_root=tmp_path, resume=True, device="cpu", export_dir=tmp_path / "out",
                              attention_default="xformers")
    assert cmd[:5] == [sys.executable, "-m", "dreambooth", "train", "m"]
    assert cmd[5:] == ["--models-root", str(tmp_path), "--resume", "--device", "cpu", "--export-dir",
                       str(tmp_path / "out"), "--attention-default", "xformers"]
    from dreambooth.cli import build_parser

    args = build_parser().parse_args(cmd[3:])
    assert (args.name, args.resume, args.device, args.attention_default) == ("m", True, "cpu", "xformers")


# ---------------------------------------------------------------------------------------------------------------
# a real worker


def test_real_worker_trains_to_done_while_the_caller_goes_on(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the worker is a new process: conftest's thread setting stays here
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1)
    t0 = time.monotonic()
    pid = jobs.start(md, models_root=tmp_path, device="cpu", export_dir=tmp_path / "exports",
                     attention_default="default")
    assert time.monotonic() - t0 < 5
    assert jobs.status(md)["state"] == "starting" and jobs.running(md)
    final = jobs.wait(md, timeout=300)
    assert final["state"] == "done", final
    assert final["pid"] == pid and final["step"] == final["total_steps"] == 4 and final["attention"] == "default"
    assert not final["running"] and lock.holder(md.path) is None and jobs.exit_code(pid, wait=30) == 0
    assert "training m" in (md.logs / "worker.log").read_text()


def test_a_pause_sent_while_the_worker_starts_holds_it_before_its_first_step(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    md = make_training_model(tmp_path, tiny_checkpoint("sd1"), epochs=1)
    (md.path / "cancel.request").touch()  # left by an earlier run: must not cancel this one
    jobs.start(md, models_root=tmp_path, device="cpu", attention_default="default")
    jobs.pause(md)  # at once: the worker is still starting its Python
    deadline = time.monotonic() + 300
    while (jobs.status(md).get("state") != "paused" or not jobs.running(md)) and time.monotonic() < deadline:
        assert jobs.status(md).get("state") in jobs.ACTIVE_STATES, jobs.status(md)
        time.sleep(0.1)
    paused = jobs.status(md)
    assert paused["state"] == "paused" and paused["step"] == 0, paused
    assert (md.logs / "loss.csv").read_text().splitlines()[1:] == []  # no step was trained or logged
    jobs.cancel(md)
    final = jobs.wait(md, timeout=120)
    assert final["state"] == "cancelled" and final["step"] == 0, final
    assert not (md.path / "pause.request").exists() and not (md.path / "cancel.request").exists()


def test_controls_keep_requests_made_for_this_run_and_drop_an_earlier_runs(tmp_path):
    from dreambooth.train.status import Controls, request_cancel, request_pause

    md = fake_model(tmp_path)
    request_pause(md)
    request_cancel(md)
    launched = Controls(md, install_signal_handlers=False, clear_requests=False)  # a worker jobs.start launched
    assert launched.pause_requested and launched.cancel_requested
    launched.close()  # the run is over: its requests go with it
    assert not (md.path / "pause.request").exists() and not (md.path / "cancel.request").exists()
    request_pause(md)
    direct = Controls(md, install_signal_handlers=False)  # a trainer run directly: nobody cleared before it
    assert not direct.pause_requested and not direct.cancel_requested
    direct.close()


def test_the_worker_knows_it_was_launched_by_the_lock_it_took_over(tmp_path, monkeypatch):
    launcher = lock.acquire(tmp_path)
    assert not launcher.handed_over
    monkeypatch.setenv(lock.TOKEN_ENV, launcher.token)
    worker = lock.acquire(tmp_path)
    assert worker.handed_over
    worker.release()
