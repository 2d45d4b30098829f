"""Jobs that start from what an earlier one made (spec.Continuation): resume, branch and extend.

A continued job starts its section loop at `first_section` with the history the sections before it left, and its
video already holding their frames:

- from saved state (engine/state.py: resume, branch, extending a past output): the history is rebuilt from the
  saved latents; the video's frames that are final after the last kept section are copied as H.264 packets
  (all but its newest one, which a killed job's file may lack), and the 33 after them are decoded again from the
  saved latents, as the uninterrupted job decoded them (the VAE decode is deterministic): the newest is encoded,
  the other 32 are held for the next section's cross-fade, as the uninterrupted job held them.
- from any video (extend): converted to 30 fps and the start image's bucket, its frames are encoded into the new
  file, and its last frames (at most 73, 19 latents) are VAE-encoded into the history; the rest of the history is
  zero-padded as the official demo pads it. The start latent (the "start" clean latent every section is
  conditioned on) comes from the video's first frame, or from an image the user picks.

Prompts over time (prompts.py): each section keeps its own prompt. A resume continues the saved plan (state.json's
"section_prompts"); a branch keeps the source's prompts before section K and takes the new prompt's schedule (on
the video's own timeline) from K; an extension's prompt times count from the extension's start.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np
import torch

from ..errors import InputError
from ..prompts import PromptChange, SectionPrompt, schedule, section_prompts
from ..spec import FPS, FRAMES_PER_SECTION, Continuation, JobSpec
from . import image as image_ops
from . import vae as vae_ops
from .lending import VAE, ModelLender
from .sections import HISTORY_SIZES, OVERLAP_FRAMES, History, decode_latent_count, section_frames
from .state import RESUME_SECTIONS, SavedState, check_models, load_state

log = logging.getLogger(__name__)

SETTINGS_KEPT_BY_RESUME = ("image", "prompt", "negative", "seconds", "seed", "steps", "gs", "cfg", "rs", "resolution",
                           "sampler", "teacache", "teacache_threshold", "crf", "fast_decode", "section_state",
                           "prompt_blend_sections", "loras")
HISTORY_FRAMES = 1 + 4 * (sum(HISTORY_SIZES) - 1)  # 73: the frames the 19 history latents hold
CHUNK_FRAMES = 8  # frames of a brought video converted at a time


@dataclass
class Origin:
    """Where a continued job's section loop starts, and what its video and history hold before that."""
    kind: str
    spec: JobSpec  # the job as it runs (a resume's comes from its state; an extension's length is the whole video's)
    width: int
    height: int
    first_section: int  # the first section sampled (0-based)
    saved: SavedState | None = None  # the source's state (None: a video without one)
    video: Path | None = None  # the source video
    copy_frames: int = 0  # its first frames, copied into the new file as they are
    kept: list[dict] = field(default_factory=list)  # state.json entries of the sections kept
    generator_state: torch.Tensor | None = None  # continue the source's section noise (None: fresh from the seed)
    anchor_image: np.ndarray | None = None  # the start image to encode (None: the saved start latent)
    anchor_note: str = ""  # which frame anchors the start latent, in words
    section_prompts: list[SectionPrompt] = field(default_factory=list)  # every section of the output's prompt
    prompt_changes: list[PromptChange] = field(default_factory=list)  # where its prompts change (the record)


def open_origin(start: Continuation, spec: JobSpec, model_files: dict | None) -> Origin:
    """Read and check what `start` continues; InputError (one line) where it cannot be, before anything is
    written. `spec`: the job's settings (for a resume, the saved ones are used)."""
    start.validate()
    video = Path(start.video)
    if start.kind == "resume":
        saved = _saved(video, model_files)
        spec = resumed_spec(saved.settings, spec.image if spec.image else None)
        if saved.sections_done == 0:
            raise InputError(f"{video.name} has no finished section to resume from: generate it again")
        if saved.sections_done >= spec.sections:
            raise InputError(f"{video.name} is finished ({saved.sections_done} of {spec.sections} sections): "
                             f"nothing to resume")
        origin = _from_state("resume", saved, spec, saved.sections_done, same_noise=True)
        plan = saved.section_plan()
        if len(plan) != spec.sections:
            raise InputError(f"the saved state of {video.name} plans {len(plan)} sections, its settings "
                             f"{spec.sections}: it cannot be resumed")
        # the changes as the source recorded them (an extension's count from where it started)
        recorded = saved.settings.get("prompt_changes")
        changes = ([PromptChange(c["at_s"], c["section_index"], c["prompt"]) for c in recorded]
                   if isinstance(recorded, list) else spec.prompt_schedule())
        return _with_prompts(origin, plan, changes)
    if start.kind == "branch":
        saved = _saved(video, model_files)
        k = start.from_section
        if k > saved.sections_done:
            raise InputError(f"{video.name} has {saved.sections_done} sections: cannot branch from section {k}")
        if spec.sections < k:
            raise InputError(f"the branch is {spec.sections} sections long: it must reach section {k}")
        if spec.resolution != saved.settings["resolution"]:
            raise InputError(f"a branch keeps {video.name}'s resolution ({saved.settings['resolution']})")
        same_noise = spec.seed == saved.settings["seed"]
        origin = _from_state("branch", saved, spec, k - 1, same_noise)
        # the new prompt's schedule from section K on; the kept sections keep what they were made with
        return _with_prompts(origin, saved.section_plan()[:k - 1] + spec.section_prompts()[k - 1:],
                             spec.prompt_schedule())
    origin = _extend(video, spec, model_files)
    first, more = origin.first_section, origin.spec.sections - origin.first_section
    # the extension's prompt times count from its own start (checked against its length by spec.validate)
    shift = first * FRAMES_PER_SECTION / FPS
    changes = [PromptChange(c.at_s + shift, c.section + first, c.prompt) for c in schedule(spec.prompt, more)]
    added = section_prompts(schedule(spec.prompt, more), more, spec.prompt_blend_sections)
    before = origin.saved.section_plan()[:first] if origin.saved is not None else [added[0]] * first
    return _with_prompts(origin, before + added, changes)


