"""Lends models to the engine and decides how long they stay.

The official demo loads everything at start and never frees it (~43 GB of RAM). Here a model is loaded when
first asked for, and the big, once-per-job ones (the 15 GB text encoder, SigLIP) are freed as soon as their
phase ends, so the peak is the largest phase rather than the sum of all models.

Where each model lives comes from a LoadPlan (plan.py) turned into Placements: the manager applies it and decides
nothing. Without a plan, `default_placements` keeps the old behaviour, except that the transformer is always read
from its read-only file map (same numbers, no RAM copy, nothing charged to the commit limit).

A streamed transformer whose placement says `park_for_decode` gives its resident blocks' VRAM to the VAE: while
the VAE is in use they point at their mapped sources (streaming.BlockStreamer.park) and are copied back after, so
on an 8 GB card the decode no longer caps how many blocks stay resident. After loading, the transformer gets the
placement's speed options (compiled block forwards, attention backend, fp8 matmuls: kernels.py, fp8.py).
"""
from __future__ import annotations

import gc
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import MemoryPlanError
from . import loading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # compute dtype
    keep: bool  # stays loaded after use (reused every section) or freed at the end of the phase
    storage: str = "ram"  # "map": weights read-only-mapped from the files (storage.py); "ram": the library's loader
    resident_blocks: int | None = None  # set: stream the other blocks (layers) to the GPU (streaming.py)
    vae_tiling: bool = False
    vae_tile_px: int = 256  # with vae_tiling: spatial tile size (the plan picks the largest that fits)
    park_for_decode: bool = False  # streamed transformer: its resident blocks leave VRAM while the VAE is used
    # transformer: how it computes (kernels.py, fp8.py), applied once per load
    compile: bool = False
    attention: str | None = None
    fp8_matmul: bool = False
    pin_sources: bool = False  # streamed transformer: its streamed blocks held in page-locked RAM (streaming.py)


def default_placements(device: torch.device) -> dict[str, Placement]:
    """Half precision on the GPU as the official demo; float32 on the CPU, where half-precision kernels are slow."""
    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    brain = torch.bfloat16 if cuda else torch.float32
    return {
        "text_encoders": Placement(device, half, keep=False),
        "image_encoder": Placement(device, half, keep=False),
        "vae": Placement(device, half, keep=True),
        "transformer": Placement(device, brain, keep=True, storage="map"),
    }


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def placements_from_plan(plan) -> dict[str, Placement]:
    """A LoadPlan's decisions in the manager's terms (no decision is made here)."""
    result = {}
    for name, c in plan.components.items():
        result[name] = Placement(torch.device(c.device), _DTYPES[c.compute_dtype], c.keep, c.storage,
                                 c.resident_blocks if c.where == "gpu-streamed" else None, c.vae_tiling,
                                 c.vae_tile_px, c.park_for_decode, c.compile, c.attention, c.fp8_matmul,
                                 c.pinned_sources)
    return result


# What can be streamed, and from which storage: the blocks' sources must be the read-only map (never RAM copies)
STREAMABLE = {"transformer": ("map", "fp8"), "text_encoders": ("map",)}


def _check_supported(placements: dict[str, Placement]) -> None:
    for name, p in placements.items():
        if p.resident_blocks is not None and p.storage not in STREAMABLE.get(name, ()):
            raise MemoryPlanError("only the transformer and the text encoder can be streamed, and only from their "
                                  "read-only file maps")


def _load_transformer(d: Path, p: Placement):
    if p.resident_blocks is None:
        return loading.load_transformer(d, p.dtype, p.device, p.storage)
    from .streaming import stream_transformer

    # Streamed: mapped on the CPU first (the streamed blocks' sources stay there, file-backed), then the
    # embedders and the first `resident_blocks` blocks go to the device and the rest pass through the
    # streamer's two pinned block buffers each forward.
    model = loading.load_transformer(d, p.dtype, torch.device("cpu"), p.storage)
    model._framepack_streamer = stream_transformer(model, p.device, p.resident_blocks, p.pin_sources,
                                                   pin_parked=p.pin_sources and p.park_for_decode)
    return model


def _load_transformer_as_placed(d: Path, p: Placement):
    model = _load_transformer(d, p)
    _apply_speed_options(model, p)
    return model


