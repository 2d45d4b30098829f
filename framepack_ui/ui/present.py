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
from ..events import CacheReport, Failed, Finished, Notice, Phase, Progress, SectionSaved, Step, Stopped
from ..prompts import SECTION_S, format_timed, parse_timed, schedule, section_prompts
from ..spec import CACHE_METHODS, FPS, FRAMES_PER_SECTION, JobSpec, LoraChoice, frame_count, section_count
from ..units import GB
from ..worker.events import Estimated, Queued

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
    computed_calls: tuple[str, ...] = ()  # per section, "computed/calls" of the step cache (CacheReport)
    cache_method: str = ""
    estimate: Estimated | None = None  # said as the job started; shown until the engine's own ETA takes over


def apply(view: JobView, event) -> JobView:
    """The view after one more event of the followed job."""
    if isinstance(event, Queued):
        return replace(view, status="queued", position=event.position)
    if isinstance(event, Estimated):
        return replace(view, estimate=event)
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
    if isinstance(event, CacheReport):
        return replace(view, computed_calls=(*view.computed_calls, f"{event.computed}/{event.calls}"),
                       cache_method=event.method)
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
        elif view.estimate is not None and view.estimate.total_s is not None:  # until the job measures its own
            parts.append(f"estimated {_duration(view.estimate.total_s)} in all")
    lines = [" · ".join(parts)]
    if view.computed_calls:
        lines.append(cache_line(view))
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


def cache_line(view: JobView) -> str:
    """'Model calls computed per section (magcache): 12/25, 13/25' (the rest reused the last computed residual)."""
    return f"Model calls computed per section ({view.cache_method}): {', '.join(view.computed_calls)}"


# The step cache's form values, in Page.cache_inputs() order; restored from a past job's settings (RESTORED_EXTRAS)
CACHE_KEYS = ("cache", "magcache_threshold", "magcache_max_skip_steps", "magcache_retention_ratio")


def with_cache(spec: JobSpec, cache: str, magcache_threshold: float, magcache_max_skip_steps: float,
               magcache_retention_ratio: float, calibrate: bool) -> JobSpec:
    """The form's step cache on the spec: the method chosen (calibrating is MagCache's), TeaCache's checkbox kept
    in step for older readers of the settings; InputError (one line) for what the form cannot hold."""
    if calibrate:
        cache = "magcache"
    for name, value in (("magcache threshold", magcache_threshold), ("magcache max skip steps",
                                                                      magcache_max_skip_steps),
                        ("magcache retention ratio", magcache_retention_ratio)):
        if value is None:
            raise InputError(f"{name} is empty")
    if magcache_max_skip_steps != int(magcache_max_skip_steps):
        raise InputError("magcache max skip steps must be a whole number")
    return replace(spec, cache=cache, teacache=cache == "teacache", magcache_threshold=float(magcache_threshold),
                   magcache_max_skip_steps=int(magcache_max_skip_steps),
                   magcache_retention_ratio=float(magcache_retention_ratio), cache_calibrate=bool(calibrate))


def cache_form_values(settings: dict) -> dict[str, Any]:
    """CACHE_KEYS from a past job's settings; one from before the choice existed has only its teacache flag."""
    values = {key: settings[key] for key in CACHE_KEYS[1:] if settings.get(key) is not None}
    method = settings.get("cache")
    if method not in CACHE_METHODS:
        if not isinstance(settings.get("teacache"), bool):
            return values
        method = "teacache" if settings["teacache"] else "off"
    return {"cache": method, **values}


def cache_text(settings: dict) -> str:
    """'magcache (threshold 0.1, K 3, retention 0.2)', 'teacache (threshold 0.15)' or 'off'."""
    values = cache_form_values(settings)
    method = values.get("cache", "")
    if method == "magcache":
        return (f"magcache (threshold {values.get('magcache_threshold', '?')}, "
                f"K {values.get('magcache_max_skip_steps', '?')}, "
                f"retention {values.get('magcache_retention_ratio', '?')})")
    if method == "teacache":
        return f"teacache (threshold {settings.get('teacache_threshold', '?')})"
    return method


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
RESTORED_EXTRAS = ("profile", "storage", "prompt_rows", *CACHE_KEYS)
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
    if cache_form_values(s).get("cache"):
        rows.append(f"| step cache | {cache_text(s)} |")
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
    values.update(cache_form_values(settings))
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
            f"now {status.file}{resume_text(status)}")


