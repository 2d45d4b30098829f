"""Pure functions from worker events, job lists and gauges to what the page shows. No gradio, no I/O.

A page follows one job: `apply(view, event)` folds that job's events into a JobView (replaying a job from the
start gives the same view as having watched it live), and `changes(old, new)` says which outputs differ, so the
page is sent only what changed (a growing video is not re-sent at every sampler step).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..events import Failed, Finished, Notice, Phase, Progress, SectionSaved, Step, Stopped
from ..spec import FPS, FRAMES_PER_SECTION, JobSpec, frame_count, section_count
from ..units import GB
from ..worker.events import Queued

OUTPUTS = ("preview", "section_video", "progress", "final_video")  # the outputs a followed job drives
MAX_NOTES = 3
# The transformer's storage a page may ask for: (label, value); the value goes to the plan as its fp8 option
STORAGE_CHOICES = [("Automatic", "auto"), ("bf16 (as shipped)", "bf16"), ("fp8 (half the size)", "fp8")]
FP8_OPTION = {"auto": None, "bf16": False, "fp8": True}
PHASES = {  # engine phase names in words (anything else shows its own detail)
    "starting": "Starting the engine",
    "settings": "Preparing",
    "text": "Encoding the prompt",
    "image": "Encoding the start image",
    "transformer": "Loading the video model",
    "decode": "Decoding",
    "convert": "Converting the video model to fp8 (once)",
    "plan": "Planning where the models live",
    "download": "Downloading the models",
}


@dataclass(frozen=True)
class JobView:
    """What a page shows about the job it follows."""
    job_id: str | None = None
    status: str = "idle"  # idle, queued, running, finished, stopped, failed
    position: int | None = None  # place in the queue while queued
    phase: str = ""  # what the engine is doing, in words
    notes: tuple[str, ...] = ()  # Notice messages (newest last)
    step: Step | None = None  # the newest sampler step
    s_per_frame: float | None = None  # sampling seconds per output video frame
    elapsed_s: float | None = None
    preview: Any = None  # uint8 (H, W, 3) strip of the newest step's denoised frames
    section_video: str | None = None  # the MP4 so far (plays up to the newest finished section)
    sections_saved: int = 0  # bumps at every SectionSaved: the same path then holds a longer video
    frames_written: int = 0
    final_video: str | None = None
    result: str = ""  # one line once the job ended


def apply(view: JobView, event) -> JobView:
    """The view after one more event of the followed job."""
    if isinstance(event, Queued):
        return replace(view, status="queued", position=event.position)
    if isinstance(event, Phase):
        words = PHASES.get(event.name, event.name.capitalize())
        detail = event.detail if event.name == "settings" else ""  # the others' details repeat the words
        return replace(view, status="running", position=None, phase=f"{words}: {detail}" if detail else words)
    if isinstance(event, Progress):
        return replace(view, status="running", position=None, phase=progress_bar(event))
    if isinstance(event, Notice):
        return replace(view, notes=(*view.notes, event.message)[-MAX_NOTES:])
    if isinstance(event, Step):
        return replace(view, status="running", position=None, phase="Sampling", step=event,
                       elapsed_s=event.elapsed_s, s_per_frame=_s_per_frame(event) or view.s_per_frame,
                       preview=event.preview if event.preview is not None else view.preview)
    if isinstance(event, SectionSaved):
        return replace(view, section_video=event.path, sections_saved=view.sections_saved + 1,
                       frames_written=event.frames_written, elapsed_s=event.elapsed_s,
                       phase=f"section {event.section + 1} saved ({event.frames_written} frames on disk)")
    if isinstance(event, Finished):
        return replace(view, status="finished", final_video=event.path, elapsed_s=event.elapsed_s, phase="",
                       result=f"Done: {event.frames} frames in {event.elapsed_s:.1f} s, saved as "
                              f"{Path(event.path).name}")
    if isinstance(event, Stopped):
        kept = (f"kept {event.frames} frames in {Path(event.path).name}" if event.path
                else "no section was finished, nothing kept")
        return replace(view, status="stopped", final_video=event.path, phase="", position=None,
                       result=f"Stopped: {kept}")
    if isinstance(event, Failed):
        kept = f" (kept {Path(event.path).name})" if event.path else ""
        return replace(view, status="failed", final_video=event.path, phase="", position=None,
                       result=f"Failed: {event.message}{kept}")
    return view


def progress_bar(event: Progress, width: int = 20) -> str:
    """`Converting ...: [#######.............] 35 % of 13.2 GB, about 1 min 10 s left`: one line of text, so the
    page's progress line can show it on any screen."""
    fraction = event.done / event.total if event.total else 0.0
    filled = round(width * fraction)
    left = f", about {_duration(event.eta_s)} left" if event.eta_s is not None else ""
    return (f"{event.task[:1].upper()}{event.task[1:]}: [{'#' * filled}{'.' * (width - filled)}] "
            f"{100 * fraction:.0f} % of {event.total / GB:.1f} GB{left}")


