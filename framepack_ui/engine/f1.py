"""The FramePack F1 section loop: history -> clean latents -> sample -> append -> decode the tail -> write (on
an encoder thread, beside the next section's sampling).

`generate(spec, out_path, manager, cancel)` yields typed events (see events.py). Each section predicts 9 new
latent frames (36 video frames) conditioned on the start latent and the last 16 + 2 + 1 history frames at 4x,
2x and 1x compression; the token count per call is constant, so time is linear in video length and memory flat.
"""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..errors import Cancelled, UserError
from ..events import Failed, Finished, Notice, Phase, SectionSaved, Step, Stopped
from ..sidecar import write_sidecar
from ..spec import LATENT_WINDOW, JobSpec
from ..weights.layout import COMPONENTS
from . import image as image_ops
from . import text, vae as vae_ops
from .sampling import flux_mu, flux_sigmas, sample_euler, sample_unipc
from .teacache import apply_teacache, remove_teacache
from .video import BackgroundWriter, SectionVideoWriter

log = logging.getLogger(__name__)

HISTORY_SIZES = (16, 2, 1)  # history latent frames fed at 4x, 2x and 1x compression (oldest first)
DECODE_LATENTS = 2 * LATENT_WINDOW  # later sections decode 18 latents and cross-fade 33 of the 69 frames
OVERLAP_FRAMES = LATENT_WINDOW * 4 - 3  # 33
FRAMES_PER_SECTION = LATENT_WINDOW * 4  # 36 new frames per section
# The context decode (`decode_context` k): a later section decodes its 9 new latents after k older ones instead
# of the official 18. diffusers decodes frame tiles of 16 frames at a stride of 12 (3 latents) counted from the
# first latent it is given, each tile on its own: a k that is a multiple of 3 keeps the official tile grid, so
# the new latents' frames come out bit for bit as in the official decode (checked on the tiny VAE); other k move
# every tile boundary. k = 3 is the smallest such. The official loop cross-fades 33 frames of two decodes; the
# context decode fades only the frames it reproduces exactly (see section_overlap).
ALIGNED_CONTEXT = 3
# Section 1 decodes officially: section 0's decode starts one latent earlier (the start latent), so its tile grid
# is one latent off and only the full 18-latent decode reproduces the official fade between the two.
CONTEXT_FROM_SECTION = 2
GUIDANCE_SCALE = 1000.0  # distilled guidance is fed to the model as gs * 1000
TIMESTEP_SCALE = 1000.0  # the model's timestep is sigma * 1000


@dataclass
class History:
    """The newest latent frames (1, 16, T, h, w), zero-padded at the start as the official demo does."""
    latents: torch.Tensor

    @classmethod
    def start(cls, start_latent: torch.Tensor) -> "History":
        zeros = torch.zeros_like(start_latent).repeat(1, 1, sum(HISTORY_SIZES), 1, 1)
        return cls(torch.cat([zeros, start_latent], dim=2))

    def conditioning(self, start_latent: torch.Tensor) -> dict:
        """The transformer's clean-latent inputs, with their frame indices in the official layout."""
        kept = self.latents[:, :, -sum(HISTORY_SIZES):]
        latents_4x, latents_2x, latents_1x = kept.split(HISTORY_SIZES, dim=2)
        # Frame positions: [start, 16 x 4x, 2 x 2x, 1 x 1x, 9 new] = 0 | 1..16 | 17..18 | 19 | 20..28
        indices = torch.arange(1 + sum(HISTORY_SIZES) + LATENT_WINDOW)
        start_idx, idx_4x, idx_2x, idx_1x, idx_new = indices.split([1, *HISTORY_SIZES, LATENT_WINDOW])
        # diffusers' FramePack RoPE takes 1-D index tensors (the official model took (1, N))
        return dict(
            indices_latents=idx_new,
            latents_clean=torch.cat([start_latent, latents_1x], dim=2),
            indices_latents_clean=torch.cat([start_idx, idx_1x]),
            latents_history_2x=latents_2x, indices_latents_history_2x=idx_2x,
            latents_history_4x=latents_4x, indices_latents_history_4x=idx_4x,
        )

    def append(self, new_latents: torch.Tensor) -> None:
        # Only the newest frames are ever read (19 for conditioning, 18 for decoding): keep memory flat.
        keep = max(sum(HISTORY_SIZES), DECODE_LATENTS)
        self.latents = torch.cat([self.latents, new_latents], dim=2)[:, :, -keep:]


