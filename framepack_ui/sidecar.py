"""The settings file beside each video (`clip.mp4` -> `clip.json`) and the copy of its input image.

Standard library only, so the worker and the gallery can write and read it without importing torch or PyAV.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping


METADATA_KEY = "framepack_settings"  # the MP4 metadata tag that holds the same settings as JSON


def sidecar_path(video_path: str | os.PathLike[str]) -> Path:
    """Where a video's settings JSON lives: beside it, same stem (`clip.mp4` -> `clip.json`)."""
    return Path(video_path).with_suffix(".json")


def state_path(video_path: str | os.PathLike[str]) -> Path:
    """Where a video's saved section state lives (engine/state.py): beside it, `clip.mp4` -> `clip.state/`."""
    return Path(video_path).with_suffix(".state")


def input_copy_name(video_path: str | os.PathLike[str], image_path: str | os.PathLike[str] | None) -> str | None:
    """The file name of the start image's copy beside the video (`clip.mp4`, `me.PNG` -> `clip.input.png`)."""
    if image_path is None:
        return None
    return f"{Path(video_path).stem}.input{Path(image_path).suffix.lower()}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_sidecar(
    video_path: str | os.PathLike[str],
    settings: Mapping[str, Any],
    image_path: str | os.PathLike[str] | None,
) -> Path:
    """Write `<video stem>.json` (pretty, atomically) and copy the input image to `<video stem>.input<ext>`.

    The JSON gets the settings plus `input_image_file`: the copy's file name (relative to the video's folder),
    or None without an image. The image is copied first, so a JSON on disk never names a missing file.
    Returns the JSON path.
    """
    video_path = Path(video_path)
    json_path = sidecar_path(video_path)
    record = dict(settings)
    image_name = None
    if image_path is not None:
        src = Path(image_path)
        dest = video_path.with_name(input_copy_name(video_path, src))
        if not (dest.exists() and os.path.samefile(src, dest)):
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            try:
                shutil.copyfile(src, tmp)
                os.replace(tmp, dest)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
        image_name = dest.name
    record["input_image_file"] = image_name
    text = json.dumps(record, indent=2, ensure_ascii=False, default=_json_default) + "\n"
    atomic_write_bytes(json_path, text.encode("utf-8"))
    return json_path