def _with_prompts(origin: Origin, plan: list[SectionPrompt], changes: list[PromptChange]) -> Origin:
    return replace(origin, section_prompts=plan, prompt_changes=changes)


def resumed_spec(settings: dict, image: str | None = None) -> JobSpec:
    """The job a state's settings describe (its start image only if it is still there: a resume needs none)."""
    values = {key: settings[key] for key in SETTINGS_KEPT_BY_RESUME if key in settings}
    if image is not None:
        values["image"] = image
    if values.get("image") and not Path(values["image"]).is_file():
        values["image"] = ""
    return JobSpec.from_settings(values).validate(image_required=False)


def _saved(video: Path, model_files: dict | None) -> SavedState:
    saved = load_state(video)
    check_models(saved, model_files)
    return saved


def _from_state(kind: str, saved: SavedState, spec: JobSpec, first: int, same_noise: bool,
                anchor_image: np.ndarray | None = None, anchor_note: str = "") -> Origin:
    width, height = saved.size
    if saved.manifest.get("brought_video") and first <= 1:
        raise InputError(f"section 1 of {saved.video.name} is the video it extends: continue from section 2 or later")
    saved.kept_sections(first - RESUME_SECTIONS, first)
    generator = None
    if same_noise and first > 0:
        generator = saved.section(first - 1)["generator"]
    frames_file = saved.frames_file()
    # the frames the file held for sure once the section was saved (SectionSaved's frames_on_disk: all but the one
    # the muxer still held), then the newest final one and the held ones are decoded again (_history_from_state)
    copy = saved.entry(first - 1)["frames_on_disk"] if first > 0 else 0
    return Origin(kind, spec, width, height, first, saved, frames_file, copy, saved.manifest["sections"][:first],
                  generator, anchor_image, anchor_note)


def _extend(video: Path, spec: JobSpec, model_files: dict | None) -> Origin:
    """An extension: of a past output with its state (its latents continue exactly), or of any video."""
    anchor = image_ops.load_image(spec.image) if spec.image else None
    more = spec.sections
    try:
        saved = _saved(video, model_files)
    except InputError:
        saved = None
    if saved is not None and saved.sections_done and saved.frames_file() == video:
        done = saved.sections_done
        grown = replace(spec, seconds=(done + more) * FRAMES_PER_SECTION / FPS, resolution=saved.settings["resolution"])
        width, height = saved.size
        if anchor is not None:
            anchor = image_ops.resize_and_center_crop(anchor, width, height)
        note = ("the start latent comes from the image you picked" if anchor is not None else
                f"the start latent is {video.name}'s own (its start image)")
        try:
            return _from_state("extend", saved, grown, done, spec.seed == saved.settings["seed"], anchor, note)
        except InputError:
            log.info("%s: its state cannot be continued; extending it as a video", video.name)
    probe = probe_video(video)
    height, width = image_ops.nearest_bucket(probe.height, probe.width, resolution=spec.resolution)
    if probe.frames_at_30fps is not None and probe.frames_at_30fps < OVERLAP_FRAMES:
        raise InputError(f"{video.name} is too short to extend: at least {OVERLAP_FRAMES} frames "
                         f"({OVERLAP_FRAMES / FPS:.1f} s) are needed")
    if anchor is None:
        anchor = image_ops.resize_and_center_crop(probe.first_frame, width, height)
        note = f"the start latent comes from {video.name}'s first frame"
    else:
        anchor = image_ops.resize_and_center_crop(anchor, width, height)
        note = "the start latent comes from the image you picked"
    # the brought video counts as section 1 of the output: its new sections are decoded and cross-faded as later
    # sections are (sections.decode_latent_count)
    grown = replace(spec, seconds=(1 + more) * FRAMES_PER_SECTION / FPS)
    return Origin("extend", grown, width, height, 1, None, video, 0, [], None, anchor, note)