def _context(section: int, decode_context: int | None, from_section: int) -> int | None:
    """The context this section decodes with; None: the official decode."""
    if decode_context is None or section < from_section or decode_context >= LATENT_WINDOW:
        return None
    return decode_context


def decode_latent_count(section: int, decode_context: int | None = None,
                        from_section: int = CONTEXT_FROM_SECTION) -> int:
    """Latents a section decodes: the first its 9 and the start latent; a later one the last 18 (official) or,
    with a context from `from_section` on, its 9 new ones after `decode_context` older ones."""
    if section == 0:
        return LATENT_WINDOW + 1
    context = _context(section, decode_context, from_section)
    return DECODE_LATENTS if context is None else LATENT_WINDOW + context


def section_overlap(section: int, decode_context: int | None = None, from_section: int = CONTEXT_FROM_SECTION) -> int:
    """Frames before a later section's last 36 that cross-fade into the video (official: 33, its whole old part).

    A context decode of k latents gives 1 frame for the first and 4 for each other; the first two latents' frames
    differ from the official decode (its own first frame; a tile not blended with the one before), so only the
    remaining 4k - 8 frames fade in, with the end of the official weights; the frame before them keeps weight 1.
    """
    context = _context(section, decode_context, from_section)
    return OVERLAP_FRAMES if context is None else max(1, 4 * context - 7)


def section_frames(pixels: torch.Tensor, section: int, decode_context: int | None = None,
                   from_section: int = CONTEXT_FROM_SECTION) -> tuple[torch.Tensor, int | None]:
    """A section's decoded frames as the writer takes them, and their cross-fade length (None for section 0)."""
    if section == 0:
        return pixels, None
    fade = section_overlap(section, decode_context, from_section)
    return pixels[:, -(FRAMES_PER_SECTION + fade):], fade


def check_decode_context(decode_context: int | None) -> int | None:
    if decode_context is not None and not 1 <= decode_context <= LATENT_WINDOW:
        raise ValueError(f"decode_context must be None or 1..{LATENT_WINDOW}, got {decode_context}")
    return decode_context


class Denoiser:
    """Adapts the transformer (a velocity predictor) to the samplers' `denoise(x, sigma) -> x0` and owns
    real CFG. One Denoiser per section: it holds that section's clean-latent conditioning and step count."""

    def __init__(self, transformer, positive: dict, negative: dict | None, cfg: float, rs: float, steps: int,
                 teacache=None, conditioning: dict | None = None):
        device, dtype = transformer.device, transformer.dtype
        cond = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                for k, v in (conditioning or {}).items()}
        _mask_to_device(transformer)
        self.transformer = transformer
        self.positive = _with_host_mask({**positive, **cond}, device)
        self.negative = _with_host_mask({**negative, **cond}, device) if negative is not None and cfg != 1 else None
        self.cfg, self.rs, self.steps, self.teacache = cfg, rs, steps, teacache
        self.step = 0
        self.calls = 0
        if teacache is not None:
            teacache.reset()  # each section starts again at sigma 1

    def _velocity(self, x: torch.Tensor, timestep: torch.Tensor, inputs: dict, branch: str) -> torch.Tensor:
        if self.teacache is not None:
            self.teacache.begin(self.step, self.steps, branch)
        self.calls += 1
        return self.transformer(hidden_states=x, timestep=timestep, return_dict=False, **inputs)[0].float()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        dtype, device = self.transformer.dtype, self.transformer.device
        # sigma stays a tensor where the sampler keeps it (on the GPU: reading it would wait for the GPU); the
        # timestep is rounded from float64 as the official float(sigma) * 1000 is
        sigma = torch.as_tensor(sigma, dtype=torch.float32).to(device)
        x_model = x.to(device, dtype)  # (1, 16, 9, h, w)
        timestep = (sigma.double() * TIMESTEP_SCALE).to(dtype).reshape(1)
        velocity = self._velocity(x_model, timestep, self.positive, "positive")
        if self.negative is not None:
            negative = self._velocity(x_model, timestep, self.negative, "negative")
            guided = negative + self.cfg * (velocity - negative)
            velocity = _rescale_cfg(guided, velocity, self.rs)
        self.step += 1
        # x0 from the model's own (possibly rounded) input, as the official wrapper does
        return (x_model.float() - velocity * sigma).to(x.device)


def _rescale_cfg(guided: torch.Tensor, positive: torch.Tensor, rs: float) -> torch.Tensor:
    if rs == 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rs * rescaled + (1 - rs) * guided


