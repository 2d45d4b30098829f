"""VAE decode of one later section (18 latents, 640x608) under different tilings: time, peak VRAM, and PSNR
against the untiled decode of the same latents (a tiling counts only if its frames match).

    python -m bench.bench_vae_tiles --out vae-tiles.json [--tiny]

A mechanism on its own (the VAE alone, diffusers' own tiler, no plan). A whole multi-section video (the context
decode, cudnn.benchmark, PSNR of the stitched video) is measured by bench_decode.py; the tiles the app's plan picks
run in bench_run.py. `--tiny`: a tiny VAE at 64x64 on any machine (a smoke test, not a figure).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_vae_tiles.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse

import torch

from bench.common import GiB, build_vae, header, latent_hw, now, psnr, write_json

# (spatial tile, spatial stride, frame tile, frame stride) in pixels / frames; None = untiled
TILINGS = [None, (256, 192, 16, 12), (384, 320, 16, 12), (512, 448, 16, 12), (256, 192, 32, 28),
           (384, 320, 32, 28), (640, 576, 16, 12)]
TINY_TILINGS = [None, (32, 24, 16, 12)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default="vae-tiles.json")
    a = p.parse_args()

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    vae = build_vae(a.tiny, device, torch.float16 if cuda else torch.float32)
    lh, lw = latent_hw(a.tiny)
    g = torch.Generator("cpu").manual_seed(0)
    z = (torch.randn(1, 16, 18, lh, lw, generator=g) * 0.8).to(device, vae.dtype) / vae.config.scaling_factor
    rows, reference = [], None
    for tiling in TINY_TILINGS if a.tiny else TILINGS:
        if tiling is None:
            vae.disable_tiling()
        else:
            s, ss, f, fs = tiling
            vae.enable_tiling(tile_sample_min_height=s, tile_sample_min_width=s, tile_sample_min_num_frames=f,
                              tile_sample_stride_height=ss, tile_sample_stride_width=ss,
                              tile_sample_stride_num_frames=fs)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            vae.decode(z)  # warm-up
            t = now()
            x = vae.decode(z).sample
            seconds = now() - t
        if reference is None:
            reference = x.cpu()
        row = {"tiling": tiling, "s": seconds, "peak_GiB": torch.cuda.max_memory_allocated() / GiB if cuda else None,
               "psnr_vs_untiled_dB": psnr(x.cpu(), reference)}
        rows.append(row)
        print(row, flush=True)
        del x
    write_json(a.out, header(a.tiny, rows=rows))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
