"""Lends models to the engine and decides nothing: it applies a LoadPlan (memory/plan) and keeps to it.

The official demo loads everything at start and never frees it (~43 GB of RAM). Here a model is loaded when
first asked for, and the big, once-per-job ones (the 15 GB text encoder, SigLIP) are freed as soon as their
phase ends, so the peak is the largest phase rather than the sum of all models.

For each model the plan's ComponentPlan says where it lives (`where`), what its weights are read from
(`storage`), its compute dtype, whether it stays loaded (`keep`) and how it computes (compile, attention, fp8
matmul: applied through framepack_ui.compute once per load). A streamed model keeps its BlockStreamer here, and
where the plan says `park_for_decode`, using the VAE parks the transformer's resident blocks (their VRAM goes to
the decode) and restores them after. The job's LoRAs (`set_loras`) are put on the transformer when it loads, or at
once on the loaded one: a new LoRA set or strength changes only the LoRA tensors (compute/lora.py), never the
model's weights, so it reloads nothing.

The manager is the engine's `ModelLender` (engine/lending.py): `use`, `compute_place`, the prompt cache,
`first_use_notice`. It does not import the engine.
"""
from __future__ import annotations

import gc
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..compute import attention, compile as compiled, precision
from ..compute import lora as lora_compute
from ..compute.fp8_linear import set_fp8_matmul
from ..errors import MemoryPlanError
from . import allocator, exhaustion, loading
from .lora import LoraSet
from .plan import ComponentPlan, LoadPlan
from .prompt_cache import PromptCache
from .streaming import BlockStreamer, stream_model, stream_transformer

log = logging.getLogger(__name__)

# A builder reads one entry's weights as its ComponentPlan says (storage and compute dtype) onto `device`; the
# manager then streams, compiles and lends what it returns. Benchmarks inject builders that make random
# full-size weights directly on the GPU.
Builder = Callable[[Path, ComponentPlan, torch.device], Any]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What can be streamed, and from which storage: the blocks' sources must be the read-only map (never RAM copies)
STREAMABLE = {"transformer": ("map", "fp8"), "text_encoders": ("map",)}
PROMPT_CACHE_SUBDIR = Path(".cache") / "prompts"  # under the models folder unless told otherwise
# The commit a load may take beyond the plan's figure (allocator slack, library buffers): plan.COMMIT_MARGIN_BYTES.
PREWARM_MARGIN_BYTES = 1_000_000_000
TRANSFORMER_COMPILE_NOTICE = ("compiling the model for this size: the first step takes about 20 s longer "
                              "(once per size)")
VAE_COMPILE_NOTICE = ("compiling the VAE decoder: the first decode after the app starts takes a minute or more "
                      "longer (then each is faster)")


# One model built at a time in the process, whichever manager builds it (a pool has one per GPU: worker/pool.py):
# transformers' and diffusers' from_pretrained set torch's default dtype, which is process-wide, while they build,
# so a model built beside another got some of its weights in the other's dtype (seen: a Half weight in a float32
# SigLIP). Process-wide like the setting it guards.
_BUILD_LOCK = threading.Lock()


def compute_dtype(c: ComponentPlan) -> torch.dtype:
    return _DTYPES[c.compute_dtype]


def streamed(c: ComponentPlan) -> bool:
    return c.where == "gpu-streamed"


def _build_text_encoders(models_dir: Path, c: ComponentPlan, device: torch.device):
    """(llama tokenizer, clip tokenizer, llama, clip). A streamed Llama is read-only-mapped on the CPU: the
    manager streams its decoder layers to `device`."""
    dtype = compute_dtype(c)
    llama_device = torch.device("cpu") if streamed(c) else device
    llama_storage = "map" if streamed(c) else c.storage
    return (*loading.load_tokenizers(models_dir),
            loading.load_text_encoder(models_dir, dtype, llama_device, llama_storage),
            loading.load_text_encoder_2(models_dir, dtype, device, c.storage))


def _build_transformer(models_dir: Path, c: ComponentPlan, device: torch.device):
    """A streamed transformer is mapped on the CPU first (the streamed blocks' sources stay there, file-backed):
    the manager moves the embedders and the resident blocks to `device`."""
    on = torch.device("cpu") if streamed(c) else device
    return loading.load_transformer(models_dir, compute_dtype(c), on, c.storage)


