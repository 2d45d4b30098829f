"""One fp8 Linear of the full-size F1 transformer at 640 px with a LoRA, each way of adding the update, compiled:
where the time of a LoRA beside an fp8 matmul goes (issue 18).

    python -m bench.bench_lora_layer --out lora-layer.json [--ranks 32,128] [--iters 20]

Rows per layer shape (in -> out, the image tokens of one call) and rank: the fp8 product alone; the update added
beside it (`(x @ down.T) @ up.T` into y); h as R more output columns of the product, up beside
(fp8_linear.fp8_linear_rank_outputs); inside it (compute/fp8_linear.fp8_linear_low_rank, the inner dimension
padded to a multiple of 128) with its left operand `[x, h]` made by torch (three passes over x) and by the Triton
kernel (compute/fp8_lora_kernel.py); and the parts: the left operand alone made by torch and by the kernel at each
of `LAUNCH_SHAPES` (tokens, warps a program), and the activations' quantization alone (what the product without a
LoRA pays).
Milliseconds per call, the median of `--iters` after three warm-up calls (CUDA events). `kernel_x_bytes_equal`:
the share of the operand's x columns the kernel writes byte for byte as torch does (the h columns differ by design:
torch rounds h to bf16 first); `inside_kernel_vs_torch`: the two inside outputs' largest difference relative to
the output's largest value.
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_lora_layer.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import statistics

import torch

from bench.common import header, write_json
from framepack_ui.compute import fp8_linear as f8
from framepack_ui.compute import fp8_lora_kernel
from framepack_ui.memory.plan.costs import sampling_tokens

LAUNCH_SHAPES = [(64, 4), (64, 8)]
SHAPES = [(3072, 3072), (3072, 12288), (12288, 3072), (15360, 3072)]  # q/k/v/out, ff up, ff down, single proj_out


def time_ms(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def beside(x, q, scale, bias, down, up):
    y = f8.fp8_linear(x, q, scale, bias)
    y.addmm_(x @ down.t(), up.t())
    return y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="32,128")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--out", default="lora-layer.json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU with fp8 matmuls (compute capability 8.9 or later)")
    if not fp8_lora_kernel.available(torch.zeros(1, device="cuda"), 32):
        p.error("needs Triton for the kernel's rows")
    ranks = [int(r) for r in a.ranks.split(",")]
    tokens = sampling_tokens(640)
    R = header(tokens=tokens, rows={})
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch._dynamo.config.cache_size_limit = 64  # every shape and left operand is another graph
    fp8 = torch.compile(f8.fp8_linear)
    low_rank = torch.compile(f8.fp8_linear_low_rank)
    side = torch.compile(beside)
    operand = torch.compile(fp8_lora_kernel.torch_operand)
    quant_only = torch.compile(f8.quantize_rows)
    launch_shape, app_fused = fp8_lora_kernel.launch_shape, f8.FUSED_LEFT_OPERAND
    outputs_way = torch.compile(f8.fp8_linear_rank_outputs)
    columns = ["fp8", "beside", "outputs", "in-torch", "in-kernel", "op-torch", *(f"op-{m}x{w}" for m, w in LAUNCH_SHAPES),
               "quant"]
    print(f"{'layer':>12} {'rank':>5} " + " ".join(f"{c:>9}" for c in columns) + "  x-bytes-equal")
    for inn, out in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        q, scale = f8.quantize(torch.randn(out, inn, device=dev, generator=g) * 0.02)
        x = torch.randn(tokens, inn, device=dev, dtype=dt, generator=g)
        bias = torch.zeros(out, device=dev, dtype=dt)
        for rank in ranks:
            down = torch.randn(rank, inn, device=dev, dtype=dt, generator=g) * inn ** -0.5
            up = torch.randn(out, rank, device=dev, dtype=dt, generator=g) * 0.01
            inner = f8.inner_width(inn, rank)
            row = {"fp8_ms": time_ms(lambda: fp8(x, q, scale, bias), a.iters),
                   "beside_ms": time_ms(lambda: side(x, q, scale, bias, down, up), a.iters),
                   "outputs_ms": time_ms(lambda: outputs_way(x, q, scale, bias, down, up), a.iters)}
            outputs = {}
            for way, fused in (("torch", False), ("kernel", True)):
                f8.FUSED_LEFT_OPERAND = fused  # a global the compiled graph guards on: each way its own graph
                row[f"inside_{way}_ms"] = time_ms(lambda: low_rank(x, q, scale, bias, down, up), a.iters)
                outputs[way] = low_rank(x, q, scale, bias, down, up)
            f8.FUSED_LEFT_OPERAND = app_fused
            row["operand_torch_ms"] = time_ms(lambda: operand(x, down, inner), a.iters)
            for shape in LAUNCH_SHAPES:
                fp8_lora_kernel.launch_shape = lambda block_r, _shape=shape: _shape
                row["operand_kernel_m{}_w{}_ms".format(*shape)] = time_ms(
                    lambda: fp8_lora_kernel.quantize_joined(x, down, inner), a.iters)
            fp8_lora_kernel.launch_shape = launch_shape
            row["quantize_ms"] = time_ms(lambda: quant_only(x), a.iters)
            by_kernel, by_torch = fp8_lora_kernel.quantize_joined(x, down, inner), operand(x, down, inner)
            row["kernel_x_bytes_equal"] = (by_kernel[0][:, :inn].view(torch.uint8)
                                           == by_torch[0][:, :inn].view(torch.uint8)).float().mean().item()
            row["inside_kernel_vs_torch"] = ((outputs["kernel"] - outputs["torch"]).abs().max()
                                             / outputs["torch"].abs().max()).item()
            R["rows"][f"{inn}->{out} r{rank}"] = row
            print(f"{inn:>5}->{out:<6} {rank:>5} " + " ".join(f"{v:9.3f}" for k, v in row.items() if k.endswith("_ms"))
                  + f"  {row['kernel_x_bytes_equal']:.6f} (outputs {row['inside_kernel_vs_torch']:.2e})", flush=True)
            write_json(a.out, R)
    write_json(a.out, R)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
