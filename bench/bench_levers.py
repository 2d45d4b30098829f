"""The speed levers of issue 5, each measured on its own against the same eager baseline, in one run:
attention kernel, torch.compile of the blocks (element-wise fusion, with a GPU-time breakdown before and after),
streaming blocks through pinned memory (8 GB card; `--pinned` adds rows with the streamed blocks held in
page-locked RAM), torch.compile modes (`--compile-modes`), fp8 matmul (`torch._scaled_mm`) against fp8 storage
with a per-call dequantize, and mean GPU utilisation (NVML) for each.

    python -m bench.bench_levers --out levers.json [--timed-steps 3] [--vram-gb 8] [--pinned]
        [--compile-modes max-autotune-no-cudagraphs] [--fp8-attention cudnn_fp8] [--graph]
        [--inductor coordinate_descent_tuning=True] [--tiny]

Full-size F1 transformer (12.9 B params, random weights, bf16) at 640x608 with a mid-video history, as
bench_engine.py. The 8 GB card rows place that same transformer as the app's plan places it on such a card (resident
blocks, fp8 where quantized, page-locked sources where `--pinned`), through the app's ModelManager. `--tiny` runs the same code on a tiny config on any machine (a smoke test, not a figure).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_levers.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.common import (GiB, Utilisation, bench_plan, header, live_cuda_tensors, model_dtype, now,
                          one_step_setup, placed_as_planned, quantize_in_place, rel, sampling_s_per_frame)
from framepack_ui.compute import attention, compile as kernels, fp8_linear
from framepack_ui.engine import denoiser as denoiser_ops
from framepack_ui.engine.lending import TRANSFORMER
from framepack_ui.memory import allocator, fp8
from framepack_ui.memory.plan import PlanOverrides


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
    return {"s_per_step": step, "sampling_s_per_frame": sampling_s_per_frame(step), "warmup_s": warmup,
            "gpu_util_pct": util.mean}


def gpu_time_breakdown(denoiser, noise, top_kernels: int = 30) -> dict:
    """Share of one forward's GPU kernel time in attention, matmuls and everything else (element-wise), and the
    `top_kernels` largest kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        denoiser(noise, torch.tensor(0.5))
        torch.cuda.synchronize()
    buckets = {"attention": 0.0, "matmul": 0.0, "other": 0.0}
    kernels = []
    for e in prof.key_averages():
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = e.key.lower()
        us = getattr(e, "self_device_time_total", 0) or 0
        if any(k in name for k in ("flash", "fmha", "sdpa", "attention", "attn")):
            bucket = "attention"
        elif any(k in name for k in ("gemm", "nvjet", "cutlass", "xmma", "scaled_mm", "matmul", "splitk")):
            bucket = "matmul"
        else:
            bucket = "other"
        buckets[bucket] += us
        kernels.append((us, e.count, bucket, e.key))
    total = sum(buckets.values()) or 1.0
    # where the element-wise time goes (what a fusion would have to remove): the largest kernels by GPU time
    top = [f"{us / 1e3:7.2f} ms {count:4d}x {bucket[:5]:5} {key[:110]}" for us, count, bucket, key
           in sorted(kernels, reverse=True)[:top_kernels]]
    return {"gpu_ms": total / 1e3, **{f"{k}_share": v / total for k, v in buckets.items()},
            **{f"{k}_ms": v / 1e3 for k, v in buckets.items()}, "top_kernels": top, **_gpu_idle_or_why(prof)}


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