BUILDERS: dict[str, Builder] = {
    "text_encoders": _build_text_encoders,
    "image_encoder": lambda d, c, device: loading.load_image_encoder(d, compute_dtype(c), device),
    "vae": lambda d, c, device: loading.load_vae(d, compute_dtype(c), device, c.vae_tiling, c.vae_tile_px),
    "transformer": _build_transformer,
}


def _check_supported(plan: LoadPlan) -> None:
    for name, c in plan.components.items():
        if streamed(c) and c.storage not in STREAMABLE.get(name, ()):
            raise MemoryPlanError("only the transformer and the text encoder can be streamed, and only from their "
                                  "read-only file maps")


def applied_decisions(plan: LoadPlan) -> tuple:
    """What a manager applies of a plan (not its cost estimates): two plans with equal decisions keep the same
    models."""
    return tuple((name, c.where, c.storage, c.compute_dtype, c.keep, c.resident_blocks, c.vae_tiling, c.vae_tile_px,
                  c.park_for_decode, c.compile, c.attention, c.fp8_matmul, c.pinned_sources)
                 for name, c in plan.components.items())


class ModelManager:
    """`with manager.use("vae") as vae:` loads on first use and frees per the plan's `keep`.

    Also owns the prompt-embedding cache (memory + disk: prompt_cache.py), what happens to the kept models after a
    job (`release_after_job`) and, before a load whose commit is short, the pagefile pre-warm (prewarm.py).
    """

    _DEFAULT = object()

    def __init__(self, models_dir: Path, plan: LoadPlan, *, gpu: torch.device | str | None = None,
                 builders: Mapping[str, Builder] | None = None,
                 prompt_cache_dir: Path | None | object = _DEFAULT, release_idle_s: float | None = None,
                 commit_allocator=_DEFAULT, on_prewarm: Callable | None = None):
        """`gpu`: the device the plan's GPU placements use (default: "cuda"; tests stand the CPU in for it).
        `builders`: replace the loaders of some entries (BUILDERS), e.g. random weights in a benchmark.
        `prompt_cache_dir`: default `models_dir/.cache/prompts`; None keeps prompt embeddings in memory only.
        `release_idle_s`: what `release_after_job()` does: None keeps the models (the caller frees them), 0 frees
        them at once, N > 0 frees them after N seconds without use. `commit_allocator`: the OS commit calls for the
        pre-warm (prewarm.default_allocator() by default; None: never pre-warm). `on_prewarm(PrewarmProgress)`:
        progress of a pre-warm."""
        _check_supported(plan)  # before anything loads: never fail half-way through a job
        self.models_dir = Path(models_dir)
        self.plan = plan  # the UI and CLI show plan.explain()
        self.gpu = torch.device(gpu if gpu is not None else "cuda")
        self._builders = {**BUILDERS, **(builders or {})}
        self._loaded: dict[str, Any] = {}
        self._streamers: dict[str, BlockStreamer] = {}
        self._noticed: set[tuple] = set()  # (name, shape) first uses already announced since the load
        self.load_count: dict[str, int] = {}  # how often each was loaded: lets tests check eviction and reuse
        cache_dir = self.models_dir / PROMPT_CACHE_SUBDIR if prompt_cache_dir is self._DEFAULT else prompt_cache_dir
        self.prompt_cache = PromptCache(self.models_dir, cache_dir)
        self.release_idle_s = release_idle_s
        if commit_allocator is self._DEFAULT:
            from .prewarm import default_allocator

            commit_allocator = default_allocator()
        self.commit_allocator = commit_allocator
        self.on_prewarm = on_prewarm
        self.prewarm_count = 0  # pre-warms that reserved something (tests)
        self.park_count = 0  # times the transformer's resident blocks were parked for the VAE (tests)
        self._loras = LoraSet()  # the LoRAs the transformer computes with (set_loras)
        self._loras_applied: tuple | None = None  # the LoraSet.key on the loaded transformer (None: none applied)
        self._lock = threading.RLock()  # the idle timer frees from its own thread
        self._in_use = 0
        self._idle_timer: threading.Timer | None = None
        self._generation = 0  # bumped by every use: a timer armed before it frees nothing

    # --- the engine's ModelLender -----------------------------------------------------------------------------------

    def component(self, name: str) -> ComponentPlan:
        return self.plan.components[name]

    def device_of(self, name: str) -> torch.device:
        return self.gpu if self.component(name).device == "cuda" else torch.device("cpu")

    def compute_place(self, name: str) -> tuple[torch.device, torch.dtype]:
        return self.device_of(name), compute_dtype(self.component(name))

    def cached_prompt(self, prompt: str, variant: str):
        return self.prompt_cache.get(prompt, variant)

    def cache_prompt(self, prompt: str, variant: str, tensors: dict, notices: list[str]) -> None:
        self.prompt_cache.put(prompt, variant, tensors, notices)

    def first_use_notice(self, name: str, shape: tuple[int, ...]) -> str | None:
        """The transformer compiles once per size; the VAE decoder once per process and device (it decodes in even
        tiles)."""
        model = self._loaded.get(name)
        if name == "transformer" and model is not None and compiled.blocks_compiled(model):
            # a block with LoRA layers is another graph: a new layout of LoRAs compiles again
            layout = tuple(sorted(lora_compute.lora_layers(model).items()))
            key, notice = (name, tuple(shape), layout), TRANSFORMER_COMPILE_NOTICE
        elif (name == "vae" and model is not None and compiled.decoder_compiled(model)
              and compiled.decoder_compile_state(str(self.device_of(name)), None) != compiled.READY):
            key, notice = (name,), VAE_COMPILE_NOTICE
        else:
            return None
        if key in self._noticed:
            return None
        self._noticed.add(key)
        return notice

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
                    self._load(name)
                model = self._loaded[name]
            try:
                yield model
            finally:
                if not self.component(name).keep:
                    self.free(name)
        finally:
            with self._lock:
                self._restore(parked)
                self._in_use -= 1

    # --- loading ----------------------------------------------------------------------------------------------------

    def _load(self, name: str) -> None:
        c = self.component(name)
        log.info("loading %s (%s, %s, %s)", name, c.where, c.compute_dtype,
                 "read-only file map" if c.storage in ("map", "fp8") else "RAM copy")
        self._prewarm_for(name)
        started = time.perf_counter()
        device = self.device_of(name)
        try:
            with _BUILD_LOCK:
                model = self._builders[name](self.models_dir, c, device)
        except Exception as exc:
            if not exhaustion.out_of_host_memory(exc):
                raise
            message = exhaustion.load_shortfall(name, c, exhaustion.commit_free_now(), exhaustion.ram_free_now())
            raise MemoryPlanError(message) from exc
        streamer = self._stream(name, model, c, device) if streamed(c) else None
        try:
            if c.compile:
                compiled.keep_caches_in(self.models_dir / compiled.CACHE_SUBDIR)
            self._apply_speed_options(name, model, c)
            if name == "transformer":
                self._loras_applied = None
                self._apply_loras(model)
        except BaseException:
            if streamer is not None:
                streamer.close()  # a load that fails holds nothing: no hooks, no page-locked memory
            raise
        self._loaded[name] = model
        if streamer is not None:
            self._streamers[name] = streamer
        self.load_count[name] = self.load_count.get(name, 0) + 1
        allocator.return_freed_heap()  # the load's transient CPU copies
        log.info("loaded %s in %.2f s", name, time.perf_counter() - started)

    @staticmethod
    def _stream(name: str, model, c: ComponentPlan, device: torch.device) -> BlockStreamer:
        """The embedders and the first `resident_blocks` blocks (layers) go to the device; the others pass through
        the streamer's two block buffers each forward (streaming.py)."""
        if name == "transformer":
            return stream_transformer(model, device, c.resident_blocks, c.pinned_sources,
                                      pin_parked=c.pinned_sources and c.park_for_decode)
        llama = model[2]  # text_encoders: (tokenizer, tokenizer_2, llama, clip)
        return stream_model(llama, list(llama.layers), device, c.resident_blocks)

    @staticmethod
    def _apply_speed_options(name: str, model, c: ComponentPlan) -> None:
        """How the model computes, as the plan decided: set once per load, before its first forward."""
        if name == "transformer":
            precision.compute_output_in_fp32(model)  # every profile, as the official demo infers
            if c.fp8_matmul:
                log.info("fp8 matmul in %d Linears", set_fp8_matmul(model, True))
            attention.set_attention(model, c.attention)
            if c.compile:
                compiled.compile_blocks(model)  # lazy: each block compiles on its first call
        elif name == "vae" and c.compile:
            compiled.compile_vae_decoder(model)  # lazy: compiles at the first decode

    def compile_vae_decoder_now(self) -> bool:
        """Compile the VAE decoder on a small decode, as the plan's `compile_later` asks of the idle time after a job
        (the worker calls this): the later jobs' plans then decode compiled at no compile cost. Returns whether
        the decoder is ready; an out-of-memory error propagates."""
        compiled.keep_caches_in(self.models_dir / compiled.CACHE_SUBDIR)
        with self.use("vae") as vae:
            compiled.compile_vae_decoder(vae)
            ready = False
            try:
                ready = compiled.compile_on_a_small_decode(vae)
            finally:
                if not ready:  # a VAE kept loaded decodes as its plan says: eagerly, in the eager tiles
                    compiled.uncompile_vae_decoder(vae)
            return ready

    # --- LoRA -------------------------------------------------------------------------------------------------------

    def set_loras(self, loras: LoraSet | None) -> None:
        """The LoRAs (with their strengths) the transformer computes with from now on (None: none): put on the
        loaded transformer at once (only their own tensors move: compute/lora.py), else when it loads. The plan
        counted their memory (PlanOverrides.lora)."""
        with self._lock:
            self._loras = loras or LoraSet()
            model = self._loaded.get("transformer")
            if model is not None:
                self._apply_loras(model)

    def _apply_loras(self, model) -> None:
        if self._loras.key == self._loras_applied:
            return
        count = lora_compute.apply_loras(model, self._loras.parts(), self.device_of("transformer"),
                                         compute_dtype(self.component("transformer")))
        self._loras_applied = self._loras.key
        if count or self._loras.entries:
            log.info("LoRA on %d layers of the transformer: %s", count, self._loras.describe() or "none")

    def _park_for(self, name: str):
        """Using the VAE while a streamed transformer is loaded, where the plan says the decode needs the room:
        park its resident blocks (streaming.BlockStreamer.park). Returns (model, streamer) to restore, or None."""
        transformer, streamer = self._loaded.get("transformer"), self._streamers.get("transformer")
        if (name != "vae" or transformer is None or streamer is None or streamer.parked
                or not self.component("transformer").park_for_decode):
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

    def held_memory(self) -> tuple[int, int, int]:
        """(RAM, commit, VRAM) bytes the loaded models hold, all of which `free()` gives back: RAM and commit as the
        plan costed them, VRAM as the CUDA allocator reserves it on the plan's GPU (the plan's figures without
        one)."""
        with self._lock:
            loaded = [self.plan.components[name] for name in self._loaded]
        ram, commit = sum(c.ram_bytes for c in loaded), sum(c.commit_bytes for c in loaded)
        if self.gpu.type == "cuda" and torch.cuda.is_available():
            vram = torch.cuda.memory_reserved(self.gpu)
        else:
            vram = sum(c.vram_bytes for c in loaded if c.device == "cuda")
        return ram, commit, vram

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def streamer(self, name: str) -> BlockStreamer | None:
        """The block streamer of a loaded, streamed model (its counters: bytes streamed, parked, pinned)."""
        return self._streamers.get(name)

    def free(self, name: str | None = None) -> None:
        """Drop one model (or all) and give the memory back to the system."""
        with self._lock:
            if name is None:
                self._cancel_idle_timer()
            for key in [name] if name else list(self._loaded):
                model = self._loaded.pop(key, None)
                if model is not None:
                    streamer = self._streamers.pop(key, None)
                    if streamer is not None:
                        streamer.close()  # waits for in-flight copies, removes its hooks
                    self._noticed = {n for n in self._noticed if n[0] != key}
                    if key == "transformer":
                        self._loras_applied = None
                    log.info("freed %s", key)
                del model
        gc.collect()
        allocator.return_freed_heap()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- after a job ------------------------------------------------------------------------------------------------

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

    # --- commit -----------------------------------------------------------------------------------------------------

    def _prewarm_for(self, name: str) -> None:
        """Before a load whose planned commit is more than is available now: grow the pagefile (Windows, system
        managed) or stop with one line (Linux with enforced commit, a fixed-size pagefile). The reservation is
        held until just before the load takes its memory, then released: the grown commit limit remains."""
        if self.commit_allocator is None:
            return
        from . import prewarm

        c = self.component(name)
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
