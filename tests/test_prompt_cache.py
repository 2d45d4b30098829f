"""Issue 3: prompt embeddings cached in memory and on disk, keyed by the prompt and the encoder files' identity."""
from __future__ import annotations

import os
import shutil

import numpy as np
import torch

from framepack_ui.engine import f1, text
from framepack_ui.events import Finished
from conftest import cpu_manager
from framepack_ui.memory.plan import make_plan, real_weights
from framepack_ui.memory.probe import Machine
from framepack_ui.memory.prompt_cache import PromptCache
from framepack_ui.spec import JobSpec
from framepack_ui.units import GB
from framepack_ui.weights.layout import COMPONENTS
from job_settings import FAST_2_STEPS


def job(manager, out, image, **settings):
    frames = []
    spec = JobSpec(image=image, prompt=settings.pop("prompt", "a square drifts"), seed=5,
                   **{**FAST_2_STEPS, **settings})
    end = f1.run(spec, out, manager, lambda e: None, frame_sink=frames.append)
    assert isinstance(end, Finished), end
    return np.concatenate(frames)


def test_rerun_with_a_known_prompt_never_loads_the_text_encoders(tiny_models_dir, start_image_64x64, tmp_path):
    cache = tmp_path / "prompts"
    manager = cpu_manager(tiny_models_dir, prompt_cache_dir=cache)
    first = job(manager, tmp_path / "a.mp4", start_image_64x64)
    assert manager.load_count["text_encoders"] == 1
    again = job(manager, tmp_path / "b.mp4", start_image_64x64)
    assert manager.load_count["text_encoders"] == 1  # from the memory cache
    assert np.array_equal(first, again)  # the cached embeddings are exactly the fresh ones

    # real CFG: the negative counts too; an unknown one loads the encoders, a known one does not
    job(manager, tmp_path / "c.mp4", start_image_64x64, cfg=2.0, negative="blurry")
    assert manager.load_count["text_encoders"] == 2
    job(manager, tmp_path / "d.mp4", start_image_64x64, cfg=2.0, negative="blurry")
    assert manager.load_count["text_encoders"] == 2

    # a new process (a fresh manager, empty memory cache) reads them from disk
    fresh = cpu_manager(tiny_models_dir, prompt_cache_dir=cache)
    assert np.array_equal(job(fresh, tmp_path / "e.mp4", start_image_64x64), first)
    job(fresh, tmp_path / "f.mp4", start_image_64x64, cfg=2.0, negative="blurry")
    assert "text_encoders" not in fresh.load_count and not fresh.is_loaded("text_encoders")
    assert list(cache.glob("*.safetensors")) and not list(cache.glob("*.tmp"))


def test_prompt_cache_invalidates_when_the_encoder_files_change(tiny_models_dir, tmp_path):
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models, ignore=shutil.ignore_patterns(".cache"))
    manager = cpu_manager(models, prompt_cache_dir=tmp_path / "prompts")
    (fresh,), loaded = text.encode_prompts(["a cat"], manager)
    assert loaded
    (cached,), loaded = text.encode_prompts(["a cat"], manager)
    assert not loaded and torch.equal(cached.llama, fresh.llama) and torch.equal(cached.clip_pooled,
                                                                                 fresh.clip_pooled)
    for component, file in (("text_encoder_2", "model.safetensors"), ("tokenizer", "tokenizer.json")):
        path = COMPONENTS[component].folder(models) / file
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # a re-downloaded file
        _, loaded = text.encode_prompts(["a cat"], manager)
        assert loaded, f"a changed {component} must not reuse old embeddings"
        _, loaded = text.encode_prompts(["a cat"], manager)
        assert not loaded
    assert manager.load_count["text_encoders"] == 3


