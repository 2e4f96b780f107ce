"""Atomic writes: a failure mid-write leaves the old file intact and no temporary file behind."""

from __future__ import annotations

import pytest

from dreambooth.atomic import atomic_dir, clean_stale_temps, write_json, write_text, write_with


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.json"
    write_json(target, {"v": 1})

    def half_then_fail(tmp):
        tmp.write_text('{"v": 2, "trunc')
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_with(target, half_then_fail)
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_atomic_dir_is_all_or_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "a").write_text("x")
    assert (tmp_path / "d" / "a").read_text() == "x"


def test_clean_stale_temps(tmp_path):
    write_text(tmp_path / "keep.txt", "ok")
    (tmp_path / ".keep.txt.tmp-abc").write_text("partial")
    (tmp_path / ".model.tmp-xyz").mkdir()
    removed = clean_stale_temps(tmp_path)
    assert sorted(p.name for p in removed) == [".keep.txt.tmp-abc", ".model.tmp-xyz"]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