def _model_inputs(embeds: text.PromptEmbeds, image_embeds: torch.Tensor, pooled_guidance: torch.Tensor,
                  device, dtype) -> dict:
    e = embeds.to(device, dtype)
    return dict(encoder_hidden_states=e.llama, encoder_attention_mask=e.llama_mask, pooled_projections=e.clip_pooled,
                image_embeds=image_embeds.to(device, dtype), guidance=pooled_guidance)


def _with_host_mask(inputs: dict, device) -> dict:
    """The text mask moved to the host: diffusers' forward cuts the text tokens at the mask's sum (batch 1), and
    with the mask on the GPU that read waits for the GPU to finish the previous step, every step. The context
    embedder, the one user of the mask on the device, gets a copy (_mask_to_device)."""
    mask = inputs.get("encoder_attention_mask")
    if mask is None:
        return inputs
    mask = mask.cpu()
    return {**inputs, "encoder_attention_mask": mask.pin_memory() if torch.device(device).type == "cuda" else mask}


def _mask_to_device(transformer) -> None:
    """Let the transformer take the text mask on the host (see _with_host_mask); idempotent."""
    embedder = transformer.context_embedder
    if "_framepack_host_mask" in vars(embedder):
        return
    forward = embedder.forward

    def forward_with_mask_on_device(hidden_states, timestep, attention_mask=None):
        if attention_mask is not None:
            attention_mask = attention_mask.to(hidden_states.device, non_blocking=True)
        return forward(hidden_states, timestep, attention_mask)

    embedder.forward = forward_with_mask_on_device
    embedder._framepack_host_mask = True


def _settings(spec: JobSpec, height: int, width: int, sections: int) -> dict:
    return {**spec.settings(), "height": height, "width": width, "sections": sections, "app_version": __version__,
            "models": {name: COMPONENTS[name].repo for name in ("transformer", "text_encoder", "image_encoder")}}


_FROM_SPEC = object()  # decode_context not given: the spec's fast_decode decides


def generate(spec: JobSpec, out_path: str | Path, manager, cancel: threading.Event | None = None,
             section_hook=None, frame_sink=None, decode_context: int | None | object = _FROM_SPEC):
    """Iterate the events of one job (see `run`); the job runs in a helper thread while you iterate."""
    events: queue.Queue = queue.Queue()
    end = object()

    def job():
        try:
            run(spec, out_path, manager, events.put, cancel, section_hook, frame_sink, decode_context)
        finally:
            events.put(end)

    thread = threading.Thread(target=job, name="f1-job", daemon=True)
    thread.start()
    while (event := events.get()) is not end:
        yield event
    thread.join()


