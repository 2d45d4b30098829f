"""One fp8 Linear of the full-size F1 transformer at 640 px with a LoRA, each way of adding the update, compiled:
where the time of a LoRA beside an fp8 matmul goes (issue 18).

    python -m bench.bench_lora_layer --out lora-layer.json [--ranks 32,128] [--iters 20]

Rows per layer shape (in -> out, the image tokens of one call) and rank: the fp8 product alone; the update added
beside it (`(x @ down.T) @ up.T` into y); inside it (compute/fp8_linear.fp8_linear_low_rank) with the inner dimension
padded to a multiple of 16 and of 128; and the parts: `x @ down.T` alone and the activations'
quantization alone. Milliseconds per call, the median of `--iters` after three warm-up calls (CUDA events).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_lora_layer.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import statistics

import torch

from bench.common import header, write_json
from framepack_ui.compute import fp8_linear as f8
from framepack_ui.memory.plan.costs import sampling_tokens

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
    ranks = [int(r) for r in a.ranks.split(",")]
    tokens = sampling_tokens(640)
    R = header(tokens=tokens, rows={})
    dev, dt = torch.device("cuda"), torch.bfloat16
    fp8 = torch.compile(f8.fp8_linear)
    low_rank = torch.compile(f8.fp8_linear_low_rank)
    side = torch.compile(beside)
    h_only = torch.compile(lambda x, down: x @ down.t())
    quant_only = torch.compile(f8.quantize_rows)
    print(f"{'layer':>12} {'rank':>5} {'fp8':>7} {'beside':>7} {'in16':>7} {'in-K128':>8} {'x@down':>7} {'quant':>7}")
    for inn, out in SHAPES:
        g = torch.Generator(device=dev).manual_seed(0)
        q, scale = f8.quantize(torch.randn(out, inn, device=dev, generator=g) * 0.02)
        x = torch.randn(tokens, inn, device=dev, dtype=dt, generator=g)
        bias = torch.zeros(out, device=dev, dtype=dt)
        for rank in ranks:
            down = torch.randn(rank, inn, device=dev, dtype=dt, generator=g) * 0.01
            up = torch.randn(out, rank, device=dev, dtype=dt, generator=g) * 0.01
            row = {"fp8_ms": time_ms(lambda: fp8(x, q, scale, bias), a.iters),
                   "beside_ms": time_ms(lambda: side(x, q, scale, bias, down, up), a.iters)}
            for key, multiple in (("inside_pad16_ms", 16), ("inside_k128_ms", 128)):
                f8.INNER_MULTIPLE = multiple
                row[key] = time_ms(lambda: low_rank(x, q, scale, bias, down, up), a.iters)
            f8.INNER_MULTIPLE = 128
            row["x_at_down_ms"] = time_ms(lambda: h_only(x, down), a.iters)
            row["quantize_ms"] = time_ms(lambda: quant_only(x), a.iters)
            R["rows"][f"{inn}->{out} r{rank}"] = row
            print(f"{inn:>5}->{out:<6} {rank:>5} " + " ".join(f"{v:7.3f}" for v in row.values()), flush=True)
    write_json(a.out, R)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
