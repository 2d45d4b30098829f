"""VAE decode of one later section (18 latents, 640x608) under different tilings: time, peak VRAM, and PSNR
against the untiled decode of the same latents (a tiling counts only if its frames match).

    python bench/bench_vae_tiles.py --out vae-tiles.json

A whole multi-section video (the context decode, cudnn.benchmark, PSNR of the stitched video) is measured by
bench/bench_decode.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import build  # noqa: E402

# (spatial tile, spatial stride, frame tile, frame stride) in pixels / frames; None = untiled
TILINGS = [None, (256, 192, 16, 12), (384, 320, 16, 12), (512, 448, 16, 12), (256, 192, 32, 28),
           (384, 320, 32, 28), (640, 576, 16, 12)]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="vae-tiles.json")
    a = p.parse_args()
    from diffusers import AutoencoderKLHunyuanVideo

    device = torch.device("cuda")
    vae = build(AutoencoderKLHunyuanVideo, {}, device, torch.float16)
    g = torch.Generator("cpu").manual_seed(0)
    z = (torch.randn(1, 16, 18, 80, 76, generator=g) * 0.8).to(device, torch.float16) / vae.config.scaling_factor
    rows, reference = [], None
    for tiling in TILINGS:
        if tiling is None:
            vae.disable_tiling()
        else:
            s, ss, f, fs = tiling
            vae.enable_tiling(tile_sample_min_height=s, tile_sample_min_width=s, tile_sample_min_num_frames=f,
                              tile_sample_stride_height=ss, tile_sample_stride_width=ss,
                              tile_sample_stride_num_frames=fs)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            vae.decode(z)  # warm-up
            torch.cuda.synchronize()
            t = time.perf_counter()
            x = vae.decode(z).sample
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t
        if reference is None:
            reference = x.cpu()
        row = {"tiling": tiling, "s": seconds, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30,
               "psnr_vs_untiled_dB": psnr(x.cpu(), reference)}
        rows.append(row)
        print(row, flush=True)
        del x
    Path(a.out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                                       "command": " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
