"""The attention kernels on their own, at the shape of one F1 attention call at 640x608 (18293 tokens: 9 new latent
frames, the clean-latent context, SigLIP and text; 24 heads of 128): time per call, the rate it reaches, and its
output's error against an fp32 reference.

    python -m bench.bench_attention --out attention.json [--tokens 18293] [--calls 20] [--tiny]

Kernels: torch's SDPA backends (cuDNN, flash, memory-efficient) and, where their packages are installed, the
app's 8-bit adapters (memory/attention.py): SageAttention 1 and cuDNN's fp8 attention. The adapters' times include
their quantizing of Q, K and V (eager here; compiled blocks fuse it with the work before). The keys carry a
per-channel offset as real keys do, which is what the adapters' key smoothing is for; random inputs still say
nothing of a real model's attention maps, so the model-level error is measured by bench_levers.py.
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_attention.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import json

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.common import header, now, write_json
from framepack_ui.compute import attention, backends

TOKENS, HEADS, HEAD_DIM = 18293, 24, 128  # tokens: measured on the real transformer's attention call
TINY_TOKENS, TINY_HEADS = 256, 2


def sdpa(backend):
    def attend(q, k, v):  # q, k, v: [batch, tokens, heads, dim], as diffusers' processors hand them over
        with sdpa_kernel(backend):
            out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                   v.transpose(1, 2))
        return out.transpose(1, 2)
    return attend


def reference(q, k, v) -> torch.Tensor:
    """fp32 attention, one head at a time (a full fp32 score matrix would not fit)."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    backend = SDPBackend.EFFICIENT_ATTENTION if q.is_cuda else SDPBackend.MATH
    for h in range(q.shape[2]):
        qh, kh, vh = (t[:, :, h].float().unsqueeze(1) for t in (q, k, v))
        with sdpa_kernel(backend):
            out[:, :, h] = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).squeeze(1)
    return out


def time_calls(attend, q, k, v, calls: int) -> float:
    attend(q, k, v)  # warm-up: kernel selection, Triton compile
    if not q.is_cuda:
        t = now()
        for _ in range(calls):
            attend(q, k, v)
        return (now() - t) / calls
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        attend(q, k, v)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / calls


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="a few tokens and heads on the CPU: a smoke test")
    p.add_argument("--tokens", type=int, default=None, help=f"default {TOKENS} ({TINY_TOKENS} with --tiny)")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--out", default="attention.json")
    a = p.parse_args()
    device = torch.device("cpu" if a.tiny or not torch.cuda.is_available() else "cuda")
    tokens = a.tokens or (TINY_TOKENS if a.tiny else TOKENS)
    heads = TINY_HEADS if a.tiny else HEADS
    g = torch.Generator(device).manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.bfloat16)

    shape = (1, tokens, heads, HEAD_DIM)
    q, v = rnd(*shape), rnd(*shape)
    k = rnd(*shape) + 4 * rnd(1, 1, heads, HEAD_DIM)  # a shared per-channel offset, as real keys have
    exact = reference(q, k, v)
    flops = 4 * tokens * tokens * HEAD_DIM * heads
    R = header(a.tiny, tokens=tokens, heads=heads, head_dim=HEAD_DIM, rows={})
    if device.type != "cuda":
        R["card"] = "cpu"
    candidates = {"cuDNN (SDPA)": sdpa(SDPBackend.CUDNN_ATTENTION), "flash (SDPA)": sdpa(SDPBackend.FLASH_ATTENTION),
                  "memory-efficient (SDPA)": sdpa(SDPBackend.EFFICIENT_ATTENTION)}
    if device.type != "cuda":  # what the CPU has: the smoke test's rows
        candidates = {"math (SDPA)": sdpa(SDPBackend.MATH), "flash (SDPA)": sdpa(SDPBackend.FLASH_ATTENTION)}
    elif backends.package_available(attention.SAGE):
        candidates["SageAttention 1 (app adapter)"] = attention.sage_attention
    if device.type == "cuda" and backends.package_available(attention.CUDNN_FP8):
        candidates["cuDNN fp8 (app adapter)"] = attention.cudnn_fp8_attention
        operands = attention.cudnn_fp8_operands(q, k, v, None)

        def kernel_only(*_):  # the same call on inputs quantized beforehand: what quantizing costs
            scale_o = operands[6]
            return attention._cudnn_fp8_kernel(*operands).float() / scale_o

        candidates["cuDNN fp8, kernel only"] = kernel_only
    for name, attend in candidates.items():
        try:
            s = time_calls(attend, q, k, v, a.calls)
            out = attend(q, k, v).float()
            row = {"ms_per_call": s * 1e3, "TFLOPs": flops / s / 1e12,
                   "rel_error_vs_fp32": ((out - exact).norm() / exact.norm()).item(),
                   "ms_per_step_60_blocks": s * 1e3 * 60}
        except Exception as exc:  # one kernel failing must not lose the others' rows
            row = {"error": f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"}
        R["rows"][name] = row
        print(f"{name}: {json.dumps(row)}", flush=True)
    print(f"\n{'kernel':32} {'ms/call':>8} {'TFLOP/s':>8} {'ms/step':>8} {'error':>8}")
    for name, r in R["rows"].items():
        if "error" in r:
            print(f"{name:32} {r['error'][:60]}")
        else:
            print(f"{name:32} {r['ms_per_call']:8.2f} {r['TFLOPs']:8.0f} {r['ms_per_step_60_blocks']:8.0f} "
                  f"{r['rel_error_vs_fp32']:8.2%}")
    write_json(a.out, R)


if __name__ == "__main__":
    main()
