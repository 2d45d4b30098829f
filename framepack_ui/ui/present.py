"""Pure functions from worker events, job lists and gauges to what the page shows. No gradio, no I/O.

A page follows one job: `apply(view, event)` folds that job's events into a JobView (replaying a job from the
start gives the same view as having watched it live), and `changes(old, new)` says which outputs differ, so the
page is sent only what changed (a growing video is not re-sent at every sampler step).
"""
from __future__ import annotations

import html
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..events import Failed, Finished, Notice, Phase, Progress, SectionSaved, Step, Stopped
from ..prompts import SECTION_S, format_timed, parse_timed, schedule, section_prompts
from ..spec import FPS, FRAMES_PER_SECTION, JobSpec, LoraChoice, frame_count, section_count
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
    "prompts": "Prompts over time",
    "text": "Encoding the prompt",
    "image": "Encoding the start image",
    "transformer": "Loading the video model",
    "sampling": "Sampling",
    "decode": "Decoding",
    "writing": "Writing the video",
    "convert": "Converting the video model to fp8 (once)",
    "plan": "Planning where the models live",
    "download": "Downloading the models",
    "lora": "Reading the LoRAs",
}
LORA_SLOTS = 4  # LoRA pickers on the page, each with its strength
NO_LORA = ("(none)", "")  # the picker's empty choice: (label, value)


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
                     resolution: float, crf: float, sampler: str, prompt_blend_sections: float = 0) -> JobSpec:
    """The form's values as a JobSpec; InputError (one line) for what the form itself cannot hold."""
    if not image:
        raise InputError("upload a start image first")
    numbers = dict(seconds=seconds, seed=seed, steps=steps, gs=gs, cfg=cfg, rs=rs,
                   teacache_threshold=teacache_threshold, resolution=resolution, crf=crf,
                   prompt_blend_sections=prompt_blend_sections)
    for name, value in numbers.items():
        if value is None:
            raise InputError(f"{name} is empty")
    for name in ("seed", "steps", "resolution", "crf", "prompt_blend_sections"):
        if numbers[name] != int(numbers[name]):
            raise InputError(f"{name} must be a whole number")
    return JobSpec(image=str(image), prompt=prompt or "", negative=negative or "", seconds=float(seconds),
                   seed=int(seed), steps=int(steps), gs=float(gs), cfg=float(cfg), rs=float(rs),
                   resolution=int(resolution), sampler=sampler, teacache=bool(teacache),
                   teacache_threshold=float(teacache_threshold), crf=int(crf),
                   prompt_blend_sections=int(prompt_blend_sections))


def lora_choices(names: list, strengths: list, folder: Path) -> tuple[LoraChoice, ...]:
    """The LoRA pickers' values (file names in `folder`, "" or None for none) and strengths as the job's choices;
    InputError (one line) for a strength the form left empty."""
    choices = []
    for name, strength in zip(names, strengths):
        if not name:
            continue
        if strength is None:
            raise InputError(f"LoRA {name}: strength is empty")
        choices.append(LoraChoice(str(Path(folder) / name), strength))
    return tuple(choices)


def lora_form_values(settings: dict, available: list[str], slots: int = LORA_SLOTS) -> tuple[list, list, list[str]]:
    """What "Use these settings" puts in the LoRA pickers: (names, strengths) for every slot ("" and 1 for the
    empty ones), and the recorded LoRAs it cannot (not in the LoRA folder, or beyond the pickers)."""
    names, strengths, missing = [], [], []
    for entry in settings.get("loras") or []:
        name = Path(str(entry.get("path", ""))).name if isinstance(entry, dict) else ""
        if name in available and len(names) < slots:
            names.append(name)
            strengths.append(entry.get("strength", 1.0))
        elif name:
            missing.append(name)
    pad = slots - len(names)
    return names + [NO_LORA[1]] * pad, strengths + [1.0] * pad, missing


def loras_text(settings: dict) -> str:
    """'a.safetensors x0.8, b.safetensors x1': the LoRAs a job recorded ("" for none)."""
    return ", ".join(f"{Path(str(e.get('path', ''))).name} x{e.get('strength', 1.0):g}"
                     for e in settings.get("loras") or [] if isinstance(e, dict))


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
    if job.status == "waiting":
        return "queued before the app closed: start or drop it (buttons below)"
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
    if len(g.gpus) > 1:  # a pool's GPUs, one line each
        lines += [f"**GPU {gpu.index}** {gpu.util_pct:.0f}% · **VRAM** {_gb(gpu.vram_used_bytes)} / "
                  f"{_gb(gpu.vram_total_bytes)} GB · {gpu.name}" for gpu in g.gpus]
        lines.append(f"**disk read** {disk}")
    elif g.gpu_available:
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
             "resolution", "crf", "sampler", "prompt_blend_sections")  # the sidecar keys put back in the form
# ...then these, from the settings' memory record and the prompt (restored_form)
RESTORED_EXTRAS = ("profile", "storage", "prompt_rows")
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
    if loras_text(s):
        rows.append(f"| LoRA | {_cell(loras_text(s), 200)} |")
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