def fold(events, view: JobView) -> JobView:
    for event in events:
        view = apply(view, event)
    return view


def _s_per_frame(step: Step) -> float | None:
    """Seconds of sampling per video frame, from the engine's ETA (its measured time per step)."""
    remaining = (step.sections - step.section) * step.steps - step.step
    if step.eta_s is None or remaining <= 0:
        return None
    return step.eta_s / remaining * step.steps / FRAMES_PER_SECTION


def progress_text(view: JobView) -> str:
    """One or two lines of Markdown: where the job is, elapsed, s/frame and ETA; or how it ended."""
    if view.status == "idle":
        return "No job yet: upload an image, write a prompt and press Generate."
    if view.status == "queued":
        return f"Job {view.job_id}: waiting in the queue (position {view.position})."
    parts = [f"Job {view.job_id}"]
    if view.result:
        parts.append(view.result)
    else:
        step = view.step
        if step is not None:
            parts.append(f"section {step.section + 1}/{step.sections}, step {step.step}/{step.steps}")
        if view.phase:
            parts.append(view.phase)
        if view.elapsed_s is not None:
            parts.append(f"elapsed {_duration(view.elapsed_s)}")
        if view.s_per_frame is not None:
            parts.append(f"{view.s_per_frame:.2f} s/frame")
        if step is not None and step.eta_s is not None:
            parts.append(f"ETA {_duration(step.eta_s)}")
    lines = [" · ".join(parts)]
    lines += [f"Note: {note}" for note in view.notes]
    return "  \n".join(lines)


def changes(old: JobView | None, new: JobView) -> dict[str, Any]:
    """The outputs (names in OUTPUTS) whose shown value differs between two views, with their new values."""
    out: dict[str, Any] = {}
    if old is None or old.job_id != new.job_id:  # a different job: every output starts over
        old = None
    if old is None or new.preview is not old.preview:
        out["preview"] = new.preview
    if old is None or (new.section_video, new.sections_saved) != (old.section_video, old.sections_saved):
        out["section_video"] = new.section_video
    if old is None or progress_text(new) != progress_text(old):
        out["progress"] = progress_text(new)
    if old is None or (new.final_video, new.status) != (old.final_video, old.status):
        out["final_video"] = new.final_video
    return out


def length_text(seconds: float | None) -> str:
    """'2 sections, 73 frames (2.4 s)': what a requested length becomes."""
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return "Length must be more than 0 s."
    sections = section_count(seconds)
    frames = frame_count(sections)
    return f"{sections} section{'s' if sections != 1 else ''}, {frames} frames ({frames / FPS:.1f} s at {FPS} fps)"


