"""Output folders are written whole or not at all (tfmq.folders, used by tfmq.save and the ONNX export)."""

import pytest

from tfmq.folders import refuse_nonempty, written_whole


def test_written_whole_replaces_only_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="midway"):
        with written_whole(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("midway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]           # no partial folder left
    assert [p.name for p in out.iterdir()] == ["old.txt"]                   # the old folder untouched
    with written_whole(out) as tmp:
        assert tmp.name == "out.tfmq-partial"
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuse_nonempty(tmp_path):
    refuse_nonempty(tmp_path / "missing", overwrite=False)
    (tmp_path / "empty").mkdir()
    refuse_nonempty(tmp_path / "empty", overwrite=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        refuse_nonempty(tmp_path / "file", overwrite=False)
    with pytest.raises(FileExistsError, match="allow overwriting"):
        refuse_nonempty(tmp_path, overwrite=False)
    refuse_nonempty(tmp_path, overwrite=True)
