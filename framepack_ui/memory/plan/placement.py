"""The placement decisions: where each entry lives on this machine, and how the transformer computes."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ...compute import backends
from ...errors import MemoryPlanError
from ...units import GB
from ..probe import ComponentWeights, Machine
from .budgets import (FP8_CONVERSION_MARGIN_BYTES, PIN_HEADROOM_BYTES, Budgets, DoesNotFit, budgets_for, check,
                      page_cache_room, shortfall, spills_from_page_cache)
from .catalogue import ENTRY_COMPONENTS, PLAN_CHOICES, compute_itemsize, fp8_weights, with_real_defaults
from .costs import (decode_activations, decode_seconds, entry_weights, frames_on_host, lora_bytes, phase_costs,
                    place, runtime_baseline, sampling_activations, text_activations, tile_table, with_lora,
                    with_pinned_sources)
from .explain import decode_name, gb_text
from .measured import VAE_DECODER_COMPILE_SECONDS, VAE_SMALLEST_TILE_PX
from .types import ComponentPlan, LoadPlan, PhaseCost, PlanOverrides
from .vocabulary import Storage, Where

# What compiling the VAE decoder buys is room for larger tiles; the compile (about 70 s on an H100's host, longer
# on a laptop's CPU) runs once per app run, so the plan compiles the decoder only where the decode it allows is at
# least this much faster: 256 -> 352 px on an 8 GB card (4.39 -> 2.58 s), not 384 px -> untiled on a 48 GB card
# (2.86 -> 2.19 s). docs/benchmarks.md, "Compiled VAE decoder only where it buys larger tiles".
VAE_COMPILE_MIN_GAIN = 0.25
STORAGE_SWITCH_MARGIN_BYTES = 2 * GB  # bf16 is taken back from a cached fp8 only with this much page cache to spare


def make_plan(machine: Machine, weights: dict[str, ComponentWeights],
              overrides: PlanOverrides | None = None) -> LoadPlan:
    """Decide every placement (auto unless overridden) and predict each phase; raise if it cannot fit.

    The transformer's storage, unless forced (PlanOverrides.fp8): bf16 as shipped, or fp8 where the transformer
    is streamed from its file map and the bf16 blocks would not stay in the page cache beside the largest phase
    (every step would read them from disk again) but the fp8 ones would (_choose_storage)."""
    o = overrides or PlanOverrides()
    if o.fp8 is None and o.fp8_matmul:  # asked whatever the fit: the same answer on every machine
        raise MemoryPlanError("--fp8-matmul needs the transformer stored as fp8 (add --fp8)")
    if o.fp8 is not None:
        plan = _plan_with_decoder_choice(machine, weights, o)
        if o.fp8:
            _refuse_conversion_without_disk(machine, weights, plan)
        return plan
    return _choose_storage(machine, weights, o)


def _choose_storage(machine: Machine, weights: dict[str, ComponentWeights], o: PlanOverrides) -> LoadPlan:
    """bf16, unless bf16 fits nowhere, or its streamed blocks spill out of the page cache, while fp8 fits and the fp8
    cache is on disk or there is disk to convert it once; the choice and why in the plan's notes. fp8 is taken also
    where its blocks spill too: half the bytes, so each step reads far less from disk."""
    try:
        bf16 = _plan_with_decoder_choice(machine, weights, replace(o, fp8=False))
    except DoesNotFit as refused:
        bf16, refusal = None, refused
    if o.plan == "cpu" and bf16 is None:  # fp8 is read from its map: not an option for RAM copies
        raise refusal
    cached = with_real_defaults(weights)["transformer"].fp8_cached
    # once its cache is on disk, fp8 is kept until bf16 fits with room to spare: a machine whose free RAM wavers
    # around the line would otherwise switch storage (and reload the model) from one job to the next
    margin = STORAGE_SWITCH_MARGIN_BYTES if cached else 0
    if o.plan == "cpu" or (bf16 is not None and not spills_from_page_cache(bf16, margin)):
        return bf16
    try:
        fp8 = _plan_with_decoder_choice(machine, weights, replace(o, fp8=True))
    except DoesNotFit:
        if bf16 is None:
            raise refusal from None
        return bf16
    short = _conversion_disk_short(machine, weights)
    if short:
        if bf16 is None:
            raise MemoryPlanError(f"{refusal.message}; fp8 storage would fit, but {short}")
        return replace(bf16, notes=bf16.notes + (f"fp8 storage would read less from disk each step, but {short}",))
    t_fp8 = fp8.components["transformer"]
    if bf16 is None:
        why = f"bf16 does not fit ({refusal.message})"
    else:
        t_bf16 = bf16.components["transformer"]
        why = (f"the bf16 blocks streamed each step ({gb_text(t_bf16.page_cache_bytes)}) would not stay in the page "
               f"cache beside the largest phase (about {gb_text(max(0, page_cache_room(bf16)))} of room) and every "
               f"step would read the rest from disk; ")
        if spills_from_page_cache(fp8):
            keep = t_fp8.page_cache_bytes - page_cache_room(fp8)
            why += (f"the fp8 ones ({gb_text(t_fp8.page_cache_bytes)}) read less; about {gb_text(keep)} more free RAM "
                    f"or a lower --resolution would keep them all cached")
        else:
            why += f"the fp8 ones ({gb_text(t_fp8.page_cache_bytes)}) stay cached"
    return replace(fp8, notes=(f"transformer stored as fp8 (chosen automatically): {why}",) + fp8.notes)


def _conversion_disk_short(machine: Machine, weights: dict[str, ComponentWeights]) -> str | None:
    """Where the fp8 cache is not on disk yet and its one-time conversion does not fit the models' disk: what it
    needs, in one line; else None (also where the free disk is not known)."""
    t = with_real_defaults(weights)["transformer"]
    if t.fp8_cached or t.storage_itemsize <= 1 or machine.disk_free_bytes is None:
        return None
    need = fp8_weights(t).file_bytes + FP8_CONVERSION_MARGIN_BYTES
    if machine.disk_free_bytes >= need:
        return None
    return (f"converting the transformer to fp8 once needs {gb_text(need)} of free disk beside the models and "
            f"{gb_text(machine.disk_free_bytes)} is free")


def _refuse_conversion_without_disk(machine: Machine, weights: dict[str, ComponentWeights], plan: LoadPlan) -> None:
    short = _conversion_disk_short(machine, weights)
    if short and plan.components["transformer"].storage == Storage.FP8:
        raise MemoryPlanError(f"--fp8: {short}; free some space, or use bf16 (--no-fp8)")


def _plan_with_decoder_choice(machine: Machine, weights: dict[str, ComponentWeights], o: PlanOverrides) -> LoadPlan:
    """Where torch.compile works, the plan is made twice, with the VAE decoder eager and compiled, and the compiled
    one is taken where its smaller decode footprint buys a decode at least VAE_COMPILE_MIN_GAIN faster (larger
    tiles, or none) or is the only one that fits. Where the decoder is not compiled in this process yet and the
    job's sections would not pay the compile back, the job decodes eagerly and the decoder compiles after it, while
    the worker is idle (`_compile_later`)."""
    compile_able = (machine.has_cuda and o.plan not in ("mmap", "cpu") and machine.decoder_compile != "failed"
                    and (machine.compile_supported if o.compile is None else o.compile))
    if not compile_able:
        return _make_plan(machine, weights, o, compile_decoder=False)
    try:
        eager = _make_plan(machine, weights, o, compile_decoder=False)
    except MemoryPlanError:
        return _make_plan(machine, weights, o, compile_decoder=True)
    try:
        compiled = _make_plan(machine, weights, o, compile_decoder=True)
    except MemoryPlanError:
        return eager
    before, after = decode_seconds(eager), decode_seconds(compiled)
    if after > (1 - VAE_COMPILE_MIN_GAIN) * before:
        return eager
    compile_s = VAE_DECODER_COMPILE_SECONDS[machine.decoder_compile]
    if o.sections is not None and o.sections * (before - after) < compile_s:
        return _compile_later(eager, compiled, compile_s, o.sections)
    compiling = f"; the first decode after the app starts compiles it: {_compile_time_text(compile_s)}" \
        if compile_s else ""
    return replace(compiled, notes=compiled.notes + (
        f"VAE decoder compiled: a third less VRAM, so it decodes {decode_name(compiled)} instead of "
        f"{decode_name(eager)} (about {before / after:.1f}x faster{compiling})",))


def _compile_later(eager: LoadPlan, compiled: LoadPlan, compile_s: float, sections: int) -> LoadPlan:
    """The eager plan, with the decoder to compile when the worker is idle after the job: this job's decodes would
    save less than the compile costs it (docs/benchmarks.md, "First-job compile costs")."""
    plan = eager.with_component("vae", compile_later=True)
    return replace(plan, notes=plan.notes + (
        f"VAE decoder not compiled for this job: {sections} sections to make (this job's and any queued after it) "
        f"would not pay back the compile "
        f"({_compile_time_text(compile_s)}), so it decodes {decode_name(eager)}; the web app compiles the decoder "
        f"while idle after the job, and its later jobs decode {decode_name(compiled)} (about "
        f"{decode_seconds(eager) / decode_seconds(compiled):.1f}x faster)",))


def _compile_time_text(seconds: float) -> str:
    return "a minute or more" if seconds >= 60 else "seconds, from the compile cache"


def _make_plan(machine: Machine, weights: dict[str, ComponentWeights], o: PlanOverrides,
               compile_decoder: bool) -> LoadPlan:
    """One plan, the VAE decoder eager or compiled: each entry placed in turn (the VAE first, the transformer
    last: it takes what the others leave), then the transformer's storage and speed options, where its
    streamed blocks live and the VAE's tile; the phases costed and checked against the budgets."""
    _refuse_impossible_overrides(machine, o)
    weights = _weights_as_stored(weights, o)
    ctx = _Context.of(machine, weights, o, compile_decoder)
    plans = {"vae": _place_vae(ctx)}
    plans["image_encoder"] = _place_image_encoder(ctx)
    plans["text_encoders"] = _place_text_encoders(ctx)
    plans["transformer"] = with_lora(_place_transformer(ctx, plans["vae"]), ctx.lora_bytes)
    notes = []
    if o.lora is not None:
        notes.append(f"LoRA on {o.lora.layers} layers: {gb_text(ctx.lora_bytes)} beside the transformer "
                     f"({'VRAM' if ctx.cuda else 'RAM'}), applied as each layer runs (no weights rewritten)")
    if o.fp8:
        plans["transformer"], note = _apply_fp8(plans["transformer"], ctx.w["transformer"])
        notes.append(note)
    plans["transformer"] = replace(plans["transformer"], **_speed_options(machine, plans["transformer"], o))
    if plans["transformer"].device == "cuda" and not plans["transformer"].compile and o.compile is None:
        notes.append(COMPILE_OFF_NOTE)
    plans = _choose_pinning(ctx, plans)
    plans = _choose_vae_tile(ctx, plans)
    plan = LoadPlan(machine, "cuda" if ctx.cuda else "cpu", {k: plans[k] for k in ENTRY_COMPONENTS},
                    ctx.phases(plans), ctx.budgets.ram, ctx.budgets.vram, ctx.budgets.commit, o.resolution,
                    tuple(notes))
    return check(plan, weights)