# --------------------------------------------------------------------------------------------- first run: the models

def models_card(missing_models: list, need_bytes: int, free_bytes: int | None, offline: bool = False) -> str:
    """The short card at the top when model files are missing (Markdown; "" when none is). `missing_models`:
    worker.missing_model_files(). Offline, it says to copy them in by hand (the list below says what and where)."""
    if not missing_models:
        return ""
    if offline:
        return (f"**The models are not here yet** ({_gb1(need_bytes)} GB), and the app runs offline (`--offline`): "
                f"copy the files listed below into their folders, then reload this page.")
    free = ""
    if free_bytes is not None:
        short = " (not enough: free some space or choose another `--models` folder)" if free_bytes < need_bytes else ""
        free = f", {_gb1(free_bytes)} GB free on that disk{short}"
    return f"**The models are not here yet:** {_gb1(need_bytes)} GB to download{free}."


def missing_files_text(missing_models: list) -> str:
    """Markdown: per model, the folder its missing files go in and the files, for copying them in by hand."""
    parts = []
    for model in missing_models:
        files = "\n".join(f"  - `{file}`" for file in model.files)
        parts.append(f"- **{model.name}** (about {_gb1(model.approx_bytes)} GB) from `{model.repo}`, into "
                     f"`{model.folder}`:\n{files}")
    return ("Each file goes in the folder shown, as in the Hugging Face repository (copy them from another "
            "machine or a Hugging Face cache):\n\n" + "\n".join(parts)) if parts else ""


def download_html(status) -> str:
    """The download's progress (worker.DownloadStatus): one line (download_text) over a bar per model, the whole
    download's speed and time left; "" when no download ran."""
    line = download_text(status)
    if not line:
        return ""
    bars = []
    for name, done, total in status.models:
        pct = min(100 * done / total, 100.0) if total else 0.0
        state = "done" if total and done >= total else "ok"
        bars.append(_bar_row(name, pct, _mb_or_gb(done, total), state, name))
    speed = download_speed(status) if status.state == "running" else ""
    speed_line = f'<p class="fp-download-speed">{speed}</p>' if speed else ""
    return (f'<div class="fp-download"><p class="fp-download-line">{html.escape(line)}</p>'
            f'<div class="fp-bars">{"".join(bars)}</div>{speed_line}</div>')


def download_speed(status) -> str:
    """'12.3 MB/s, about 4 min 10 s left': from the bytes this run fetched (not those it resumed) over its time."""
    if status.started_at_s is None or status.updated_at_s is None:
        return ""
    span_s = status.updated_at_s - status.started_at_s
    fetched = status.done_bytes - status.started_done_bytes
    if span_s <= 0 or fetched <= 0:
        return "measuring the speed..."
    rate = fetched / span_s  # bytes per second
    left_s = max(status.total_bytes - status.done_bytes, 0) / rate
    return f"{rate / 1_000_000:.1f} MB/s, about {_duration(left_s)} left"


def resume_text(status) -> str:
    """', resumed with 1.20 GB already here': where a download that continues a stopped one (or files copied in by
    hand) started; "" for a fresh one."""
    return f", resumed with {_mb_or_gb(status.resumed_bytes)} already here" if status.resumed_bytes else ""


def _mb_or_gb(done: int, total: int | None = None) -> str:
    unit, scale = ("GB", GB) if (total or done) >= GB else ("MB", 1_000_000)
    return f"{done / scale:.2f} / {total / scale:.2f} {unit}" if total is not None else f"{done / scale:.2f} {unit}"


def _gb1(n: int) -> str:
    return f"{n / GB:.1f}"


# --------------------------------------------------------------------------------------------- gauges as bars

NEAR_LIMIT_PCT = 80  # a memory gauge this full turns amber...
AT_LIMIT_PCT = 95  # ...and this full red
DISK_BAR_FULL_MB_S = 1000  # the disk-read bar's full scale (a SATA SSD reads ~500 MB/s, NVMe a few GB/s)


