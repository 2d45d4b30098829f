"""The left operand of an fp8 product with a low-rank update inside it, made in one Triton kernel.

`fp8_linear.fp8_linear_low_rank` multiplies `[x, h] @ [W, U].T` in fp8, with `h = x @ down.T`. Made by torch, the
left operand costs three passes over the activations beyond the product's own quantization: `x @ down.T` reads x,
joining `[x, h]` reads x and writes the join, quantizing reads the join. That was most of a LoRA's cost beside fp8
matmuls (docs/benchmarks.md "LoRA": 1.085x the step). Here each block of tokens reads x once to find each token's
scale (the largest of its x and its h) while its tensor cores compute h, and once more to write
`[x, h, 0...]` quantized at that scale. An fp8 matmul needs Ada or later, which Triton supports everywhere torch
does; where Triton is missing (Windows without triton-windows) the product makes the operand with torch.
"""
from __future__ import annotations

import contextlib
import logging

import torch

FP8_MAX = 448.0  # e4m3fn's largest finite value (fp8_linear.FP8_MAX; not imported: fp8_linear imports this)

try:  # torch's Linux CUDA wheels bring Triton; CPU builds and Windows without triton-windows have none
    import triton
    import triton.language as tl
except ImportError:
    triton = None


# the Triton interpreter (TRITON_INTERPRET=1 when this module is first imported) runs the kernel on the CPU: the tests
INTERPRETED = triton is not None and bool(triton.knobs.runtime.interpret)
BLOCK_K = 128  # the activations' columns per load
# the widest h the kernel computes, the widest measured (docs/benchmarks.md "LoRA"); a wider rank (the sum of a
# layer's LoRAs) goes torch's way. Its tiles must fit an Ada card's 99 KB of shared memory a block: 48 KB at 128,
# 144 KB at 512 (Triton 3.7.1 compiling for sm_89: test_fp8_lora_kernel.py)
MAX_RANK_BLOCK = 128
_failed: list[str] = []  # the first launch that failed (Triton could not build or run it): torch's way from then on

log = logging.getLogger(__name__)


def rank_block(rank: int) -> int:
    """The columns of h the tensor cores compute: the rank padded to a power of two, at least 16 (tl.dot's least)."""
    return max(16, 1 << (rank - 1).bit_length())


def available(x: torch.Tensor, rank: int) -> bool:
    """Whether the kernel makes the operand for `x` and a rank of `rank`: Triton installed and working, x on a CUDA
    device (or interpreted), the rank within MAX_RANK_BLOCK."""
    return (triton is not None and (x.is_cuda or INTERPRETED) and rank_block(rank) <= MAX_RANK_BLOCK
            and not _failed)


def launch_shape(block_r: int) -> tuple[int, int]:
    """(tokens per program, warps per program): the fastest of five on an H100 for rank 32 and 128 at each of the
    transformer's widths (docs/benchmarks.md "LoRA")."""
    return (64, 4) if block_r <= 32 else (64, 8)


def quantize_joined(x: torch.Tensor, down: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) and down (R, K) -> the fp8 operand (M, inner) holding `[x, x @ down.T, 0...]` each token at its own
    scale, and the scales (M, 1) float32: the largest magnitude of the token's x and h over 448, as
    `fp8_linear.quantize_rows` gives `torch.cat([x, h])` (h here accumulated in float32, not first rounded to x's
    dtype). Columns past K + R are zero. A NaN in x stays NaN.

    A custom op, opaque to torch.compile: traced into a compiled block as a user kernel, the same launch took
    4.5 ms where it takes 0.75 run as itself (12288 -> 3072, rank 32, H100: docs/benchmarks.md "LoRA")."""
    return torch.ops.framepack_ui.quantize_joined(x, down, inner)


def torch_operand(x: torch.Tensor, down: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same operand made by torch: `x @ down.T`, joined and quantized (three more passes over x)."""
    from .fp8_linear import quantize_rows
    h = x @ down.to(x.dtype).t()
    return quantize_rows(torch.cat([x, torch.nn.functional.pad(h, (0, inner - x.shape[1] - h.shape[1]))], dim=1))


