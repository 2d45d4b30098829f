"""Tests for behaviour a mutation check found no test guarding (issue 26): each fails with the small bug named in its
docstring and passes without it."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from framepack_ui.events import Finished
from framepack_ui.memory.prompt_cache import PromptCache
from framepack_ui.memory.streaming import stream_transformer
from framepack_ui.sidecar import sidecar_path, write_sidecar
from framepack_ui.spec import FRAMES_PER_SECTION, JobSpec, frame_count, section_count
from framepack_ui.weights.layout import COMPONENTS


@pytest.mark.parametrize("sections", [1, 2, 3, 100])
def test_a_video_of_n_sections_has_1_plus_36n_frames(sections):
    """Mutant: the start frame dropped (36 n)."""
    assert FRAMES_PER_SECTION == 36
    assert frame_count(sections) == 1 + 36 * sections
    assert section_count(1.2 * sections) == sections
    assert JobSpec(image="x.png", prompt="p", seconds=1.2 * sections).frames == 1 + 36 * sections


def test_a_failed_settings_write_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    """Mutant: the settings file written in place. A write that fails part-way (disk full at the rename) must leave
    the previous settings readable and no temporary file behind."""
    video = tmp_path / "clip.mp4"
    write_sidecar(video, {"status": "running", "seed": 7}, None)
    before = sidecar_path(video).read_bytes()

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_sidecar(video, {"status": "finished", "seed": 7, "frames": 37}, None)
    assert sidecar_path(video).read_bytes() == before and json.loads(before)["status"] == "running"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.json"]


# listed here, not read from the module: a component left out of the module's list must still be tested
@pytest.mark.parametrize("component", ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2"])
def test_every_encoder_file_is_part_of_the_prompt_cache_key(tiny_models_dir, tmp_path, component):
    """Mutant: a component (the Llama encoder's files, say) left out of the key: a changed or re-downloaded file of
    any of the four must give other keys, so stale embeddings are never served."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    cache = PromptCache(models, None)
    before = cache.key("a cat", "v")
    folder = COMPONENTS[component].folder(models)
    changed = folder / COMPONENTS[component].files[0]
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert PromptCache(models, None).key("a cat", "v") != before


def test_a_random_seed_is_fixed_at_submit_and_recorded_everywhere(tiny_models_dir, tmp_path, start_image_80x64):
    """Mutant: seed -1 recorded as -1. The job, its file name and its settings file carry the seed actually used."""
    from framepack_ui.worker import Worker

    seen = {}

    def engine(spec, out_path, manager, emit, cancel, **kwargs):  # a scripted engine: what the worker hands it
        seen["seed"] = spec.seed
        write_sidecar(out_path, spec.settings(), None)
        emit(Finished(str(out_path), str(sidecar_path(out_path)), 0, 0.0))

    worker = Worker(tiny_models_dir, tmp_path / "outputs", device="cpu", run_job=engine, manager=object())
    try:
        job = worker.submit(JobSpec(image=start_image_80x64, prompt="p", seed=-1, resolution=64, steps=1))
        info = worker.job(job)
        list(worker.events(job))
    finally:
        worker.shutdown()
    seed = info.spec.seed
    assert 0 <= seed and seen["seed"] == seed and info.out_path.endswith(f"_{seed}.mp4")
    assert json.loads(sidecar_path(info.out_path).read_text())["seed"] == seed


def test_teacache_skips_in_the_official_pattern_and_resets_after_each_computed_step():
    """Mutant: the accumulator never reset after a computed step (it then computes every later step). Recorded
    input: the first block's modulated input changing by 5 % a step over 10 steps, threshold 0.15. By the official
    rule, each change adds RESCALE_POLY(0.05) = 0.06204 (HunyuanVideo's coefficients); the blocks are skipped while
    the sum stays under 0.15 and computed, resetting it, when it reaches it: 0.062 S, 0.124 S, 0.186 C, and so on;
    the first and last steps are always computed."""
    import torch

    from framepack_ui.engine.teacache import TeaCache, _poly

    assert _poly(0.05) == pytest.approx(0.0620384, abs=1e-6)
    cache, steps, pattern = TeaCache(0.15), 10, ""
    modulated = torch.ones(4)
    for step in range(steps):
        cache.begin(step, steps)
        skipped = cache.decide(modulated)
        pattern += "S" if skipped else "C"
        if not skipped:  # a computed call stores its residual (the hooks do, from the blocks' output)
            cache._branches["positive"].residual = torch.zeros(4)
        modulated = modulated * 1.05
    assert pattern == "CSSCSSCSSC"
    assert (cache.computed_calls, cache.skipped_calls) == (4, 6)


def test_a_changed_memory_profile_frees_the_models_of_the_previous_plan(tiny_models_dir, tmp_path, start_image_80x64):
    """Mutant: the old manager not freed when a job's profile changes. With models kept between jobs, the first
    plan's models stay loaded after its job; the next job, under another profile, frees them before loading its own
    (the two never share the memory)."""
    from framepack_ui.engine import f1
    from framepack_ui.worker import Worker

    worker = Worker(tiny_models_dir, tmp_path / "outputs", device="cpu", run_job=f1.run, keep_models_s=None)
    try:
        first = worker.submit(JobSpec(image=start_image_80x64, prompt="p", resolution=64, steps=1), profile="cpu")
        assert isinstance(list(worker.events(first))[-1], Finished)
        first_manager = worker._manager
        assert first_manager.is_loaded("transformer") and first_manager.is_loaded("vae")  # kept between jobs
        second = worker.submit(JobSpec(image=start_image_80x64, prompt="p", resolution=64, steps=1), profile="mmap")
        assert isinstance(list(worker.events(second))[-1], Finished)
    finally:
        worker.shutdown()
    assert worker._manager is not first_manager
    assert not any(first_manager.is_loaded(name) for name in first_manager.plan.components)


def test_an_fp8_shard_that_reads_back_other_bytes_is_never_kept(models_copy, monkeypatch):
    """Mutant: the read-back check of each written fp8 shard switched off. A byte that reaches the disk different
    from what was hashed (a failing disk, injected at the write boundary) fails the conversion with one line, and
    no cache or temporary file is left."""
    from framepack_ui.errors import ModelFilesError
    from framepack_ui.memory import fp8

    real_write, chunks = fp8._write_chunk, []

    def flip_a_bit(fh, data):
        chunks.append(len(data))
        if len(chunks) == 3:  # a data chunk, after the header's length and the header
            data = bytes([data[0] ^ 1]) + bytes(data[1:])
        real_write(fh, data)

    monkeypatch.setattr(fp8, "_write_chunk", flip_a_bit)
    folder = COMPONENTS["transformer"].folder(models_copy)
    with pytest.raises(ModelFilesError, match="reads back different bytes"):
        fp8.convert(folder)
    assert fp8.check_cache(folder) == "absent" and not (folder / fp8.CACHE_DIRNAME).exists()


def test_a_streamed_block_waits_for_its_slow_copy(tiny_models_dir, monkeypatch):
    """Mutant: a streamed block run without waiting for its copy. Each copy is made slow on purpose (0.2 s, far
    longer than the tiny block computes), so a block that did not wait would run on whatever its slot held (the
    empty slot, then the block before's weights); the output must still equal the resident model's exactly."""
    import time

    import torch

    from framepack_ui.compute.compile import transformer_blocks
    from framepack_ui.memory import loading, streaming
    from model_inputs import transformer_inputs

    transformer = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"))
    inputs = transformer_inputs(transformer)
    copy_in = streaming.BlockStreamer._copy_in

    def slow_copy_in(self, *args):
        time.sleep(0.2)
        return copy_in(self, *args)

    with torch.no_grad():
        expected = transformer(**inputs)[0]
        monkeypatch.setattr(streaming.BlockStreamer, "_copy_in", slow_copy_in)
        streamer = stream_transformer(transformer, "cpu", resident_blocks=0)
        try:
            got = transformer(**inputs)[0]
        finally:
            streamer.close()
    assert len(transformer_blocks(transformer)) >= 2 and torch.equal(got, expected)
