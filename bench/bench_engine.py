"""Full-size speed benchmark of the engine's section pipeline (sampling, VAE decode, video encode).

Builds the F1 transformer at its real config directly on the GPU in bf16 with random weights (random weights
cost the same compute as real ones) and the HunyuanVideo VAE at its real config in fp16; the text and image
encoders are replaced by random embeddings of the real shapes. Runs the engine's own Denoiser, samplers,
TeaCache hooks, decode and SectionVideoWriter at 640x608. Prints a table and writes JSON.

    python bench/bench_engine.py --out bench-result.json [--timed-steps 4] [--full-section] [--compile]

On a machine without CUDA, `--tiny` runs the same code on a tiny config (a smoke test of the script).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from framepack_ui.engine import denoiser, sections, sampling, teacache as teacache_ops, vae as vae_ops  # noqa: E402
from framepack_ui.engine.video import SectionVideoWriter  # noqa: E402
from framepack_ui.compute import attention, compile as kernels  # noqa: E402
from framepack_ui.memory.streaming import stream_transformer, transformer_blocks  # noqa: E402

REAL_TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                        num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                        patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
                        pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
                        has_image_proj=True, image_proj_dim=1152, has_clean_x_embedder=True)
TINY_TRANSFORMER = {**REAL_TRANSFORMER, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1,
                    "num_single_layers": 1, "num_refiner_layers": 1, "rope_axes_dim": (2, 2, 4),
                    "text_embed_dim": 32, "pooled_projection_dim": 32, "image_proj_dim": 32}
TINY_VAE = dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4)
FRAMES_PER_SECTION = 36
TEXT_TOKENS = 64  # a typical prompt's Llama tokens after cropping
SIGLIP_TOKENS = 729


def now() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def proc_status_mib() -> dict:
    try:
        with open("/proc/self/status") as f:
            return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f
                    if line.startswith(("VmHWM", "RssAnon", "RssFile"))}
    except OSError:
        return {}


def build(cls, config: dict, device, dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the final dtype directly: 12.9 B params in fp32 would need 52 GB
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def inputs(cfg: dict, lh: int, lw: int, device, dtype, generator):
    def rnd(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    embeds = dict(encoder_hidden_states=rnd(1, TEXT_TOKENS, cfg["text_embed_dim"]),
                  encoder_attention_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long, device=device),
                  pooled_projections=rnd(1, cfg["pooled_projection_dim"]),
                  image_embeds=rnd(1, SIGLIP_TOKENS, cfg["image_proj_dim"]),
                  guidance=torch.tensor([10_000.0], device=device, dtype=dtype))
    start_latent = torch.randn(1, 16, 1, lh, lw, generator=generator)
    history = sections.History.start(start_latent)
    history.append(torch.randn(1, 16, 18, lh, lw, generator=generator))  # a mid-video history
    return embeds, start_latent, history


def time_steps(denoiser, noise, n: int) -> list[float]:
    sigmas = torch.linspace(1, 0.1, n + 1)
    denoiser(noise, sigmas[0])  # warm-up (kernels, caches, compile)
    times = []
    for s in sigmas[1:]:
        t = now()
        denoiser(noise, s)
        times.append(now() - t)
    return times


def resident_blocks_for(transformer, vram_gb: float, activation_reserve_gb: float) -> int:
    """How many leading blocks fit beside the embedders, two streaming slots and the activations."""
    blocks = transformer_blocks(transformer)
    block_bytes = [sum(q.numel() * q.element_size() for q in b.parameters()) for b in blocks]
    other_bytes = sum(q.numel() * q.element_size() for q in transformer.parameters()) - sum(block_bytes)
    budget = vram_gb * 2**30 - other_bytes - 2 * max(block_bytes) - activation_reserve_gb * 2**30
    resident = 0
    while resident < len(blocks) and budget - block_bytes[resident] > 0:
        budget -= block_bytes[resident]
        resident += 1
    return resident


def streamed_profile(transformer, make_denoiser, noise, a, device) -> dict:
    """Keep as many blocks resident as fit `--vram-gb`, stream the rest from (pageable) RAM; a filler
    allocation leaves only that much VRAM to the whole process."""
    res: dict = {"vram_gb": a.vram_gb}
    sigma = torch.tensor(0.7)
    reference = make_denoiser()(noise, sigma)
    blocks = transformer_blocks(transformer)
    resident = resident_blocks_for(transformer, a.vram_gb, a.activation_reserve_gb)
    streamer = stream_transformer(transformer, device, resident)
    torch.cuda.empty_cache()
    used = torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    filler = None
    try:
        filler = torch.empty(max(0, int(free - (a.vram_gb * 2**30 - used))), dtype=torch.uint8, device=device)
        torch.cuda.reset_peak_memory_stats()
        d = make_denoiser()
        out = d(noise, sigma)
        res["max_abs_diff_vs_resident"] = (out - reference).abs().max().item()
        before = streamer.bytes_streamed
        times = time_steps(d, noise, a.timed_steps)
        res["bytes_streamed_per_step_GB"] = (streamer.bytes_streamed - before) / (a.timed_steps + 1) / 1e9
        res["s_per_step_median"] = statistics.median(times)
        res["sampling_s_per_frame"] = res["s_per_step_median"] * a.steps / FRAMES_PER_SECTION
        res["resident_blocks"] = resident
        res["streamed_blocks"] = len(blocks) - resident
        res["peak_vram_GiB_excluding_filler"] = (torch.cuda.max_memory_allocated() - filler.numel()) / 2**30
        res["laptop_link_12GBps_s_per_step"] = res["bytes_streamed_per_step_GB"] / 12
    finally:
        del filler
        streamer.close()
    print(f"streamed at {a.vram_gb} GB: {resident} resident / {len(blocks) - resident} streamed blocks, "
          f"step {res['s_per_step_median']:.3f} s, {res['bytes_streamed_per_step_GB']:.1f} GB/step, "
          f"diff vs resident {res['max_abs_diff_vs_resident']:.2e}, peak {res['peak_vram_GiB_excluding_filler']:.2f} GiB",
          flush=True)
    for block in blocks:  # back on the GPU for the rest of the run
        block.to(device)
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
                   help="also time the streamed profile on a card with this much VRAM (filler allocation)")
    p.add_argument("--activation-reserve-gb", type=float, default=2.5)
    p.add_argument("--out", default="bench-result.json")
    a = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = TINY_TRANSFORMER if a.tiny else REAL_TRANSFORMER
    h, w = (64, 64) if a.tiny else (a.height, a.width)
    lh, lw = h // 8, w // 8
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel

    R = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name() if device.type == "cuda"
         else platform.processor() or "cpu", "torch": torch.__version__, "command": " ".join(sys.argv),
         "height": h, "width": w, "steps": a.steps, "compile": a.compile, "tiny": a.tiny}
    t = now()
    transformer = build(HunyuanVideoFramepackTransformer3DModel, cfg, device, dtype)
    R["params_B"] = sum(q.numel() for q in transformer.parameters()) / 1e9
    R["build_s"] = now() - t
    if a.compile:
        kernels.compile_blocks(transformer)  # the app's own: each block's forward (see memory/kernels.py)
    g = torch.Generator("cpu").manual_seed(0)
    embeds, start_latent, history = inputs(cfg, lh, lw, device, dtype, g)
    noise = torch.randn(1, 16, 9, lh, lw, generator=g)
    cond = history.conditioning(start_latent)

    def denoiser(teacache=None):
        return denoiser.Denoiser(transformer, embeds, None, 1.0, 0.0, a.steps, teacache, conditioning=cond)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step_times = time_steps(denoiser(), noise, a.timed_steps)
    R["s_per_step_median"] = statistics.median(step_times)
    R["s_per_step_all"] = step_times
    R["sampling_s_per_frame"] = R["s_per_step_median"] * a.steps / FRAMES_PER_SECTION
    if device.type == "cuda":
        R["transformer_peak_vram_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"transformer {R['params_B']:.2f} B params; step {R['s_per_step_median']:.3f} s "
          f"-> sampling {R['sampling_s_per_frame']:.3f} s/frame", flush=True)

    sigmas = sampling.flux_sigmas(a.steps, sampling.flux_mu(9 * lh * lw // 4))
    if a.full_section:
        for threshold in (0.0, 0.15):
            cache = teacache_ops.apply_teacache(transformer, threshold) if threshold else None
            d = denoiser(cache)
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
        R["streamed"] = streamed_profile(transformer, denoiser, noise, a, device)

    transformer.to("meta") if device.type == "cuda" else None  # free VRAM for the VAE figures
    del transformer
    torch.cuda.empty_cache() if device.type == "cuda" else None

    vae = build(AutoencoderKLHunyuanVideo, TINY_VAE if a.tiny else {}, device,
                torch.float16 if device.type == "cuda" else torch.float32)
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
                R[f"decode18_peak_vram_GiB_tiling_{tiling}"] = torch.cuda.max_memory_allocated() / 2**30
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

    print("\n| what | value |\n|---|---|")
    for key, value in R.items():
        if not isinstance(value, (list, dict)):
            print(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    Path(a.out).write_text(json.dumps(R, indent=1, default=str))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