def run(spec: JobSpec, out_path: str | Path, manager, emit, cancel: threading.Event | None = None,
        section_hook=None, frame_sink=None, decode_context: int | None | object = _FROM_SPEC):
    """Write `out_path`, calling `emit(event)` as work progresses; returns (and emits) exactly one of
    Finished, Stopped or Failed. Never raises for a job's own failure: a failed or stopped job keeps a
    playable video of its finished sections and a settings sidecar that says how it ended.

    `section_hook(section_index)` is a seam for fault injection at a section boundary (tests);
    `frame_sink(uint8 (N, H, W, 3))` sees every frame as it goes to the encoder (on the encoder thread).
    `decode_context`: None decodes as the official loop (18 latents per later section); k (1..9) decodes the 9
    new latents after k older ones (k a multiple of 3 keeps the VAE's frame-tile grid: see ALIGNED_CONTEXT).
    Default: ALIGNED_CONTEXT when `spec.fast_decode`, else None.
    Sections are encoded on a helper thread while the next one samples; SectionSaved is emitted from there,
    once the section is in the file, so it may come after the next section's first Steps.
    """
    cancel = cancel or threading.Event()
    started = time.monotonic()
    out_path = Path(out_path)
    encoder = settings = None
    try:
        spec = spec.validate().with_seed()
        if decode_context is _FROM_SPEC:
            decode_context = ALIGNED_CONTEXT if spec.fast_decode else None
        check_decode_context(decode_context)
        source = image_ops.load_image(spec.image)
        height, width = image_ops.nearest_bucket(*source.shape[:2], resolution=spec.resolution)
        start_image = image_ops.resize_and_center_crop(source, width, height)
        sections = spec.sections
        settings = _settings(spec, height, width, sections)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        settings_path = write_sidecar(out_path, {**settings, "status": "running"}, spec.image)
        emit(Phase("settings", f"seed {spec.seed}, {width}x{height}, {sections} sections, {spec.frames} frames"))

        emit(Phase("text", "encoding the prompt"))
        # Known prompts come from the prompt cache: the 15 GB text encoder is loaded only for a new one (and the
        # negative counts only with real CFG, the only time it is used).
        prompts = [spec.prompt] + ([spec.negative] if spec.cfg != 1 else [])
        embeds, encoded = text.encode_prompts(prompts, manager)
        positive, negative = embeds[0], (embeds[1] if spec.cfg != 1 else None)
        if not encoded:
            emit(Phase("text", "prompt embeddings from the cache (text encoder not loaded)"))
        for message in positive.notices:
            emit(Notice(message))
        _check_cancel(cancel)

        emit(Phase("image", "encoding the start image"))
        image_embeds = _encode_image(manager, start_image)
        generator = torch.Generator("cpu").manual_seed(spec.seed)
        with manager.use("vae") as vae:
            start_latent = vae_ops.encode(vae, image_ops.to_model_tensor(start_image), generator)
        _check_cancel(cancel)

        emit(Phase("transformer", "loading the video model"))
        with manager.use("transformer") as transformer:
            if _first_compiled_run(transformer, (height, width)):
                emit(Phase("transformer", "compiling the model for this size: the first step takes about 20 s "
                                          "longer (once per size)"))
            device, dtype = transformer.device, transformer.dtype
            guidance = torch.tensor([spec.gs * GUIDANCE_SCALE], device=device, dtype=dtype)
            pos_inputs = _model_inputs(positive, image_embeds, guidance, device, dtype)
            neg_inputs = _model_inputs(negative, image_embeds, guidance, device, dtype) if negative else None
            teacache = apply_teacache(transformer, spec.teacache_threshold) if spec.teacache else None
            try:
                history = History.start(start_latent)
                writer = SectionVideoWriter(out_path, width, height, crf=spec.crf, frame_sink=frame_sink,
                                            metadata={"framepack_settings": json.dumps(settings, sort_keys=True)})

                def saved(section, frames_written):  # on the encoder thread, once the section is in the file
                    emit(SectionSaved(section, sections, str(out_path), frames_written, time.monotonic() - started))

                encoder = BackgroundWriter(writer, saved)
                clock = _Clock(started, spec.steps, sections)
                for section in range(sections):
                    if section_hook:
                        section_hook(section)
                    _check_cancel(cancel)
                    denoiser = Denoiser(transformer, pos_inputs, neg_inputs, spec.cfg, spec.rs, spec.steps,
                                        teacache, conditioning=history.conditioning(start_latent))
                    new_latents = _sample_section(spec, section, sections, denoiser, start_latent, generator,
                                                  cancel, emit, clock)
                    history.append(new_latents)
                    emit(Phase("decode", f"decoding section {section + 1}/{sections}"))
                    finishing_started = time.monotonic()
                    with manager.use("vae") as vae:
                        if _first_compiled_decode(vae):
                            emit(Phase("decode", "compiling the VAE decoder: the first decodes after the app "
                                                 "starts take minutes longer (then each is faster)"))
                        tail = history.latents[:, :, -decode_latent_count(section, decode_context):]
                        pixels = vae_ops.decode(vae, tail)
                    # the clock counts the decode only: the encode overlaps the next section's sampling
                    clock.section_finished(time.monotonic() - finishing_started)
                    encoder.put(section, *section_frames(pixels, section, decode_context))
                    del pixels  # the encoder thread frees them once written
            finally:
                if teacache is not None:
                    remove_teacache(transformer)
        encoder.finish()  # every section in the file; an encoder error fails the job here
        frames = _close(encoder)
        _record_end(out_path, settings, spec, "finished", frames)
        result = Finished(str(out_path), str(settings_path), frames, time.monotonic() - started)
    except (Cancelled, KeyboardInterrupt):  # Ctrl+C in the CLI is a stop too: keep what is done
        frames = _close(encoder)
        _record_end(out_path, settings, spec, "stopped", frames)
        result = Stopped(str(out_path) if frames else None, frames)
    except UserError as exc:
        frames = _close(encoder)
        _record_end(out_path, settings, spec, "failed", frames, exc.message)
        result = Failed(exc.message, str(out_path) if frames else None, exc.reason)
    except torch.OutOfMemoryError as exc:
        frames = _close(encoder)
        message = ("out of memory: " + " ".join(str(exc).split())[:160] +
                   " (try a lower resolution, or close other programs using the GPU)")
        _record_end(out_path, settings, spec, "failed", frames, message)
        result = Failed(message, str(out_path) if frames else None, "memory")
    except Exception as exc:  # an internal error: one line for the user, the traceback in the log
        log.exception("generation failed")
        frames = _close(encoder)
        message = f"internal error: {exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}"
        _record_end(out_path, settings, spec, "failed", frames, message)
        result = Failed(message, str(out_path) if frames else None)
    emit(result)
    return result