def gauges_html(g, warning: str | None = None) -> str:
    """The gauges (telemetry.Gauges) as bars with their figures: RAM, swap/pagefile, commit, VRAM, GPU busy and disk
    reads; a memory bar near its limit is amber, at it red; the starved-GPU warning beside them in plain words."""
    swap_name = "Pagefile" if sys.platform == "win32" else "Swap"
    rows = [_memory_row("RAM", g.ram_used_bytes, g.ram_total_bytes, f" · app {_gb(g.process_rss_bytes)} GB"),
            _memory_row(swap_name, g.swap_used_bytes, g.swap_total_bytes),
            _memory_row("Commit", g.commit_used_bytes, g.commit_limit_bytes)]
    if len(g.gpus) > 1:  # a pool's GPUs (worker/pool.py): each one's VRAM and how busy it is
        for gpu in g.gpus:
            rows.append(_memory_row(f"VRAM {gpu.index}", gpu.vram_used_bytes, gpu.vram_total_bytes, f" · {gpu.name}"))
            rows.append(_bar_row(f"GPU {gpu.index}", gpu.util_pct, f"{gpu.util_pct:.0f}% busy",
                                 "full" if warning else "ok", f"gpu{gpu.index}"))
    elif g.gpu_available:
        torch_part = f" · PyTorch {_gb(g.torch_reserved_bytes)} GB" if g.torch_reserved_bytes is not None else ""
        rows.append(_memory_row("VRAM", g.vram_used_bytes, g.vram_total_bytes, torch_part))
        busy = g.gpu_util_pct or 0.0
        # a busy GPU is good news: only a starved one (the warning) is coloured
        rows.append(_bar_row("GPU", busy, f"{busy:.0f}% busy", "full" if warning else "ok", "gpu"))
    if g.disk_read_mb_s is not None:
        rate = g.disk_read_mb_s
        rows.append(_bar_row("Disk read", min(100 * rate / DISK_BAR_FULL_MB_S, 100.0), f"{rate:.0f} MB/s",
                             "near" if warning else "ok", "disk"))
    else:
        rows.append(_bar_row("Disk read", 0.0, "n/a", "ok", "disk"))
    note = f'<p class="fp-gauge-note">GPU: {html.escape(g.gpu_note)}</p>'
    alert = f'<p class="fp-warning" role="alert">⚠ {html.escape(warning)}</p>' if warning else ""
    return f'<div class="fp-gauges"><div class="fp-bars">{"".join(rows)}</div>{note}{alert}</div>'


def gauge_level(pct: float) -> str:
    """'ok', 'near' or 'full': how close a memory gauge is to its limit."""
    return "full" if pct >= AT_LIMIT_PCT else "near" if pct >= NEAR_LIMIT_PCT else "ok"


def _memory_row(name: str, used: int | None, total: int | None, extra: str = "") -> str:
    if used is None or not total:
        return _bar_row(name, 0.0, "n/a" if total is None else "none", "ok", name.lower())
    pct = 100 * used / total
    return _bar_row(name, min(pct, 100.0), f"{_gb(used)} / {_gb(total)} GB{extra}", gauge_level(pct), name.lower())


def _bar_row(name: str, pct: float, figure: str, level: str, key: str) -> str:
    return (f'<div class="fp-gauge fp-{level}" data-gauge="{html.escape(key)}" data-pct="{pct:.1f}">'
            f'<span class="fp-gauge-name">{html.escape(name)}</span>'
            f'<span class="fp-gauge-track"><span class="fp-gauge-fill" style="width:{pct:.1f}%"></span></span>'
            f'<span class="fp-gauge-figure">{html.escape(figure)}</span></div>')


# --------------------------------------------------------------------------------------------- the jobs table

JOB_ACTIONS = {"running": "stop", "queued": "remove", "waiting": "remove"}  # anything else (ended): "remove"


def page_jobs(jobs, mine) -> list:
    """The jobs a page lists: its own (ids in `mine`), the running one and those waiting since a restart (any page
    may start or drop them)."""
    return [job for job in jobs if job.id in mine or job.status in ("running", "waiting")]


