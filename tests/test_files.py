"""One atomic-write helper for every multi-file result: all or nothing, never a `.tmp-*` left behind."""

import pytest

from flowerdist.files import atomic_dir, atomic_symlink, atomic_write_text


def test_complete_block_renames_into_place(tmp_path):
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("a")
        assert not (tmp_path / "out").exists()  # invisible until complete
    assert (tmp_path / "out" / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_inside_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("decoding failed")
    assert list(tmp_path.iterdir()) == []


def test_existing_result_is_kept_unless_replace(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(OSError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(tmp_path / "out", exist_ok=True) as tmp:  # someone else's identical result wins
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    with atomic_dir(tmp_path / "out", replace=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_symlink_is_replaced_in_one_step(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    atomic_symlink(tmp_path / "last", "a")
    atomic_symlink(tmp_path / "last", "b")
    assert (tmp_path / "last").resolve() == (tmp_path / "b").resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "last"]


def test_a_failed_small_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    atomic_write_text(path, "old")

    def killed(self, target):  # the new text is written, then the process dies before it takes the old one's place
        raise OSError("killed")

    monkeypatch.setattr(type(path), "replace", killed)
    with pytest.raises(OSError, match="killed"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["run.json"]
