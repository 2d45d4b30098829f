"""The cost model: what a placement holds (RAM, commit, VRAM, page cache), the activations of each phase, and
each phase's total. Costs only: which placement to take is placement.py's."""
from __future__ import annotations

from dataclasses import replace

from ...errors import MemoryPlanError
from ...spec import LATENT_WINDOW
from ...units import GB
from ..probe import ComponentWeights
from .catalogue import (ENTRY_COMPONENTS, IMAGE_TOKENS, ITEMSIZE, KEEP, MAPPABLE, PHASE_ENTRIES, PHASES, PROMPT_TOKENS,
                        TEXT_TOKENS, VAE_REAL_TOP_WIDTH, compute_dtype, storage_dtype)
from .explain import gb_text
from .measured import (RUNTIME_BASELINE_COMMIT_BYTES, RUNTIME_BASELINE_RAM_BYTES, UPCAST_COPIES,
                       VAE_COMPILED_UNTILED_RATIO, VAE_DECODE_REF_PIXELS, VAE_DECODE_REF_UNTILED_BYTES,
                       VAE_DECODE_SECONDS, VAE_DECODE_SECONDS_COMPILED, VAE_TILE_DECODE_BYTES,
                       VAE_TILE_DECODE_BYTES_COMPILED)
from .types import ComponentPlan, LoadPlan, LoraCost, PhaseCost
from .vocabulary import Storage, Where

# Host-side CUDA/cuBLAS/cuDNN state, the compiled kernels and graphs, and what malloc keeps between the loads: the
# anonymous memory beside the runtime baseline and the transformer's page-locked blocks while a job samples its first
# section (H100, 2026-12-06, 8 GB plan, compiled, malloc trimmed: 1.40 GB in the first job, 1.62 GB in the second;
# docs/benchmarks.md, "Section state size").
CUDA_HOST_OVERHEAD_BYTES = int(1.6 * GB)
# Decoded frames on the host in float32, in both the sampling and the decode phase of a later section: the writer's
# last frames, which the next section cross-fades into, a section's 69 decoded frames (its 18 latents) and the
# cross-fade's two temporaries of 32 frames; the writer's thread still encodes a section while the next one samples.
# Measured at 608x640 (H100, 2026-12-06, docs/benchmarks.md "Section state size"): up to 0.69 GiB (148 frames) of
# anonymous memory over a first section's sampling, in the sampling of a 5 s job's third section.
HELD_FRAMES = 4 * LATENT_WINDOW - 3
DECODED_FRAMES = 1 + 4 * (2 * LATENT_WINDOW - 1)
HOST_FRAMES = HELD_FRAMES + DECODED_FRAMES + 2 * (HELD_FRAMES - 1)
# streaming.py: two pinned host buffers and two VRAM slots, each the size of the largest streamed block (a dual
# block of the 13B model is ~0.68 GB): the block computing and the one being prefetched.
STREAM_STAGING_BUFFERS = 2
STREAM_SPARE_BLOCKS = 2
# Activations: the largest block holds about this many hidden-state-sized tensors at once (q, k, v, attention
# output, the 4x MLP and its activation, the residual streams). Estimate from the block's shapes, not measured.
ACTIVATION_COPIES = 16


def frames_on_host(resolution: int) -> dict[str, int]:
    """Bytes of decoded frames each phase holds on the host (float32 RGB at about resolution^2 pixels)."""
    held = HOST_FRAMES * 3 * resolution * resolution * 4
    return {"sampling": held, "decode": held}


def runtime_baseline(cuda: bool) -> tuple[int, int]:
    """RAM and commit of the process before any model, with CUDA's host-side state where the plan uses the GPU."""
    host = CUDA_HOST_OVERHEAD_BYTES if cuda else 0
    return RUNTIME_BASELINE_RAM_BYTES + host, RUNTIME_BASELINE_COMMIT_BYTES + host


# --- activations ---------------------------------------------------------------------------------------------------