def _launch(x: torch.Tensor, down: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, width = x.shape
    block_r = rank_block(down.shape[0])
    x = x.contiguous()
    # (K, BLOCK_R), zero past the rank: the tensor cores' right operand, each row one aligned vector load
    down_t = torch.nn.functional.pad(down.to(x.dtype), (0, 0, 0, block_r - down.shape[0])).t().contiguous()
    joined = torch.empty(tokens, inner, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(tokens, 1, dtype=torch.float32, device=x.device)
    block_m, warps = launch_shape(block_r)
    try:
        # Triton launches on the current device, which need not be x's (a worker on cuda:1)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _quantize_joined_kernel[(triton.cdiv(tokens, block_m),)](
                x, down_t, joined, scale, tokens, width, inner,
                BLOCK_M=block_m, BLOCK_K=BLOCK_K, BLOCK_R=block_r, FP8_LIMIT=FP8_MAX, num_warps=warps)
    except Exception as exc:  # a Triton that cannot build for this GPU (a toolchain, a card's shared memory)
        _failed.append(f"{exc.__class__.__name__}: {exc}")
        log.warning("the fp8 LoRA kernel failed, torch makes its operand from now on: %s", _failed[0])
        return torch_operand(x, down, inner)
    return joined, scale


# registered once per process: a reload (the tests' interpreter) keeps the op, whose body reads this module's
# globals at each call, so it launches whichever kernel the module now holds
if triton is not None and "_quantize_joined_op" not in globals():
    @torch.library.custom_op("framepack_ui::quantize_joined", mutates_args=())
    def _quantize_joined_op(x: torch.Tensor, down: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _launch(x, down, inner)

    @_quantize_joined_op.register_fake
    def _(x: torch.Tensor, down: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.new_empty((x.shape[0], inner), dtype=torch.float8_e4m3fn),
                x.new_empty((x.shape[0], 1), dtype=torch.float32))


if triton is not None:
    @triton.jit
    def _quantize_joined_kernel(x_ptr, down_t_ptr, out_ptr, scale_ptr, tokens, width, inner,
                                BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                                FP8_LIMIT: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < tokens
        ranks = tl.arange(0, BLOCK_R)
        h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        x_rows = x_ptr + rows[:, None].to(tl.int64) * width
        # pass 1: each token's largest |x|, and h = x @ down.T on the tensor cores
        for start in range(0, width, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < width), other=0.0)
            d = tl.load(down_t_ptr + cols[:, None] * BLOCK_R + ranks[None, :], mask=cols[:, None] < width, other=0.0)
            h = tl.dot(x, d, h)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        amax = tl.maximum(amax, tl.max(tl.abs(h), axis=1))
        scale = tl.where(amax > 0, tl.math.div_rn(amax, FP8_LIMIT), 1.0)  # exact, as torch divides
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        # pass 2: x quantized at the token's scale into columns [0, K); a NaN stays NaN (clamp propagates it)
        out_rows = out_ptr + rows[:, None].to(tl.int64) * inner
        for start in range(0, width, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            ok = row_ok[:, None] & (cols[None, :] < width)
            x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0)
            q = tl.clamp(tl.math.div_rn(x.to(tl.float32), scale[:, None]), -FP8_LIMIT, FP8_LIMIT,
                         propagate_nan=tl.PropagateNan.ALL)
            tl.store(out_rows + cols[None, :], q.to(tl.float8e4nv), mask=ok)
        # h into columns [K, K + BLOCK_R) (its columns past the rank are zero: down_t is), zeros after
        q = tl.clamp(tl.math.div_rn(h, scale[:, None]), -FP8_LIMIT, FP8_LIMIT, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_rows + width + ranks[None, :], q.to(tl.float8e4nv),
                 mask=row_ok[:, None] & (width + ranks[None, :] < inner))
        zeros = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32).to(tl.float8e4nv)
        for start in range(width + BLOCK_R, inner, BLOCK_R):
            cols = start + ranks
            tl.store(out_rows + cols[None, :], zeros, mask=row_ok[:, None] & (cols[None, :] < inner))
