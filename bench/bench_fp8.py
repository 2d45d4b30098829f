"""fp8 (e4m3, per-row scales) storage of the full-size F1 transformer on the GPU: output error against bf16 on
the same inputs, and the step time with the per-call dequantize of framepack_ui.memory.fp8.

    python bench/bench_fp8.py --out fp8.json

Random weights have no outlier channels, so the error here understates the real model's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import REAL_TRANSFORMER, build, inputs, time_steps  # noqa: E402
from framepack_ui.engine import denoiser  # noqa: E402
from framepack_ui.compute import fp8_linear  # noqa: E402
from framepack_ui.memory import fp8  # noqa: E402


def quantize_in_place(model) -> int:
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and fp8.quantizable(f"{name}.weight", tuple(module.weight.shape), "BF16"):
            q, scale = fp8_linear.quantize(module.weight.data)
            module.weight = torch.nn.Parameter(q, requires_grad=False)
            module.register_parameter(fp8_linear.SCALE_PARAM, torch.nn.Parameter(scale, requires_grad=False))
            count += 1
    return count


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--out", default="fp8.json")
    a = p.parse_args()
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    device = torch.device("cuda")
    model = build(HunyuanVideoFramepackTransformer3DModel, REAL_TRANSFORMER, device, torch.bfloat16)
    g = torch.Generator("cpu").manual_seed(0)
    embeds, start_latent, history = inputs(REAL_TRANSFORMER, 80, 76, device, torch.bfloat16, g)
    noise = torch.randn(1, 16, 9, 80, 76, generator=g)

    def denoiser():
        return denoiser.Denoiser(model, embeds, None, 1.0, 0.0, 25, None, conditioning=history.conditioning(start_latent))

    R = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    sigma = torch.tensor(0.7)
    reference = denoiser()(noise, sigma)
    R["bf16_s_per_step"] = statistics.median(time_steps(denoiser(), noise, a.timed_steps))
    R["bf16_weights_GiB"] = torch.cuda.memory_allocated() / 2**30
    R["quantized_linears"] = quantize_in_place(model)
    torch.cuda.empty_cache()
    R["fp8_weights_GiB"] = torch.cuda.memory_allocated() / 2**30
    fp8.apply_fp8_compute(model, torch.bfloat16)
    out = denoiser()(noise, sigma)
    # the denoiser returns x0 = x - sigma * v: compare the model's part, sigma * v
    ref_v, out_v = (noise - reference), (noise - out)
    R["x0_rel_error"] = ((out - reference).norm() / reference.norm()).item()
    R["velocity_rel_error"] = ((out_v - ref_v).norm() / ref_v.norm()).item()
    R["fp8_s_per_step"] = statistics.median(time_steps(denoiser(), noise, a.timed_steps))
    print(json.dumps(R, indent=1), flush=True)
    Path(a.out).write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
