"""The speed levers of issue 5, each measured on its own against the same eager baseline, in one run:
attention kernel, torch.compile of the blocks (element-wise fusion, with a GPU-time breakdown before and after),
streaming blocks through pinned memory (8 GB card; `--pinned` adds rows with the streamed blocks held in
page-locked RAM), torch.compile modes (`--compile-modes`), fp8 matmul (`torch._scaled_mm`) against fp8 storage
with a per-call dequantize, and mean GPU utilisation (NVML) for each.

    python bench/bench_levers.py --out levers.json [--timed-steps 3] [--vram-gb 8] [--pinned]
        [--compile-modes max-autotune-no-cudagraphs] [--fp8-attention cudnn_fp8] [--tiny]

Full-size F1 transformer (12.9 B params, random weights, bf16) at 640x608 with a mid-video history, as
bench_engine.py. `--tiny` runs the same code on a tiny config on any machine (a smoke test, not a figure).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_engine import (REAL_TRANSFORMER, TINY_TRANSFORMER, FRAMES_PER_SECTION, build, inputs, now,  # noqa: E402
                          resident_blocks_for)
from bench_fp8 import quantize_in_place  # noqa: E402
from framepack_ui.engine import denoiser  # noqa: E402
from framepack_ui.compute import attention, compile as kernels, fp8_linear  # noqa: E402
from framepack_ui.memory import allocator, fp8  # noqa: E402
from framepack_ui.memory.streaming import stream_transformer, transformer_blocks  # noqa: E402


class Utilisation:
    """Mean GPU utilisation (NVML, sampled every 20 ms) while the `with` block runs; None without NVML."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:
            self._nvml = None
        self.mean = None

    @contextlib.contextmanager
    def measure(self):
        if self._nvml is None:
            yield self
            return
        samples, stop = [], threading.Event()

        def sample():
            while not stop.wait(0.02):
                samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.mean = statistics.mean(samples) if samples else None


def timed(denoiser, noise, n: int, util: Utilisation) -> dict:
    """One warm-up call (kernels, caches, compile: its time is reported), then `n` timed steps."""
    t = now()
    denoiser(noise, torch.tensor(0.95))
    warmup = now() - t
    times = []
    with util.measure():
        for sigma in torch.linspace(0.9, 0.1, n):
            t = now()
            denoiser(noise, sigma)
            times.append(now() - t)
    step = statistics.median(times)
    return {"s_per_step": step, "sampling_s_per_frame": step * 25 / FRAMES_PER_SECTION, "warmup_s": warmup,
            "gpu_util_pct": util.mean}