def jobs_html(jobs) -> str:
    """The jobs (JobInfo list, oldest first) as a table that fits a phone: status, progress, length, prompt, and a
    Stop (running) or Remove (queued: drops it; ended: off this list) per job; newest first."""
    if not jobs:
        return '<p class="fp-jobs-empty">No jobs yet.</p>'
    rows = []
    for job in reversed(jobs):
        act = JOB_ACTIONS.get(job.status, "remove")
        prompt = " ".join(str(job.spec.prompt).split())
        rows.append(f'<tr data-job="{html.escape(job.id)}"><td class="fp-id">{html.escape(job.id)}</td>'
                    f'<td class="fp-status fp-{html.escape(job.status)}">{html.escape(job.status)}</td>'
                    f'<td class="fp-progress">{html.escape(_job_progress(job))}</td>'
                    f'<td class="fp-length">{job.spec.seconds:g} s</td>'
                    f'<td class="fp-prompt" title="{html.escape(prompt, quote=True)}">{html.escape(prompt)}</td>'
                    f'<td class="fp-act"><button class="fp-job-act fp-{act}" data-job="{html.escape(job.id)}" '
                    f'data-act="{act}">{act.capitalize()}</button></td></tr>')
    head = ('<tr><th class="fp-id">#</th><th class="fp-status">Status</th><th class="fp-progress">Progress</th>'
            '<th class="fp-length">Length</th><th class="fp-prompt">Prompt</th><th class="fp-act"></th></tr>')
    return f'<table class="fp-jobs"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


# ------------------------------------------------------------------------ the job's plot, the estimate, batches

PLOT_SERIES = (  # (timeline key, label, colour, unit, fixed scale or None for the series' own peak)
    ("gpu_util_pct", "GPU", "#e15759", "%", 100.0),
    ("vram_used_gb", "VRAM", "#b07aa1", "GB", None),
    ("ram_used_gb", "RAM", "#4e79a7", "GB", None),
    ("disk_read_mb_s", "disk reads", "#59a14f", "MB/s", None),
)
PHASE_COLOURS = {"text": "#9c755f", "image": "#edc948", "transformer": "#bab0ac", "sampling": "#76b7b2",
                 "decode": "#f28e2b", "writing": "#8cd17d"}
PLOT_W, PLOT_H, PLOT_LEFT, PLOT_TOP, PLOT_BOTTOM = 640, 180, 8, 16, 34  # the SVG's user units


def job_plot_html(timeline: dict | None, title: str = "This job") -> str:
    """The job's timeline (worker/timeline.py) as an inline SVG: GPU use, VRAM, RAM and disk reads over time, each
    line scaled to its own peak (said in the legend), a band under them coloured by phase (text, image, loading,
    sampling, decode, writing) and a dashed line where each section starts; "" without a timeline."""
    if not timeline or not timeline.get("t_s"):
        return ""
    times = timeline["t_s"]
    phases = [p for p in timeline.get("phases") or [] if isinstance(p, list) and len(p) == 2]
    end_s = max([timeline.get("ended_s") or 0, times[-1], *(p[0] for p in phases), 1e-3])
    inner_w, inner_h = PLOT_W - 2 * PLOT_LEFT, PLOT_H - PLOT_TOP - PLOT_BOTTOM

    def x(t: float) -> float:
        return PLOT_LEFT + inner_w * min(max(t, 0.0), end_s) / end_s

    parts = [f'<rect x="{PLOT_LEFT}" y="{PLOT_TOP}" width="{inner_w}" height="{inner_h}" fill="#fafafa" '
             f'stroke="#ccc"/>']
    band_y = PLOT_TOP + inner_h + 3
    for i, (start, name) in enumerate(phases):
        stop = phases[i + 1][0] if i + 1 < len(phases) else end_s
        words = PHASES.get(name, name)
        width = max(x(stop) - x(start), 0.5)
        parts.append(f'<rect class="fp-phase" x="{x(start):.1f}" y="{band_y}" width="{width:.1f}" height="10" '
                     f'fill="{PHASE_COLOURS.get(name, "#ddd")}"><title>{html.escape(words)}: '
                     f'{start:.1f}-{stop:.1f} s</title></rect>')
    for i, section in enumerate(timeline.get("sections") or []):
        start = section.get("sampling_start_s")
        if isinstance(start, (int, float)):
            parts.append(f'<line class="fp-section" x1="{x(start):.1f}" x2="{x(start):.1f}" y1="{PLOT_TOP}" '
                         f'y2="{band_y + 10}" stroke="#555" stroke-dasharray="3,3"/>'
                         f'<text x="{x(start) + 2:.1f}" y="{PLOT_TOP - 4}" font-size="10">S{i + 1}</text>')
    legend = []
    for key, label, colour, unit, scale in PLOT_SERIES:
        values = timeline.get(key) or []
        known = [v for v in values if isinstance(v, (int, float))]
        if not known:
            continue
        top = scale or max(max(known), 1e-9)
        for run in _runs(times, values):
            points = " ".join(f"{x(t):.1f},{PLOT_TOP + inner_h * (1 - min(v / top, 1.0)):.1f}" for t, v in run)
            parts.append(f'<polyline class="fp-series" data-series="{key}" points="{points}" fill="none" '
                         f'stroke="{colour}" stroke-width="1.5"/>')
        peak = f"{max(known):.0f}" if unit in ("%", "MB/s") else f"{max(known):.1f}"
        legend.append(f'<span style="color:{colour}">■</span> {label} (peak {peak} {unit})')
    seen = list(dict.fromkeys(name for _, name in phases))
    legend += [f'<span style="color:{PHASE_COLOURS.get(n, "#ddd")}">▬</span> {html.escape(PHASES.get(n, n))}'
               for n in seen if n in PHASE_COLOURS]
    parts.append(f'<text x="{PLOT_LEFT}" y="{PLOT_H - 4}" font-size="10">0 s</text>'
                 f'<text x="{PLOT_W - PLOT_LEFT}" y="{PLOT_H - 4}" font-size="10" text-anchor="end">'
                 f'{_duration(end_s)}</text>')
    gpu = f" on {html.escape(timeline['gpu'])}" if timeline.get("gpu") else ""
    estimated = timeline.get("estimated_s")
    took = (f"{_duration(end_s)} (estimated {_duration(estimated)})" if isinstance(estimated, (int, float))
            else _duration(end_s))
    return (f'<div class="fp-plot"><div><b>{html.escape(title)}</b>{gpu}: {took}, a reading every '
            f'{timeline.get("interval_s", 1):g} s; dashed: where each section starts</div>'
            f'<svg viewBox="0 0 {PLOT_W} {PLOT_H}" width="100%" role="img" '
            f'aria-label="the job\'s gauges over time">{"".join(parts)}</svg>'
            f'<div class="fp-legend">{" · ".join(legend)}</div></div>')


