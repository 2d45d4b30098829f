"""The settings file beside each video: how it is written (a mutation check found these unguarded: issue 26).
The plain write-and-read is in test_video.py, a failed write in test_blind_spots.py."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from framepack_ui.sidecar import write_sidecar


def test_each_file_is_written_to_a_hidden_temporary_beside_it_then_renamed(tmp_path, monkeypatch):
    """Beside it: a rename within one folder is atomic (a temporary in /tmp could sit on another file system);
    hidden and ending in .tmp: the gallery skips dot files, and a leftover after a crash says what it is."""
    image = tmp_path / "start.png"
    image.write_bytes(b"png bytes")
    video = tmp_path / "out" / "clip.mp4"
    video.parent.mkdir()
    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        renamed.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    write_sidecar(video, {"seed": 1}, image)
    assert [dst.name for _, dst in renamed] == ["clip.input.png", "clip.json"]  # the image first
    for src, dst in renamed:
        assert src.parent == dst.parent == video.parent
        assert src.name.startswith(f".{dst.name}.") and src.name.endswith(".tmp"), src.name


def test_a_failed_image_copy_leaves_no_temporary_and_no_settings(tmp_path, monkeypatch):
    image = tmp_path / "start.png"
    image.write_bytes(b"png bytes")
    video = tmp_path / "out" / "clip.mp4"
    video.parent.mkdir()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full_disk)
    with pytest.raises(OSError):
        write_sidecar(video, {"seed": 1}, image)
    assert list(video.parent.iterdir()) == []


def test_the_settings_are_pretty_utf8_json_with_paths_as_text(tmp_path):
    """Readable by a person (non-ASCII prompts as written, not \\u escapes) and by the gallery."""
    video = tmp_path / "clip.mp4"
    settings = {"prompt": "un café, 猫", "image": Path("/in/start.png"), "steps": 25}
    text = write_sidecar(video, settings, None).read_bytes().decode("utf-8")
    expected = {**settings, "image": str(Path("/in/start.png")), "input_image_file": None}
    assert text == json.dumps(expected, indent=2, ensure_ascii=False) + "\n"
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_sidecar(video, {"bad": object()}, None)
