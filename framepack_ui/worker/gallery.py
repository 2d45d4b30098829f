"""Past outputs: the videos in the outputs folder with their settings sidecars, newest first.

Reads files only (json, no torch): the sidecar of `clip.mp4` is `clip.json` (`framepack_ui.sidecar.sidecar_path`)
and its `input_image_file` names the copy of the start image beside it. The sidecar's `status` says how the job
ended ("finished", "stopped", "failed"); one left at "running" by a job that is no longer running (the app was
closed mid-job) is shown as "interrupted".
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..sidecar import sidecar_path, state_path
from .restore import start_image

log = logging.getLogger(__name__)

MAX_ENTRIES = 200  # the newest; older files stay on disk, only the list is cut


@dataclass(frozen=True)
class PastOutput:
    name: str  # the video's file name, e.g. 20260101_120000_42.mp4 (the key the UI selects by)
    video: str | None  # absolute path of the video; None when no section was ever written
    settings: dict = field(default_factory=dict)  # the sidecar JSON ({} when there is none or it is unreadable)
    image: str | None = None  # the copy of the start image, if it is there
    status: str = "unknown"  # finished, stopped, failed, running, interrupted, unknown (no settings file)
    message: str = ""  # why a failed job failed
    frames: int | None = None
    mtime: float = 0.0
    sections_saved: int = 0  # sections in its saved state (engine/state.py): resume, branch and extend read them


def past_outputs(outputs_dir: Path, running: set[str] = frozenset(), limit: int = MAX_ENTRIES) -> list[PastOutput]:
    """Every video (and every settings file of a job that left no video) in `outputs_dir`, newest first.

    `running`: absolute paths of the videos being written now (their sidecar's "running" is true).
    """
    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        return []
    stems: dict[str, float] = {}
    for path in outputs_dir.iterdir():
        if path.suffix.lower() not in (".mp4", ".json") or ".input" in path.suffixes or path.name.startswith("."):
            continue
        try:
            mtime = path.stat().st_mtime
        except OSError:
            continue
        stems[path.stem] = max(stems.get(path.stem, 0.0), mtime)
    newest = sorted(stems, key=lambda s: (stems[s], s), reverse=True)
    entries = (_entry(outputs_dir, stem, stems[stem], running) for stem in newest)
    # a job not started yet has only its record (queue_records.py): it is listed with the jobs, not here
    return list(itertools.islice((entry for entry in entries if entry.status != "queued"), limit))


def _entry(outputs_dir: Path, stem: str, mtime: float, running: set[str]) -> PastOutput:
    video = outputs_dir / f"{stem}.mp4"
    sidecar = outputs_dir / f"{stem}.json"
    settings: dict = {}
    if sidecar.is_file():
        try:
            settings = json.loads(sidecar.read_text(encoding="utf-8"))
            if not isinstance(settings, dict):
                settings = {}
        except (OSError, ValueError):
            log.warning("unreadable settings file %s", sidecar)
    status = str(settings.get("status", "unknown")) if settings else "unknown"
    if status == "running" and str(video.resolve()) not in running:
        status = "interrupted"
    image = start_image(settings, (outputs_dir,))  # as settings from a dropped file find it
    has_video = video.is_file() and video.stat().st_size > 0
    frames = settings.get("frames")
    return PastOutput(video.name, str(video.resolve()) if has_video else None, settings, image, status,
                      str(settings.get("message", "")), frames if isinstance(frames, int) else None, mtime,
                      _sections_saved(video))


def _sections_saved(video: Path) -> int:
    """Sections listed in the video's state.json (0 without one); the engine checks the files when it reads them."""
    try:
        manifest = json.loads((state_path(video) / "state.json").read_text(encoding="utf-8"))
        return len(manifest["sections"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def remove_output(outputs_dir: Path, name: str) -> list[str]:
    """Delete the video `name` of `outputs_dir` with its settings file, start-image copy, section state and a
    resume's unfinished file; returns the names removed."""
    video = Path(outputs_dir) / Path(name).name
    removed = []
    beside = [video, sidecar_path(video), *video.parent.glob(f"{video.stem}.input.*"),
              *video.parent.glob(f".{video.stem}.resume-*.mp4")]
    for path in beside:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
    state = state_path(video)
    if state.is_dir():
        shutil.rmtree(state)
        removed.append(state.name)
    return removed


def listing_signature(outputs_dir: Path) -> tuple:
    """Changes whenever a video or settings file is added, removed or rewritten: cheap (no file is read)."""
    try:
        with os.scandir(outputs_dir) as entries:
            return tuple(sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size) for e in entries
                                if e.name.endswith((".mp4", ".json")) and not e.name.startswith(".")))
    except OSError:
        return ()
