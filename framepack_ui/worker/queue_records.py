"""The web app's queue on disk, so that jobs queued but not started outlive the app (closed, crashed or killed).

A queued job's record is its settings file before the engine writes it: `clip.json` beside where `clip.mp4` will
be, with status "queued", the memory profile and plan options it was submitted with, and a copy of its start image
(`clip.input.png`: an upload in Gradio's cache may be gone after a restart). The engine replaces it with its own
settings file when the job starts ("running", then how it ended); a job dropped before it starts takes its record
with it. At startup the worker lists every record still "queued": those jobs come back waiting for the user.
Standard library only, like the sidecar it shares the file with.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..sidecar import sidecar_path, write_sidecar
from ..spec import Continuation, JobSpec

log = logging.getLogger(__name__)

QUEUED = "queued"  # the record's status until the engine starts the job


@dataclass(frozen=True)
class QueuedRecord:
    out_path: Path
    spec: JobSpec  # its image: the copy beside the record
    profile: str
    plan_options: dict
    submitted_at: float
    start: Continuation | None = None  # a branch or an extension: the output it continues


def write(out_path: Path, spec: JobSpec, profile: str, plan_options: dict, submitted_at: float,
          start: Continuation | None = None) -> None:
    """Record a job as queued (a branch or an extension with what it continues; a resume is not recorded: its
    record would replace its source's settings file, and the gallery offers the source's Resume after a restart).
    A record that cannot be written (a full disk) costs only the restart's memory of the job: logged, not raised."""
    if start is not None and start.kind == "resume":
        return
    continues = {} if start is None else {"continues": {"kind": start.kind, "video": start.video,
                                                        "from_section": start.from_section}}
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_sidecar(out_path, {**spec.settings(), "status": QUEUED, "profile": profile,
                                 "plan_options": plan_options, "submitted_at": submitted_at, **continues},
                      spec.image or None)
    except OSError:
        log.exception("recording the queued job %s failed: it will not come back after a restart", out_path.name)


def drop(out_path: Path) -> None:
    """Remove the record of a job that never started (its settings file only while it still says "queued", and
    the image copy made for it where no video was made)."""
    path = sidecar_path(out_path)
    record = _read(path)
    if record is None or record.get("status") != QUEUED:
        return
    image = record.get("input_image_file")
    try:
        path.unlink()
        if isinstance(image, str) and image and not out_path.exists():
            (out_path.parent / Path(image).name).unlink(missing_ok=True)
    except OSError:
        log.exception("dropping the record of %s failed", out_path.name)


def read_all(outputs_dir: Path) -> list[QueuedRecord]:
    """The jobs recorded as queued in `outputs_dir`, in the order they were submitted. A record whose settings are
    no longer valid (its image copy gone) is dropped with a log line: nothing could run it."""
    if not outputs_dir.is_dir():
        return []
    records = []
    for path in outputs_dir.glob("*.json"):
        record = _read(path)
        if record is None or record.get("status") != QUEUED:
            continue
        out_path = path.with_suffix(".mp4")
        image = record.get("input_image_file")
        try:
            start = _continuation(record.get("continues"))
            if isinstance(image, str) and image:
                spec = JobSpec.from_settings(record, image=str(outputs_dir / Path(image).name))
            elif start is not None:  # an extension of a video without a new start image, or a branch
                spec = JobSpec.from_settings(record, image="")
            else:
                raise InputError("no copy of the start image")
            spec = spec.validate(image_required=start is None)
        except (InputError, TypeError) as exc:
            log.warning("queued job %s cannot come back (%s): dropped", out_path.name, exc)
            drop(out_path)
            continue
        options = record.get("plan_options")
        records.append(QueuedRecord(out_path, spec, str(record.get("profile") or "auto"),
                                    options if isinstance(options, dict) else {},
                                    float(record.get("submitted_at") or path.stat().st_mtime), start))
    return sorted(records, key=lambda r: (r.submitted_at, r.out_path.name))


def _continuation(recorded) -> Continuation | None:
    """What a record says its job continues (None: a job from its image); InputError when that is gone."""
    if recorded is None:
        return None
    if not isinstance(recorded, dict):
        raise InputError("what it continues is not readable")
    return Continuation(str(recorded.get("kind")), str(recorded.get("video")), recorded.get("from_section")).validate()


def _read(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