def _refuse_impossible_overrides(machine: Machine, o: PlanOverrides) -> None:
    """An unknown --plan, --fp8 with --plan cpu (fp8 is read from its map), --plan gpu or streamed without a GPU."""
    if o.plan not in PLAN_CHOICES:
        raise MemoryPlanError(f"--plan must be one of {', '.join(PLAN_CHOICES)}, not {o.plan!r}")
    if o.fp8 and o.plan == "cpu":
        raise MemoryPlanError("--fp8 needs the read-only file map (--plan auto, gpu, streamed or mmap), "
                              "not --plan cpu")
    if o.plan in ("gpu", "streamed") and not machine.has_cuda:
        raise MemoryPlanError(f"--plan {o.plan} needs a CUDA GPU, and none was found (use --plan mmap or auto)")


def _weights_as_stored(weights: dict[str, ComponentWeights], o: PlanOverrides) -> dict[str, ComponentWeights]:
    """The weights planned with: the real models' expected sizes for components not on disk, and with --fp8 the
    transformer as its fp8 cache stores it."""
    weights = with_real_defaults(weights)
    if o.fp8:
        weights = {**weights, "transformer": fp8_weights(weights["transformer"])}
    return weights


@dataclass(frozen=True)
class _Context:
    """What every placement rule reads: the overrides, each entry's weights, the budgets, and the activations of
    sampling and of the text encoders (they depend on the compute device only, not on where the weights are)."""
    o: PlanOverrides
    cuda: bool  # the plan uses the GPU: there is one, and --plan is not mmap or cpu
    compile_decoder: bool
    w: dict[str, ComponentWeights]  # by manager entry
    budgets: Budgets
    sampling_act: int
    text_act: int
    lora_bytes: int  # the job's LoRAs beside the transformer (costs.lora_bytes)

    @classmethod
    def of(cls, machine: Machine, weights: dict[str, ComponentWeights], o: PlanOverrides,
           compile_decoder: bool) -> _Context:
        cuda = machine.has_cuda and o.plan not in ("mmap", "cpu")
        w = {e: entry_weights(e, weights) for e in ENTRY_COMPONENTS}
        sampling_act = sampling_activations(w["transformer"], w["image_encoder"], o.resolution,
                                            itemsize=compute_itemsize("transformer", cuda), lora=o.lora)
        text_act = text_activations(weights["text_encoder"], compute_itemsize("text_encoders", cuda))
        lora = lora_bytes(o.lora, compute_itemsize("transformer", cuda))
        return cls(o, cuda, compile_decoder, w, budgets_for(machine, cuda), sampling_act, text_act, lora)

    def vae_decode(self, tile_px: int | None) -> int:
        """What the VAE's decode allocates, untiled (None) or in tiles of `tile_px`."""
        return decode_activations(self.w["vae"], self.o.resolution, tile_px, compute_itemsize("vae", self.cuda),
                                  self.compile_decoder)

    def decode_bytes(self, vae: ComponentPlan) -> int:
        """What the decode of the VAE as placed allocates."""
        return self.vae_decode(vae.vae_tile_px if vae.vae_tiling else None)

    def phases(self, plans: dict[str, ComponentPlan]) -> tuple[PhaseCost, ...]:
        """Each phase's cost with these placements."""
        baseline_ram, baseline_commit = runtime_baseline(self.cuda)
        return phase_costs(plans, baseline_ram, baseline_commit, 0 if self.cuda else self.sampling_act,
                           self.sampling_act if self.cuda else 0, self.text_act, self.decode_bytes(plans["vae"]),
                           frames_on_host(self.o.resolution))


