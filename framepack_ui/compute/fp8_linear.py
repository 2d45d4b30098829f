"""fp8 Linear layers: e4m3fn weights with one float32 scale per output channel, computed in the compute dtype.

The numbers (quantize / dequantize per row) and the layer that computes with them. Storing the transformer's
weights this way, and the verified cache on disk, are the memory manager's business (memory/fp8.py); how an fp8
layer multiplies (dequantize then bf16, or fp8 tensor cores) is decided by the plan and set here.

Format: weight ~= fp8.float() * scale[:, None], scale = max|row| / 448 (e4m3fn's largest finite value).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import fp8_lora_kernel

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_PARAM = "weight_scale"  # "<linear>.weight" is scaled by "<linear>.weight_scale"
# a low-rank update inside an fp8 product pads the inner dimension to this (_scaled_mm wants 16): with rank 32 the
# H100 step was 1.085x its own without a LoRA padded to 128, 1.105x padded to 16 (docs/benchmarks.md "LoRA")
INNER_MULTIPLE = 128
SMALL_ROW_FACTOR = 16  # fp8_linear_low_rank: rows of W whose scale is under the mean's 1/16 do not set c_r
# fp8_linear_low_rank makes its left operand [x, h] in one Triton kernel where it can (fp8_lora_kernel.py) when this
# is on: off until measured in the compiled step (traced as a user kernel the step was slower, docs/benchmarks.md
# "LoRA"; `bench_lora --left-operand kernel,torch` compares them)
FUSED_LEFT_OPERAND = False


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (fp8 [out, in], float32 scale [out]). An all-zero row gets scale 1."""
    w = weight.to(torch.float32)
    scale = row_scales(w)
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def row_scales(weight: torch.Tensor) -> torch.Tensor:
    amax = weight.abs().amax(dim=1).to(torch.float32)  # [out]; exact in the source dtype, no float32 copy
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [out, in] and scale [out] -> [out, in] in `dtype` (a new tensor: the stored bytes are only read)."""
    return q.to(dtype) * scale.to(dtype)[:, None]


class Fp8Linear(torch.nn.Linear):
    """nn.Linear computed from an fp8 weight and its per-row scale: dequantized into a transient tensor in the
    compute dtype for the call only (the stored, mapped or streamed-slot, fp8 tensor is only read), or with
    `fp8_matmul` multiplied in fp8 directly (`fp8_linear`).

    It reads `self.weight` at call time, so under streaming.py it sees the block's slot copy: the streamer's
    forward pre-hook sits on the block and runs before the block's forward calls this Linear.
    A class swapped in (`apply_fp8_compute`), not a per-module diffusers hook: torch.compile guards on each hooked
    module's own forward object, so with hooks every one of the 60 blocks recompiled and compile gave up after 8
    (measured on the H100: "hit config.recompile_limit (8)"); with one class, all blocks of a kind share a graph.
    """

    compute_dtype = torch.bfloat16  # set per module by apply_fp8_compute
    fp8_matmul = False  # set by set_fp8_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias
        if bias is not None and bias.dtype != self.compute_dtype:
            bias = bias.to(self.compute_dtype)
        if self.fp8_matmul:
            return fp8_linear(x.to(self.compute_dtype), self.weight, self.weight_scale, bias)
        return F.linear(x, dequantize(self.weight, self.weight_scale, self.compute_dtype), bias)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (fp8 [M, K], float32 scale [M, 1]): one scale per token, as the weight has one per
    output channel, so an outlier token does not flatten the others."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ weight.T + bias with both operands in e4m3 and row-wise scales (`torch._scaled_mm`: the fp8 tensor
    cores of Ada/Hopper and later, about twice the bf16 matmul rate); output in x's dtype."""
    shape = x.shape
    xq, x_scale = quantize_rows(x.reshape(-1, shape[-1]))
    y = _scaled_product(xq, x_scale, weight, weight_scale, bias, x.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])