@dataclass
class VideoProbe:
    width: int
    height: int
    first_frame: np.ndarray  # uint8 (H, W, 3)
    frames_at_30fps: int | None  # from the stream's duration; None when the file does not say


def probe_video(path: Path) -> VideoProbe:
    """The video's size and first frame; InputError (one line) for a file that is not a video or has no frames."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path.name} has no video frames")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise InputError(f"{path.name} has no video frames")
            duration = (float(stream.duration * stream.time_base) if stream.duration else
                        container.duration / av.time_base if container.duration else None)
            return VideoProbe(first.width, first.height, first.to_ndarray(format="rgb24"),
                              round(duration * FPS) if duration else None)
    except av.error.FFmpegError as exc:
        raise InputError(f"{path.name} is not a video FramePack can read ({exc.__class__.__name__})") from exc


def frames_at_30fps(path: Path, width: int, height: int) -> Iterator[np.ndarray]:
    """Every frame of the video at 30 fps (each output time shows the newest source frame at or before it),
    cover-resized and centre-cropped to width x height, uint8 (H, W, 3), one at a time."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or Fraction(FPS)
        shown, previous, previous_t, origin = 0, None, None, None
        for frame in container.decode(stream):
            t = float(frame.time) if frame.time is not None else shown / FPS
            origin = t if origin is None else origin
            t -= origin
            if previous is not None:
                while shown / FPS < t - 1e-6:  # the previous frame is shown until this one's time
                    yield previous
                    shown += 1
            previous = image_ops.resize_and_center_crop(frame.to_ndarray(format="rgb24"), width, height)
            previous_t = t
        if previous is not None:
            end = previous_t + 1 / float(rate)
            while shown == 0 or shown / FPS < end - 1e-6:
                yield previous
                shown += 1


def history_and_frames(origin: Origin, lender: ModelLender, generator: torch.Generator):
    """(History before the first section, pixels (3, T, H, W) in [-1, 1] to append after the copied frames, one
    chunk at a time). Saved state: the kept latents and the decoded tail; a video: its frames and its last frames
    VAE-encoded, sampled with `generator` (the VAE borrowed here, before the transformer loads)."""
    if origin.saved is not None:
        return _history_from_state(origin, lender)
    return _history_from_video(origin, lender, generator)


def _history_from_state(origin: Origin, lender: ModelLender):
    saved, first = origin.saved, origin.first_section
    # The history as the source's loop had it: its own start latent first, then its sections' latents
    history = History.start(saved.inputs()["start_latent"])
    for section in range(max(0, first - RESUME_SECTIONS), first):
        history.append(saved.section(section)["latents"])
    if first == 0:
        return history, []
    decode_context = saved.manifest["decode_context"]
    tail = history.latents[:, :, -decode_latent_count(first - 1, decode_context):]
    with lender.use(VAE) as vae:
        pixels = vae_ops.decode(vae, tail)
    pixels, _ = section_frames(pixels, first - 1, decode_context)
    # the frames after the copied ones: the newest final one, then the 32 the next section fades into
    return history, [pixels[:, -OVERLAP_FRAMES:].clone()]


def _history_from_video(origin: Origin, lender: ModelLender, generator: torch.Generator):
    last: deque[np.ndarray] = deque(maxlen=HISTORY_FRAMES)
    total = 0
    for frame in frames_at_30fps(origin.video, origin.width, origin.height):
        last.append(frame)
        total += 1
    if total < OVERLAP_FRAMES:
        raise InputError(f"{origin.video.name} is too short to extend: at least {OVERLAP_FRAMES} frames "
                         f"({OVERLAP_FRAMES / FPS:.1f} s) are needed")
    count = 1 + 4 * ((len(last) - 1) // 4)  # the causal VAE encodes 1 + 4k frames into 1 + k latents
    clip = torch.from_numpy(np.stack(list(last)[-count:])).float() / 127.5 - 1  # (T, H, W, 3)
    with lender.use(VAE) as vae:
        encoded = vae_ops.encode(vae, clip.permute(3, 0, 1, 2)[None], generator)
    zeros = torch.zeros_like(encoded[:, :, :1]).repeat(1, 1, sum(HISTORY_SIZES), 1, 1)
    history = History(torch.cat([zeros, encoded], dim=2)[:, :, -max(sum(HISTORY_SIZES), encoded.shape[2]):])
    return history, _video_chunks(origin)


def _video_chunks(origin: Origin) -> Iterator[torch.Tensor]:
    chunk = []
    for frame in frames_at_30fps(origin.video, origin.width, origin.height):
        chunk.append(frame)
        if len(chunk) == CHUNK_FRAMES:
            yield _to_pixels(chunk)
            chunk = []
    if chunk:
        yield _to_pixels(chunk)


def _to_pixels(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) frames -> (3, T, H, W) in [-1, 1], which video.to_uint8 turns back into the same bytes."""
    return (torch.from_numpy(np.stack(frames)).float() / 127.5 - 1).permute(3, 0, 1, 2)
