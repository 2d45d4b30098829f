"""Prompt embeddings cached in memory (a small LRU) and on disk, so a known prompt never loads the 15 GB encoder.

The key is a hash of the prompt, the identity of every tokenizer and text-encoder file (name, size, mtime: a
changed or re-downloaded file changes the key), the encoding recipe (template, crop, hidden layer, token limits)
and the variant the engine passes (its encoding recipe: template, crop, hidden layer, token limits; and the device
type and compute dtype: float16 on the GPU and float32 on the CPU give different numbers, and a cached result must
equal what a fresh encode would give). Entries are plain tensors and notices: this module knows nothing of the
engine, which reaches it through the manager (engine/lending.py). Files on disk are safetensors with the key and the
notices in their metadata, written to a temporary name and renamed: a crash never leaves a half-written entry
that looks valid, and an unreadable entry is a miss (and is removed), never an error.

The disk cache is capped (DISK_BYTES, 256 MB: about 60 real prompts): after each write the least recently used
entries go first. "Used" is the file's mtime, set on every write and hit (memory hits too), so the order holds
across processes; it is set from the Python clock in nanoseconds, not left to the file system's coarser tick.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch

from ..weights.layout import COMPONENTS

log = logging.getLogger(__name__)

# Bump when the stored format or the meaning of the tensors changes.
CACHE_FORMAT_VERSION = 1
ENCODER_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
MEMORY_ENTRIES = 16  # a prompt is ~256 x 4096 floats (4 MB) with the real encoder: 16 of them is ~64 MB at most
DISK_BYTES = 256 * 1024 * 1024  # the disk cache's cap; least recently used entries are removed past it
ENTRY_SUFFIX = ".safetensors"


def encoder_identity(models_dir: Path) -> str:
    """Hash of the tokenizer and text-encoder files' names, sizes and mtimes (cheap: stat only)."""
    h = hashlib.sha256()
    for name in ENCODER_COMPONENTS:
        folder = COMPONENTS[name].folder(models_dir)
        for file in COMPONENTS[name].files:
            try:
                st = (folder / file).stat()
                h.update(f"{name}/{file}:{st.st_size}:{st.st_mtime_ns};".encode())
            except OSError:
                h.update(f"{name}/{file}:missing;".encode())
    return h.hexdigest()


class PromptCache:
    """`get(prompt, variant)` -> (tensors, notices) or None; `put(prompt, variant, tensors, notices)`.
    Thread-safe.

    `cache_dir=None`: memory only. `max_disk_bytes`: the disk cache's cap (None: unbounded).
    """

    def __init__(self, models_dir: Path, cache_dir: Path | None, memory_entries: int = MEMORY_ENTRIES,
                 max_disk_bytes: int | None = DISK_BYTES):
        self.models_dir = Path(models_dir)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.memory_entries = memory_entries
        self.max_disk_bytes = max_disk_bytes
        self._memory: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def key(self, prompt: str, variant: str = "") -> str:
        h = hashlib.sha256()
        for part in (str(CACHE_FORMAT_VERSION), encoder_identity(self.models_dir), variant, prompt):
            h.update(part.encode("utf-8"))
            h.update(b"\0")
        return h.hexdigest()

    def _path(self, key: str) -> Path:
        return self.cache_dir / f"{key}{ENTRY_SUFFIX}"

    def get(self, prompt: str, variant: str = ""):
        key = self.key(prompt, variant)
        with self._lock:
            embeds = self._memory.get(key)
            if embeds is not None:
                self._memory.move_to_end(key)
        if embeds is None and self.cache_dir is not None:
            embeds = self._read(key)
            if embeds is not None:
                self._remember(key, embeds)
        with self._lock:
            if embeds is None:
                self.misses += 1
            else:
                self.hits += 1
        if embeds is None:
            return None
        self._touch(key)
        return _copy(embeds)

    def put(self, prompt: str, variant: str, tensors: dict[str, torch.Tensor], notices=()) -> None:
        key = self.key(prompt, variant)
        embeds = _copy((tensors, list(notices)))
        self._remember(key, embeds)
        if self.cache_dir is not None:
            try:
                self._write(key, embeds)
                self._touch(key)
                self._prune(keep=key)
            except OSError as exc:  # a full or read-only disk costs a re-encode next time, nothing more
                log.warning("could not write the prompt cache entry in %s: %s", self.cache_dir, exc)

    def _remember(self, key: str, embeds) -> None:
        with self._lock:
            self._memory[key] = embeds
            self._memory.move_to_end(key)
            while len(self._memory) > self.memory_entries:
                self._memory.popitem(last=False)

    def _touch(self, key: str) -> None:
        """Mark an entry used now (its mtime orders the pruning)."""
        if self.cache_dir is None:
            return
        now = time.time_ns()
        try:
            os.utime(self._path(key), ns=(now, now))
        except OSError:
            pass  # not on disk (memory only, or removed by another process): nothing to order

    def _prune(self, keep: str) -> None:
        """Remove the least recently used entries until the disk cache is within `max_disk_bytes` (never `keep`,
        the entry just written)."""
        if self.max_disk_bytes is None:
            return
        entries = []
        for path in self.cache_dir.glob(f"*{ENTRY_SUFFIX}"):
            try:
                st = path.stat()
            except OSError:
                continue  # removed meanwhile
            entries.append((st.st_mtime_ns, path.name, path, st.st_size))
        total = sum(size for *_, size in entries)
        for _, _, path, size in sorted(entries):
            if total <= self.max_disk_bytes:
                break
            if path == self._path(keep):
                continue
            path.unlink(missing_ok=True)
            total -= size
            log.info("prompt cache: removed the least recently used entry %s", path.name)

    def _write(self, key: str, embeds) -> None:
        from safetensors.torch import save

        tensors, notices = embeds
        data = save({k: v.contiguous() for k, v in tensors.items()},
                    metadata={"key": key, "notices": json.dumps(list(notices))})
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink(missing_ok=True)

    def _read(self, key: str):
        from safetensors.torch import load

        path = self._path(key)
        try:
            data = path.read_bytes()  # read, not mapped: the file can be replaced while we hold the tensors
        except OSError:
            return None
        try:
            (header_len,) = struct.unpack("<Q", data[:8])
            metadata = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
            if metadata.get("key") != key:
                raise ValueError("key mismatch")
            return load(data), list(json.loads(metadata.get("notices", "[]")))
        except Exception as exc:  # corrupt or foreign: a miss, and the entry goes
            log.warning("ignoring unreadable prompt cache entry %s: %s", path, exc)
            path.unlink(missing_ok=True)
            return None


def _copy(embeds):
    """Callers may move or modify what they get: never hand out the cached tensors themselves."""
    tensors, notices = embeds
    return {k: v.clone() for k, v in tensors.items()}, list(notices)