def _place_vae(ctx: _Context) -> ComponentPlan:
    """The VAE: on the GPU where the plan uses one, else on the CPU. Its decode is tiled where asked, or else where
    the untiled decode does not fit: on the GPU, beside the whole transformer resident (untiled is faster, 3.9 s
    against 6.9 s per section on the H100, docs/benchmarks.md, but needs 21.8 GB at 640 px); on the CPU, in half
    the RAM budget. In the smallest tiles: _choose_vae_tile grows them once the transformer is placed."""
    o, vae = ctx.o, ctx.w["vae"]
    untiled = ctx.vae_decode(None)
    if ctx.cuda:
        untiled_fits = (vae.params * compute_itemsize("vae", cuda=True)
                        + ctx.w["transformer"].params * compute_itemsize("transformer", cuda=True) + ctx.lora_bytes
                        + max(ctx.sampling_act, untiled) <= ctx.budgets.vram)
        tiled = (o.vae_tiling if o.vae_tiling is not None
                 else not untiled_fits and ctx.vae_decode(VAE_SMALLEST_TILE_PX) < untiled)
        return replace(place("vae", vae, Where.GPU, vae_tiling=tiled, note="tiled decode" if tiled else ""),
                       compile=ctx.compile_decoder)
    tiled = o.vae_tiling if o.vae_tiling is not None else untiled > ctx.budgets.ram // 2
    return place("vae", vae, Where.CPU, vae_tiling=tiled, note="tiled decode" if tiled else "")


