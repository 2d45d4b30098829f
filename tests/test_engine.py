"""End-to-end engine tests on tiny random models in the real folder layout, through the real loaders."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from framepack_ui.engine import f1, denoiser, sections
from framepack_ui.engine.image import buckets, nearest_bucket
from framepack_ui.engine.teacache import apply_teacache, remove_teacache
from framepack_ui.engine.video import count_frames, read_metadata
from framepack_ui.sidecar import sidecar_path
from framepack_ui.events import Failed, Finished, Notice, SectionSaved, Step, Stopped
from conftest import cpu_manager, cpu_plan
from framepack_ui.spec import JobSpec
from job_settings import FAST


@pytest.fixture(scope="module")
def manager(tiny_models_dir):
    return cpu_manager(tiny_models_dir)


def run_job(manager, out, **settings):
    spec = JobSpec(image=settings.pop("image"), prompt=settings.pop("prompt", "a red square moves"),
                   **{**FAST, **settings})
    events = list(f1.generate(spec, out, manager))
    return events, events[-1]


def decoded_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_buckets_square_keeps_later_bucket_and_scale():
    assert nearest_bucket(1024, 1024) == (640, 608)  # tie: the official loop's `<=` keeps the later bucket
    assert nearest_bucket(720, 1280) == (480, 832)  # |720*832 - 1280*480| is the smallest
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in buckets(128) + buckets(960))
    assert buckets(128)[0] == (80, 192)  # 416x960 scaled by 0.2, sides rounded to multiples of 16


def test_same_seed_same_frames_different_seed_different(manager, start_image, tmp_path):
    _, a = run_job(manager, tmp_path / "a.mp4", image=start_image, seed=7)
    _, b = run_job(manager, tmp_path / "b.mp4", image=start_image, seed=7)
    _, c = run_job(manager, tmp_path / "c.mp4", image=start_image, seed=8)
    assert isinstance(a, Finished) and isinstance(b, Finished) and isinstance(c, Finished)
    fa, fb, fc = (decoded_frames(tmp_path / n) for n in ("a.mp4", "b.mp4", "c.mp4"))
    assert np.array_equal(fa, fb)
    assert not np.array_equal(fa, fc)


def test_random_seed_is_picked_and_recorded(manager, start_image, tmp_path):
    events, end = run_job(manager, tmp_path / "r.mp4", image=start_image, seed=-1)
    assert isinstance(end, Finished)
    settings = json.loads(Path(end.settings_path).read_text())
    assert 0 <= settings["seed"] <= 2**32 - 1
    assert json.loads(read_metadata(end.path)["framepack_settings"])["seed"] == settings["seed"]


def test_events_stream_steps_with_previews_and_sections(manager, start_image, tmp_path):
    events, end = run_job(manager, tmp_path / "e.mp4", image=start_image, seconds=2.4)
    steps = [e for e in events if isinstance(e, Step)]
    saved = [e for e in events if isinstance(e, SectionSaved)]
    assert len(steps) == 2 * FAST["steps"] and [s.section for s in saved] == [0, 1]
    assert steps[0].preview.dtype == np.uint8 and steps[0].preview.shape[2] == 3
    assert steps[0].eta_s > 0 and steps[-1].eta_s > 0  # the last section still has its decode ahead
    # the last 32 frames wait for the next section's cross-fade, and the muxer writes the newest frame with the next
    assert saved[0].frames_written == 37 - 32 - 1
    assert isinstance(end, Finished) and end.frames == 1 + 36 * 2


def test_phases_say_when_each_section_samples_and_when_the_last_is_written(manager, start_image, tmp_path):
    """Each section's sampling starts with a phase (after a decode, the page would still say "Decoding" until the
    next Step, a compiled step later), and after the last decode a "writing" phase covers the wait for the writer:
    the phases tile the job (bench/bench_app.py times them)."""
    from framepack_ui.events import Phase

    events, end = run_job(manager, tmp_path / "p.mp4", image=start_image, seconds=2.4)
    main = [e.name for e in events if isinstance(e, Phase) and e.name in ("sampling", "decode", "writing")]
    assert main == ["sampling", "decode", "sampling", "decode", "writing"]
    sampling = [e for e in events if isinstance(e, Phase) and e.name == "sampling"]
    assert [e.detail for e in sampling] == ["section 1/2", "section 2/2"]
    first_steps = [next(i for i, e in enumerate(events) if isinstance(e, Step) and e.section == k) for k in (0, 1)]
    assert all(events.index(phase) < step for phase, step in zip(sampling, first_steps))
    assert isinstance(end, Finished)


def test_stop_midway_keeps_a_playable_video_of_finished_sections(manager, start_image, tmp_path):
    cancel = threading.Event()
    spec = JobSpec(image=start_image, prompt="stop me", **{**FAST, "seconds": 3.6})
    events = []

    def emit(event):
        events.append(event)
        if isinstance(event, Step) and event.section == 1 and event.step == 2:
            cancel.set()  # the user presses stop during the second section

    end = f1.run(spec, tmp_path / "s.mp4", manager, emit, cancel)
    assert isinstance(end, Stopped) and end.frames == 37
    assert count_frames(tmp_path / "s.mp4") == 37  # section 1 whole, held-back frames flushed on stop
    assert json.loads(sidecar_path(tmp_path / "s.mp4").read_text())["status"] == "stopped"


def test_failure_in_a_later_section_keeps_the_finished_ones(manager, start_image, tmp_path):
    def out_of_memory_at_section_1(section):
        if section == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    spec = JobSpec(image=start_image, prompt="fail later", **{**FAST, "seconds": 2.4})
    end = f1.run(spec, tmp_path / "f.mp4", manager, lambda e: None, section_hook=out_of_memory_at_section_1)
    assert isinstance(end, Failed) and "\n" not in end.message and "out of memory" in end.message
    assert end.reason == "memory"
    assert end.path and count_frames(end.path) == 37


def test_encoding_overlaps_the_next_sections_sampling(manager, start_image, tmp_path):
    """Section 0 is encoded on the encoder thread while section 1 samples: its frame sink waits for section 1's
    first Step, which an inline encode would hold back (the wait then gives up and the test fails)."""
    next_section_started = threading.Event()
    overlapped: list[bool] = []
    events = []

    def sink(rgb):
        if not overlapped:  # 60 s only guards against a hang if encoding went inline again; not a timing assert
            overlapped.append(next_section_started.wait(timeout=60))

    def emit(event):
        events.append(event)
        if isinstance(event, Step) and event.section == 1:
            next_section_started.set()

    spec = JobSpec(image=start_image, prompt="overlap", **{**FAST, "seconds": 2.4})
    end = f1.run(spec, tmp_path / "o.mp4", manager, emit, frame_sink=sink)
    assert overlapped == [True]
    assert isinstance(end, Finished) and end.frames == 1 + 36 * 2 and count_frames(end.path) == 1 + 36 * 2
    kinds = [(type(e).__name__, getattr(e, "section", None)) for e in events]
    assert kinds.index(("Step", 1)) < kinds.index(("SectionSaved", 0))  # saved once really in the file
    assert kinds[-2:] == [("SectionSaved", 1), ("Finished", None)]  # every section is written before the end


def test_an_encoder_failure_fails_the_job_and_keeps_the_written_sections(manager, start_image, tmp_path):
    calls = []

    def sink(rgb):
        calls.append(len(rgb))
        if len(calls) == 2:  # section 1's first chunk (section 0 hands over its 5 final frames in one)
            raise OSError("No space left on device (injected)")

    events = []
    spec = JobSpec(image=start_image, prompt="disk full", **{**FAST, "seconds": 3.6})
    end = f1.run(spec, tmp_path / "d.mp4", manager, events.append, frame_sink=sink)
    assert isinstance(end, Failed) and "No space left on device" in end.message and "\n" not in end.message
    assert [e.section for e in events if isinstance(e, SectionSaved)] == [0]
    assert end.path and count_frames(end.path) == 37  # section 0 whole: its held-back frames flushed on close
    assert json.loads(sidecar_path(tmp_path / "d.mp4").read_text())["status"] == "failed"


def test_teacache_threshold_zero_equals_off_and_positive_skips(manager, start_image, tmp_path):
    _, off = run_job(manager, tmp_path / "off.mp4", image=start_image, teacache=False, steps=12)
    _, zero = run_job(manager, tmp_path / "zero.mp4", image=start_image, teacache=True, teacache_threshold=0.0,
                      steps=12)
    assert np.array_equal(decoded_frames(off.path), decoded_frames(zero.path))

    # Count real model calls with the tiny transformer: a positive threshold must skip some.
    with manager.use("transformer") as transformer:
        calls = {}
        for threshold in (0.0, 0.15):
            cache = apply_teacache(transformer, threshold)
            try:
                d = _tiny_denoiser(transformer, cache, steps=25)
                from framepack_ui.engine.sampling import flux_mu, flux_sigmas, sample_unipc
                sample_unipc(d, torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(0)),
                             flux_sigmas(25, flux_mu(9 * 16)))
                calls[threshold] = cache.computed_calls
            finally:
                remove_teacache(transformer)
    assert calls[0.0] == 25
    assert calls[0.15] < 25


def _tiny_denoiser(transformer, cache, steps):
    cfg = transformer.config
    g = torch.Generator().manual_seed(1)
    embeds = dict(encoder_hidden_states=torch.randn(1, 5, cfg.text_embed_dim, generator=g),
                  encoder_attention_mask=torch.ones(1, 5, dtype=torch.long),
                  pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                  image_embeds=torch.randn(1, 4, cfg.image_proj_dim, generator=g),
                  guidance=torch.tensor([10000.0]))
    start = torch.randn(1, 16, 1, 8, 8, generator=g)
    history = sections.History.start(start)
    return denoiser.Denoiser(transformer, embeds, None, 1.0, 0.0, steps, cache,
                             conditioning=history.conditioning(start))


def test_long_prompt_is_truncated_with_a_notice(manager, start_image, tmp_path):
    events, end = run_job(manager, tmp_path / "t.mp4", image=start_image, prompt="walking slowly " * 200)
    assert isinstance(end, Finished)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("Llama tokens" in n for n in notices) and any("CLIP tokens" in n for n in notices)


def test_text_encoder_is_freed_before_sampling(manager, start_image, tmp_path):
    seen = []
    spec = JobSpec(image=start_image, prompt="memory order", **FAST)

    def emit(event):
        if isinstance(event, Step):
            seen.append(manager.is_loaded("text_encoders") or manager.is_loaded("image_encoder"))

    assert isinstance(f1.run(spec, tmp_path / "m.mp4", manager, emit), Finished)
    assert seen and not any(seen)


def test_no_image_encoder_object_survives_into_sampling(manager, start_image, tmp_path):
    """Freed by the manager is not enough: a local of the job holding SigLIP kept it in VRAM through the whole
    job (found at full size: the 8 GB run ran out of memory). No SigLIP module may be alive while sampling."""
    import gc
    import warnings

    from transformers import SiglipVisionModel

    alive = []
    spec = JobSpec(image=start_image, prompt="siglip freed", **FAST)

    def emit(event):
        if isinstance(event, Step) and not alive:
            gc.collect()
            with warnings.catch_warnings():  # isinstance on some torch module proxies warns of deprecations
                warnings.simplefilter("ignore")
                alive.append(sum(isinstance(o, SiglipVisionModel) for o in gc.get_objects()))

    assert isinstance(f1.run(spec, tmp_path / "s.mp4", manager, emit), Finished)
    assert alive == [0]


def test_real_cfg_encodes_the_negative_prompt_only_when_cfg_above_1(manager, start_image, tmp_path):
    def frames(name, **settings):
        _, end = run_job(manager, tmp_path / f"{name}.mp4", image=start_image, seed=3, teacache=False, **settings)
        assert isinstance(end, Finished)
        return decoded_frames(end.path)

    cfg_a = frames("cfg_a", cfg=3.0, negative="blurry, static")
    cfg_b = frames("cfg_b", cfg=3.0, negative="a dog barks loudly")
    assert not np.array_equal(cfg_a, cfg_b)  # the negative prompt steers real CFG
    off_a = frames("off_a", cfg=1.0, negative="blurry, static")
    off_b = frames("off_b", cfg=1.0, negative="a dog barks loudly")
    assert np.array_equal(off_a, off_b)  # cfg 1: one model call per step, the negative is never used
    # the CFG rescale changes the guided prediction; compared at the denoiser, since the tiny model's frames at
    # 64 px can round to the same levels with and without it
    with manager.use("transformer") as transformer:
        base = _tiny_denoiser(transformer, None, steps=3)
        negative = {**base.positive, "encoder_hidden_states": base.positive["encoder_hidden_states"].flip(1)}
        x = torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(2))
        guided = denoiser.Denoiser(transformer, base.positive, negative, 3.0, 0.0, 3)(x, 0.5)
        rescaled = denoiser.Denoiser(transformer, base.positive, negative, 3.0, 0.7, 3)(x, 0.5)
    assert not torch.equal(guided, rescaled)


def test_real_cfg_makes_two_model_calls_per_step(manager):
    with manager.use("transformer") as transformer:
        single = _tiny_denoiser(transformer, None, steps=3)
        x = torch.randn(1, 16, 9, 8, 8, generator=torch.Generator().manual_seed(2))
        single(x, 0.5)
        guided = denoiser.Denoiser(transformer, single.positive, single.positive, 2.0, 0.0, 3)
        guided(x, 0.5)
    assert single.calls == 1 and guided.calls == 2


def _phases_saying(manager, out, image, text: str) -> list:
    """Run a job to the end; its Phase events whose detail contains `text`."""
    from framepack_ui.events import Phase

    events, end = run_job(manager, out, image=image)
    assert isinstance(end, Finished), end
    return [e for e in events if isinstance(e, Phase) and text in e.detail]


def _compiling_manager(models_dir, monkeypatch, name: str):
    """A manager whose plan compiles `name`; torch.compile stands in as the identity (real compiling is slow on
    the CPU), so the model runs through the real compile hooks without a compiler."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    return cpu_manager(models_dir, cpu_plan(models_dir).with_component(name, compile=True))