def restored_form(settings: dict, profiles) -> dict[str, Any]:
    """Every form value a past job's settings give back (FORM_KEYS, then RESTORED_EXTRAS): the memory profile
    where the page offers it, the storage the job asked for, the timeline editor's rows for its prompt. Values a
    file does not hold are left out (the form keeps its own)."""
    values = form_values(settings)
    memory = settings.get("memory") if isinstance(settings.get("memory"), dict) else {}
    if memory.get("profile") in profiles:
        values["profile"] = memory["profile"]
    if memory.get("storage_asked") in FP8_OPTION:
        values["storage"] = memory["storage_asked"]
    rows = prompt_rows(values["prompt"]) if isinstance(values.get("prompt"), str) else None
    if rows is not None:
        values["prompt_rows"] = rows
    return values


def restored_note(name: str, settings: dict, image: str | None) -> str:
    """One line: whose settings the form now holds, and whether the start image came back."""
    changes = len(settings.get("prompt_changes") or []) or len(prompt_rows(str(settings.get("prompt", ""))) or [])
    prompts = f"{changes} prompts over time, " if changes > 1 else ""
    found = (f"start image {Path(image).name}" if image else
             "its start image was not found beside it or in the outputs folder: upload it again")
    return f"Settings of **{_cell(name, 80)}** restored: {prompts}seed {settings.get('seed', '?')}; {found}."


# ---------------------------------------------------------------------------------------- prompts over time

PROMPT_COLUMNS = ["time (s)", "prompt"]
# one colour per prompt span on the timeline (cycled)
SPAN_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2")


def prompt_rows(prompt: str) -> list[list[str]] | None:
    """The timeline editor's rows ([time, prompt] per change; one row at 0 for a plain prompt) for the prompt
    text; None while the text does not parse (the editor keeps its rows, the timeline says what is wrong)."""
    try:
        pairs = parse_timed(prompt or "")
    except InputError:
        return None
    return [[f"{seconds:g}", text] for seconds, text in pairs]


def prompt_from_rows(rows) -> str:
    """The prompt text for the editor's rows, blank rows left out (prompts.format_timed)."""
    kept = []
    for row in rows or []:
        cells = [("" if cell is None else str(cell)) for cell in list(row)[:2]] + ["", ""]
        if cells[0].strip() or cells[1].strip():
            kept.append((cells[0], cells[1]))
    return format_timed(kept)


def timeline_html(prompt: str, seconds: float | None, blend_sections: float | None = 0) -> str:
    """Under the length slider: the video's sections as a bar, each coloured by its prompt (blended ones as a
    gradient), a mark where each prompt starts, and a line per prompt saying where its change lands; or, for a
    prompt that cannot run, the one line Generate would refuse it with."""
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return ""
    sections = section_count(seconds)
    try:
        changes = schedule(prompt or "", sections)
        plan = section_prompts(changes, sections, int(blend_sections or 0))
    except InputError as exc:
        cells = "".join(f'<span style="flex:1" title="section {i + 1}">{i + 1}</span>' for i in range(sections))
        return (f'<div class="fp-timeline"><div class="fp-bar fp-bad">{cells}</div>'
                f'<div class="fp-problem">⚠ {html.escape(exc.message)}</div></div>')
    colour = {c.prompt: SPAN_COLOURS[i % len(SPAN_COLOURS)] for i, c in enumerate(changes)}
    cells = []
    for i, section in enumerate(plan):
        start = f"{i * SECTION_S:.1f}–{(i + 1) * SECTION_S:.1f} s"
        if section.blend_from is None:
            fill, says = colour[section.prompt], section.prompt
        else:
            fill = f"linear-gradient(to right, {colour[section.blend_from]}, {colour[section.prompt]})"
            says = f"{section.weight:.0%} {section.prompt}, {1 - section.weight:.0%} {section.blend_from}"
        cells.append(f'<span style="flex:1;background:{fill}" title="section {i + 1}, {start}: '
                     f'{html.escape(says, quote=True)}">{i + 1}</span>')
    marks = "".join(f'<span class="fp-mark" style="left:{100 * c.section / sections:.2f}%">▲ {c.lands_s:.1f} s</span>'
                    for c in changes[1:])
    lines = []
    for c in changes:
        asked = ("" if math.isclose(c.at_s, c.lands_s, abs_tol=1e-9) else
                 f" (asked {c.at_s:g} s: lands at the nearest section boundary)")
        lines.append(f'<li><b style="color:{colour[c.prompt]}">■</b> from {c.lands_s:.1f} s, section {c.section + 1}'
                     f'{asked}: {html.escape(_cell(c.prompt, 120))}</li>')
    return (f'<div class="fp-timeline"><div class="fp-bar">{"".join(cells)}</div><div class="fp-marks">{marks}</div>'
            f'<ul>{"".join(lines)}</ul></div>')


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
