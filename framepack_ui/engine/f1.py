"""The FramePack F1 job: encode the prompt and the start image, then section by section
history -> clean latents -> sample -> append -> decode the tail -> write (on an encoder thread, beside the next
section's sampling).

`run(spec, out_path, lender, emit, cancel)` emits typed events (events.py) and returns how the job ended;
`generate(...)` iterates the same events. The models are borrowed from a `ModelLender` (lending.py). The token
count per call is constant, so time is linear in video length and memory flat.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import Cancelled, UserError
from ..events import CacheReport, Failed, Finished, Notice, Phase, SectionSaved, Step, Stopped
from ..prompts import PromptChange, SectionPrompt, describe, distinct_prompts, schedule_record
from ..sidecar import METADATA_KEY, input_copy_name, write_sidecar
from ..spec import LATENT_WINDOW, Continuation, JobSpec
from ..weights.layout import COMPONENTS
from . import continuation, step_cache
from . import image as image_ops
from . import text, vae as vae_ops
from .clock import EtaClock
from .denoiser import GUIDANCE_SCALE, Denoiser, model_inputs
from .lending import IMAGE_ENCODER, TRANSFORMER, VAE, ModelLender
from .sampling import flux_mu, flux_sigmas, sample_euler, sample_unipc
from .sections import ALIGNED_CONTEXT, History, check_decode_context, decode_latent_count, section_frames
from .state import SectionStore, prompt_tensors
from .video import BackgroundWriter, SectionVideoWriter, count_frames

log = logging.getLogger(__name__)

_FROM_SPEC = object()  # decode_context not given: the spec's fast_decode decides


@dataclass
class JobInputs:
    """What every section of a job is conditioned on, made once before the transformer loads."""
    spec: JobSpec  # validated, with its seed
    width: int
    height: int
    prompts: dict[str, text.PromptEmbeds]  # every distinct prompt the sections use
    section_prompts: list[SectionPrompt]  # what each section of the output is conditioned on (prompts.py)
    negative: text.PromptEmbeds | None  # only with real CFG
    image_embeds: torch.Tensor  # (1, 729, 1152) SigLIP
    start_latent: torch.Tensor  # (1, 16, 1, h, w)
    generator: torch.Generator  # draws each section's noise, in order (section_noise_generator)


def generate(spec: JobSpec, out_path: str | Path, lender: ModelLender, cancel: threading.Event | None = None,
             section_hook=None, frame_sink=None, decode_context: int | None | object = _FROM_SPEC,
             start: Continuation | None = None):
    """Iterate the events of one job (see `run`); the job runs in a helper thread while you iterate."""
    events: queue.Queue = queue.Queue()
    end = object()

    def job():
        try:
            run(spec, out_path, lender, events.put, cancel, section_hook, frame_sink, decode_context, start=start)
        finally:
            events.put(end)

    thread = threading.Thread(target=job, name="f1-job", daemon=True)
    thread.start()
    while (event := events.get()) is not end:
        yield event
    thread.join()


def run(spec: JobSpec, out_path: str | Path, lender: ModelLender, emit, cancel: threading.Event | None = None,
        section_hook=None, frame_sink=None, decode_context: int | None | object = _FROM_SPEC,
        record: dict | None = None, out_of_memory_advice: str | None = None, start: Continuation | None = None,
        calibration_dir: Path | None = None):
    """Write `out_path`, calling `emit(event)` as work progresses; returns (and emits) exactly one of
    Finished, Stopped or Failed. Never raises for a job's own failure: a failed or stopped job keeps a
    playable video of its finished sections and a settings sidecar that says how it ended.

    `section_hook(section_index)` is a seam for fault injection at a section boundary (tests);
    `frame_sink(uint8 (N, H, W, 3))` sees every frame as it goes to the encoder (on the encoder thread).
    `decode_context`: None decodes as the official loop (18 latents per later section); k (1..9) decodes the 9
    new latents after k older ones (k a multiple of 3 keeps the VAE's frame-tile grid: see sections.py).
    Default: ALIGNED_CONTEXT when `spec.fast_decode`, else None. `record`: more to record with the job's settings
    (in the settings file and the MP4's metadata), e.g. the memory plan the worker ran it under, and "model_files"
    (weights.layout.model_fingerprint), which the section state keeps. `start`: continue what an earlier job made
    (resume, branch, extend: continuation.py); checked before anything is written.
    After each section, what continuing from it needs is saved beside the video (state.py).
    `out_of_memory_advice`: what to pick instead, should the GPU run out of memory (the worker derives it from the
    job's memory plan: memory.plan.leaner_choices); it ends the one line such a failure gives.
    `calibration_dir`: where MagCache's calibrations are kept (step_cache.py; None: the published ratios only).
    Sections are encoded on a helper thread while the next one samples; SectionSaved is emitted from there,
    once the section is in the file, so it may come after the next section's first Steps.
    """
    cancel = cancel or threading.Event()
    started = time.monotonic()
    out_path = Path(out_path)
    files = _JobFiles(out_path, record)
    try:
        spec = spec.validate(image_required=start is None).with_seed()
        origin = None
        if start is not None:
            origin = continuation.open_origin(start, spec, files.record.get("model_files"))
            spec = origin.spec
        if decode_context is _FROM_SPEC:
            decode_context = ALIGNED_CONTEXT if spec.fast_decode else None
        check_decode_context(decode_context)
        ratios = None  # MagCache's, checked before anything is encoded or loaded (a bad calibration file: one line)
        if spec.cache_method == "magcache":
            height, width = (origin.height, origin.width) if origin is not None else _bucket(spec)
            ratios = step_cache.mag_ratios(spec, height, width, files.record, calibration_dir)
        files.record = {**files.record, **step_cache.record_of(spec, ratios)}
        if origin is None:
            inputs, loop_start = _prepare(spec, files, lender, emit, cancel), None
            files.start_state(spec, inputs, decode_context)
        else:
            inputs, loop_start = _prepare_continued(origin, files, lender, emit, cancel, decode_context, frame_sink,
                                                    started)
        emit(Phase("transformer", "loading the video model"))
        with lender.use(TRANSFORMER) as transformer:
            notice = lender.first_use_notice(TRANSFORMER, (inputs.height, inputs.width))
            if notice:
                emit(Phase("transformer", notice))
            cache = step_cache.attach(transformer, spec, ratios)
            try:
                if files.encoder is None:
                    files.start_video(inputs, frame_sink, emit, started)
                first = loop_start.first_section if loop_start else 0
                _sample_sections(inputs, transformer, cache, lender, files.encoder, emit, cancel,
                                 EtaClock(started, spec.steps, spec.sections - first), decode_context, section_hook,
                                 loop_start, files.state.section_sampled)
                if spec.cache_calibrate:
                    _save_calibration(spec, cache, inputs, files.record, calibration_dir, emit)
                # what is left: the last section's encode on the writer thread (and freeing the models)
                emit(Phase("writing", "writing the last section"))
            finally:
                step_cache.detach(transformer, cache)
        files.encoder.finish()  # every section in the file; an encoder error fails the job here
        frames = files.end("finished")
        result = Finished(str(out_path), str(files.settings_path), frames, time.monotonic() - started)
    except (Cancelled, KeyboardInterrupt):  # Ctrl+C in the CLI is a stop too: keep what is done
        frames = files.end("stopped")
        result = Stopped(files.kept(frames), frames)
    except UserError as exc:
        frames = files.end("failed", exc.message)
        result = Failed(exc.message, files.kept(frames), exc.reason)
    except torch.OutOfMemoryError as exc:
        # No retry of the section with a leaner plan: that needs the section state saved, to resume from it.
        advice = out_of_memory_advice or "try a lower resolution, or close other programs using the GPU"
        what = " ".join(str(exc).split())[:120]
        del exc  # its traceback holds the failed section's tensors: free them before the next job
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        message = f"out of GPU memory ({what}): {advice}"
        frames = files.end("failed", message)
        result = Failed(message, files.kept(frames), "memory")
    except Exception as exc:  # an internal error: one line for the user, the traceback in the log
        if getattr(exc, "errno", None) == errno.ENOSPC:  # writing the video or the settings (Windows' 112 too)
            message = f"the disk is full ({out_path.parent}): free some space, then run the job again"
            reason = "disk"
        else:
            log.exception("generation failed")
            message = f"internal error: {exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}"
            reason = "internal"
        frames = files.end("failed", message)
        result = Failed(message, files.kept(frames), reason)
    emit(result)
    return result


def _sample_sections(inputs: JobInputs, transformer, cache, lender: ModelLender, encoder: BackgroundWriter,
                     emit, cancel: threading.Event, clock: EtaClock, decode_context: int | None, section_hook,
                     loop_start: "LoopStart | None" = None, on_section_done=None) -> None:
    """The section loop: history -> clean latents -> sample -> append -> decode the tail -> write.
    `loop_start`: a continued job's first section and the history before it; `on_section_done(section,
    new_latents, generator_state)`: each section's latents as sampled (the section state)."""
    spec, start_latent = inputs.spec, inputs.start_latent
    device, dtype = transformer.device, transformer.dtype
    guidance = torch.tensor([spec.gs * GUIDANCE_SCALE], device=device, dtype=dtype)
    # the model's inputs once per distinct conditioning (a prompt, or a blend of two), not once per section
    first = loop_start.first_section if loop_start else 0
    positives = {}
    for plan in inputs.section_prompts[first:]:
        if plan not in positives:
            positives[plan] = model_inputs(_conditioning(plan, inputs.prompts), inputs.image_embeds, guidance,
                                           device, dtype)
    negative = model_inputs(inputs.negative, inputs.image_embeds, guidance, device, dtype) if inputs.negative else None
    history = loop_start.history if loop_start else History.start(start_latent)
    for section in range(first, spec.sections):
        if section_hook:
            section_hook(section)
        _check_cancel(cancel)
        # said at its start: a section's first Step comes a step later (and, compiling, tens of seconds later)
        emit(Phase("sampling", f"section {section + 1}/{spec.sections}"))
        positive = positives[inputs.section_prompts[section]]
        denoiser = Denoiser(transformer, positive, negative, spec.cfg, spec.rs, spec.steps, cache,
                            conditioning=history.conditioning(start_latent))
        calls_before = (cache.computed_calls, cache.skipped_calls) if cache is not None else None
        new_latents = _sample_section(spec, section, denoiser, start_latent, inputs.generator, cancel, emit, clock)
        if cache is not None:
            computed, skipped = (now - before for now, before in
                                 zip((cache.computed_calls, cache.skipped_calls), calls_before))
            emit(CacheReport(section, spec.sections, spec.cache_method, computed, computed + skipped))
        if on_section_done:
            on_section_done(section, new_latents, inputs.generator.get_state())
        history.append(new_latents)
        pixels = _decode_tail(lender, history, section, spec.sections, decode_context, emit, clock)
        encoder.put(section, *section_frames(pixels, section, decode_context))
        del pixels  # the encoder thread frees them once written


def _bucket(spec: JobSpec) -> tuple[int, int]:
    """(height, width) of the job's resolution bucket, from its start image (read again by _prepare)."""
    source = image_ops.load_image(spec.image)
    return image_ops.nearest_bucket(*source.shape[:2], resolution=spec.resolution)


def _save_calibration(spec: JobSpec, cache, inputs: JobInputs, record: dict, folder: Path, emit) -> None:
    """A calibration run's ratios (the mean over its sections) stored for the MagCache jobs after it."""
    ratios = cache.calibrated_ratios(spec.steps)
    if ratios is None:
        emit(Notice("MagCache calibration: no section was sampled in full, nothing stored"))
        return
    key = step_cache.calibration_key(spec, inputs.height, inputs.width, record)
    path = step_cache.save_calibration(folder, key, ratios)
    emit(Notice(f"MagCache calibrated on {len(cache.calibration)} sections and stored in {path}: later MagCache "
                f"jobs with this model, step count, resolution, storage and LoRA set use it"))


def _conditioning(plan: SectionPrompt, prompts: dict[str, text.PromptEmbeds]) -> text.PromptEmbeds:
    if plan.blend_from is None:
        return prompts[plan.prompt]
    return text.mix_embeds(prompts[plan.blend_from], prompts[plan.prompt], plan.weight)


def _prepare(spec: JobSpec, files: "_JobFiles", lender: ModelLender, emit, cancel: threading.Event) -> JobInputs:
    """The start image cropped to its bucket, the settings file, the prompt and image embeddings, the start
    latent: everything the sections need before the transformer loads."""
    source = image_ops.load_image(spec.image)
    height, width = image_ops.nearest_bucket(*source.shape[:2], resolution=spec.resolution)
    start_image = image_ops.resize_and_center_crop(source, width, height)
    files.write_settings(spec, height, width)
    emit(Phase("settings", f"seed {spec.seed}, {width}x{height}, {spec.sections} sections, {spec.frames} frames"))

    changes, plan = spec.prompt_schedule(), spec.section_prompts()
    if len(changes) > 1:
        emit(Phase("prompts", describe(changes)))
    # Every prompt of every section here, before the transformer loads, so the plan's peaks hold. Known prompts
    # come from the prompt cache: the 15 GB text encoder is loaded only for new ones, once for all of them (and
    # the negative counts only with real CFG, the only time it is used).
    distinct = distinct_prompts(plan)
    emit(Phase("text", "encoding the prompt" if len(distinct) == 1 else f"encoding {len(distinct)} prompts"))
    embeds, encoded = text.encode_prompts(distinct + ([spec.negative] if spec.cfg != 1 else []), lender)
    prompts = dict(zip(distinct, embeds))
    negative = embeds[-1] if spec.cfg != 1 else None
    if not encoded:
        emit(Phase("text", "prompt embeddings from the cache (text encoder not loaded)"))
    for prompt, embed in prompts.items():
        for message in embed.notices:
            emit(Notice(message if len(prompts) == 1 else f"{message} ('{_short(prompt)}')"))
    _check_cancel(cancel)

    emit(Phase("image", "encoding the start image"))
    image_embeds = _encode_image(lender, start_image)
    with lender.use(VAE) as vae:
        start_latent = vae_ops.encode(vae, image_ops.to_model_tensor(start_image), start_latent_generator(spec.seed))
    _check_cancel(cancel)
    return JobInputs(spec, width, height, prompts, plan, negative, image_embeds, start_latent,
                     section_noise_generator(spec.seed))


# A seed gives the official worker's noise: its generator, `torch.Generator("cpu").manual_seed(seed)`, draws only
# the sections' noise, in order. Its start latent is a VAE posterior sample from unseeded randomness; here that
# sample has a generator of its own, derived from the seed, so a seed still reproduces the whole video.
START_LATENT_SEED_MIX = 0x9E3779B97F4A7C15  # any fixed 64-bit pattern: XOR keeps every seed's pair distinct


def section_noise_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def start_latent_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed ^ START_LATENT_SEED_MIX)


def _sample_section(spec, section, denoiser, start_latent, generator, cancel, emit, clock) -> torch.Tensor:
    """Sample one section's 9 new latent frames, emitting a Step (with preview) per step."""
    _, channels, _, h, w = start_latent.shape  # (1, 16, 1, h, w)
    noise = torch.randn((1, channels, LATENT_WINDOW, h, w), generator=generator, dtype=torch.float32)
    seq_len = LATENT_WINDOW * h * w // 4  # new-latent tokens after the 2x2 patching
    sigmas = flux_sigmas(spec.steps, flux_mu(seq_len))
    last = [time.monotonic()]
    unreported = []  # the step the GPU may still be running: reported once it is done, while the next one runs

    def report(i: int, preview: vae_ops.PendingPreview) -> None:
        strip = preview.wait()
        now = time.monotonic()
        elapsed, eta = clock.step(now - last[0])
        last[0] = now
        emit(Step(section, spec.sections, i + 1, spec.steps, elapsed, eta, strip))

    def on_step(info):
        preview = vae_ops.PendingPreview(info["denoised"])
        if unreported:
            report(*unreported.pop())
        unreported.append((info["i"], preview))
        _check_cancel(cancel)  # a stop is honoured between steps

    sampler = sample_unipc if spec.sampler == "unipc" else sample_euler
    # the sampler runs where the model does: on the host, its arithmetic and the copies made every step wait for the
    # GPU and then leave it idle (docs/benchmarks.md, "Sampler on the device and previews without a sync")
    latents = sampler(denoiser, noise.to(denoiser.transformer.device), sigmas, callback=on_step)
    if unreported:
        report(*unreported.pop())
    return latents.float().cpu()  # (1, 16, 9, h, w)


def _decode_tail(lender: ModelLender, history: History, section: int, sections: int, decode_context: int | None,
                 emit, clock: EtaClock) -> torch.Tensor:
    """Decode the latents this section shows (sections.decode_latent_count) -> pixels (3, F, H, W) on the CPU."""
    emit(Phase("decode", f"decoding section {section + 1}/{sections}"))
    started = time.monotonic()
    tail = history.latents[:, :, -decode_latent_count(section, decode_context):]
    with lender.use(VAE) as vae:
        notice = lender.first_use_notice(VAE, tuple(tail.shape))
        if notice:
            emit(Phase("decode", notice))
        pixels = vae_ops.decode(vae, tail)
    # the clock counts the decode only: the encode overlaps the next section's sampling
    clock.section_finished(time.monotonic() - started)
    return pixels


def _encode_image(lender: ModelLender, start_image):
    """SigLIP's embedding of the start image. A function of its own so that no local of the job keeps the model
    alive after the lender frees it: held by `run`'s locals it stayed in VRAM through the whole job (0.8 GB of
    an 8 GB card: the full-size run of bench/bench_run.py ran out of memory sampling)."""
    with lender.use(IMAGE_ENCODER) as (processor, image_encoder):
        return image_ops.encode_siglip(start_image, processor, image_encoder)


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled()


class _JobFiles:
    """The job's video (written on an encoder thread) and its settings sidecar, and how they end."""

    def __init__(self, out_path: Path, record: dict | None = None):
        self.out_path = out_path
        self.record = record or {}
        self.settings: dict | None = None
        self.settings_path: Path | None = None
        self.encoder: BackgroundWriter | None = None
        self.state: SectionStore | None = None
        self.writing = out_path  # where the frames go: a resume writes beside the output, then moves it there
        self.replaces: Path | None = None  # a resume's earlier unfinished file, dropped once the new one is in place
        self._image: str | None = None

    def write_settings(self, spec: JobSpec, height: int, width: int,
                       prompts: tuple[list[PromptChange], list[SectionPrompt]] | None = None) -> None:
        """`prompts`: (changes, each section's prompt) where not the spec's own (a continued job's)."""
        changes, plan = prompts or (spec.prompt_schedule(), spec.section_prompts())
        self.settings = {**spec.settings(), "height": height, "width": width, "sections": spec.sections,
                         **schedule_record(changes, plan),
                         "app_version": __version__, **self.record,
                         "models": {name: COMPONENTS[name].repo
                                    for name in ("transformer", "text_encoder", "image_encoder")}}
        self._image = spec.image or None
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.settings_path = write_sidecar(self.out_path, {**self.settings, "status": "running"}, self._image)

    def start_state(self, spec: JobSpec, inputs: JobInputs, decode_context: int | None,
                    origin: "continuation.Origin | None" = None) -> None:
        """The section state beside the video (state.py): the encoders' outputs now, each section as it is made."""
        header = {"settings": self.settings, "width": inputs.width, "height": inputs.height,
                  "model_files": self.record.get("model_files"), "decode_context": decode_context,
                  "planned_sections": spec.sections}
        if origin is not None and origin.saved is None:
            header["brought_video"] = origin.video.name  # its section 1 is that video, not sampled latents
        self.state = SectionStore(self.out_path, spec.section_state, header, self.writing.name,
                                  inputs.section_prompts)
        resumed = origin is not None and origin.kind == "resume"
        tensors = None if resumed else _input_tensors(inputs)
        self.state.begin(tensors, origin.kept if origin else None,
                         origin.saved.folder if origin and origin.saved else None)

    def start_video(self, inputs: JobInputs, frame_sink, emit, started: float) -> None:
        spec, out_path = inputs.spec, self.out_path
        # the settings in the file itself, with the name of the start image's copy beside it (settings from a file)
        settings = {**self.settings, "input_image_file": input_copy_name(out_path, self._image)}
        writer = SectionVideoWriter(self.writing, inputs.width, inputs.height, crf=spec.crf, frame_sink=frame_sink,
                                    metadata={METADATA_KEY: json.dumps(settings, sort_keys=True)})

        def saved(section, frames_on_disk):  # on the encoder thread, once the section is in the file
            if self.state is not None:  # what a resume copies: the frames a killed job's file holds for sure
                self.state.section_saved(section, frames_on_disk)
            emit(SectionSaved(section, spec.sections, str(self.writing), frames_on_disk,
                              time.monotonic() - started))

        self.encoder = BackgroundWriter(writer, saved)

    def end(self, status: str, message: str | None = None) -> int:
        """Close the video (frames in the file) and record how the job ended in the settings file."""
        frames = self._close()
        if self.writing != self.out_path and self.encoder is not None:
            frames = self._move_into_place(frames)
        if self.settings is not None:
            try:
                write_sidecar(self.out_path, {**self.settings, "status": status, "frames": frames,
                                              **({"message": message} if message else {})}, self._image)
            except OSError:
                log.exception("writing the settings sidecar failed")
        return frames

    def _move_into_place(self, frames: int) -> int:
        """A resume's file replaces the output it continued (it holds all of its frames and more)."""
        try:
            os.replace(self.writing, self.out_path)
            if self.state is not None:
                self.state.set_video(self.out_path.name)
            if self.replaces is not None and self.replaces != self.out_path:
                self.replaces.unlink(missing_ok=True)
        except OSError:
            log.exception("moving %s into place failed; the frames are in it", self.writing)
        return frames

    def kept(self, frames: int) -> str | None:
        return str(self.out_path) if frames else None

    def _close(self) -> int:
        if self.encoder is None:
            return 0
        try:
            return self.encoder.close()
        except Exception:  # never let a failing close hide the original outcome
            log.exception("closing the video failed")
            # after a failed write (a full disk) the encoder's count is more than the file holds: count those
            try:
                return count_frames(self.writing)
            except Exception:
                log.exception("the video %s cannot be read back", self.writing)
                return 0


# --- continued jobs (continuation.py): resume, branch, extend ----------------------------------------------------

@dataclass
class LoopStart:
    """Where a continued job's section loop starts."""
    first_section: int
    history: History  # the latents before it


def _prepare_continued(origin: "continuation.Origin", files: "_JobFiles", lender: ModelLender, emit,
                       cancel: threading.Event, decode_context: int | None, frame_sink,
                       started: float) -> tuple[JobInputs, LoopStart]:
    """What `_prepare` makes, for a job that continues `origin`: the saved encoder outputs where they still apply
    (a resume loads no encoder), the history, and the video holding the frames before the first new section."""
    spec, plan = origin.spec, origin.section_prompts
    if origin.kind == "resume":
        files.writing = files.out_path.with_name(f".{files.out_path.stem}.resume-{time.time_ns()}.mp4")
        files.replaces = origin.video
    files.record = {**files.record, "continued": {"kind": origin.kind, "video": origin.video.name,
                                                  "from_section": origin.first_section + 1}}
    files.write_settings(spec, origin.height, origin.width, (origin.prompt_changes, plan))
    emit(Phase("settings", f"seed {spec.seed}, {origin.width}x{origin.height}, {origin.kind} from section "
                           f"{origin.first_section + 1} of {spec.sections}, {spec.frames} frames"))
    if len(origin.prompt_changes) > 1:
        emit(Phase("prompts", describe(origin.prompt_changes)))
    if origin.anchor_note:
        emit(Notice(origin.anchor_note))
    saved = origin.saved.inputs() if origin.saved is not None else {}
    prompts, negative = _continued_prompts(origin, saved, lender, emit)
    _check_cancel(cancel)
    if origin.anchor_image is None:
        image_embeds, start_latent = saved["image_embeds"], saved["start_latent"]
    else:
        emit(Phase("image", "encoding the start image"))
        image_embeds = _encode_image(lender, origin.anchor_image)
        with lender.use(VAE) as vae:
            start_latent = vae_ops.encode(vae, image_ops.to_model_tensor(origin.anchor_image),
                                          start_latent_generator(spec.seed))
    generator = section_noise_generator(spec.seed)
    if origin.generator_state is not None:
        generator.set_state(origin.generator_state)
    inputs = JobInputs(spec, origin.width, origin.height, prompts, plan, negative, image_embeds, start_latent,
                       generator)
    emit(Phase("decode", "putting back the frames before the first new section"))
    history, frames = continuation.history_and_frames(origin, lender, start_latent_generator(spec.seed))
    files.start_state(spec, inputs, decode_context, origin)
    files.start_video(inputs, frame_sink, emit, started)
    writer = files.encoder.writer
    if origin.copy_frames:
        writer.copy_frames(origin.video, origin.copy_frames)
    for pixels in frames:
        writer.append(pixels)
        _check_cancel(cancel)
    if origin.saved is None:  # a brought video: the history it gave stands as section 1's latents (resumable)
        files.state.section_sampled(0, history.latents, generator.get_state())
        files.state.section_saved(0, writer.frames_on_disk)
    return inputs, LoopStart(origin.first_section, history)


def _continued_prompts(origin: "continuation.Origin", saved: dict, lender: ModelLender,
                       emit) -> tuple[dict[str, text.PromptEmbeds], text.PromptEmbeds | None]:
    """Every prompt of the continued output's sections (and the negative, with real CFG): the saved embeddings of
    those the source already had, the others encoded (through the prompt cache)."""
    spec = origin.spec
    known = origin.saved.prompt_embeds(saved) if origin.saved is not None else {}
    prompts = {prompt: known[prompt] for prompt in distinct_prompts(origin.section_prompts) if prompt in known}
    missing = [prompt for prompt in distinct_prompts(origin.section_prompts) if prompt not in prompts]
    negative = None
    if spec.cfg != 1 and origin.saved is not None and origin.saved.settings.get("negative") == spec.negative:
        negative = origin.saved.negative_embeds(saved)
    wants_negative = spec.cfg != 1 and negative is None
    if missing or wants_negative:
        emit(Phase("text", "encoding the prompt" if len(missing) + wants_negative == 1 else
                   f"encoding {len(missing) + wants_negative} prompts"))
        embeds, _ = text.encode_prompts(missing + ([spec.negative] if wants_negative else []), lender)
        prompts.update(zip(missing, embeds))
        if wants_negative:
            negative = embeds[-1]
    return prompts, negative


def _input_tensors(inputs: JobInputs) -> dict[str, torch.Tensor]:
    """The encoders' outputs a continued job reuses (state.py's inputs.safetensors)."""
    return {"start_latent": inputs.start_latent, "image_embeds": inputs.image_embeds,
            **prompt_tensors(inputs.section_prompts, inputs.prompts, inputs.negative)}