def _apply_speed_options(model, p: Placement) -> None:
    """How the transformer computes, as the plan decided: set once per load, before its first forward."""
    from . import kernels

    if p.fp8_matmul:
        from .fp8 import set_fp8_matmul

        log.info("fp8 matmul in %d Linears", set_fp8_matmul(model, True))
    kernels.set_attention(model, p.attention)
    if p.compile:
        kernels.compile_blocks(model)  # lazy: each block compiles on its first call


def _load_vae(d: Path, p: Placement):
    model = loading.load_vae(d, p.dtype, p.device, p.vae_tiling, p.vae_tile_px)
    if p.compile:
        from . import kernels

        kernels.compile_vae_decoder(model)  # lazy: compiles at the first decode
    return model


def _load_text_encoders(d: Path, p: Placement):
    if p.resident_blocks is None:
        text_encoder = loading.load_text_encoder(d, p.dtype, p.device, p.storage)
    else:
        text_encoder = loading.load_text_encoder_streamed(d, p.dtype, p.device, p.resident_blocks)
    return (*loading.load_tokenizers(d), text_encoder, loading.load_text_encoder_2(d, p.dtype, p.device, p.storage))


def _streamers(model) -> list:
    """The block streamers of a loaded entry (a model, or a tuple of them such as the text encoders)."""
    parts = model if isinstance(model, tuple) else (model,)
    return [s for s in (getattr(m, "_framepack_streamer", None) for m in parts) if s is not None]


_LOADERS: dict[str, Callable] = {
    "text_encoders": _load_text_encoders,
    "image_encoder": lambda d, p: loading.load_image_encoder(d, p.dtype, p.device),
    "vae": _load_vae,
    "transformer": _load_transformer_as_placed,
}


PROMPT_CACHE_SUBDIR = Path(".cache") / "prompts"  # under the models folder unless told otherwise
# The commit a load may take beyond the plan's figure (allocator slack, library buffers): plan.COMMIT_MARGIN_BYTES.
PREWARM_MARGIN_BYTES = 1_000_000_000