class GraphedStep:
    """One whole denoiser step (the transformer's forward and the x0 around it) captured as a CUDA graph and replayed:
    what graphs could save on the all-on-GPU plan, where nothing moves between the GPU and the host inside a step.
    Per-block graphs (torch.compile's reduce-overhead) failed: the single blocks share one graph whose replays
    overwrite the output the next block reads (docs/benchmarks.md, "No CUDA graphs"). The inputs are copied into
    the captured ones; the output is the captured tensor, overwritten by the next replay."""

    def __init__(self, denoiser, noise: torch.Tensor):
        self.x = noise.to("cuda").clone()
        self.sigma = torch.tensor(0.5, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as capture needs: compiles, allocator pools
            for _ in range(2):
                denoiser(self.x, self.sigma)
        torch.cuda.current_stream().wait_stream(side)
        self.denoiser = denoiser  # it holds the conditioning on the GPU that the graph reads
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = denoiser(self.x, self.sigma)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        self.x.copy_(x, non_blocking=True)
        self.sigma.fill_(float(sigma))
        self.graph.replay()
        return self.out


def graphed_row(make, noise, sigma, reference, compiled_out, a, util) -> dict:
    step = GraphedStep(make(), noise)
    out = step(noise, sigma).cpu()  # where the reference is (the noise's device)
    return {**timed(step, noise, a.timed_steps, util), "x0_rel_diff": rel(out, reference),
            "max_abs_diff_vs_compiled": (out - compiled_out.cpu()).abs().max().item(),
            **gpu_time_breakdown(step, noise)}


def split_output_forward(block, hidden_states, encoder_hidden_states, temb, attention_mask=None,
                         image_rotary_emb=None, *args, **kwargs):
    """diffusers' HunyuanVideoSingleTransformerBlock.forward without concatenating the attention and MLP outputs
    before `proj_out` (the compiled step's largest element-wise kernel, 18 ms: docs/benchmarks.md, "Where the
    compiled step's time goes"): `proj_out` as two matmuls over its weight's two column blocks, the second adding
    onto the first, and the MLP's tanh GELU in its matmul's epilogue (cuBLASLt, through `_addmm_activation`, which
    inductor leaves to cuBLAS). `block.split_weights`: the two column blocks, contiguous."""
    text = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
    b, n, d = norm_hidden_states.shape
    mlp = torch._addmm_activation(block.proj_mlp.bias, norm_hidden_states.reshape(b * n, d),
                                  block.proj_mlp.weight.t(), use_gelu=True)
    attn_output, context_attn_output = block.attn(hidden_states=norm_hidden_states[:, :-text],
                                                  encoder_hidden_states=norm_hidden_states[:, -text:],
                                                  attention_mask=attention_mask, image_rotary_emb=image_rotary_emb)
    attn_output = torch.cat([attn_output, context_attn_output], dim=1).reshape(b * n, d)
    attention_weight, mlp_weight = block.split_weights
    out = torch.addmm(block.proj_out.bias, attn_output, attention_weight.t())
    out = torch.addmm(out, mlp, mlp_weight.t())
    hidden_states = gate.unsqueeze(1) * out.view(b, n, d) + residual
    return hidden_states[:, :-text], hidden_states[:, -text:]


def split_output_row(model, make, noise, sigma, reference, compiled_out, a, util) -> dict:
    """The compiled blocks with the single blocks' forward as `split_output_forward` (a hook inside the compiled
    one), then put back as they were."""
    from diffusers.hooks import ModelHook

    class SplitOutput(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            return split_output_forward(module, *args, **kwargs)

    blocks = list(model.single_transformer_blocks)
    mode = kernels._hook(blocks[0], kernels.BLOCK_HOOK).mode
    state = kernels._CompilerState()

    def recompile(split: bool) -> None:
        for block in blocks:
            kernels._remove(block, kernels.BLOCK_HOOK)
            kernels._remove(block, "bench_split_output")
            if split:
                d = block.proj_mlp.in_features
                block.split_weights = (block.proj_out.weight[:, :d].contiguous(),
                                       block.proj_out.weight[:, d:].contiguous())
                kernels._register(block, SplitOutput(), "bench_split_output")
            else:
                block.split_weights = None
            kernels._register(block, kernels.CompiledBlockForward(mode, state), kernels.BLOCK_HOOK)

    recompile(True)
    try:
        out = make()(noise, sigma)
        return {**timed(make(), noise, a.timed_steps, util),
                **(gpu_time_breakdown(make(), noise) if torch.cuda.is_available() else {}),
                "x0_rel_diff": rel(out, reference), "x0_rel_diff_vs_compiled": rel(out, compiled_out)}
    finally:
        recompile(False)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def inductor_row(option: str, make, noise, sigma, reference, a, util) -> dict:
    """The compiled blocks compiled again with one inductor option set (`name=value`, value a Python literal)."""
    import ast

    import torch._inductor.config as inductor_config

    name, _, value = option.partition("=")
    torch._dynamo.reset()  # the blocks trace again, under the option
    try:
        with inductor_config.patch({name: ast.literal_eval(value)}):
            return {**timed(make(), noise, a.timed_steps, util),
                    **(gpu_time_breakdown(make(), noise) if torch.cuda.is_available() else {}),
                    "x0_rel_diff": rel(make()(noise, sigma), reference)}
    finally:
        torch._dynamo.reset()  # the rows after it compile again without the option


def streamed(transformer, make, noise, a, util, device, speed: dict, pin: bool = False) -> dict:
    """The card of `--vram-gb` GiB as the app's plan places this transformer on it (resident blocks, streamed
    ones; fp8 where it is quantized), applied by the app's manager to the same weights; a filler allocation leaves
    the process that budget. The streamed blocks' sources sit in pageable RAM, or with `pin` in page-locked RAM
    (uploaded from there). `speed`: the row's compile, attention and fp8 matmul, for the plan to apply as set."""
    fp8_stored = any(fp8_linear.is_fp8_linear(m) for m in transformer.modules())
    before_GiB = torch.cuda.memory_allocated() / GiB if torch.cuda.is_available() else 0.0
    plan = bench_plan(PlanOverrides(plan="streamed", fp8=fp8_stored, pin_streamed=pin, **speed), vram_gb=a.vram_gb,
                      tiny=a.tiny)
    with placed_as_planned(transformer, plan, tiny=a.tiny, device=device, vram_gb=a.vram_gb) as manager:
        streamer = manager.streamer(TRANSFORMER)
        before = streamer.bytes_streamed
        r = timed(make(), noise, a.timed_steps, util)
        r["GB_streamed_per_step"] = (streamer.bytes_streamed - before) / (a.timed_steps + 1) / 1e9
        r["upload_GBps_needed_to_hide"] = r["GB_streamed_per_step"] / r["s_per_step"]
        r["resident_blocks"], r["streamed_blocks"] = len(streamer.resident), len(streamer.streamed)
        r["pinned_sources"], r["streamer_setup_s"] = streamer.pinned_sources, manager.load_s(TRANSFORMER)
        r["allocated_GiB_before_streaming"] = before_GiB
        r["allocated_GiB_streaming_setup"] = manager.filler_info.get("allocated_GiB")
        if torch.cuda.is_available():
            r["live_cuda_tensors_GiB_by_shape"] = live_cuda_tensors()
            r["peak_vram_GiB_excluding_filler"] = manager.peak_vram_excluding_filler_gib()
    return r


def report(R: dict, out: str) -> None:
    rows = R["rows"]
    print(f"\n{'lever':58} {'s/step':>7} {'s/frame':>8} {'GPU %':>6}  notes")
    for name, r in rows.items():
        if "error" in r:
            print(f"{name:58} {'-':>7} {'-':>8} {'-':>6}  {r['error'][:80]}")
            continue
        notes = ", ".join(f"{k} {v:.3g}" for k, v in r.items() if k not in ("s_per_step", "sampling_s_per_frame",
                                                                                "gpu_util_pct")
                          and isinstance(v, (int, float)) and not k.endswith("_share"))
        pct = f"{r['gpu_util_pct']:.0f}" if r.get("gpu_util_pct") is not None else "-"
        print(f"{name:58} {r['s_per_step']:7.3f} {r['sampling_s_per_frame']:8.3f} {pct:>6}  {notes}")
    for name, r in rows.items():
        if r.get("top_kernels"):
            print(f"\n{name}: largest kernels of one step (GPU time, calls, bucket, name)")
            print("\n".join(r["top_kernels"]))
    Path(out).write_text(json.dumps(R, indent=1))


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
    p.add_argument("--graph", action="store_true",
                   help="also the compiled all-on-GPU step captured whole as one CUDA graph")
    p.add_argument("--split-output", action="store_true",
                   help="also the compiled blocks with the single blocks' output projection split (no concatenation)")
    p.add_argument("--inductor", default="", help="comma-separated inductor options (name=value) to time one at a "
                                                   "time on the compiled blocks, e.g. coordinate_descent_tuning=True")
    p.add_argument("--out", default="levers.json")
    a = p.parse_args()
    allocator.configure()  # as the app does, before CUDA starts
    # each lever row changes what the compiled blocks trace (attention backend, fp8): past dynamo's default 8
    # versions a block silently runs eagerly, which once made a row 30 % slower than it is
    torch._dynamo.config.cache_size_limit = 64

    R: dict = header(a.tiny, rows={})
    rows = R["rows"]
    device, model, embeds, noise, cond = one_step_setup(a.tiny)
    cuda, dtype = device.type == "cuda", model_dtype(device)
    util = Utilisation()

    def make():
        return denoiser_ops.Denoiser(model, embeds, None, 1.0, 0.0, 25, None, conditioning=cond)

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

    def with_attention(backend):
        attention.set_attention(model, backend)
        return {**timed(make(), noise, a.timed_steps, util), "x0_rel_diff": rel(make()(noise, sigma), reference)}

    best, best_step = "native", rows["eager, default attention"]["s_per_step"]
    for backend in ([b for b in a.attention.split(",") if b] if cuda else []):
        r = row(f"eager, attention {backend}", lambda: with_attention(backend))
        if "s_per_step" in r and r["s_per_step"] < best_step:
            best, best_step = backend, r["s_per_step"]
    attention.set_attention(model, best)
    R["best_attention"] = best

    def streamed_rows(name: str, **speed) -> None:
        """The 8 GB card's rows: the row's own speed options (the model as it is set now), placed by the plan."""
        if a.no_streamed:
            return
        speed = {"compile": False, "attention": best, "fp8_matmul": None, **speed}
        row(f"{name}, {a.vram_gb:g} GB card", lambda: streamed(model, make, noise, a, util, device, speed))
        if a.pinned:
            row(f"{name}, {a.vram_gb:g} GB card, page-locked sources",
                lambda: streamed(model, make, noise, a, util, device, speed, pin=True))

    streamed_rows("eager")
    kernels.compile_blocks(model)
    row(f"compiled blocks, attention {best}", lambda: {**timed(make(), noise, a.timed_steps, util),
                                                       **(gpu_time_breakdown(make(), noise) if cuda else {}),
                                                       "x0_rel_diff": rel(make()(noise, sigma), reference)})
    compiled_out = make()(noise, sigma)
    if a.graph and cuda:
        row("compiled blocks, whole step as one CUDA graph", lambda: graphed_row(make, noise, sigma, reference,
                                                                                 compiled_out, a, util))
    if a.split_output:
        row("compiled blocks, single blocks' output projection split, GELU in its matmul",
            lambda: split_output_row(model, make, noise, sigma, reference, compiled_out, a, util))
        row(f"compiled blocks, attention {best}, again", lambda: {**timed(make(), noise, a.timed_steps, util),
                                                                   "x0_rel_diff": rel(make()(noise, sigma), reference)})
    for option in [o for o in a.inductor.split(",") if o]:
        row(f"compiled blocks, inductor {option}", lambda: inductor_row(option, make, noise, sigma, reference, a, util))
    streamed_rows("compiled", compile=True)
    for mode in [m for m in a.compile_modes.split(",") if m]:
        kernels.compile_blocks(model, mode)
        row(f"compiled blocks, mode {mode}", lambda: {**timed(make(), noise, a.timed_steps, util),
                                                      "x0_rel_diff": rel(make()(noise, sigma), reference)})
        kernels.compile_blocks(model)  # the rows below keep the default mode (the app's)

    if a.no_fp8:
        report(R, a.out)
        return
    R["quantized_linears"] = quantize_in_place(model)
    fp8.apply_fp8_compute(model, dtype)
    if cuda:
        torch.cuda.empty_cache()
        R["fp8_weights_GiB"] = torch.cuda.memory_allocated() / GiB

    def fp8_row(matmul: bool):
        fp8_linear.set_fp8_matmul(model, matmul)
        out = make()(noise, sigma)
        # x0 = x - sigma * v: the model's own part is x - x0
        return {**timed(make(), noise, a.timed_steps, util), "velocity_rel_error": rel(noise - out, noise - reference),
                "x0_rel_error": rel(out, reference), **(gpu_time_breakdown(make(), noise) if cuda else {})}

    row("compiled, fp8 storage (dequantize per call)", lambda: fp8_row(False))
    row("compiled, fp8 matmul", lambda: fp8_row(True))
    fp8_backends = [b for b in a.fp8_attention.split(",") if b and b != best]
    for backend in fp8_backends:
        attention.set_attention(model, backend)
        row(f"compiled, fp8 matmul, attention {backend}", lambda: fp8_row(True))
    if a.graph and cuda:
        fp8_linear.set_fp8_matmul(model, True)
        for backend in [best, *fp8_backends]:
            attention.set_attention(model, backend)
            row(f"compiled, fp8 matmul, attention {backend}, whole step as one CUDA graph",
                lambda: graphed_row(make, noise, sigma, reference, make()(noise, sigma), a, util))
    attention.set_attention(model, best)
    fp8_linear.set_fp8_matmul(model, True)
    streamed_rows("compiled, fp8 matmul", compile=True, fp8_matmul=True)

    report(R, a.out)

if __name__ == "__main__":
    main()
