"""Full-size speed benchmark of the engine's section pipeline (sampling, VAE decode, video encode).

Builds the F1 transformer at its real config directly on the GPU in bf16 with random weights (random weights
cost the same compute as real ones) and the HunyuanVideo VAE at its real config in fp16; the text and image
encoders are replaced by random embeddings of the real shapes. Runs the engine's own Denoiser, samplers,
TeaCache hooks, decode and SectionVideoWriter at 640x608. Prints a table and writes JSON.

    python -m bench.bench_engine --out bench-result.json [--timed-steps 4] [--full-section] [--compile]
        [--vram-gb 8 [--pinned]]

`--vram-gb` adds the streamed placement the app's plan makes for a card with that much VRAM, applied by the app's
ModelManager to the same transformer (bench/common.py `bench_manager`). On a machine without CUDA, `--tiny` runs
the same code on a tiny config (a smoke test of the script).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_engine.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import torch

from bench.common import (FRAMES_PER_SECTION, GiB, bench_plan, build_transformer, build_vae, header, inputs,
                          model_dtype, now, placed_as_planned, proc_status_mib, sampling_s_per_frame, time_steps,
                          transformer_config, write_result)
from framepack_ui.compute import compile as kernels
from framepack_ui.engine import denoiser as denoiser_ops, sampling, teacache as teacache_ops, vae as vae_ops
from framepack_ui.engine.lending import TRANSFORMER
from framepack_ui.engine.video import SectionVideoWriter
from framepack_ui.memory import allocator
from framepack_ui.memory.plan import PlanOverrides


def streamed_profile(transformer, make_denoiser, noise, a, device) -> dict:
    """The plan's placement of this transformer on a card with `--vram-gb` GiB free (as many blocks resident as it
    says, the rest streamed; page-locked where it pins, or as `--pinned` forces), applied by the app's manager; a
    filler allocation leaves the process that budget. The transformer is lent as built (bench_manager's `models`),
    so its output is compared with the resident one on the same weights."""
    res: dict = {"vram_gb": a.vram_gb}
    sigma = torch.tensor(0.7)
    reference = make_denoiser()(noise, sigma)
    plan = bench_plan(PlanOverrides(compile=a.compile, pin_streamed=a.pinned), vram_gb=a.vram_gb, tiny=a.tiny)
    with placed_as_planned(transformer, plan, tiny=a.tiny, device=device, vram_gb=a.vram_gb) as manager:
        streamer = manager.streamer(TRANSFORMER)
        d = make_denoiser()
        out = d(noise, sigma)
        res["max_abs_diff_vs_resident"] = (out - reference).abs().max().item()
        before = streamer.bytes_streamed if streamer else 0
        times = time_steps(d, noise, a.timed_steps)
        streamed = (streamer.bytes_streamed - before) if streamer else 0
        res["bytes_streamed_per_step_GB"] = streamed / (a.timed_steps + 1) / 1e9
        res["s_per_step_median"] = statistics.median(times)
        res["sampling_s_per_frame"] = sampling_s_per_frame(res["s_per_step_median"], a.steps)
        res["resident_blocks"] = manager.plan.components[TRANSFORMER].resident_blocks
        res["streamed_blocks"] = len(streamer.streamed) if streamer else 0
        res["pinned_sources"] = streamer.pinned_sources if streamer else False
        res["streamer_setup_s"] = manager.load_s(TRANSFORMER)
        res["peak_vram_GiB_excluding_filler"] = manager.peak_vram_excluding_filler_gib()
        res["filler"] = manager.filler_info
        res["laptop_link_12GBps_s_per_step"] = res["bytes_streamed_per_step_GB"] / 12
    print(f"streamed at {a.vram_gb} GB: {res['resident_blocks']} resident / {res['streamed_blocks']} streamed blocks, "
          f"step {res['s_per_step_median']:.3f} s, {res['bytes_streamed_per_step_GB']:.1f} GB/step, "
          f"diff vs resident {res['max_abs_diff_vs_resident']:.2e}", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--width", type=int, default=608)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--timed-steps", type=int, default=4)
    p.add_argument("--full-section", action="store_true", help="also time a whole 25-step section, TeaCache off and on")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--vram-gb", type=float, default=None,
                   help="also time the plan's streamed placement on a card with this many GiB (filler allocation)")
    p.add_argument("--pinned", action=argparse.BooleanOptionalAction, default=None,
                   help="with --vram-gb: streamed blocks in page-locked RAM (default: the plan's choice)")
    p.add_argument("--out", default="bench-result.json")
    a = p.parse_args()
    allocator.configure()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = model_dtype(device)
    cfg = transformer_config(a.tiny)
    h, w = (64, 64) if a.tiny else (a.height, a.width)
    lh, lw = h // 8, w // 8

    R = header(a.tiny, height=h, width=w, steps=a.steps, compile=a.compile)
    t = now()
    transformer = build_transformer(a.tiny, device, dtype)
    R["params_B"] = sum(q.numel() for q in transformer.parameters()) / 1e9
    R["build_s"] = now() - t
    if a.compile:
        kernels.compile_blocks(transformer)  # the app's own: each block's forward (compute/compile.py)
    g = torch.Generator("cpu").manual_seed(0)
    embeds, start_latent, history = inputs(cfg, lh, lw, device, dtype, g)
    noise = torch.randn(1, 16, 9, lh, lw, generator=g)
    cond = history.conditioning(start_latent)

    def make_denoiser(teacache=None):
        return denoiser_ops.Denoiser(transformer, embeds, None, 1.0, 0.0, a.steps, teacache, conditioning=cond)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times = time_steps(make_denoiser(), noise, a.timed_steps)
    R["s_per_step_median"] = statistics.median(step_times)
    R["s_per_step_all"] = step_times
    R["sampling_s_per_frame"] = sampling_s_per_frame(R["s_per_step_median"], a.steps)
    if device.type == "cuda":
        R["transformer_peak_vram_GiB"] = torch.cuda.max_memory_allocated() / GiB
    print(f"transformer {R['params_B']:.2f} B params; step {R['s_per_step_median']:.3f} s "
          f"-> sampling {R['sampling_s_per_frame']:.3f} s/frame", flush=True)

    sigmas = sampling.flux_sigmas(a.steps, sampling.flux_mu(9 * lh * lw // 4))
    if a.full_section:
        for threshold in (0.0, 0.15):
            cache = teacache_ops.apply_teacache(transformer, threshold) if threshold else None
            d = make_denoiser(cache)
            t = now()
            latents = sampling.sample_unipc(d, noise, sigmas)
            R[f"section_sampling_s_teacache_{threshold}"] = now() - t
            R[f"section_model_calls_teacache_{threshold}"] = cache.computed_calls if cache else d.calls
            if cache:
                teacache_ops.remove_teacache(transformer)
            print(f"section sampling, TeaCache {threshold}: {R[f'section_sampling_s_teacache_{threshold}']:.2f} s, "
                  f"{R[f'section_model_calls_teacache_{threshold}']} full model calls", flush=True)
    else:
        latents = noise

    if a.vram_gb:
        R["streamed"] = streamed_profile(transformer, make_denoiser, noise, a, device)

    transformer.to("meta") if device.type == "cuda" else None  # free VRAM for the VAE figures
    del transformer
    torch.cuda.empty_cache() if device.type == "cuda" else None

    vae = build_vae(a.tiny, device, torch.float16 if device.type == "cuda" else torch.float32)
    tail = torch.cat([history.latents[:, :, -9:], latents.float().cpu()], dim=2)  # 18 latents, (1, 16, 18, lh, lw)
    for tiling in (False, True):
        vae.enable_tiling() if tiling else vae.disable_tiling()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            vae_ops.decode(vae, tail)  # warm-up
            t = now()
            pixels = vae_ops.decode(vae, tail)
            R[f"decode18_s_tiling_{tiling}"] = now() - t
            if device.type == "cuda":
                R[f"decode18_peak_vram_GiB_tiling_{tiling}"] = torch.cuda.max_memory_allocated() / GiB
            print(f"decode 18 latents (tiling {tiling}): {R[f'decode18_s_tiling_{tiling}']:.2f} s", flush=True)
        except torch.OutOfMemoryError as exc:
            R[f"decode18_s_tiling_{tiling}"] = f"OOM: {str(exc)[:120]}"
    with tempfile.TemporaryDirectory() as tmp:
        first = pixels[:, :37]
        with SectionVideoWriter(Path(tmp) / "bench.mp4", w, h, crf=16) as writer:
            writer.add_section(first)
            t = now()
            writer.add_section(pixels)
            R["encode_section_s"] = now() - t
    print(f"encode one section (69 frames in, 36 out): {R['encode_section_s']:.2f} s", flush=True)
    section_s = R["s_per_step_median"] * a.steps + R.get("decode18_s_tiling_False", 0) + R["encode_section_s"]
    R["whole_section_s_per_frame_untiled"] = section_s / FRAMES_PER_SECTION if isinstance(
        R.get("decode18_s_tiling_False"), float) else None
    R["host_MiB"] = proc_status_mib()
    write_result(a.out, R)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
