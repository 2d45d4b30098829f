"""Where each model lives, decided before anything is loaded: a pure function of the machine and the weights.

`make_plan(machine, weights, overrides) -> LoadPlan`. No I/O, no torch: the same call plans this machine (from
`probe.probe_machine()`) or any other (`Machine.supposed(ram_gb=32, vram_gb=8)`). A plan that cannot fit raises
MemoryPlanError with the shortfall in GB and what would make it fit.

Phases run one after another (the engine's order) and a model not kept is freed at the end of its phase, so the
predicted peak is the largest phase, not the sum of all models:

    text      the text encoders (freed after)
    image     SigLIP (freed after) and the VAE (kept: it decodes every section)
    sampling  the transformer (kept for the whole job) and the VAE
    decode    the VAE decoding a section, the transformer still loaded (a streamed one with its resident blocks
              parked when the decode needs their VRAM: streaming.BlockStreamer.park)

The transformer's speed options (torch.compile of its blocks, the attention backend, fp8 matmuls) are decided here
too, from what the probe read (`Machine.compile_supported`, `Machine.cuda_capability`), unless overridden.

Where a component lives:
    gpu           resident in VRAM (loaded from the read-only file map where it can be: no RAM copy)
    gpu-streamed  N blocks resident in VRAM, the others copied in from the read-only file map each step through
                  two block-sized pinned buffers (memory/streaming.py): the transformer's blocks, or the text
                  encoder's decoder layers (once per prompt). Where RAM is plentiful (PIN_HEADROOM_BYTES left
                  beside it), the transformer's streamed blocks are held in page-locked RAM instead and uploaded
                  from there: one host copy fewer per step
    cpu           a private copy in RAM, computed on the CPU
    mmap          computed on the CPU straight from the read-only file map: not charged to the commit limit,
                  the OS can drop and re-read its pages, each module upcast to float32 only while it runs

Figures are bytes. RAM means anonymous memory (RssAnon): file-backed pages of a read-only map are listed apart as
"page cache", which the OS reclaims instead of swapping. Commit is what counts against Windows' commit limit (Linux:
VmData under `prlimit --data`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ...errors import MemoryPlanError
from ...spec import LATENT_WINDOW
from ...units import GB, MB
from ...weights.layout import COMPONENTS
from ..probe import ComponentWeights, Machine

PHASES = ("text", "image", "sampling", "decode")
# Manager entries in memory during each phase, and the weight components each entry loads.
PHASE_ENTRIES = {"text": ("text_encoders",), "image": ("image_encoder", "vae"),
                 "sampling": ("vae", "transformer"), "decode": ("vae", "transformer")}
ENTRY_COMPONENTS = {"text_encoders": ("text_encoder", "text_encoder_2"), "image_encoder": ("image_encoder",),
                    "vae": ("vae",), "transformer": ("transformer",)}
KEEP = {"text_encoders": False, "image_encoder": False, "vae": True, "transformer": True}
# Entries the storage module can build from a read-only map (diffusers/transformers classes on `meta`).
MAPPABLE = ("text_encoders", "transformer")
WHERE = ("gpu", "gpu-streamed", "cpu", "mmap")
PLAN_CHOICES = ("auto", "gpu", "streamed", "mmap", "cpu")  # the `--plan` override

# --- named budget constants (policy) ------------------------------------------------------------------------------
RAM_RESERVE_BYTES = 4 * GB  # left to the OS, browser and desktop of a laptop: planned RAM stays under total - this
VRAM_MARGIN_BYTES = 750 * MB  # CUDA context (when the figure is supposed), cuBLAS workspaces, fragmentation
COMMIT_MARGIN_BYTES = 1 * GB
# The process before any model: Python + torch + diffusers + transformers + PyAV (the CLI; the app adds gradio).
# Measured here (Linux, torch 2.13 CPU, `generate` on the tiny models): RssAnon 250 MB after the imports and
# 280-306 MB through the text and image phases with tiny encoders; VmData 338 MB, then 383-427 MB.
RUNTIME_BASELINE_RAM_BYTES = 300 * MB
RUNTIME_BASELINE_COMMIT_BYTES = 430 * MB
CUDA_HOST_OVERHEAD_BYTES = 1 * GB  # host-side CUDA/cuBLAS/cuDNN state: an estimate, not measured on this machine
# streaming.py: two pinned host buffers and two VRAM slots, each the size of the largest streamed block (a dual
# block of the 13B model is ~0.68 GB): the block computing and the one being prefetched.
STREAM_STAGING_BUFFERS = 2
STREAM_SPARE_BLOCKS = 2
# Page-locked memory cannot be paged out or dropped: the streamed blocks are pinned only where this much RAM (and
# commit) stays free beside the plan's largest phase, for the next prompt's text encoder (loaded while the
# transformer is kept), the page cache, the browser and other programs.
PIN_HEADROOM_BYTES = 8 * GB
# Activations: the largest block holds about this many hidden-state-sized tensors at once (q, k, v, attention
# output, the 4x MLP and its activation, the residual streams). Estimate from the block's shapes, not measured.
ACTIVATION_COPIES = 16
# No tokens^2 term: batch 1 runs without an attention mask, and torch's CPU SDPA then uses its flash kernel
# (measured: 8 heads x 6000 tokens took +150 MB, not the 1.1 GB a score matrix would).
TEXT_TOKENS = 256 + 95  # Llama input: the template prefix (95) and at most 256 prompt tokens, padded
PROMPT_TOKENS = 256  # what reaches the transformer: the prompt's real tokens, at most 256
IMAGE_TOKENS = 729  # SigLIP tokens of the real model
# A module computed from the map holds its float32 copy while it runs, and the allocator keeps about one more
# freed copy around (glibc): measured +130-160 MB RssAnon over the baseline while sampling the 1.48 GB test
# transformer (largest module 32 MB in float32, activations ~35 MB).
UPCAST_COPIES = 2
# VAE decode of 18 latents (69 frames) at 640x608, measured on the H100: 21.8 GB untiled.
VAE_DECODE_REF_PIXELS = 69 * 640 * 608
VAE_DECODE_REF_UNTILED_BYTES = int(21.8 * GB)
# Spatial tiles (px; diffusers' overlap of 64 px), largest first, and what the same decode allocates with them
# beyond the VAE's 0.49 GB of weights: bench/bench_decode.py peaks of 4.25 GiB (256 px, H100), 6.23, 7.37 and
# 8.63 GiB (320, 352, 384 px, H200), 2026-11-28. Larger tiles are faster: a later section's context decode took
# 4.39, 3.55, 3.37 and 2.87 s (untiled 2.45 s), so the decode takes the largest that fits beside the transformer.
VAE_TILE_DECODE_BYTES = {384: int(8.77 * GB), 352: int(7.42 * GB), 320: int(6.20 * GB), 256: int(4.07 * GB)}
# With the decoder compiled (kernels.compile_vae_decoder: the element-wise work between the convolutions fuses) the
# same decodes peak a third lower: 14.07 GiB untiled (21.63 eager), 2.97 / 4.23 / 4.96 / 5.75 / 7.58 GiB in
# 256 / 320 / 352 / 384 / 448 px tiles, VAE weights included (bench/bench_decode.py --compiled-pass, H200,
# 2026-11-29).
VAE_COMPILED_UNTILED_RATIO = 0.65
VAE_TILE_DECODE_BYTES_COMPILED = {448: int(7.65 * GB), 384: int(5.68 * GB), 352: int(4.84 * GB), 320: int(4.05 * GB),
                                  256: int(2.70 * GB)}
# Seconds per later section (context decode, 640x608; None: untiled), eager and compiled with dynamic shapes:
# H200 2026-11-28/29, 256 px eager H100. Compiled, the decode runs in tiles of one size (engine/vae.py
# decode_in_even_tiles: one compile per job; its peak is at most the table's, measured with diffusers' largest tile):
# at 640x608, tiles of 352-448 px all come out 44x42 latents (2.58 s, 4.74 GiB) and 256-320 px 32x31 (3.34 s,
# 2.85 GiB: 9 tiles where diffusers cuts 16). What compiling buys is room for larger tiles; the compile (about
# 100 s on the H200's host, longer on a laptop's CPU) runs once per app run, so the plan compiles the decoder only
# where the decode it allows is at least VAE_COMPILE_MIN_GAIN faster: 256 -> 384 px on an 8 GB card
# (4.39 -> 2.58 s), not 384 px -> untiled on a 48 GB card (2.86 -> 2.19 s).
VAE_DECODE_SECONDS = {None: 2.45, 384: 2.86, 352: 3.37, 320: 3.55, 256: 4.39}
VAE_DECODE_SECONDS_COMPILED = {None: 2.19, 448: 2.58, 384: 2.58, 352: 2.58, 320: 3.34, 256: 3.34}
VAE_COMPILE_MIN_GAIN = 0.25
VAE_TILE_OVERLAP_PX = 64
VAE_SMALLEST_TILE_PX = min(VAE_TILE_DECODE_BYTES)
VAE_REAL_TOP_WIDTH = 128  # channels of the real VAE decoder's last block: activation size scales with it
# Half precision on the GPU as the official demo; float32 on the CPU (half-precision CPU kernels are 2-3x slower:
# a bf16 transformer forward took 82-95 s against 31-34 s in float32 here).
GPU_DTYPE = {"text_encoders": "float16", "image_encoder": "float16", "vae": "float16", "transformer": "bfloat16"}
CPU_DTYPE = "float32"
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "float8_e4m3fn"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}
FP8_MATMUL_CAPABILITY = (8, 9)  # e4m3 tensor cores (torch._scaled_mm): Ada (8.9), Hopper (9.0) and later


@dataclass(frozen=True)
class PlanOverrides:
    """What the user may force. `plan`: "auto", or one placement for the big models (see PLAN_CHOICES)."""
    plan: str = "auto"
    resolution: int = 640  # bucket scale in px: activations and VAE decode grow with it
    resident_blocks: int | None = None  # gpu-streamed: force N resident blocks
    vae_tiling: bool | None = None  # None: tile only when untiled decode does not fit
    fp8: bool = False  # transformer blocks stored as fp8 (memory/fp8.py): about half the bytes, bf16 compute
    # How the transformer computes (kernels.py, fp8.py); None: decided from the machine
    compile: bool | None = None  # torch.compile of each block's forward (auto: CUDA with Triton)
    attention: str | None = None  # one of kernels.ATTENTION_BACKENDS; None: diffusers' default (SDPA's choice)
    fp8_matmul: bool | None = None  # e4m3 matmuls (auto: fp8 storage on a GPU of compute capability 8.9+)
    pin_streamed: bool | None = None  # streamed transformer blocks in page-locked RAM (auto: where RAM allows)


@dataclass(frozen=True)
class ComponentPlan:
    """One manager entry: where it lives and what it costs while loaded (and, transiently, while loading)."""
    name: str
    where: str  # gpu | gpu-streamed | cpu | mmap
    storage: str  # "map" (read-only file map) or "ram" (a private copy made by the library's loader)
    storage_dtype: str
    compute_dtype: str
    keep: bool
    ram_bytes: int  # anonymous RAM while loaded
    commit_bytes: int
    vram_bytes: int
    page_cache_bytes: int  # file pages it reads from (reclaimable, not commit)
    load_ram_bytes: int = 0  # extra, while loading only
    load_commit_bytes: int = 0
    resident_blocks: int | None = None  # gpu-streamed
    total_blocks: int | None = None
    vae_tiling: bool = False
    vae_tile_px: int = VAE_SMALLEST_TILE_PX  # with vae_tiling: the spatial tile (stride: VAE_TILE_OVERLAP_PX less)
    file_bytes: int = 0
    note: str = ""
    # gpu-streamed: the VRAM it holds with its resident blocks parked, and whether it parks them while the VAE
    # decodes (only where the decode needs their room)
    parked_vram_bytes: int = 0
    park_for_decode: bool = False
    pinned_sources: bool = False  # gpu-streamed: the streamed blocks held in page-locked RAM, not read from the map
    # transformer speed options (kernels.py, fp8.py)
    compile: bool = False
    attention: str | None = None
    fp8_matmul: bool = False

    @property
    def device(self) -> str:
        return "cuda" if self.where in ("gpu", "gpu-streamed") else "cpu"


@dataclass(frozen=True)
class PhaseCost:
    phase: str
    entries: tuple[str, ...]
    ram_bytes: int  # anonymous, including the runtime baseline
    commit_bytes: int
    vram_bytes: int
    page_cache_bytes: int
    activation_ram_bytes: int
    activation_vram_bytes: int


@dataclass(frozen=True)
class LoadPlan:
    machine: Machine
    device: str  # "cuda" or "cpu": where the engine computes by default
    components: dict[str, ComponentPlan]
    phases: tuple[PhaseCost, ...]
    ram_budget_bytes: int
    vram_budget_bytes: int
    commit_budget_bytes: int | None
    resolution: int
    notes: tuple[str, ...] = ()

    @property
    def peak_ram_bytes(self) -> int:
        return max(p.ram_bytes for p in self.phases)

    @property
    def peak_commit_bytes(self) -> int:
        return max(p.commit_bytes for p in self.phases)

    @property
    def peak_vram_bytes(self) -> int:
        return max(p.vram_bytes for p in self.phases)

    def summary(self) -> str:
        """One line: each model's place and the predicted peaks."""
        places = ", ".join(f"{c.name} {c.where}" + (f" {c.resident_blocks}/{c.total_blocks}"
                                                     if c.where == "gpu-streamed" else "")
                           for c in self.components.values())
        vram = f", VRAM {_gb(self.peak_vram_bytes)}" if self.device == "cuda" else ""
        return f"{places}; predicted peak RAM {_gb(self.peak_ram_bytes)}, commit {_gb(self.peak_commit_bytes)}{vram}"

    def phase(self, name: str) -> PhaseCost:
        return next(p for p in self.phases if p.phase == name)

    def explain(self) -> str:
        """A table for the CLI and the UI: one line per model, one per phase, then the notes."""
        m = self.machine
        lines = [f"Plan for {m.description}: RAM {_gb(m.ram_total_bytes)} ({_gb(m.ram_available_bytes)} free), "
                 + (f"VRAM {_gb(m.vram_total_bytes)} ({_gb(m.vram_free_bytes)} free, {m.gpu_name})"
                    if m.has_cuda else "no CUDA GPU")
                 + (f", commit {_gb(m.commit_available_bytes)} free of {_gb(m.commit_limit_bytes)}"
                    + ("" if m.commit_enforced else " (not enforced)") if m.commit_limit_bytes else "")
                 + f"; resolution {self.resolution}",
                 f"Budgets: RAM {_gb(self.ram_budget_bytes)}, VRAM {_gb(self.vram_budget_bytes)}"
                 + (f", commit {_gb(self.commit_budget_bytes)}" if self.commit_budget_bytes is not None else ""),
                 "",
                 f"{'model':<14}{'where':<20}{'storage':<16}{'compute':<10}{'on disk':>9}{'RAM':>9}{'commit':>9}"
                 f"{'VRAM':>9}{'cache':>9}  notes"]
        for c in self.components.values():
            where = c.where + (f" {c.resident_blocks}/{c.total_blocks}" if c.where == "gpu-streamed" else "")
            storage = (f"{'fp8 e4m3' if c.storage == 'fp8' else c.storage_dtype} "
                       f"{'map' if c.storage in ('map', 'fp8') else 'copy'}")
            lines.append(f"{c.name:<14}{where:<20}{storage:<16}{c.compute_dtype:<10}{_gb(c.file_bytes):>9}"
                         f"{_gb(c.ram_bytes):>9}{_gb(c.commit_bytes):>9}{_gb(c.vram_bytes):>9}"
                         f"{_gb(c.page_cache_bytes):>9}  {'; '.join(_component_notes(c))}")
        lines += ["", f"{'phase':<14}{'models':<34}{'RAM':>9}{'commit':>9}{'VRAM':>9}{'cache':>9}"]
        for p in self.phases:
            lines.append(f"{p.phase:<14}{', '.join(p.entries):<34}{_gb(p.ram_bytes):>9}{_gb(p.commit_bytes):>9}"
                         f"{_gb(p.vram_bytes):>9}{_gb(p.page_cache_bytes):>9}")
        lines.append(f"{'peak':<48}{_gb(self.peak_ram_bytes):>9}{_gb(self.peak_commit_bytes):>9}"
                     f"{_gb(self.peak_vram_bytes):>9}")
        lines += [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def _component_notes(c: ComponentPlan) -> list[str]:
    notes = [c.note] if c.note else []
    if c.park_for_decode:
        notes.append(f"resident blocks parked while the VAE decodes ({_gb(c.parked_vram_bytes)} VRAM then)")
    if c.name == "vae" and c.compile:
        notes.append("compiled decoder")
    if c.name == "transformer" and (c.device == "cuda" or c.compile or c.attention or c.fp8_matmul):
        notes.append("compiled" if c.compile else "not compiled")
        notes.append(f"attention {c.attention or 'default'}")
        if c.storage == "fp8":
            notes.append("fp8 matmul" if c.fp8_matmul else "no fp8 matmul (dequantized to bf16)")
    return notes


def _gb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / MB:.0f}M" if n < GB else f"{n / GB:.2f}G" if n < 10 * GB else f"{n / GB:.1f}G"


