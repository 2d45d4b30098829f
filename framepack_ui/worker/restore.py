"""Settings back from a file: a past video (the settings in its MP4 metadata, engine/f1.py) or its settings JSON
(sidecar.py), and the copy of its start image where it was saved.

No torch: the MP4's metadata is read with PyAV. Whatever the file says is only a suggestion for the form: the
job it fills is validated as any other, and the start image is looked for only by its plain file name, in the
dropped file's folder and the outputs folder (a settings file cannot point the page at another file on disk).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..sidecar import METADATA_KEY

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class Restored:
    name: str  # the file the settings came from
    settings: dict
    image: str | None  # the start image's copy, where it was found


def settings_from_file(path: str | Path, folders: tuple[Path, ...] = ()) -> Restored:
    """The settings in a past video or settings file; InputError (one line) when it holds none. The start image
    is looked for in the file's own folder, then in `folders` (the outputs folder)."""
    path = Path(path)
    name = path.name
    suffix = path.suffix.lower()
    if suffix == ".json":
        settings = _from_json(path)
    elif suffix in VIDEO_SUFFIXES:
        settings = _from_video(path)
    else:
        raise InputError(f"{name} is neither a video (.mp4) nor a settings file (.json) of this app")
    if not isinstance(settings, dict) or not isinstance(settings.get("prompt"), str):
        raise InputError(f"{name} holds no FramePack settings (only videos made by this app carry them)")
    return Restored(name, settings, start_image(settings, (path.parent, *folders)))


def start_image(settings: dict, folders) -> str | None:
    """The copy of the start image named by `settings` (a plain file name), in the first folder that has it."""
    image = settings.get("input_image_file")
    if not isinstance(image, str) or not image or Path(image).name != image or "\\" in image:
        return None
    if Path(image).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    for folder in folders:
        candidate = Path(folder) / image
        if candidate.is_file():
            return str(candidate.resolve())
    return None


def _from_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise InputError(f"{path.name} is not a readable settings file (JSON)") from None


def _from_video(path: Path):
    import av  # PyAV, not torch: the page can read a dropped video

    try:
        with av.open(str(path)) as container:
            text = dict(container.metadata).get(METADATA_KEY)
    except (av.error.FFmpegError, OSError) as exc:
        log.info("could not read %s: %s", path, exc)
        raise InputError(f"{path.name} is not a readable video") from None
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None
