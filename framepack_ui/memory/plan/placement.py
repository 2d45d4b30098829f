"""The placement decisions: where each entry lives on this machine, and how the transformer computes."""
from __future__ import annotations

from dataclasses import replace

from ...errors import MemoryPlanError
from ..probe import ComponentWeights, Machine
from .budgets import COMMIT_MARGIN_BYTES, PIN_HEADROOM_BYTES, RAM_RESERVE_BYTES, VRAM_MARGIN_BYTES, check, shortfall
from .catalogue import ENTRY_COMPONENTS, FP8_MATMUL_CAPABILITY, PLAN_CHOICES, fp8_weights, with_real_defaults
from .costs import (CUDA_HOST_OVERHEAD_BYTES, decode_activations, decode_seconds, entry_weights, phase_costs, place,
                    sampling_activations, text_activations, tile_table, with_pinned_sources)
from .explain import decode_name, gb_text
from .measured import RUNTIME_BASELINE_COMMIT_BYTES, RUNTIME_BASELINE_RAM_BYTES, VAE_SMALLEST_TILE_PX
from .types import ComponentPlan, LoadPlan, PhaseCost, PlanOverrides

# What compiling the VAE decoder buys is room for larger tiles; the compile (about 100 s on the H200's host, longer
# on a laptop's CPU) runs once per app run, so the plan compiles the decoder only where the decode it allows is at
# least this much faster: 256 -> 384 px on an 8 GB card (4.39 -> 2.58 s), not 384 px -> untiled on a 48 GB card
# (2.86 -> 2.19 s). docs/benchmarks.md, "The VAE decoder under torch.compile".
VAE_COMPILE_MIN_GAIN = 0.25