# --- the real weights, for planning before (or without) a download ------------------------------------------------

def real_weights() -> dict[str, ComponentWeights]:
    """The real models' weights (sizes from layout.py, dtypes and shapes from framepack-f1.md)."""
    # Per-block bytes of the 13B transformer in bf16: a dual-stream block has ~340 M params, a single-stream one
    # ~141.5 M (computed from the block shapes at width 3072); 20 + 40 blocks are ~97 % of the 25.7 GB.
    dual, single = 340_000_000 * 2, 141_500_000 * 2
    t_bytes = COMPONENTS["transformer"].approx_bytes
    # Llama-3-8B decoder layer in fp16: q, o 4096^2; k, v 4096x1024; gate, up, down 4096x14336; two norms
    llama_layer = (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096) * 2
    return {
        "text_encoder": ComponentWeights("text_encoder", COMPONENTS["text_encoder"].approx_bytes,
                                         COMPONENTS["text_encoder"].approx_bytes // 2, 2, 117_440_512,
                                         block_bytes=(llama_layer,) * 32, hidden_size=4096, heads=32, on_disk=False),
        "text_encoder_2": ComponentWeights("text_encoder_2", COMPONENTS["text_encoder_2"].approx_bytes,
                                           COMPONENTS["text_encoder_2"].approx_bytes // 2, 2, 4_718_592,
                                           hidden_size=768, heads=12, on_disk=False),
        "image_encoder": ComponentWeights("image_encoder", COMPONENTS["image_encoder"].approx_bytes,
                                          COMPONENTS["image_encoder"].approx_bytes // 2, 2, 9_916_416,
                                          hidden_size=1152, heads=16, tokens=IMAGE_TOKENS, on_disk=False),
        "vae": ComponentWeights("vae", COMPONENTS["vae"].approx_bytes, COMPONENTS["vae"].approx_bytes // 4, 4,
                                28_311_552, hidden_size=VAE_REAL_TOP_WIDTH, on_disk=False),
        "transformer": ComponentWeights("transformer", t_bytes, t_bytes // 2, 2, 94_371_840,
                                        block_bytes=(dual,) * 20 + (single,) * 40, hidden_size=3072, heads=24,
                                        on_disk=False),
    }