def _place_image_encoder(ctx: _Context) -> ComponentPlan:
    """SigLIP: small; on the GPU where the plan uses one, else a copy in RAM."""
    return place("image_encoder", ctx.w["image_encoder"], Where.GPU if ctx.cuda else Where.CPU)


def _place_text_encoders(ctx: _Context) -> ComponentPlan:
    """The text encoders, used once per prompt: a copy in RAM with --plan cpu; on the GPU where they fit with
    their activations; else their decoder layers streamed to the GPU, as many resident as fit (8 B params
    computed on a laptop CPU take minutes); without a GPU (or room for even the embeddings and two layers), on
    the CPU from the read-only map (nothing charged)."""
    te = ctx.w["text_encoders"]
    if ctx.o.plan == "cpu":
        return place("text_encoders", te, Where.CPU)
    if ctx.cuda and te.params * compute_itemsize("text_encoders", cuda=True) + ctx.text_act <= ctx.budgets.vram:
        return place("text_encoders", te, Where.GPU)
    layers = _most_resident("text_encoders", te, ctx.budgets.vram - ctx.text_act) if ctx.cuda else None
    if layers is not None:
        return place("text_encoders", te, Where.GPU_STREAMED, resident_blocks=layers,
                     note="decoder layers streamed from the file map (once per prompt)")
    return place("text_encoders", te, Where.MMAP, note="read-only file map, CPU (once per prompt)")


