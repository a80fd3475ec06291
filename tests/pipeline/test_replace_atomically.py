"""replace_atomically: a file or a folder appears whole or not at all."""

import pytest

from masklab.pipeline import replace_atomically


def write_folder(files):
    def write(tmp):
        tmp.mkdir()
        for name, text in files.items():
            (tmp / name).write_text(text)

    return write


def test_a_folder_replaces_a_folder_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "ckpt"
    replace_atomically(write_folder({"a": "old", "b": "old"}), target)
    replace_atomically(write_folder({"a": "new"}), target)
    assert {p.name: p.read_text() for p in target.iterdir()} == {"a": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_folder_write_keeps_the_old_folder_and_leaves_no_partial_one(tmp_path):
    target = tmp_path / "ckpt"
    replace_atomically(write_folder({"a": "old"}), target)

    def fail(tmp):
        write_folder({"a": "half"})(tmp)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_atomically(fail, target)
    assert (target / "a").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("keep")

    def fail(tmp):
        tmp.write_text("partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        replace_atomically(fail, target)
    assert target.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