class ModelManager:
    """`with manager.use("vae") as vae:` loads on first use and frees per the placement's `keep`.

    Also owns the prompt-embedding cache (`prompt_cache`, memory + disk: see prompt_cache.py), what happens to
    the kept models after a job (`release_after_job`) and, before a load whose commit is short, the pagefile
    pre-warm (prewarm.py).
    """

    _DEFAULT = object()

    def __init__(self, models_dir: Path, device: torch.device | str = "cpu",
                 placements: dict[str, Placement] | None = None, plan=None, *,
                 prompt_cache_dir: Path | None | object = _DEFAULT, release_idle_s: float | None = None,
                 commit_allocator=_DEFAULT, on_prewarm: Callable | None = None):
        """`prompt_cache_dir`: default `models_dir/.cache/prompts`; None keeps prompt embeddings in memory only.
        `release_idle_s`: what `release_after_job()` does: None keeps the models (the caller frees them), 0 frees
        them at once, N > 0 frees them after N seconds without use. `commit_allocator`: the OS commit calls for the
        pre-warm (prewarm.default_allocator() by default; None: never pre-warm). `on_prewarm(PrewarmProgress)`:
        progress of a pre-warm."""
        from .prompt_cache import PromptCache

        self.models_dir = Path(models_dir)
        self.device = torch.device(plan.device if plan is not None else device)
        self.plan = plan  # the LoadPlan applied, if any (the UI and CLI show plan.explain())
        self.placements = placements or (placements_from_plan(plan) if plan is not None
                                         else default_placements(self.device))
        _check_supported(self.placements)  # before anything loads: never fail half-way through a job
        self._loaded: dict[str, object] = {}
        self.load_count: dict[str, int] = {}  # how often each was loaded: lets tests check eviction and reuse
        cache_dir = self.models_dir / PROMPT_CACHE_SUBDIR if prompt_cache_dir is self._DEFAULT else prompt_cache_dir
        self.prompt_cache = PromptCache(self.models_dir, cache_dir)
        self.release_idle_s = release_idle_s
        if commit_allocator is self._DEFAULT:
            from .prewarm import default_allocator

            commit_allocator = default_allocator() if plan is not None else None
        self.commit_allocator = commit_allocator
        self.on_prewarm = on_prewarm
        self.prewarm_count = 0  # pre-warms that reserved something (tests)
        self.park_count = 0  # times the transformer's resident blocks were parked for the VAE (tests)
        self._lock = threading.RLock()  # the idle timer frees from its own thread
        self._in_use = 0
        self._idle_timer: threading.Timer | None = None
        self._generation = 0  # bumped by every use: a timer armed before it frees nothing

    def placement(self, name: str) -> Placement:
        return self.placements[name]

    @contextmanager
    def use(self, name: str):
        with self._lock:
            self._cancel_idle_timer()
            self._generation += 1
            self._in_use += 1
        parked = None
        try:
            with self._lock:
                parked = self._park_for(name)
                if name not in self._loaded:
                    p = self.placements[name]
                    log.info("loading %s (%s, %s, %s)", name, p.device, p.dtype,
                             "read-only file map" if p.storage == "map" else "RAM copy")
                    self._prewarm_for(name)
                    self._loaded[name] = _LOADERS[name](self.models_dir, self.placements[name])
                    self.load_count[name] = self.load_count.get(name, 0) + 1
                model = self._loaded[name]
            try:
                yield model
            finally:
                if not self.placements[name].keep:
                    self.free(name)
        finally:
            with self._lock:
                self._restore(parked)
                self._in_use -= 1

    def _park_for(self, name: str):
        """Using the VAE while a streamed transformer is loaded, where the plan says the decode needs the room:
        park its resident blocks (streaming.BlockStreamer.park). Returns (model, streamer) to restore, or None."""
        transformer = self._loaded.get("transformer")
        if name != "vae" or transformer is None or not self.placements["transformer"].park_for_decode:
            return None
        streamer = getattr(transformer, "_framepack_streamer", None)
        if streamer is None or streamer.parked:
            return None
        streamer.park()
        self.park_count += 1
        return transformer, streamer

    def _restore(self, parked) -> None:
        if parked is None:
            return
        transformer, streamer = parked
        if self._loaded.get("transformer") is transformer:  # not freed meanwhile
            streamer.restore()

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def free(self, name: str | None = None) -> None:
        """Drop one model (or all) and give the memory back to the system."""
        with self._lock:
            if name is None:
                self._cancel_idle_timer()
            for key in [name] if name else list(self._loaded):
                model = self._loaded.pop(key, None)
                if model is not None:
                    for streamer in _streamers(model):
                        streamer.close()  # waits for in-flight copies, removes its hooks
                    log.info("freed %s", key)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- after a job -----------------------------------------------------------------------------------------------

    def release_after_job(self, idle_s: float | None | object = _DEFAULT) -> None:
        """A job ended: free the models now (idle_s 0), after `idle_s` seconds without use (a timer thread; any
        `use` before then cancels it), or keep them (None). Default: the manager's `release_idle_s`."""
        idle_s = self.release_idle_s if idle_s is self._DEFAULT else idle_s
        if idle_s is None:
            return
        if idle_s <= 0:
            self.free()
            return
        with self._lock:
            self._cancel_idle_timer()
            timer = threading.Timer(idle_s, self._free_if_idle, args=(self._generation,))
            timer.daemon = True
            timer.name = "models-idle-free"
            self._idle_timer = timer
            timer.start()

    @property
    def idle_release_pending(self) -> bool:
        return self._idle_timer is not None

    def _free_if_idle(self, generation: int) -> None:
        with self._lock:
            if generation != self._generation or self._in_use:
                return  # used since the timer was armed, or in use now: keep
            self._idle_timer = None
            if self._loaded:
                log.info("idle for %.0f s: freeing %s", self.release_idle_s or 0, ", ".join(self._loaded))
            self.free()

    def _cancel_idle_timer(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def close(self) -> None:
        self.free()

    # --- commit ----------------------------------------------------------------------------------------------------

    def _prewarm_for(self, name: str) -> None:
        """Before a load whose planned commit is more than is available now: grow the pagefile (Windows, system
        managed) or stop with one line (Linux with enforced commit, a fixed-size pagefile). The reservation is
        held until just before the load takes its memory, then released: the grown commit limit remains."""
        if self.plan is None or self.commit_allocator is None or name not in self.plan.components:
            return
        from . import prewarm

        c = self.plan.components[name]
        needed = c.commit_bytes + c.load_commit_bytes
        if needed <= 0:
            return
        needed += PREWARM_MARGIN_BYTES
        if not prewarm.short_of(needed, self.commit_allocator):
            return
        reservation = prewarm.prewarm(needed, self.commit_allocator, progress=self.on_prewarm)
        if reservation.reserved_bytes:
            self.prewarm_count += 1
            log.info("pre-warm reserved %.1f GB of commit for %s", reservation.reserved_bytes / 1e9, name)
        reservation.release()  # just before the load: the loader gets the grown limit
