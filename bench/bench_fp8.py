"""fp8 (e4m3, per-row scales) storage of the full-size F1 transformer on the GPU: output error against bf16 on
the same inputs, and the step time with the per-call dequantize of framepack_ui.memory.fp8.

    python -m bench.bench_fp8 --out fp8.json [--timed-steps 3] [--tiny]

A lever on its own (one model, both storages, no plan): the app's fp8 profiles run through bench_run.py
(`--fp8`, `--fp8-matmul`) and bench_levers.py. Random weights have no outlier channels, so the error here
understates the real model's. `--tiny`: a tiny config on any machine (a smoke test, not a figure).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_fp8.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import statistics

import torch

from bench.common import (GiB, header, model_dtype, one_step_setup, quantize_in_place, rel, time_steps,
                          write_result)
from framepack_ui.engine import denoiser as denoiser_ops
from framepack_ui.memory import fp8


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--out", default="fp8.json")
    a = p.parse_args()

    device, model, embeds, noise, cond = one_step_setup(a.tiny)
    cuda, dtype = device.type == "cuda", model_dtype(device)

    def make():
        return denoiser_ops.Denoiser(model, embeds, None, 1.0, 0.0, 25, None, conditioning=cond)

    R = header(a.tiny)
    sigma = torch.tensor(0.7)
    reference = make()(noise, sigma)
    R["bf16_s_per_step"] = statistics.median(time_steps(make(), noise, a.timed_steps))
    if cuda:
        R["bf16_weights_GiB"] = torch.cuda.memory_allocated() / GiB
    R["quantized_linears"] = quantize_in_place(model)
    if cuda:
        torch.cuda.empty_cache()
        R["fp8_weights_GiB"] = torch.cuda.memory_allocated() / GiB
    fp8.apply_fp8_compute(model, dtype)
    out = make()(noise, sigma)
    # the denoiser returns x0 = x - sigma * v: compare the model's part, sigma * v
    R["x0_rel_error"] = rel(out, reference)
    R["velocity_rel_error"] = rel(noise - out, noise - reference)
    R["fp8_s_per_step"] = statistics.median(time_steps(make(), noise, a.timed_steps))
    write_result(a.out, R)


if __name__ == "__main__":
    main()