def test_a_compiled_model_says_it_compiles_once_per_size(tiny_models_dir, start_image, tmp_path, monkeypatch):
    """The first step of a compiled transformer is ~20 s slower: the job says so, once per size."""
    manager = _compiling_manager(tiny_models_dir, monkeypatch, "transformer")

    def compiling_notices(name):
        return _phases_saying(manager, tmp_path / name, start_image, "compiling the model")

    assert len(compiling_notices("a.mp4")) == 1
    assert compiling_notices("b.mp4") == []  # same size: compiled already


def test_a_compiled_vae_decoder_says_it_compiles_once(tiny_models_dir, start_image, tmp_path, monkeypatch):
    """The first decode of a compiled VAE decoder waits for the compiler (~2 min on the H200's host): the job
    says so at that decode, and no later decode or job does."""
    manager = _compiling_manager(tiny_models_dir, monkeypatch, "vae")

    def decoder_notices(name):
        return _phases_saying(manager, tmp_path / name, start_image, "compiling the VAE decoder")

    first = decoder_notices("a.mp4")
    assert len(first) == 1 and first[0].name == "decode"
    assert decoder_notices("b.mp4") == []


def test_a_step_is_reported_while_the_next_one_runs(manager, start_image, tmp_path, monkeypatch):
    """Step i's event (its preview copied off the GPU) waits until step i + 1 has been handed to the model: on a
    GPU the next step is then queued while the host waits, so the GPU is never idle for the report. The time
    this buys is measured by bench/bench_run.py (docs/benchmarks.md, session 6)."""
    log = []
    model_call = denoiser.Denoiser.__call__

    def logged_call(self, x, sigma):
        log.append("model")
        return model_call(self, x, sigma)

    monkeypatch.setattr(denoiser.Denoiser, "__call__", logged_call)
    spec = JobSpec(image=start_image, prompt="a red square moves", **{**FAST, "seconds": 1.0, "steps": 3})
    end = f1.run(spec, tmp_path / "lag.mp4", manager,
                 lambda event: log.append(f"step {event.step}") if isinstance(event, Step) else None)
    assert isinstance(end, Finished)
    assert log == ["model", "model", "step 1", "model", "step 2", "step 3"]