def _place_transformer(ctx: _Context, vae: ComponentPlan) -> ComponentPlan:
    """The transformer, kept for the whole job: a copy in RAM with --plan cpu; without the GPU, computed from the
    read-only map; else resident where it fits beside the VAE and the larger of the sampling and decode
    activations (unless --plan streamed or PlanOverrides.resident_blocks), or else streamed
    (_stream_transformer). --plan gpu that does not take the resident transformer is refused with the
    shortfall."""
    o, t = ctx.o, ctx.w["transformer"]
    if o.plan == "cpu":
        return place("transformer", t, Where.CPU)
    if not ctx.cuda:
        return place("transformer", t, Where.MMAP)
    # The transformer stays loaded through the decode (the engine decodes inside its `use`). Resident, it shares
    # the VAE's decode room; streamed, it can park its resident blocks while the VAE decodes (the manager does:
    # streaming.BlockStreamer.park), so only the sampling phase bounds them. Its LoRAs stay in VRAM throughout.
    sampling_room = ctx.budgets.vram - vae.vram_bytes - ctx.sampling_act - ctx.lora_bytes
    decode_room = ctx.budgets.vram - vae.vram_bytes - ctx.decode_bytes(vae) - ctx.lora_bytes
    room = min(sampling_room, decode_room)
    full = place("transformer", t, Where.GPU)
    if o.plan != "streamed" and full.vram_bytes <= room and o.resident_blocks is None:
        return full
    if o.plan == "gpu":
        raise DoesNotFit(shortfall("the transformer resident in VRAM", full.vram_bytes - room,
                                        "VRAM", "use --plan streamed or auto"))
    return _stream_transformer(t, o.resident_blocks, sampling_room, decode_room)


def _stream_transformer(t: ComponentWeights, resident_blocks: int | None, sampling_room: int,
                        decode_room: int) -> ComponentPlan:
    """The transformer streamed: `resident_blocks` resident where forced; else as many as fit beside both the
    sampling and the decode activations, or, where the all-streamed transformer fits beside the decode with its
    resident blocks parked, as many as fit beside the sampling activations. Where the decode needs their room,
    the resident blocks are parked while the VAE decodes and copied back from the map after (page cache)."""
    n = resident_blocks
    if n is None:
        n = _most_resident("transformer", t, min(sampling_room, decode_room)) or 0
        if place("transformer", t, Where.GPU_STREAMED, resident_blocks=0).vram_bytes <= decode_room:
            n = max(n, _most_resident("transformer", t, sampling_room) or 0)  # parked while decoding
    streamed = place("transformer", t, Where.GPU_STREAMED, resident_blocks=n)
    if streamed.vram_bytes > decode_room:
        streamed = replace(streamed, park_for_decode=True,
                           page_cache_bytes=streamed.page_cache_bytes + sum(t.block_bytes[:n]))
    return streamed


def _apply_fp8(t: ComponentPlan, w: ComponentWeights) -> tuple[ComponentPlan, str]:
    """--fp8: the transformer read from its fp8 cache (memory/fp8.py) rather than the bf16 shards, and the note
    saying so. Its costs are already those of the fp8 weights (_weights_as_stored)."""
    return replace(t, storage=Storage.FP8), (
        f"fp8: the transformer blocks' Linear weights as e4m3fn with per-channel scales "
        f"({gb_text(w.file_bytes)} on disk), converted once from the bf16 shards into the fp8/ cache "
        f"(needs that much free disk the first time)")