def make_plan(machine: Machine, weights: dict[str, ComponentWeights],
              overrides: PlanOverrides | None = None) -> LoadPlan:
    """Decide every placement (auto unless overridden) and predict each phase; raise if it cannot fit.

    Where torch.compile works, the plan is made twice, with the VAE decoder eager and compiled, and the compiled
    one is taken where its smaller decode footprint buys a decode at least VAE_COMPILE_MIN_GAIN faster (larger
    tiles, or none) or is the only one that fits."""
    o = overrides or PlanOverrides()
    compile_able = (machine.has_cuda and o.plan not in ("mmap", "cpu")
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
    return replace(compiled, notes=compiled.notes + (
        f"VAE decoder compiled: a third less VRAM, so it decodes {decode_name(compiled)} instead of "
        f"{decode_name(eager)} (about {before / after:.1f}x faster; the first decodes after the app starts "
        f"compile it: minutes)",))


def _make_plan(machine: Machine, weights: dict[str, ComponentWeights], o: PlanOverrides,
               compile_decoder: bool) -> LoadPlan:
    if o.plan not in PLAN_CHOICES:
        raise MemoryPlanError(f"--plan must be one of {', '.join(PLAN_CHOICES)}, not {o.plan!r}")
    weights = with_real_defaults(weights)
    if o.fp8:
        if o.plan == "cpu":
            raise MemoryPlanError("--fp8 needs the read-only file map (--plan auto, gpu, streamed or mmap), "
                                  "not --plan cpu")
        weights = {**weights, "transformer": fp8_weights(weights["transformer"])}
    cuda = machine.has_cuda and o.plan not in ("mmap", "cpu")
    if o.plan in ("gpu", "streamed") and not machine.has_cuda:
        raise MemoryPlanError(f"--plan {o.plan} needs a CUDA GPU, and none was found (use --plan mmap or auto)")
    ram_budget = max(0, min(machine.ram_available_bytes, machine.ram_total_bytes - RAM_RESERVE_BYTES))
    vram_budget = max(0, machine.vram_free_bytes - VRAM_MARGIN_BYTES) if cuda else 0
    commit_budget = (machine.commit_available_bytes - COMMIT_MARGIN_BYTES
                     if machine.commit_enforced and machine.commit_available_bytes is not None else None)
    baseline_ram = RUNTIME_BASELINE_RAM_BYTES + (CUDA_HOST_OVERHEAD_BYTES if cuda else 0)
    baseline_commit = RUNTIME_BASELINE_COMMIT_BYTES + (CUDA_HOST_OVERHEAD_BYTES if cuda else 0)
    w = {e: entry_weights(e, weights) for e in ENTRY_COMPONENTS}
    notes: list[str] = []
    half = 2

    # Activations per phase (they do not depend on where the weights are, only on the compute device)
    t_act = sampling_activations(w["transformer"], w["image_encoder"], o.resolution, itemsize=half if cuda else 4)
    text_act = text_activations(weights["text_encoder"], half if cuda else 4)

    # -- VAE: on the GPU when it and its decode fit; tiled decode when untiled does not fit (in the smallest
    #    tiles while the transformer is placed; grown to the largest that fit beside it after)
    def vae_decode(tiled: bool | int) -> int:
        tile = None if tiled is False else VAE_SMALLEST_TILE_PX if tiled is True else tiled
        return decode_activations(w["vae"], o.resolution, tile, half if cuda else 4, compile_decoder)

    if cuda:
        # Untiled decode is faster (3.9 s against 6.9 s per section on the H100) but needs 21.8 GB at 640 px:
        # keep it only when the whole transformer stays resident beside it.
        vae_vram = w["vae"].params * half
        untiled_fits = (vae_vram + w["transformer"].params * half + max(t_act, vae_decode(False))
                        <= vram_budget)
        tiled = (o.vae_tiling if o.vae_tiling is not None
                 else not untiled_fits and vae_decode(True) < vae_decode(False))
        plans = {"vae": replace(place("vae", w["vae"], "gpu", vae_tiling=tiled, note="tiled decode" if tiled else ""),
                                compile=compile_decoder)}
        decode_act = vae_decode(tiled)
    else:
        tiled = o.vae_tiling if o.vae_tiling is not None else vae_decode(False) > ram_budget // 2
        plans = {"vae": place("vae", w["vae"], "cpu", vae_tiling=tiled, note="tiled decode" if tiled else "")}
        decode_act = vae_decode(tiled)

    # -- image encoder: small; on the GPU when there is one
    plans["image_encoder"] = place("image_encoder", w["image_encoder"], "gpu" if cuda else "cpu")

    # -- text encoders: used once per prompt. On the GPU when they fit; else their decoder layers streamed to the
    #    GPU, as many resident as fit (8 B params computed on a laptop CPU take minutes); without a GPU (or room
    #    for even the embeddings and two layers), on the CPU from the read-only map (nothing charged).
    te = w["text_encoders"]
    te_layers = _most_resident("text_encoders", te, vram_budget - text_act) if cuda else None
    if o.plan == "cpu":
        plans["text_encoders"] = place("text_encoders", te, "cpu")
    elif cuda and te.params * half + text_act <= vram_budget:
        plans["text_encoders"] = place("text_encoders", te, "gpu")
    elif te_layers is not None:
        plans["text_encoders"] = place("text_encoders", te, "gpu-streamed", resident_blocks=te_layers,
                                        note="decoder layers streamed from the file map (once per prompt)")
    else:
        plans["text_encoders"] = place("text_encoders", te, "mmap", note="read-only file map, CPU (once per prompt)")

    # -- transformer: resident on the GPU if it fits beside the VAE and the larger of sampling and decode;
    #    else as many blocks resident as fit and the rest streamed; without CUDA, computed from the map.
    t = w["transformer"]
    if o.plan == "cpu":
        plans["transformer"] = place("transformer", t, "cpu")
    elif not cuda:
        plans["transformer"] = place("transformer", t, "mmap")
    else:
        # The transformer stays loaded through the decode (the engine decodes inside its `use`). Resident, it
        # shares the VAE's decode room; streamed, it can park its resident blocks while the VAE decodes (the
        # manager does: streaming.BlockStreamer.park), so only the sampling phase bounds them.
        sampling_room = vram_budget - plans["vae"].vram_bytes - t_act
        decode_room = vram_budget - plans["vae"].vram_bytes - decode_act
        room = min(sampling_room, decode_room)
        full = place("transformer", t, "gpu")
        if o.plan != "streamed" and full.vram_bytes <= room and o.resident_blocks is None:
            plans["transformer"] = full
        else:
            n = o.resident_blocks
            if n is None:
                n = _most_resident("transformer", t, room) or 0
                if place("transformer", t, "gpu-streamed", resident_blocks=0).vram_bytes <= decode_room:
                    n = max(n, _most_resident("transformer", t, sampling_room) or 0)  # parked while decoding
            streamed = place("transformer", t, "gpu-streamed", resident_blocks=n)
            if streamed.vram_bytes > decode_room:  # parked while the VAE decodes, copied back from the map after
                streamed = replace(streamed, park_for_decode=True,
                                   page_cache_bytes=streamed.page_cache_bytes + sum(t.block_bytes[:n]))
            plans["transformer"] = streamed
            if o.plan == "gpu":
                raise MemoryPlanError(shortfall("the transformer resident in VRAM", full.vram_bytes - room,
                                                 "VRAM", "use --plan streamed or auto"))

    if o.fp8:
        plans["transformer"] = replace(plans["transformer"], storage="fp8")
        notes.append(f"fp8: the transformer blocks' Linear weights as e4m3fn with per-channel scales "
                     f"({gb_text(t.file_bytes)} on disk), converted once from the bf16 shards into the fp8/ cache "
                     f"(needs that much free disk the first time)")
    plans["transformer"] = replace(plans["transformer"], **_speed_options(machine, plans["transformer"], o))

    def phases_of(candidate: dict[str, ComponentPlan], decode_bytes: int) -> tuple[PhaseCost, ...]:
        return phase_costs(candidate, baseline_ram, baseline_commit, 0 if cuda else t_act, t_act if cuda else 0,
                       text_act, decode_bytes)

    phases = phases_of(plans, decode_act)
    if plans["transformer"].where == "gpu-streamed" and o.pin_streamed is not False:
        pinned = {**plans, "transformer": with_pinned_sources(plans["transformer"], t)}
        pinned_phases = phases_of(pinned, decode_act)
        fits = (max(p.ram_bytes for p in pinned_phases) + PIN_HEADROOM_BYTES <= ram_budget
                and (commit_budget is None
                     or max(p.commit_bytes for p in pinned_phases) + PIN_HEADROOM_BYTES <= commit_budget))
        if fits or o.pin_streamed:
            plans, phases = pinned, pinned_phases
    if cuda and plans["vae"].vae_tiling:
        # Larger tiles decode faster: take the largest that fits in what the decode phase leaves free beside the
        # transformer as placed (its resident blocks parked where the plan parks them), so the tile never costs
        # the transformer a resident block.
        t_plan = plans["transformer"]
        held = t_plan.parked_vram_bytes if t_plan.park_for_decode else t_plan.vram_bytes
        room = vram_budget - plans["vae"].vram_bytes - held
        tile = next((px for px in tile_table(compile_decoder) if vae_decode(px) <= room), VAE_SMALLEST_TILE_PX)
        plans["vae"] = replace(plans["vae"], vae_tile_px=tile, note=f"tiled decode, {tile} px tiles")
        phases = phases_of(plans, vae_decode(tile))
    plan = LoadPlan(machine, "cuda" if cuda else "cpu", {k: plans[k] for k in ENTRY_COMPONENTS}, phases,
                    ram_budget, vram_budget, commit_budget, o.resolution, tuple(notes))
    return check(plan, weights)


def _most_resident(entry: str, w: ComponentWeights, room: int) -> int | None:
    """The most blocks that can stay resident with the rest streamed within `room` bytes of VRAM; None when
    not even all-streamed fits (or the weights list no blocks)."""
    if not w.block_bytes or place(entry, w, "gpu-streamed", resident_blocks=0).vram_bytes > room:
        return None
    n = len(w.block_bytes)
    while n > 0 and place(entry, w, "gpu-streamed", resident_blocks=n).vram_bytes > room:
        n -= 1
    return n


def _speed_options(machine: Machine, t: ComponentPlan, o: PlanOverrides) -> dict:
    """How the transformer computes: compiled block forwards where Triton can generate GPU code, the attention
    backend asked for, fp8 matmuls where the weights are fp8 and the GPU has e4m3 tensor cores."""
    on_gpu = t.device == "cuda"
    if o.attention is not None:
        from .. import attention  # torch: imported only when a backend is asked for
        from ..kernels import ATTENTION_BACKENDS

        if o.attention not in ATTENTION_BACKENDS:
            raise MemoryPlanError(f"--attention must be one of {', '.join(ATTENTION_BACKENDS)}, not {o.attention!r}")
        why = attention.unusable_because(o.attention, on_gpu, machine.cuda_capability)
        if why:
            raise MemoryPlanError(f"--attention {o.attention} {why}")
    compile_ = on_gpu and machine.compile_supported if o.compile is None else o.compile
    fp8_able = on_gpu and t.storage == "fp8" and machine.cuda_capability >= FP8_MATMUL_CAPABILITY
    fp8_matmul = fp8_able if o.fp8_matmul is None else o.fp8_matmul
    if fp8_matmul and t.storage != "fp8":
        raise MemoryPlanError("--fp8-matmul needs the transformer stored as fp8 (add --fp8)")
    return {"compile": bool(compile_), "attention": o.attention, "fp8_matmul": bool(fp8_matmul)}


