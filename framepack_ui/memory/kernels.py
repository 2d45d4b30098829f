"""Which kernels the transformer runs: compiled block forwards and the attention backend.

Placed here because the memory manager hands the engine a ready model: how it computes is decided with where it
lives (the plan), and applied once per load, not per job.

Measured on an H100 (docs/benchmarks.md): compiling each block's forward took a step from 1.163 to 0.865 s
(it fuses the RoPE, norm and cast element-wise work that was 35 % of GPU time). Only `block.forward` is compiled,
never `Module.compile()`: that traces the block's hooks too, and the streamer's weight swap breaks the graph.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

from . import attention

log = logging.getLogger(__name__)

# diffusers' attention dispatcher names that need nothing beyond torch, and the 8-bit kernels the app adapts
# (memory/attention.py) where their packages are installed
ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", attention.SAGE,
                      attention.CUDNN_FP8)


def compile_supported(device: torch.device | str) -> bool:
    """torch.compile's GPU code generator is Triton: CUDA only (Triton on Windows is a separate, optional package)."""
    return torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None


def _blocks(transformer) -> list[torch.nn.Module]:
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def compile_blocks(transformer, mode: str | None = None) -> bool:
    """Compile each block's forward (idempotent per `mode`, torch.compile's). Returns whether they are compiled now.

    `dynamic=False`: the token count is the same for every call of a job (F1's context is fixed-size), and a
    new resolution only recompiles (once per shape)."""
    if getattr(transformer, "_framepack_compiled", False) == (mode or "default"):
        return True
    for block in _blocks(transformer):
        eager = block.__dict__.setdefault("_framepack_eager_forward", block.forward)
        block.forward = torch.compile(eager, dynamic=False, mode=mode)
    transformer._framepack_compiled = mode or "default"
    log.info("transformer blocks compiled (the first step of a new resolution takes longer)")
    return True


# Frame windows shorter than this run the eager decoder. diffusers' windows are 5 latents (4 or fewer at the end of
# a decode); traced, 5 and 4 share one compiled graph and 3 needs another (tests/test_vae_tiles.py), minutes on a
# GPU. Eager, a 3-latent window (9 frames against 17) peaks below a compiled full one (1.5x the memory, 9/17 the
# frames), so it fits the compiled plan's budget.
VAE_COMPILED_MIN_LATENTS = 4


def compile_vae_decoder(vae) -> bool:
    """Compile the VAE decoder's forward (idempotent). Returns whether it is compiled now.

    Measured on an H200 (bench/bench_decode.py --compiled-pass, docs/benchmarks.md): compiled, the decode peaks a
    third lower (5.75 GiB instead of 8.62 in 384 px tiles, 14.1 instead of 21.6 untiled): the GroupNorm, SiLU and
    padding between the 3-D convolutions fuse instead of each writing a full-resolution tensor. It is hardly
    faster in the same tiles (352 px: 3.42 against 3.37 s per section), so the plan compiles it only where that
    room buys larger tiles (memory/plan.py). `dynamic=True`: the first decode compiles for about 2 min (H200
    host) and a new tile or latent count adds seconds (a new tiling's first decode took 11-14 s, decode
    included), instead of a full compile per shape (a static compile decoded untiled in 1.47 s, but took 86 s for
    each of a job's shapes). Even so each new shape regime recompiles: the engine decodes a compiled decoder's
    latents in spatial tiles of one size (engine/vae.py decode_in_even_tiles), and the short last frame window
    runs eagerly (VAE_COMPILED_MIN_LATENTS), so a job compiles once. Should compiling fail (a compiler missing or
    broken on the user's machine), the decoder goes back to eager for good rather than failing the job."""
    if getattr(vae, "_framepack_compiled_decoder", False):
        return True
    decoder = vae.decoder
    eager = decoder.forward
    compiled = torch.compile(eager, dynamic=True)

    def forward(z, *args, **kwargs):
        if z.shape[2] < VAE_COMPILED_MIN_LATENTS:
            return eager(z, *args, **kwargs)
        try:
            return compiled(z, *args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # a real shortage: the plan and the job's error handling deal with it
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager decoder still works
            log.warning("the compiled VAE decoder failed (%s): decoding without compiling from now on",
                        str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__)
            decoder.forward = eager
            vae._framepack_compiled_decoder = False
            return eager(z, *args, **kwargs)

    decoder.forward = forward
    vae._framepack_compiled_decoder = True
    vae._framepack_even_tiles = True  # engine/vae.py: spatial tiles of one size
    log.info("VAE decoder compiled (the first decode takes longer)")
    return True


def set_attention(transformer, backend: str | None) -> None:
    """Use one of ATTENTION_BACKENDS for every attention call (None: diffusers' default, torch's SDPA choice)."""
    if backend is None:
        return
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend in attention.ADAPTERS:
        if not attention.package_available(backend):  # the plan says so first (memory/plan.py)
            raise ValueError(f"attention {backend} needs the {attention.PACKAGES[backend]} package")
        attention.use(transformer, backend)
        return
    transformer.set_attention_backend(backend)
