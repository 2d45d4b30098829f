"""What the app loads and how it runs it: the manager's entries and their phases, the one dtype policy, token
counts, and the real models' weights (for planning before, or without, a download). Facts, not decisions."""
from __future__ import annotations

from dataclasses import replace

from ...weights.layout import COMPONENTS
from ..probe import ComponentWeights

PHASES = ("text", "image", "sampling", "decode")
# Manager entries in memory during each phase, and the weight components each entry loads.
PHASE_ENTRIES = {"text": ("text_encoders",), "image": ("image_encoder", "vae"),
                 "sampling": ("vae", "transformer"), "decode": ("vae", "transformer")}
ENTRY_COMPONENTS = {"text_encoders": ("text_encoder", "text_encoder_2"), "image_encoder": ("image_encoder",),
                    "vae": ("vae",), "transformer": ("transformer",)}
KEEP = {"text_encoders": False, "image_encoder": False, "vae": True, "transformer": True}
# Entries the storage module can build from a read-only map (diffusers/transformers classes on `meta`).
MAPPABLE = ("text_encoders", "transformer")
PLAN_CHOICES = ("auto", "gpu", "streamed", "mmap", "cpu")  # the `--plan` override

# --- the dtype policy ---------------------------------------------------------------------------------------------
# Half precision on the GPU as the official demo; float32 on the CPU (half-precision CPU kernels are 2-3x slower:
# a bf16 transformer forward took 82-95 s against 31-34 s in float32, development machine's CPU, 2026-11-28).
GPU_DTYPE = {"text_encoders": "float16", "image_encoder": "float16", "vae": "float16", "transformer": "bfloat16"}
CPU_DTYPE = "float32"
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F8_E4M3": "float8_e4m3fn"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1}


def compute_dtype(entry: str, cuda: bool) -> str:
    """The dtype an entry computes in (and its activations are), on the GPU or on the CPU."""
    return GPU_DTYPE[entry] if cuda else CPU_DTYPE


def compute_itemsize(entry: str, cuda: bool) -> int:
    return ITEMSIZE[compute_dtype(entry, cuda)]


def storage_dtype(entry: str, w: ComponentWeights) -> str:
    """The dtype an entry's weights are stored in: as the safetensors header says, else guessed from the item
    size (2 bytes: bfloat16 for the transformer and SigLIP, float16 for the others)."""
    return (SAFETENSORS_DTYPES.get(w.dtype) or
            {1: "float8_e4m3fn", 2: "bfloat16" if entry in ("transformer", "image_encoder") else "float16",
             4: "float32"}.get(w.storage_itemsize, "bfloat16"))


# --- tokens and widths of the real models --------------------------------------------------------------------------
TEXT_TOKENS = 256 + 95  # Llama input: the template prefix (95) and at most 256 prompt tokens, padded
PROMPT_TOKENS = 256  # what reaches the transformer: the prompt's real tokens, at most 256
IMAGE_TOKENS = 729  # SigLIP tokens of the real model
VAE_REAL_TOP_WIDTH = 128  # channels of the real VAE decoder's last block: activation size scales with it
VAE_TILE_OVERLAP_PX = 64  # diffusers' overlap of spatial VAE tiles: a tile's stride is its size less this


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
