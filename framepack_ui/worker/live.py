"""The growing section video, under a new name per section, without copying it.

The engine appends each section to one MP4 in the outputs folder. A browser reloads a video only when its URL
changes, and Gradio copies every file it is handed into its cache (a whole copy of the video so far at every
section: quadratic for a long video). So each section gets a hard link, `outputs/.live/<stem>.s<N>.mp4`, to the
same file: a new URL, no bytes copied. The UI serves `.live` as a static path (Gradio serves it in place). The
link of the section before stays, for a browser still reading it; every other link is removed.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

LIVE_DIR = ".live"  # under the outputs folder; the gallery skips dot names


def live_dir(outputs_dir: Path) -> Path:
    return Path(outputs_dir) / LIVE_DIR


def clear_live(outputs_dir: Path) -> None:
    """Drop links left by an earlier run (they only ever name a running job's video)."""
    shutil.rmtree(live_dir(outputs_dir), ignore_errors=True)


def section_link(video: str | Path, sections: int, outputs_dir: Path) -> str:
    """A path to `video` that is new for each `sections` count: a hard link in `.live`, or `video` itself
    where the disk cannot link (FAT, another drive); Gradio then copies it, as it would anyway."""
    video = Path(video)
    folder = live_dir(outputs_dir)
    link = folder / f"{video.stem}.s{sections}{video.suffix}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.link(video, link)
    except OSError as exc:
        log.warning("serving %s by copy: cannot link it (%s)", video.name, exc)
        return str(video)
    _drop_older(folder, video, sections)
    return str(link)


def _drop_older(folder: Path, video: Path, sections: int) -> None:
    """Keep this video's links of this section and the one before; drop the rest (other videos' too: one job
    runs at a time, and a link would keep a video's bytes on disk after the user deleted it)."""
    keep = {f"{video.stem}.s{n}{video.suffix}" for n in (sections, sections - 1)}
    for old in folder.iterdir():
        if old.name not in keep:
            try:
                old.unlink()
            except OSError:  # Windows: a browser may still be reading it; cleared at the next start
                pass
