from pathlib import Path

import pytest

from mpsclip.io import atomic_write


def test_atomic_write_takes_text_bytes_or_a_writer(tmp_path: Path) -> None:
    assert atomic_write(tmp_path / "a" / "t.txt", "héllo\n").read_text(encoding="utf-8") == "héllo\n"
    assert atomic_write(tmp_path / "b.bin", b"\x00\x01").read_bytes() == b"\x00\x01"
    assert atomic_write(tmp_path / "c.txt", lambda tmp: tmp.write_text("made by a writer")).read_text() == (
        "made by a writer"
    )
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["b.bin", "c.txt", "t.txt"]


def test_failed_write_keeps_old_content_and_removes_the_temp_file(tmp_path: Path) -> None:
    target = atomic_write(tmp_path / "out.json", "old\n")

    def half_write(tmp: Path) -> None:
        assert tmp.parent == tmp_path  # temp file beside the target, so the rename stays on one filesystem
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_write)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]