def test_prompt_cache_disk_entries_survive_only_when_valid(tmp_path):
    cache_dir = tmp_path / "prompts"
    tensors = {"llama": torch.randn(1, 3, 8), "llama_mask": torch.ones(1, 3, dtype=torch.long),
               "clip_pooled": torch.randn(1, 4)}
    PromptCache(tmp_path, cache_dir).put("p", "v", tensors, ["a notice"])
    (entry,) = cache_dir.glob("*.safetensors")
    got, notices = PromptCache(tmp_path, cache_dir).get("p", "v")  # a new instance: from disk
    assert notices == ["a notice"] and all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert PromptCache(tmp_path, cache_dir).get("p", "other variant") is None
    assert PromptCache(tmp_path, cache_dir).get("other prompt", "v") is None
    entry.write_bytes(entry.read_bytes()[:40])  # truncated: a miss, and removed
    assert PromptCache(tmp_path, cache_dir).get("p", "v") is None and not entry.exists()
    small = PromptCache(tmp_path, None, memory_entries=2)  # memory only, LRU
    for p in ("a", "b", "c"):
        small.put(p, "v", tensors)
    assert small.get("a", "v") is None and small.get("c", "v") is not None


def test_text_phase_on_an_8gb_16gb_machine_needs_under_4gb_of_ram():
    plan = make_plan(Machine.supposed(16, 8), real_weights())
    text_phase = plan.phase("text")
    te = plan.components["text_encoders"]
    assert te.where == "gpu-streamed" and te.storage == "map"  # 15 GB streamed from the read-only map, not copied
    assert text_phase.ram_bytes < 4 * GB and text_phase.commit_bytes < 4 * GB


def test_disk_cache_is_capped_least_recently_used_first(tmp_path):
    """Past `max_disk_bytes` the entries used longest ago go, after each write; a hit (from disk or memory)
    counts as a use, also for another process (the file's mtime)."""
    cache_dir = tmp_path / "prompts"
    tensors = {"llama": torch.randn(1, 16, 64), "llama_mask": torch.ones(1, 16, dtype=torch.long),
               "clip_pooled": torch.randn(1, 8)}
    PromptCache(tmp_path, cache_dir).put("a", "v", tensors)
    entry_bytes = next(cache_dir.glob("*.safetensors")).stat().st_size
    cap = 2 * entry_bytes + entry_bytes // 2  # room for two entries
    writer = PromptCache(tmp_path, cache_dir, max_disk_bytes=cap)
    writer.put("b", "v", tensors)
    assert PromptCache(tmp_path, cache_dir).get("a", "v") is not None  # another process uses "a": "b" is oldest
    writer.put("c", "v", tensors)
    entries = sorted(cache_dir.glob("*.safetensors"))
    assert len(entries) == 2 and sum(e.stat().st_size for e in entries) <= cap
    reader = PromptCache(tmp_path, cache_dir)
    assert reader.get("b", "v") is None  # the least recently used went
    assert reader.get("c", "v") is not None and reader.get("a", "v") is not None  # "c" is now the oldest
    assert writer.get("c", "v") is not None  # a memory hit touches the file too: "a" is now the oldest
    writer.put("d", "v", tensors)
    assert PromptCache(tmp_path, cache_dir).get("a", "v") is None
    assert PromptCache(tmp_path, cache_dir).get("c", "v") is not None
    unbounded = PromptCache(tmp_path, cache_dir, max_disk_bytes=None)
    for p in ("e", "f", "g"):
        unbounded.put(p, "v", tensors)
    assert len(list(cache_dir.glob("*.safetensors"))) == 5
    assert PromptCache(tmp_path, cache_dir).max_disk_bytes == 256 * 1024 * 1024  # the default cap


# --- the cache's bookkeeping, without models (fast: the mutation check's tests for this module) -------------------

def _tensors():
    return {"llama": torch.arange(12.0).reshape(1, 3, 4), "llama_mask": torch.ones(1, 3, dtype=torch.long)}