def with_real_defaults(weights: dict[str, ComponentWeights]) -> dict[str, ComponentWeights]:
    """Components not on disk get the real models' expected sizes (planning before a download)."""
    return {**real_weights(), **weights}


def fp8_weights(t: ComponentWeights) -> ComponentWeights:
    """The transformer as memory/fp8.py stores it: the blocks at one byte per element (their Linear weights are
    >99 % of a block; norms, biases and the per-row float32 scales, <0.2 %, are ignored), the rest as stored."""
    if t.storage_itemsize <= 1:
        return t
    blocks = tuple(b // t.storage_itemsize for b in t.block_bytes)
    rest = t.file_bytes - sum(t.block_bytes)  # embedders, token refiner, output: kept in bf16
    return replace(t, file_bytes=rest + sum(blocks), storage_itemsize=1, dtype="F8_E4M3", block_bytes=blocks,
                   largest_tensor_bytes=t.largest_tensor_bytes // t.storage_itemsize)


# --- estimates ---------------------------------------------------------------------------------------------------

def sampling_tokens(resolution: int, image_tokens: int = IMAGE_TOKENS) -> int:
    """Tokens per transformer call: 9 new + 2 clean latent frames at patch 2, the 2x and 4x history (one
    R^2/1024 each), the prompt and the image. ~18.4k latent tokens at 640 (18,249 measured at 640x608)."""
    per_frame = resolution * resolution / 256
    return int(per_frame * (LATENT_WINDOW + 2) + 2 * resolution * resolution / 1024) + PROMPT_TOKENS + image_tokens


def _sampling_activations(t: ComponentWeights, image: ComponentWeights, resolution: int, itemsize: int) -> int:
    tokens = sampling_tokens(resolution, image.tokens or IMAGE_TOKENS)
    return tokens * (t.hidden_size or 3072) * itemsize * ACTIVATION_COPIES


def _decode_activations(vae: ComponentWeights, resolution: int, tile_px: int | None, itemsize: int,
                        compiled: bool = False) -> int:
    """VAE decode of 18 latents, untiled (tile_px None) or in tiles of `tile_px`, eager or with the decoder
    compiled: the measured figures scaled by pixels (untiled only: tiles have a fixed size), by the decoder's
    width (the tiny test VAE is 16x narrower) and by the dtype."""
    scale = (vae.hidden_size or VAE_REAL_TOP_WIDTH) / VAE_REAL_TOP_WIDTH * itemsize / 2
    untiled = VAE_DECODE_REF_UNTILED_BYTES * 69 * resolution * resolution / VAE_DECODE_REF_PIXELS
    if compiled:
        untiled *= VAE_COMPILED_UNTILED_RATIO
    tiles = _tile_table(compiled)
    return int(scale * (untiled if tile_px is None else min(untiled, tiles[tile_px])))


def _tile_table(compiled: bool) -> dict[int, int]:
    return VAE_TILE_DECODE_BYTES_COMPILED if compiled else VAE_TILE_DECODE_BYTES


def _text_activations(te: ComponentWeights, itemsize: int) -> int:
    # every hidden state is returned (output_hidden_states): 33 x tokens x hidden, plus a layer's MLP
    return 40 * TEXT_TOKENS * (te.hidden_size or 4096) * itemsize


# --- the decision ------------------------------------------------------------------------------------------------

def _entry_weights(entry: str, weights: dict[str, ComponentWeights]) -> ComponentWeights:
    parts = [weights[c] for c in ENTRY_COMPONENTS[entry]]
    if len(parts) == 1:
        return parts[0]
    main = parts[0]
    return replace(main, name=entry, file_bytes=sum(p.file_bytes for p in parts), params=sum(p.params for p in parts),
                   largest_tensor_bytes=max(p.largest_tensor_bytes for p in parts))


def _place(entry: str, w: ComponentWeights, where: str, *, resident_blocks: int | None = None,
           vae_tiling: bool = False, note: str = "") -> ComponentPlan:
    """The cost of one placement (no decision here)."""
    storage_dtype = (SAFETENSORS_DTYPES.get(w.dtype) or
                     {1: "float8_e4m3fn", 2: "bfloat16" if entry in ("transformer", "image_encoder") else "float16",
                      4: "float32"}.get(w.storage_itemsize, "bfloat16"))
    mapped = entry in MAPPABLE
    if where == "gpu":
        compute = GPU_DTYPE[entry]
        vram = w.params * ITEMSIZE[compute]
        if storage_dtype == "float8_e4m3fn":  # fp8 stays fp8 in VRAM, each Linear dequantized per call
            vram = w.file_bytes
        if mapped:  # read from the read-only map straight into VRAM: page cache only, nothing charged
            return ComponentPlan(entry, where, "map", storage_dtype, compute, KEEP[entry], 0, 0, vram, 0,
                                 load_ram_bytes=0, load_commit_bytes=0, file_bytes=w.file_bytes,
                                 vae_tiling=vae_tiling, note=note)
        # the library loads to the CPU first (safetensors' copy-on-write map is charged as commit), then moves it
        transient = w.params * ITEMSIZE[compute]
        return ComponentPlan(entry, where, "ram", storage_dtype, compute, KEEP[entry], 0, 0, vram, 0,
                             load_ram_bytes=transient, load_commit_bytes=transient + w.file_bytes,
                             file_bytes=w.file_bytes, vae_tiling=vae_tiling, note=note)
    if where == "gpu-streamed":
        blocks = list(w.block_bytes)
        n = len(blocks) if resident_blocks is None else max(0, min(resident_blocks, len(blocks)))
        resident = sum(blocks[:n])
        streamed = sum(blocks[n:])
        rest = w.file_bytes - sum(blocks)  # embedders, refiner, output: always resident
        spare = STREAM_SPARE_BLOCKS * max(blocks[n:], default=0)
        pinned = STREAM_STAGING_BUFFERS * max(blocks[n:], default=0)  # pinned: resident and charged
        return ComponentPlan(entry, where, "map", storage_dtype, GPU_DTYPE[entry], KEEP[entry],
                             pinned, pinned, rest + resident + spare, streamed,
                             resident_blocks=n, total_blocks=len(blocks), file_bytes=w.file_bytes,
                             note=note or f"{_gb(streamed)} streamed from the file map per step",
                             parked_vram_bytes=rest)  # park() frees the slots too
    if where == "cpu":
        ram = w.params * ITEMSIZE[CPU_DTYPE]
        return ComponentPlan(entry, where, "ram", storage_dtype, CPU_DTYPE, KEEP[entry], ram, ram, 0, 0,
                             load_commit_bytes=w.file_bytes, file_bytes=w.file_bytes, vae_tiling=vae_tiling,
                             note=note)
    if where == "mmap":
        if not mapped:
            raise MemoryPlanError(f"{entry} cannot be computed from the file map (only {', '.join(MAPPABLE)})")
        # the largest module's weights exist in float32 while it runs (and the allocator keeps a freed copy)
        upcast = UPCAST_COPIES * w.largest_tensor_bytes * ITEMSIZE[CPU_DTYPE] // max(1, w.storage_itemsize)
        return ComponentPlan(entry, where, "map", storage_dtype, CPU_DTYPE, KEEP[entry], upcast, upcast, 0,
                             w.file_bytes, file_bytes=w.file_bytes, note=note or "read-only file map, CPU")
    raise ValueError(f"unknown placement {where!r}")


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
    before, after = _decode_seconds(eager), _decode_seconds(compiled)
    if after > (1 - VAE_COMPILE_MIN_GAIN) * before:
        return eager
    return replace(compiled, notes=compiled.notes + (
        f"VAE decoder compiled: a third less VRAM, so it decodes {_decode_name(compiled)} instead of "
        f"{_decode_name(eager)} (about {before / after:.1f}x faster; the first decodes after the app starts "
        f"compile it: minutes)",))


def _decode_seconds(plan: LoadPlan) -> float:
    vae = plan.components["vae"]
    tile = vae.vae_tile_px if vae.vae_tiling else None
    return (VAE_DECODE_SECONDS_COMPILED if vae.compile else VAE_DECODE_SECONDS)[tile]


def _decode_name(plan: LoadPlan) -> str:
    vae = plan.components["vae"]
    return f"in {vae.vae_tile_px} px tiles" if vae.vae_tiling else "untiled"


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
    w = {e: _entry_weights(e, weights) for e in ENTRY_COMPONENTS}
    notes: list[str] = []
    half = 2

    # Activations per phase (they do not depend on where the weights are, only on the compute device)
    t_act = _sampling_activations(w["transformer"], w["image_encoder"], o.resolution, itemsize=half if cuda else 4)
    text_act = _text_activations(weights["text_encoder"], half if cuda else 4)

    # -- VAE: on the GPU when it and its decode fit; tiled decode when untiled does not fit (in the smallest
    #    tiles while the transformer is placed; grown to the largest that fit beside it after)
    def vae_decode(tiled: bool | int) -> int:
        tile = None if tiled is False else VAE_SMALLEST_TILE_PX if tiled is True else tiled
        return _decode_activations(w["vae"], o.resolution, tile, half if cuda else 4, compile_decoder)

    if cuda:
        # Untiled decode is faster (3.9 s against 6.9 s per section on the H100) but needs 21.8 GB at 640 px:
        # keep it only when the whole transformer stays resident beside it.
        vae_vram = w["vae"].params * half
        untiled_fits = (vae_vram + w["transformer"].params * half + max(t_act, vae_decode(False))
                        <= vram_budget)
        tiled = (o.vae_tiling if o.vae_tiling is not None
                 else not untiled_fits and vae_decode(True) < vae_decode(False))
        plans = {"vae": replace(_place("vae", w["vae"], "gpu", vae_tiling=tiled, note="tiled decode" if tiled else ""),
                                compile=compile_decoder)}
        decode_act = vae_decode(tiled)
    else:
        tiled = o.vae_tiling if o.vae_tiling is not None else vae_decode(False) > ram_budget // 2
        plans = {"vae": _place("vae", w["vae"], "cpu", vae_tiling=tiled, note="tiled decode" if tiled else "")}
        decode_act = vae_decode(tiled)

    # -- image encoder: small; on the GPU when there is one
    plans["image_encoder"] = _place("image_encoder", w["image_encoder"], "gpu" if cuda else "cpu")

    # -- text encoders: used once per prompt. On the GPU when they fit; else their decoder layers streamed to the
    #    GPU, as many resident as fit (8 B params computed on a laptop CPU take minutes); without a GPU (or room
    #    for even the embeddings and two layers), on the CPU from the read-only map (nothing charged).
    te = w["text_encoders"]
    te_layers = _most_resident("text_encoders", te, vram_budget - text_act) if cuda else None
    if o.plan == "cpu":
        plans["text_encoders"] = _place("text_encoders", te, "cpu")
    elif cuda and te.params * half + text_act <= vram_budget:
        plans["text_encoders"] = _place("text_encoders", te, "gpu")
    elif te_layers is not None:
        plans["text_encoders"] = _place("text_encoders", te, "gpu-streamed", resident_blocks=te_layers,
                                        note="decoder layers streamed from the file map (once per prompt)")
    else:
        plans["text_encoders"] = _place("text_encoders", te, "mmap", note="read-only file map, CPU (once per prompt)")

    # -- transformer: resident on the GPU if it fits beside the VAE and the larger of sampling and decode;
    #    else as many blocks resident as fit and the rest streamed; without CUDA, computed from the map.
    t = w["transformer"]
    if o.plan == "cpu":
        plans["transformer"] = _place("transformer", t, "cpu")
    elif not cuda:
        plans["transformer"] = _place("transformer", t, "mmap")
    else:
        # The transformer stays loaded through the decode (the engine decodes inside its `use`). Resident, it
        # shares the VAE's decode room; streamed, it can park its resident blocks while the VAE decodes (the
        # manager does: streaming.BlockStreamer.park), so only the sampling phase bounds them.
        sampling_room = vram_budget - plans["vae"].vram_bytes - t_act
        decode_room = vram_budget - plans["vae"].vram_bytes - decode_act
        room = min(sampling_room, decode_room)
        full = _place("transformer", t, "gpu")
        if o.plan != "streamed" and full.vram_bytes <= room and o.resident_blocks is None:
            plans["transformer"] = full
        else:
            n = o.resident_blocks
            if n is None:
                n = _most_resident("transformer", t, room) or 0
                if _place("transformer", t, "gpu-streamed", resident_blocks=0).vram_bytes <= decode_room:
                    n = max(n, _most_resident("transformer", t, sampling_room) or 0)  # parked while decoding
            streamed = _place("transformer", t, "gpu-streamed", resident_blocks=n)
            if streamed.vram_bytes > decode_room:  # parked while the VAE decodes, copied back from the map after
                streamed = replace(streamed, park_for_decode=True,
                                   page_cache_bytes=streamed.page_cache_bytes + sum(t.block_bytes[:n]))
            plans["transformer"] = streamed
            if o.plan == "gpu":
                raise MemoryPlanError(_shortfall("the transformer resident in VRAM", full.vram_bytes - room,
                                                 "VRAM", "use --plan streamed or auto"))

    if o.fp8:
        plans["transformer"] = replace(plans["transformer"], storage="fp8")
        notes.append(f"fp8: the transformer blocks' Linear weights as e4m3fn with per-channel scales "
                     f"({_gb(t.file_bytes)} on disk), converted once from the bf16 shards into the fp8/ cache "
                     f"(needs that much free disk the first time)")
    plans["transformer"] = replace(plans["transformer"], **_speed_options(machine, plans["transformer"], o))

    def phases_of(candidate: dict[str, ComponentPlan], decode_bytes: int) -> tuple[PhaseCost, ...]:
        return _phases(candidate, baseline_ram, baseline_commit, 0 if cuda else t_act, t_act if cuda else 0,
                       text_act, decode_bytes)

    phases = phases_of(plans, decode_act)
    if plans["transformer"].where == "gpu-streamed" and o.pin_streamed is not False:
        pinned = {**plans, "transformer": _with_pinned_sources(plans["transformer"], t)}
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
        tile = next((px for px in _tile_table(compile_decoder) if vae_decode(px) <= room), VAE_SMALLEST_TILE_PX)
        plans["vae"] = replace(plans["vae"], vae_tile_px=tile, note=f"tiled decode, {tile} px tiles")
        phases = phases_of(plans, vae_decode(tile))
    plan = LoadPlan(machine, "cuda" if cuda else "cpu", {k: plans[k] for k in ENTRY_COMPONENTS}, phases,
                    ram_budget, vram_budget, commit_budget, o.resolution, tuple(notes))
    return _check(plan, weights)


def _with_pinned_sources(c: ComponentPlan, w: ComponentWeights) -> ComponentPlan:
    """A streamed placement whose streamed blocks are copied once into page-locked RAM (charged to RAM and
    commit, never paged) and uploaded from there: no staging buffers, nothing re-read from the map per step.
    Resident blocks that are parked for the decode are pinned too, so they come back asynchronously
    (streaming.BlockStreamer.restore)."""
    streamed = sum(w.block_bytes[c.resident_blocks:])
    pinned = streamed + (sum(w.block_bytes[:c.resident_blocks]) if c.park_for_decode else 0)
    return replace(c, ram_bytes=pinned, commit_bytes=pinned, page_cache_bytes=c.page_cache_bytes - pinned,
                   pinned_sources=True, note=f"{_gb(streamed)} streamed per step from page-locked RAM")


def _most_resident(entry: str, w: ComponentWeights, room: int) -> int | None:
    """The most blocks that can stay resident with the rest streamed within `room` bytes of VRAM; None when
    not even all-streamed fits (or the weights list no blocks)."""
    if not w.block_bytes or _place(entry, w, "gpu-streamed", resident_blocks=0).vram_bytes > room:
        return None
    n = len(w.block_bytes)
    while n > 0 and _place(entry, w, "gpu-streamed", resident_blocks=n).vram_bytes > room:
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


def _phases(plans: dict[str, ComponentPlan], baseline_ram: int, baseline_commit: int, cpu_act: int, gpu_act: int,
            text_act: int, decode_act: int) -> tuple[PhaseCost, ...]:
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
        result.append(PhaseCost(phase, entries, ram + act_ram, commit + act_ram, vram + act_vram, cache,
                                act_ram, act_vram))
    return tuple(result)


def _shortfall(what: str, short_bytes: int, resource: str, fix: str) -> str:
    return f"{what} needs {short_bytes / GB:.1f} GB more {resource} than this machine has to spare: {fix}"


def _check(plan: LoadPlan, weights: dict[str, ComponentWeights]) -> LoadPlan:
    """Raise MemoryPlanError (shortfall in GB and what would fit) if a phase exceeds a budget; else add notes."""
    notes = list(plan.notes)
    worst_ram = max(plan.phases, key=lambda p: p.ram_bytes)
    if worst_ram.ram_bytes > plan.ram_budget_bytes:
        short = worst_ram.ram_bytes - plan.ram_budget_bytes
        raise MemoryPlanError(
            f"no plan fits: the {worst_ram.phase} phase needs {_gb(worst_ram.ram_bytes)} of RAM and "
            f"{_gb(plan.ram_budget_bytes)} can be used (total minus {RAM_RESERVE_BYTES / GB:.0f} GB for the system, "
            f"or what is free now): {short / GB:.1f} GB short; close other programs, add RAM, or lower --resolution")
    if plan.commit_budget_bytes is not None and plan.peak_commit_bytes > plan.commit_budget_bytes:
        short = plan.peak_commit_bytes - plan.commit_budget_bytes
        disk = plan.machine.disk_free_bytes
        if plan.machine.pagefile_growable and (disk is None or disk > short + RAM_RESERVE_BYTES):
            # the manager pre-grows the system-managed pagefile before the load (prewarm.py) instead of
            # letting the load die with os error 1455
            notes.append(f"commit is {short / GB:.1f} GB short: the pagefile will be grown by that much before "
                         f"loading (Windows manages it; needs that much free disk)")
        else:
            raise MemoryPlanError(
                f"no plan fits the commit limit: {_gb(plan.peak_commit_bytes)} needed, "
                f"{_gb(plan.commit_budget_bytes)} available: {short / GB:.1f} GB short; enlarge the pagefile (or let "
                f"Windows manage it) by at least {math.ceil(short / GB)} GB")
    if plan.device == "cuda":
        worst_vram = max(plan.phases, key=lambda p: p.vram_bytes)
        if worst_vram.vram_bytes > plan.vram_budget_bytes:
            short = worst_vram.vram_bytes - plan.vram_budget_bytes
            raise MemoryPlanError(
                f"no plan fits the GPU: the {worst_vram.phase} phase needs {_gb(worst_vram.vram_bytes)} of VRAM and "
                f"{_gb(plan.vram_budget_bytes)} is free: {short / GB:.1f} GB short; lower --resolution, close "
                f"programs using the GPU, or use --plan mmap (CPU, slow)")
        t = plan.components["transformer"]
        if t.where == "gpu-streamed":
            cache_room = plan.ram_budget_bytes - plan.phase("sampling").ram_bytes
            if t.page_cache_bytes > cache_room:
                notes.append(f"the page cache can keep about {_gb(max(0, cache_room))} of the {_gb(t.page_cache_bytes)}"
                             f" streamed each step: the rest is read from disk every step (slower, never the pagefile)")
    missing = sorted(n for n, w in weights.items() if not w.on_disk)
    if missing:
        notes.append(f"expected sizes (not on disk): {', '.join(missing)}")
    pinned = plan.components["transformer"].pinned_sources
    if any(c.where == "gpu-streamed" and not c.pinned_sources for c in plan.components.values()):
        notes.append("gpu-streamed: blocks beyond the resident ones are copied from the read-only map each step "
                     "through two pinned block buffers" + ("" if pinned else " (the only pinned memory)"))
    if pinned:
        notes.append(f"pinned: the transformer's streamed blocks are held in page-locked RAM (uploaded without a "
                     f"host copy; {PIN_HEADROOM_BYTES / GB:.0f} GB of RAM stays free beside the largest phase)")
    return replace(plan, notes=tuple(notes))