class _Clock:
    """Elapsed time and ETA from this job's own measured time per step and per section decode (the encode runs
    beside the next section's sampling)."""

    def __init__(self, started: float, steps: int, sections: int):
        self.started, self.steps, self.sections = started, steps, sections
        self.steps_done = self.sections_done = 0
        self.sampling_s = self.finishing_s = 0.0

    def step(self, step_s: float) -> tuple[float, float]:
        self.steps_done += 1
        self.sampling_s += step_s
        sampling_left = self.sampling_s / self.steps_done * (self.steps * self.sections - self.steps_done)
        # every unfinished section still needs its decode and write; guess 0 until one was measured
        finishing_left = (self.finishing_s / self.sections_done if self.sections_done else 0.0) * (
            self.sections - self.sections_done)
        return time.monotonic() - self.started, sampling_left + finishing_left

    def section_finished(self, finishing_s: float) -> None:
        self.sections_done += 1
        self.finishing_s += finishing_s


def _sample_section(spec, section, sections, denoiser, start_latent, generator, cancel, emit, clock):
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
        emit(Step(section, sections, i + 1, spec.steps, elapsed, eta, strip))

    def on_step(info):
        preview = vae_ops.PendingPreview(info["denoised"])
        if unreported:
            report(*unreported.pop())
        unreported.append((info["i"], preview))
        _check_cancel(cancel)  # a stop is honoured between steps

    sampler = sample_unipc if spec.sampler == "unipc" else sample_euler
    # the sampler runs where the model does: on the host, its arithmetic and the copies made every step wait for
    # the GPU and then left it idle (docs/benchmarks.md, session 6)
    latents = sampler(denoiser, noise.to(denoiser.transformer.device), sigmas, callback=on_step)
    if unreported:
        report(*unreported.pop())
    return latents.float().cpu()  # (1, 16, 9, h, w)


def _first_compiled_run(transformer, size: tuple[int, int]) -> bool:
    """True the first time a compiled transformer (memory/kernels.py) runs at this size: compiling takes 18-20 s
    on an H100 (docs/benchmarks.md), long enough that the user should know why the first step is slow."""
    if not getattr(transformer, "_framepack_compiled", False):
        return False
    seen = transformer.__dict__.setdefault("_framepack_compiled_sizes", set())
    if size in seen:
        return False
    seen.add(size)
    return True


def _first_compiled_decode(vae) -> bool:
    """True at the first decode of a compiled VAE decoder (memory/kernels.py): about 2 min of compiling on the
    H200's host, and some seconds more at each new tile or latent count (docs/benchmarks.md)."""
    if not getattr(vae, "_framepack_compiled_decoder", False) or vae.__dict__.get("_framepack_decoder_warm"):
        return False
    vae._framepack_decoder_warm = True
    return True


def _encode_image(manager, start_image):
    """SigLIP's embedding of the start image. A function of its own so that no local of the job keeps the model
    alive after the manager frees it: held by `run`'s locals it stayed in VRAM through the whole job (0.8 GB of
    an 8 GB card: the full-size run of bench/bench_run.py ran out of memory sampling)."""
    with manager.use("image_encoder") as (processor, image_encoder):
        return image_ops.encode_siglip(start_image, processor, image_encoder)


def _check_cancel(cancel: threading.Event) -> None:
    if cancel.is_set():
        raise Cancelled()


def _close(encoder) -> int:
    if encoder is None:
        return 0
    try:
        return encoder.close()
    except Exception:  # never let a failing close hide the original outcome
        log.exception("closing the video failed")
        return encoder.writer.frames_written


def _record_end(out_path, settings, spec, status, frames, message=None):
    if settings is None:
        return
    try:
        write_sidecar(out_path, {**settings, "status": status, "frames": frames,
                                 **({"message": message} if message else {})}, spec.image)
    except OSError:
        log.exception("writing the settings sidecar failed")