def _scaled_product(xq: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    # weight [out, in] row-major: its transpose is the column-major [in, out] operand _scaled_mm wants
    return torch._scaled_mm(xq, weight.t(), scale_a=x_scale, scale_b=weight_scale.float().view(1, -1), bias=bias,
                            out_dtype=dtype)


def fp8_linear_low_rank(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                        down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`fp8_linear` plus a low-rank update `(x @ down.T) @ up.T` inside the same fp8 product: the rank joins the
    inner dimension, `[x, h] @ [W, U].T` with `h = x @ down.T`, so the update costs a (tokens, R) matmul and R more
    columns, not a read and a write of the (tokens, out) output beside the product.

    Scales: a row of [W, U] shares W's scale and a token of [x, h] one scale, so each rank r is rebalanced by a
    factor c_r (h_r * c_r and U_r / c_r multiply to the same update): c_r makes U's largest entry 448 of W's
    steps, which leaves `h * c` about the size of the activations for any LoRA whose effect is a fraction of the
    layer's output; a larger h widens its token's scale rather than saturating. A row of W far smaller than the
    layer's others (scale under a 16th of their mean) would set c_r alone and crush every token's x into fp8's
    subnormals, so c_r is taken as if its scale were that floor: U saturates in that row only. Costs per call
    beside the product: the left operand `[x, h]` quantized (one Triton kernel where it runs:
    compute/fp8_lora_kernel.py), and a copy of the fp8 weight with U's columns. The inner dimension is padded to
    `INNER_MULTIPLE`."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    scale = weight_scale.float()
    floor = scale.mean() / SMALL_ROW_FACTOR
    up = up.float()
    steps = up / scale[:, None]  # (out, R): the update's up in W's fp8 steps
    # c_r; the clamp keeps an all-zero rank (an up column of zeros) from dividing 0 by 0
    balance = (up / scale.clamp(min=floor)[:, None]).abs().amax(dim=0).clamp_(min=1e-30) / FP8_MAX  # (R,)
    inner = inner_width(shape[-1], down.shape[0])
    pad = inner - shape[-1] - down.shape[0]
    u = F.pad((steps / balance).clamp_(-FP8_MAX, FP8_MAX), (0, pad)).to(FP8_DTYPE)  # (out, R + pad)
    down = down.to(x.dtype) * balance.to(x.dtype)[:, None]
    make = fp8_lora_kernel.quantize_joined if fused_left_operand(x2, down.shape[0]) else fp8_lora_kernel.torch_operand
    xq, x_scale = make(x2, down, inner)
    y = _scaled_product(xq, x_scale, torch.cat([weight, u], dim=1), weight_scale, bias, x.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])


def inner_width(width: int, rank: int) -> int:
    """fp8_linear_low_rank's inner dimension: the input's width and the rank, padded to INNER_MULTIPLE."""
    return width + rank + (-(width + rank) % INNER_MULTIPLE)


def fp8_linear_rank_outputs(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                            bias: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`fp8_linear` plus a low-rank update with `h = x @ down.T` computed by the fp8 product itself: down's rows
    join W's as R more output channels (each with its own scale), so the activations are quantized once, as
    without a LoRA (and compiled, in the kernel that makes them), and never read again; then `y + h @ up.T`
    beside, which reads and writes a (tokens, out) tensor more. h carries fp8's rounding of x and of down. The
    output dimension is padded to a multiple of 16 (`_scaled_mm`)."""
    shape = x.shape
    out, rank = weight.shape[0], down.shape[0]
    pad = -(out + rank) % 16
    down_q, down_scale = quantize(F.pad(down.float(), (0, 0, 0, pad)))
    if bias is not None:
        bias = F.pad(bias, (0, rank + pad))
    y = fp8_linear(x.reshape(-1, shape[-1]), torch.cat([weight, down_q]),
                   torch.cat([weight_scale.float(), down_scale]), bias)
    y = torch.addmm(y[:, :out], y[:, out:out + rank], up.to(y.dtype).t())
    return y.reshape(*shape[:-1], out)


def fused_left_operand(x: torch.Tensor, rank: int) -> bool:
    """Whether fp8_linear_low_rank makes [x, h] in one kernel for `x` and a rank of `rank` (else torch's three more
    passes over x)."""
    return FUSED_LEFT_OPERAND and fp8_lora_kernel.available(x, rank)


def set_fp8_matmul(model: torch.nn.Module, enabled: bool) -> int:
    """Switch every fp8 Linear of `model` between fp8 matmul and dequantize-then-bf16-matmul; returns how many.
    The activations are quantized too, so this costs accuracy beyond the weight storage: measured in
    docs/benchmarks.md, "fp8 storage and fp8 matmul"."""
    count = 0
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            module.fp8_matmul = enabled
            count += 1
    return count


def is_fp8_linear(module: torch.nn.Module) -> bool:
    return (isinstance(module, torch.nn.Linear) and module._parameters.get(SCALE_PARAM) is not None
            and module.weight.dtype == FP8_DTYPE)