def gpu_time_breakdown(denoiser, noise) -> dict:
    """Share of one forward's GPU kernel time in attention, matmuls and everything else (element-wise)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        denoiser(noise, torch.tensor(0.5))
        torch.cuda.synchronize()
    buckets = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.key.lower()
        us = getattr(e, "self_device_time_total", 0) or 0
        if any(k in name for k in ("flash", "fmha", "sdpa", "attention", "attn")):
            buckets["attention"] += us
        elif any(k in name for k in ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm", "matmul", "splitk")):
            buckets["matmul"] += us
        else:
            buckets["other"] += us
    total = sum(buckets.values()) or 1.0
    return {"gpu_ms": total / 1e3, **{f"{k}_share": v / total for k, v in buckets.items()}, **_gpu_idle_or_why(prof)}


def _gpu_idle_or_why(prof) -> dict:
    try:
        return gpu_idle(prof)
    except Exception as exc:  # a profiler API change must not lose the row
        return {"gpu_idle_error": f"{exc.__class__.__name__}: {exc}"[:200]}


def gpu_idle(prof, top: int = 6) -> dict:
    """Where the GPU waits inside one forward: the span from the first kernel's start to the last one's end, the
    time no kernel ran, and the largest gaps with the kernels on each side (what the CPU was doing then)."""
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == torch.autograd.DeviceType.CUDA), key=lambda k: k[0])
    if not kernels:
        return {}
    gaps, end, before = [], kernels[0][1], kernels[0][2]
    for start, stop, name in kernels[1:]:
        if start > end:
            gaps.append((start - end, before[:40], name[:40]))
        if stop > end:
            end, before = stop, name
    idle = sum(g for g, _, _ in gaps)
    span = end - kernels[0][0]
    return {"gpu_span_ms": span / 1e3, "gpu_idle_ms": idle / 1e3,
            "gaps_over_50us_ms": sum(g for g, _, _ in gaps if g > 50) / 1e3,
            "largest_gaps": [f"{g / 1e3:.2f} ms after {a} before {b}" for g, a, b in sorted(gaps)[::-1][:top]]}


def live_cuda_tensors(top: int = 8) -> dict:
    """GiB of live CUDA tensors reachable by the garbage collector, by shape and dtype (the largest groups)."""
    groups: dict[str, float] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                key = f"{tuple(obj.shape)} {obj.dtype}"
                groups[key] = groups.get(key, 0.0) + obj.numel() * obj.element_size() / 2**30
        except Exception:
            continue
    return dict(sorted(groups.items(), key=lambda kv: -kv[1])[:top])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def streamed(transformer, make, noise, a, util, device, pin: bool = False) -> dict:
    """8 GB card: as many blocks resident as fit, the rest streamed through pinned buffers; a filler
    allocation leaves `--vram-gb` to the process. The streamed blocks' sources sit in pageable RAM, or with
    `pin` in page-locked RAM (uploaded from there)."""
    blocks = transformer_blocks(transformer)
    resident = resident_blocks_for(transformer, a.vram_gb, 2.5)
    before_GiB = torch.cuda.memory_allocated() / 2**30
    t = now()
    streamer = stream_transformer(transformer, device, resident, pin_sources=pin)
    setup_s = now() - t
    filler = None
    try:
        gc.collect()
        torch.cuda.empty_cache()
        in_use = torch.cuda.memory_allocated()
        free, _ = torch.cuda.mem_get_info()
        # leave the process `--vram-gb` in all; if what it holds already exceeds that, still leave room for the
        # activations and report the excess instead of failing
        leave = max(a.vram_gb * 2**30 - in_use, 2.5 * 2**30)
        filler = torch.empty(max(0, int(free - leave)), dtype=torch.uint8, device=device)
        torch.cuda.reset_peak_memory_stats()
        before = streamer.bytes_streamed
        r = timed(make(), noise, a.timed_steps, util)
        r["GB_streamed_per_step"] = (streamer.bytes_streamed - before) / (a.timed_steps + 1) / 1e9
        r["upload_GBps_needed_to_hide"] = r["GB_streamed_per_step"] / r["s_per_step"]
        r["resident_blocks"], r["streamed_blocks"] = resident, len(blocks) - resident
        r["pinned_sources"], r["streamer_setup_s"] = streamer.pinned_sources, setup_s
        r["allocated_GiB_before_streaming"] = before_GiB
        r["allocated_GiB_streaming_setup"] = in_use / 2**30
        r["live_cuda_tensors_GiB_by_shape"] = live_cuda_tensors()
        r["peak_vram_GiB_excluding_filler"] = (torch.cuda.max_memory_allocated() - filler.numel()) / 2**30
    finally:
        del filler
        streamer.close()
        for block in blocks:
            block.to(device)
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--vram-gb", type=float, default=8.0)
    p.add_argument("--attention", default="_native_flash,_native_cudnn,_native_efficient",
                   help="comma-separated diffusers attention backends to compare ('' skips the comparison)")
    p.add_argument("--no-fp8", action="store_true")
    p.add_argument("--fp8-attention", default="", help="comma-separated attention backends to time again with fp8 "
                                                       "matmul, after the best one's row (e.g. sage1)")
    p.add_argument("--no-streamed", action="store_true", help="skip the 8 GB card rows")
    p.add_argument("--pinned", action="store_true", help="also stream from page-locked RAM (each streamed row)")
    p.add_argument("--compile-modes", default="", help="comma-separated torch.compile modes to time after the "
                                                        "default one, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--out", default="levers.json")
    a = p.parse_args()
    allocator.configure()  # as the app does, before CUDA starts
    # each lever row changes what the compiled blocks trace (attention backend, fp8): past dynamo's default 8
    # versions a block silently runs eagerly, which once made a row 30 % slower than it is
    torch._dynamo.config.cache_size_limit = 64
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = TINY_TRANSFORMER if a.tiny else REAL_TRANSFORMER
    lh, lw = (8, 8) if a.tiny else (80, 76)
    R: dict = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "command": " ".join(sys.argv),
               "card": torch.cuda.get_device_name() if cuda else "cpu", "tiny": a.tiny, "rows": {}}
    rows = R["rows"]
    model = build(HunyuanVideoFramepackTransformer3DModel, cfg, device, dtype)
    g = torch.Generator("cpu").manual_seed(0)
    embeds, start_latent, history = inputs(cfg, lh, lw, device, dtype, g)
    noise = torch.randn(1, 16, 9, lh, lw, generator=g)
    cond = history.conditioning(start_latent)
    util = Utilisation()

    def make():
        return denoiser.Denoiser(model, embeds, None, 1.0, 0.0, 25, None, conditioning=cond)

    def row(name: str, fn) -> dict | None:
        try:
            rows[name] = fn()
        except Exception as exc:  # one failing lever must not lose the others' figures
            rows[name] = {"error": f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"}
        print(f"{name}: {json.dumps(rows[name])}", flush=True)
        Path(a.out).write_text(json.dumps(R, indent=1))
        return rows[name]

    sigma = torch.tensor(0.7)
    reference = make()(noise, sigma)
    row("eager, default attention", lambda: {**timed(make(), noise, a.timed_steps, util),
                                             **(gpu_time_breakdown(make(), noise) if cuda else {})})

    def attention(backend):
        attention.set_attention(model, backend)
        return {**timed(make(), noise, a.timed_steps, util), "x0_rel_diff": rel(make()(noise, sigma), reference)}

    best, best_step = "native", rows["eager, default attention"]["s_per_step"]
    for backend in ([b for b in a.attention.split(",") if b] if cuda else []):
        r = row(f"eager, attention {backend}", lambda: attention(backend))
        if "s_per_step" in r and r["s_per_step"] < best_step:
            best, best_step = backend, r["s_per_step"]
    attention.set_attention(model, best)
    R["best_attention"] = best

    def streamed_rows(name: str) -> None:
        if not cuda or a.no_streamed:
            return
        row(f"{name}, {a.vram_gb:g} GB card", lambda: streamed(model, make, noise, a, util, device))
        if a.pinned:
            row(f"{name}, {a.vram_gb:g} GB card, page-locked sources",
                lambda: streamed(model, make, noise, a, util, device, pin=True))

    streamed_rows("eager")
    kernels.compile_blocks(model)
    row(f"compiled blocks, attention {best}", lambda: {**timed(make(), noise, a.timed_steps, util),
                                                       **(gpu_time_breakdown(make(), noise) if cuda else {}),
                                                       "x0_rel_diff": rel(make()(noise, sigma), reference)})
    streamed_rows("compiled")
    for mode in [m for m in a.compile_modes.split(",") if m]:
        kernels.compile_blocks(model, mode)
        row(f"compiled blocks, mode {mode}", lambda: {**timed(make(), noise, a.timed_steps, util),
                                                      "x0_rel_diff": rel(make()(noise, sigma), reference)})
        kernels.compile_blocks(model)  # the rows below keep the default mode (the app's)

    if a.no_fp8:
        Path(a.out).write_text(json.dumps(R, indent=1))
        return
    R["quantized_linears"] = quantize_in_place(model)
    fp8.apply_fp8_compute(model, dtype)
    if cuda:
        torch.cuda.empty_cache()
        R["fp8_weights_GiB"] = torch.cuda.memory_allocated() / 2**30

    def fp8_row(matmul: bool):
        fp8_linear.set_fp8_matmul(model, matmul)
        out = make()(noise, sigma)
        # x0 = x - sigma * v: the model's own part is x - x0
        return {**timed(make(), noise, a.timed_steps, util), "velocity_rel_error": rel(noise - out, noise - reference),
                "x0_rel_error": rel(out, reference)}

    row("compiled, fp8 storage (dequantize per call)", lambda: fp8_row(False))
    row("compiled, fp8 matmul", lambda: fp8_row(True))
    for backend in [b for b in a.fp8_attention.split(",") if b and b != best]:
        attention.set_attention(model, backend)
        row(f"compiled, fp8 matmul, attention {backend}", lambda: fp8_row(True))
    attention.set_attention(model, best)
    streamed_rows("compiled, fp8 matmul")

    print(f"\n{'lever':58} {'s/step':>7} {'s/frame':>8} {'GPU %':>6}  notes")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:58} {'-':>7} {'-':>8} {'-':>6}  {r['error'][:80]}")
            continue
        notes = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k not in ("s_per_step", "sampling_s_per_frame",
                                                                                "gpu_util_pct")
                          and isinstance(v, (int, float)))
        pct = f"{r['gpu_util_pct']:.0f}" if r.get("gpu_util_pct") is not None else "-"
        print(f"{name:58} {r['s_per_step']:7.3f} {r['sampling_s_per_frame']:8.3f} {pct:>6}  {notes}")
    Path(a.out).write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