def spec_from_inputs(image: str | None, prompt: str, negative: str, seconds: float, seed: float, steps: float,
                     gs: float, cfg: float, rs: float, teacache: bool, teacache_threshold: float,
                     resolution: float, crf: float, sampler: str) -> JobSpec:
    """The form's values as a JobSpec; InputError (one line) for what the form itself cannot hold."""
    if not image:
        raise InputError("upload a start image first")
    numbers = dict(seconds=seconds, seed=seed, steps=steps, gs=gs, cfg=cfg, rs=rs,
                   teacache_threshold=teacache_threshold, resolution=resolution, crf=crf)
    for name, value in numbers.items():
        if value is None:
            raise InputError(f"{name} is empty")
    for name in ("seed", "steps", "resolution", "crf"):
        if numbers[name] != int(numbers[name]):
            raise InputError(f"{name} must be a whole number")
    return JobSpec(image=str(image), prompt=prompt or "", negative=negative or "", seconds=float(seconds),
                   seed=int(seed), steps=int(steps), gs=float(gs), cfg=float(cfg), rs=float(rs),
                   resolution=int(resolution), sampler=sampler, teacache=bool(teacache),
                   teacache_threshold=float(teacache_threshold), crf=int(crf))


def jobs_table(jobs) -> str:
    """The worker's jobs (JobInfo list) as a Markdown table, newest first."""
    if not jobs:
        return "No jobs yet."
    rows = ["| job | status | progress | file | prompt |", "|---|---|---|---|---|"]
    for job in reversed(jobs):
        rows.append(f"| {job.id} | {job.status} | {_job_progress(job)} | {Path(job.out_path).name} | "
                    f"{_cell(job.spec.prompt, 40)} |")
    return "\n".join(rows)


def _job_progress(job) -> str:
    if job.status == "queued":
        return f"position {job.position}"
    if job.status == "running":
        if job.step is None:
            return "starting"
        return f"section {job.step.section + 1}/{job.step.sections}, step {job.step.step}/{job.step.steps}"
    result = job.result
    if isinstance(result, Finished):
        return f"{result.frames} frames, {result.elapsed_s:.0f} s"
    if isinstance(result, Stopped):
        return f"kept {result.frames} frames"
    if isinstance(result, Failed):
        return _cell(result.message, 60)
    return ""


def gauges_text(g, warning: str | None = None) -> str:
    """The gauges panel (telemetry.Gauges) in Markdown: RAM, swap, commit, VRAM, GPU load, disk reads."""
    swap_name = "pagefile" if sys.platform == "win32" else "swap"
    lines = [
        f"**RAM** {_gb(g.ram_used_bytes)} / {_gb(g.ram_total_bytes)} GB · **app** {_gb(g.process_rss_bytes)} GB · "
        f"**{swap_name}** {_gb(g.swap_used_bytes)} / {_gb(g.swap_total_bytes)} GB · "
        f"**commit** {_gb(g.commit_used_bytes)} / {_gb(g.commit_limit_bytes)} GB",
    ]
    disk = f"{g.disk_read_mb_s:.0f} MB/s" if g.disk_read_mb_s is not None else "n/a"
    if g.gpu_available:
        torch_part = f" (PyTorch {_gb(g.torch_reserved_bytes)} GB)" if g.torch_reserved_bytes is not None else ""
        lines.append(f"**VRAM** {_gb(g.vram_used_bytes)} / {_gb(g.vram_total_bytes)} GB{torch_part} · "
                     f"**GPU** {g.gpu_util_pct:.0f}% · **disk read** {disk} · {g.gpu_note}")
    else:
        lines.append(f"**GPU**: {g.gpu_note} · **disk read** {disk}")
    if warning:
        lines.append(f"⚠ {warning}")
    return "  \n".join(lines)


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GB:.2f}"


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _cell(text: str, limit: int) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"



# --------------------------------------------------------------------------------------------- past outputs

FORM_KEYS = ("prompt", "negative", "seconds", "seed", "steps", "gs", "cfg", "rs", "teacache", "teacache_threshold",
             "resolution", "crf", "sampler")  # the sidecar keys "Use these settings" puts back in the form
ENDED = {"finished": "finished", "stopped": "stopped", "failed": "failed", "running": "running now",
         "interrupted": "interrupted (the app was closed mid-job)", "unknown": "no settings file"}


def gallery_status(entry) -> str:
    """How a past job ended, in words: 'finished, 73 frames', 'stopped, kept 37 frames', 'failed: ...'."""
    words = ENDED.get(entry.status, entry.status)
    if entry.status == "stopped":
        return f"stopped, kept {entry.frames or 0} frames" if entry.video else "stopped, nothing kept"
    if entry.status == "failed":
        kept = f" (kept {entry.frames} frames)" if entry.video and entry.frames else ""
        return f"failed: {_cell(entry.message, 80)}{kept}" if entry.message else f"failed{kept}"
    if entry.status == "finished" and entry.frames is not None:
        return f"finished, {entry.frames} frames"
    return words