def sampling_tokens(resolution: int, image_tokens: int = IMAGE_TOKENS) -> int:
    """Tokens per transformer call: 9 new + 2 clean latent frames at patch 2, the 2x and 4x history (one
    R^2/1024 each), the prompt and the image. ~18.4k latent tokens at 640 (18,249 measured at 640x608)."""
    per_frame = resolution * resolution / 256
    return int(per_frame * (LATENT_WINDOW + 2) + 2 * resolution * resolution / 1024) + PROMPT_TOKENS + image_tokens


def sampling_activations(t: ComponentWeights, image: ComponentWeights, resolution: int, itemsize: int,
                         lora: LoraCost | None = None) -> int:
    """What a sampling step allocates beside the weights, with what `lora`'s updates added beside need."""
    tokens = sampling_tokens(resolution, image.tokens or IMAGE_TOKENS)
    return tokens * (t.hidden_size or 3072) * itemsize * ACTIVATION_COPIES + lora_beside_bytes(lora, itemsize, tokens)


def decode_activations(vae: ComponentWeights, resolution: int, tile_px: int | None, itemsize: int,
                       compiled: bool = False) -> int:
    """VAE decode of 18 latents, untiled (tile_px None) or in tiles of `tile_px`, eager or with the decoder
    compiled: the measured figures scaled by pixels (untiled only: tiles have a fixed size), by the decoder's
    width (the tiny test VAE is 16x narrower) and by the dtype."""
    scale = (vae.hidden_size or VAE_REAL_TOP_WIDTH) / VAE_REAL_TOP_WIDTH * itemsize / 2
    untiled = VAE_DECODE_REF_UNTILED_BYTES * 69 * resolution * resolution / VAE_DECODE_REF_PIXELS
    if compiled:
        untiled *= VAE_COMPILED_UNTILED_RATIO
    tiles = tile_table(compiled)
    return int(scale * (untiled if tile_px is None else min(untiled, tiles[tile_px])))


def tile_table(compiled: bool) -> dict[int, int]:
    """The VAE tiles (px, largest first) and what a decode in them allocates, eager or compiled."""
    return VAE_TILE_DECODE_BYTES_COMPILED if compiled else VAE_TILE_DECODE_BYTES


def text_activations(te: ComponentWeights, itemsize: int) -> int:
    # every hidden state is returned (output_hidden_states): 33 x tokens x hidden, plus a layer's MLP. No tokens^2
    # term: batch 1 runs without an attention mask, and torch's CPU SDPA then uses its flash kernel (measured on
    # the development machine, 2026-11-28: 8 heads x 6000 tokens took +150 MB, not the 1.1 GB of a score matrix).
    return 40 * TEXT_TOKENS * (te.hidden_size or 4096) * itemsize


def decode_seconds(plan: LoadPlan) -> float:
    """Seconds the plan's VAE takes per later section (measured.VAE_DECODE_SECONDS)."""
    vae = plan.components["vae"]
    tile = vae.vae_tile_px if vae.vae_tiling else None
    return (VAE_DECODE_SECONDS_COMPILED if vae.compile else VAE_DECODE_SECONDS)[tile]


# --- placements ----------------------------------------------------------------------------------------------------

def entry_weights(entry: str, weights: dict[str, ComponentWeights]) -> ComponentWeights:
    """A manager entry's weights: its one component's, or the text encoders' two summed."""
    parts = [weights[c] for c in ENTRY_COMPONENTS[entry]]
    if len(parts) == 1:
        return parts[0]
    main = parts[0]
    return replace(main, name=entry, file_bytes=sum(p.file_bytes for p in parts), params=sum(p.params for p in parts),
                   largest_tensor_bytes=max(p.largest_tensor_bytes for p in parts))