def test_hits_and_misses_are_counted_and_a_disk_hit_is_kept_in_memory(tmp_path):
    cache_dir = tmp_path / "deep" / "er" / "prompts"  # made with its parents on the first write
    writer = PromptCache(tmp_path, cache_dir)
    assert (writer.hits, writer.misses) == (0, 0)
    assert writer.get("p") is None and writer.get("q", "v") is None
    writer.put("p", "", _tensors())
    assert (entry := next(cache_dir.glob("*.safetensors"))).exists()
    assert writer.get("p") is not None and writer.key("p") == writer.key("p", "")  # "" is the default variant
    assert (writer.hits, writer.misses) == (1, 2)
    reader = PromptCache(tmp_path, cache_dir)
    assert reader.get("p", "") is not None  # from disk
    entry.unlink()
    got, notices = reader.get("p", "")  # now from memory
    assert torch.equal(got["llama"], _tensors()["llama"]) and notices == []
    assert (reader.hits, reader.misses) == (2, 0)


def test_the_memory_cache_keeps_the_most_recently_used_entries(tmp_path):
    cache = PromptCache(tmp_path, None, memory_entries=2)
    cache.put("a", "v", _tensors())
    cache.put("b", "v", _tensors())
    assert cache.get("a", "v") is not None  # "a" used: "b" is now the oldest
    cache.put("c", "v", _tensors())
    assert cache.get("b", "v") is None
    assert cache.get("a", "v") is not None and cache.get("c", "v") is not None  # two kept, not fewer


def test_the_format_version_is_part_of_the_key(tmp_path, monkeypatch):
    from framepack_ui.memory import prompt_cache

    before = PromptCache(tmp_path, None).key("p", "v")
    monkeypatch.setattr(prompt_cache, "CACHE_FORMAT_VERSION", prompt_cache.CACHE_FORMAT_VERSION + 1)
    assert PromptCache(tmp_path, None).key("p", "v") != before


def test_a_write_marks_its_entry_used_by_the_python_clock(tmp_path, monkeypatch):
    """The file system's own mtime tick can be coarse (2 s on FAT): the order of use comes from time.time_ns()."""
    from framepack_ui.memory import prompt_cache

    monkeypatch.setattr(prompt_cache.time, "time_ns", lambda: 4_000_000_000_123_456_789)
    PromptCache(tmp_path, tmp_path / "prompts").put("p", "v", _tensors())
    (entry,) = (tmp_path / "prompts").glob("*.safetensors")
    assert entry.stat().st_mtime_ns == 4_000_000_000_123_456_789


def test_pruning_removes_as_many_entries_as_needed_stops_at_the_cap_and_never_the_new_one(tmp_path):
    cache_dir = tmp_path / "prompts"
    unbounded = PromptCache(tmp_path, cache_dir, max_disk_bytes=None)
    for i, prompt in enumerate("abc"):
        unbounded.put(prompt, "v", _tensors())
        os.utime(PromptCache(tmp_path, cache_dir)._path(unbounded.key(prompt, "v")), ns=(i * 10**9, i * 10**9))
    entry_bytes = next(cache_dir.glob("*.safetensors")).stat().st_size
    PromptCache(tmp_path, cache_dir, max_disk_bytes=2 * entry_bytes).put("d", "v", _tensors())
    left = {p for p in "abcd" if PromptCache(tmp_path, cache_dir).get(p, "v") is not None}
    assert left == {"c", "d"}  # exactly at the cap: two stay (a and b, the oldest, went)
    PromptCache(tmp_path, cache_dir, max_disk_bytes=entry_bytes // 2).put("e", "v", _tensors())
    assert [p.name for p in cache_dir.glob("*.safetensors")] == [f"{unbounded.key('e', 'v')}.safetensors"]


def test_an_unreadable_entry_that_another_process_removed_first_is_a_plain_miss(tmp_path, monkeypatch):
    """Two processes read the same corrupt entry: the second to remove it finds it gone, and that is no error."""
    from pathlib import Path

    cache = PromptCache(tmp_path, tmp_path / "prompts")
    entry = cache._path(cache.key("p", "v"))
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: b"\x08" + b"\0" * 7 + b"not json" if self == entry else real_read_bytes(self))
    assert not entry.exists() and cache.get("p", "v") is None