def _runs(times: list, values: list) -> list[list[tuple[float, float]]]:
    """The (t, value) stretches without a gap (None where the machine gave no figure), two points or more each."""
    runs, current = [], []
    for t, v in zip(times, values):
        if isinstance(v, (int, float)):
            current.append((t, float(v)))
        else:
            runs.append(current)
            current = []
    runs.append(current)
    return [run if len(run) > 1 else run * 2 for run in runs if run]


def shape_from_inputs(seconds, steps, resolution, cfg, teacache, teacache_threshold):
    """The form's values that a job's time depends on (worker.speed.JobShape); None while one is not a number."""
    from ..worker.speed import JobShape

    values = (seconds, steps, resolution, cfg, teacache_threshold)
    if any(v is None or not isinstance(v, (int, float)) or not math.isfinite(v) for v in values) or seconds <= 0:
        return None
    return JobShape(section_count(seconds), max(int(steps), 1), int(resolution), float(cfg),
                    float(teacache_threshold) if teacache else 0.0)


def estimate_text(guess, jobs: int = 1) -> str:
    """The estimate before Generate (worker.speed.Estimate), labelled as one, with its source; `jobs`: a batch's
    count, each taking the estimated time."""
    if guess is None:
        return "**Estimate:** set the length, steps and resolution first."
    if guess.total_s is None:
        return f"**Estimate:** {guess.source}."
    parts = [f"sampling {_duration(guess.sampling_s)}", f"decoding {_duration(guess.decode_s)}"]
    if guess.other_s is not None:
        parts.append(f"loading, warm-up and writing {_duration(guess.other_s)}")
    each = f" each, {_duration(guess.total_s * jobs)} for the {jobs} jobs" if jobs > 1 else ""
    note = f"; {guess.note}" if guess.note else ""
    return (f"**Estimate: about {_duration(guess.total_s)}**{each} ({', '.join(parts)}{note}). "
            f"Source: {guess.source}.")


def batch_pairs(images, image: str | None, prompts_text: str | None, prompt: str) -> list[tuple[str, str]]:
    """A batch's jobs, (image, prompt) for every image x every prompt, images first: the batch's images (else the
    form's start image) and its prompts, one a line (else the form's prompt). InputError without an image."""
    paths = [str(p) for p in images or [] if p] or ([str(image)] if image else [])
    if not paths:
        raise InputError("upload a start image first (or several, in the batch)")
    lines = [line.strip() for line in (prompts_text or "").splitlines() if line.strip()] or [prompt or ""]
    return [(path, text) for path in paths for text in lines]