def place(entry: str, w: ComponentWeights, where: Where, *, resident_blocks: int | None = None,
          vae_tiling: bool = False, note: str = "") -> ComponentPlan:
    """The cost of one placement (no decision here)."""
    stored = storage_dtype(entry, w)
    mapped = entry in MAPPABLE
    if where == Where.GPU:
        compute = compute_dtype(entry, cuda=True)
        vram = w.params * ITEMSIZE[compute]
        if stored == "float8_e4m3fn":  # fp8 stays fp8 in VRAM, each Linear dequantized per call
            vram = w.file_bytes
        if mapped:  # read from the read-only map straight into VRAM: page cache only, nothing charged
            return ComponentPlan(entry, where, Storage.MAP, stored, compute, KEEP[entry], 0, 0, vram, 0,
                                 load_ram_bytes=0, load_commit_bytes=0, file_bytes=w.file_bytes,
                                 vae_tiling=vae_tiling, note=note)
        # the library loads to the CPU first (safetensors' copy-on-write map is charged as commit), then moves it
        transient = w.params * ITEMSIZE[compute]
        return ComponentPlan(entry, where, Storage.RAM, stored, compute, KEEP[entry], 0, 0, vram, 0,
                             load_ram_bytes=transient, load_commit_bytes=transient + w.file_bytes,
                             file_bytes=w.file_bytes, vae_tiling=vae_tiling, note=note)
    if where == Where.GPU_STREAMED:
        blocks = list(w.block_bytes)
        n = len(blocks) if resident_blocks is None else max(0, min(resident_blocks, len(blocks)))
        resident = sum(blocks[:n])
        streamed = sum(blocks[n:])
        rest = w.file_bytes - sum(blocks)  # embedders, refiner, output: always resident
        spare = STREAM_SPARE_BLOCKS * max(blocks[n:], default=0)
        pinned = STREAM_STAGING_BUFFERS * max(blocks[n:], default=0)  # pinned: resident and charged
        return ComponentPlan(entry, where, Storage.MAP, stored, compute_dtype(entry, cuda=True), KEEP[entry],
                             pinned, pinned, rest + resident + spare, streamed,
                             resident_blocks=n, total_blocks=len(blocks), file_bytes=w.file_bytes,
                             note=note or f"{gb_text(streamed)} streamed from the file map per step",
                             parked_vram_bytes=rest)  # park() frees the slots too
    if where == Where.CPU:
        compute = compute_dtype(entry, cuda=False)
        ram = w.params * ITEMSIZE[compute]
        return ComponentPlan(entry, where, Storage.RAM, stored, compute, KEEP[entry], ram, ram, 0, 0,
                             load_commit_bytes=w.file_bytes, file_bytes=w.file_bytes, vae_tiling=vae_tiling,
                             note=note)
    if where == Where.MMAP:
        if not mapped:
            raise MemoryPlanError(f"{entry} cannot be computed from the file map (only {', '.join(MAPPABLE)})")
        # the largest module's weights exist in float32 while it runs (and the allocator keeps a freed copy)
        compute = compute_dtype(entry, cuda=False)
        upcast = UPCAST_COPIES * w.largest_tensor_bytes * ITEMSIZE[compute] // max(1, w.storage_itemsize)
        return ComponentPlan(entry, where, Storage.MAP, stored, compute, KEEP[entry], upcast, upcast, 0,
                             w.file_bytes, file_bytes=w.file_bytes, note=note or "read-only file map, CPU")
    raise ValueError(f"unknown placement {where!r}")


def with_pinned_sources(c: ComponentPlan, w: ComponentWeights) -> ComponentPlan:
    """A streamed placement whose streamed blocks are copied once into page-locked RAM (charged to RAM and
    commit, never paged) and uploaded from there: no staging buffers, nothing re-read from the map per step.
    Resident blocks that are parked for the decode are pinned too, so they come back asynchronously
    (streaming.BlockStreamer.restore)."""
    streamed = sum(w.block_bytes[c.resident_blocks:])
    pinned = streamed + (sum(w.block_bytes[:c.resident_blocks]) if c.park_for_decode else 0)
    return replace(c, ram_bytes=pinned, commit_bytes=pinned, page_cache_bytes=c.page_cache_bytes - pinned,
                   pinned_sources=True, note=f"{gb_text(streamed)} streamed per step from page-locked RAM")