def _choose_pinning(ctx: _Context, plans: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
    """A streamed transformer's streamed blocks held in page-locked RAM (with_pinned_sources) where, pinned,
    PIN_HEADROOM_BYTES of RAM (and of commit, where enforced) stay free beside the largest phase, or where
    forced; never where refused (PlanOverrides.pin_streamed)."""
    t = plans["transformer"]
    if t.where != Where.GPU_STREAMED or ctx.o.pin_streamed is False:
        return plans
    pinned = {**plans, "transformer": with_pinned_sources(t, ctx.w["transformer"])}
    phases = ctx.phases(pinned)
    fits = (max(p.ram_bytes for p in phases) + PIN_HEADROOM_BYTES <= ctx.budgets.ram
            and (ctx.budgets.commit is None
                 or max(p.commit_bytes for p in phases) + PIN_HEADROOM_BYTES <= ctx.budgets.commit))
    return pinned if fits or ctx.o.pin_streamed else plans


def _choose_vae_tile(ctx: _Context, plans: dict[str, ComponentPlan]) -> dict[str, ComponentPlan]:
    """A tiled decode on the GPU in the largest tile (larger tiles decode faster) that fits in what the decode
    phase leaves free beside the transformer as placed (its resident blocks parked where the plan parks them),
    so the tile never costs the transformer a resident block; in the smallest where none fits."""
    vae, t = plans["vae"], plans["transformer"]
    if not (ctx.cuda and vae.vae_tiling):
        return plans
    held = t.parked_vram_bytes if t.park_for_decode else t.vram_bytes
    room = ctx.budgets.vram - vae.vram_bytes - held
    tile = next((px for px in tile_table(ctx.compile_decoder) if ctx.vae_decode(px) <= room), VAE_SMALLEST_TILE_PX)
    return {**plans, "vae": replace(vae, vae_tile_px=tile, note=f"tiled decode, {tile} px tiles")}


def _most_resident(entry: str, w: ComponentWeights, room: int) -> int | None:
    """The most blocks that can stay resident with the rest streamed within `room` bytes of VRAM; None when
    not even all-streamed fits (or the weights list no blocks)."""
    if not w.block_bytes or place(entry, w, Where.GPU_STREAMED, resident_blocks=0).vram_bytes > room:
        return None
    n = len(w.block_bytes)
    while n > 0 and place(entry, w, Where.GPU_STREAMED, resident_blocks=n).vram_bytes > room:
        n -= 1
    return n


# Why a CUDA machine runs the blocks eagerly without being asked to (docs/benchmarks.md, "Compiled block forwards":
# eager takes 1.26x the compiled step)
COMPILE_OFF_NOTE = ("transformer not compiled: torch.compile needs Triton and a GPU of compute capability 7.0 or "
                    "later (on Windows, install.py installs triton-windows beside a CUDA build of torch); each step "
                    "takes about 1.3x longer (H100)")


def _speed_options(machine: Machine, t: ComponentPlan, o: PlanOverrides) -> dict:
    """How the transformer computes: compiled block forwards where Triton can generate GPU code, the attention
    backend asked for, fp8 matmuls where the weights are fp8 and the GPU has e4m3 tensor cores."""
    on_gpu = t.device == "cuda"
    if o.attention is not None:
        if o.attention not in backends.ATTENTION_BACKENDS:
            raise MemoryPlanError(f"--attention must be one of {', '.join(backends.ATTENTION_BACKENDS)}, "
                                  f"not {o.attention!r}")
        why = backends.unusable_because(o.attention, on_gpu, machine.cuda_capability)
        if why:
            raise MemoryPlanError(f"--attention {o.attention} {why}")
    compile_ = on_gpu and machine.compile_supported if o.compile is None else o.compile
    fp8_able = on_gpu and t.storage == Storage.FP8 and machine.cuda_capability >= backends.FP8_MATMUL_CAPABILITY
    fp8_matmul = fp8_able if o.fp8_matmul is None else o.fp8_matmul
    if fp8_matmul and t.storage != Storage.FP8:
        raise MemoryPlanError("--fp8-matmul needs the transformer stored as fp8 (add --fp8)")
    return {"compile": bool(compile_), "attention": o.attention, "fp8_matmul": bool(fp8_matmul)}