def gallery_choices(entries) -> list[tuple[str, str]]:
    """(label, value) pairs for the gallery list, in the entries' order (newest first)."""
    return [(f"{e.name} · {gallery_status(e)} · {_cell(e.settings.get('prompt', ''), 50) or '(no prompt)'}", e.name)
            for e in entries]


def gallery_details(entry) -> str:
    """One past output's settings as Markdown: how it ended, then the settings a new job can reuse."""
    if entry is None:
        return "Select a past output to see its settings."
    s = entry.settings
    lines = [f"**{entry.name}**: {gallery_status(entry)}"]
    if not s:
        return lines[0] + "  \nNo settings file beside this video."
    size = f"{s['width']}x{s['height']}, " if "width" in s and "height" in s else ""
    sections = f"{s['sections']} sections, " if "sections" in s else ""
    lines.append(f"{size}{sections}seed {s.get('seed', '?')}")
    if entry.sections_saved:
        resume = " (Resume continues it)" if can_resume(entry) else ""
        lines.append(f"{entry.sections_saved} sections saved: branch from any of them, or extend it{resume}")
    rows = ["| setting | value |", "|---|---|"]
    rows += [f"| {key} | {_cell(s[key], 200)} |" for key in FORM_KEYS if key in s]
    if entry.image:
        rows.append(f"| start image | {Path(entry.image).name} |")
    return "  \n".join(lines) + "\n\n" + "\n".join(rows)


EXTEND_IMAGE_LABEL = ("Start image for Extend: anchors the new sections (empty: a past output's own start image, "
                      "or a video's first frame)")


def can_resume(entry) -> bool:
    """An output that stopped, failed or was interrupted before its planned length, with sections saved."""
    return entry is not None and entry.status in ("stopped", "failed", "interrupted") and entry.sections_saved > 0


def continued_spec(base: JobSpec, image: str | None, seconds: float | None = None) -> JobSpec:
    """The form's settings for a branch or an extension: its start image is the source's (or the one picked)."""
    return replace(base, image=image or "", **({"seconds": float(seconds)} if seconds else {}))


def form_values(settings: dict) -> dict[str, Any]:
    """The sidecar's settings that the form can hold, by FORM_KEYS name (others left out)."""
    return {key: settings[key] for key in FORM_KEYS if settings.get(key) is not None}


def models_notice_text(missing: str, need_bytes: int = 0, free_bytes: int | None = None) -> str:
    """The banner when model files are missing: which, where, how much to download and the room there is."""
    if not missing:
        return ""
    space = f"About {_gb(need_bytes)} GB to download" if need_bytes else "The download size is not known yet"
    if free_bytes is not None:
        space += f"; {_gb(free_bytes)} GB free on that disk" + (" (not enough)" if free_bytes < need_bytes else "")
    return f"**Model files are missing.** {missing}.  \n{space}. Press **Download models** to fetch them here."


def download_text(status) -> str:
    """The download's progress (worker.DownloadStatus) in one line."""
    if status.state == "failed":
        return f"Download failed: {status.message}"
    if status.state == "stopped":
        kept = f" at {100 * status.done_bytes / status.total_bytes:.0f}%" if status.total_bytes else ""
        return f"Download stopped{kept}: what it fetched is kept; press Download models to resume."
    if status.state == "done":
        return "Models downloaded."
    if status.state == "idle":
        return ""
    if not status.total_bytes:
        return "Download: asking the hub for the file sizes..."
    pct = 100 * status.done_bytes / status.total_bytes
    unit, scale = ("GB", GB) if status.total_bytes >= GB else ("MB", 1_000_000)
    return (f"Downloading: {pct:.0f}% ({status.done_bytes / scale:.2f} / {status.total_bytes / scale:.2f} {unit}), "
            f"now {status.file}")