def lora_bytes(cost: LoraCost | None, itemsize: int) -> int:
    """What a job's LoRAs hold beside the transformer in its compute dtype (compute/lora.py): their down and up
    matrices, and while a layer runs, its weight merged with its update (at most the largest layer's)."""
    if cost is None:
        return 0
    return (cost.params + cost.largest_layer_params) * itemsize


def lora_beside_bytes(cost: LoraCost | None, itemsize: int, tokens: int) -> int:
    """What a sampling step needs beyond `lora_bytes` where a layer adds its update beside its output (compute/lora.py:
    the few-token Linears, and beside an fp8 matmul the narrowing ones): the widest layer's `tokens` x out result,
    less the merged layer already counted. At 640 px 0.48 GB against 0.11 GB: an 8 GB fp8 plan that counted the
    merge alone ran out of memory with a rank-128 LoRA added beside every layer (H100, 2026-12-06,
    docs/benchmarks.md "LoRA"). Counted whichever way the layers take, as the plan's fp8 matmul choice comes later;
    only while sampling, not in the decode. With the update inside the fp8 product where a layer widens, that
    plan's 7.82 GB held a 7.73 GB peak."""
    if cost is None:
        return 0
    return max(0, tokens * cost.largest_out_features - cost.largest_layer_params) * itemsize


def with_lora(c: ComponentPlan, nbytes: int) -> ComponentPlan:
    """The transformer's placement with its LoRAs: on the GPU (VRAM, parked or not: the LoRA stays), or in RAM where
    it computes on the CPU."""
    if not nbytes:
        return c
    if c.device == "cuda":
        return replace(c, vram_bytes=c.vram_bytes + nbytes, parked_vram_bytes=c.parked_vram_bytes + nbytes,
                       lora_bytes=nbytes)
    return replace(c, ram_bytes=c.ram_bytes + nbytes, commit_bytes=c.commit_bytes + nbytes, lora_bytes=nbytes)


# --- phases --------------------------------------------------------------------------------------------------------

def phase_costs(plans: dict[str, ComponentPlan], baseline_ram: int, baseline_commit: int, cpu_act: int,
                gpu_act: int, text_act: int, decode_act: int,
                frames: dict[str, int] | None = None) -> tuple[PhaseCost, ...]:
    """Each phase's total: the runtime baseline, the entries in memory, the one loading (transiently), the
    phase's activations and the decoded frames it holds on the host (`frames`, by phase: frames_on_host)."""
    result = []
    for phase in PHASES:
        entries = PHASE_ENTRIES[phase]
        ram = baseline_ram + sum(plans[e].ram_bytes for e in entries)
        commit = baseline_commit + sum(plans[e].commit_bytes for e in entries)
        vram = sum(plans[e].parked_vram_bytes if phase == "decode" and plans[e].park_for_decode
                   else plans[e].vram_bytes for e in entries)
        cache = sum(plans[e].page_cache_bytes for e in entries)
        # loading is transient: the entry loaded in this phase may briefly need more
        fresh = [e for e in entries if not (phase in ("sampling", "decode") and e == "vae")
                 and not (phase == "decode" and e == "transformer")]
        ram += max((plans[e].load_ram_bytes for e in fresh), default=0)
        commit += max((plans[e].load_commit_bytes for e in fresh), default=0)
        act_ram = act_vram = 0
        if phase == "text":
            on_gpu = plans["text_encoders"].device == "cuda"
            act_ram, act_vram = (0, text_act) if on_gpu else (text_act, 0)
        elif phase == "sampling":
            act_ram, act_vram = cpu_act, gpu_act
        elif phase == "decode":
            on_gpu = plans["vae"].device == "cuda"
            act_ram, act_vram = (0, decode_act) if on_gpu else (decode_act, 0)
        held = (frames or {}).get(phase, 0)
        result.append(PhaseCost(phase, entries, ram + act_ram + held, commit + act_ram + held, vram + act_vram,
                                cache, act_ram, act_vram, held))
    return tuple(result)
