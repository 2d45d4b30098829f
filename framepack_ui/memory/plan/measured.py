"""Measured figures the cost model is built on, each with where it was measured (card, date, script). The GPU
figures are rows of docs/benchmarks.md (its sections are dated and name the card); bytes are decimal GB/MB."""
from __future__ import annotations

from ...units import GB, MB

# --- the process ---------------------------------------------------------------------------------------------------
# The process before any model: Python + torch + diffusers + transformers + PyAV (the CLI; the app adds gradio).
# Development machine (Linux, torch 2.13 CPU, `generate` on the tiny models), 2026-11-28: RssAnon 250 MB after the
# imports and 280-306 MB through the text and image phases with tiny encoders; VmData 338 MB, then 383-427 MB.
RUNTIME_BASELINE_RAM_BYTES = 300 * MB
RUNTIME_BASELINE_COMMIT_BYTES = 430 * MB
# A module computed from the map holds its float32 copy while it runs, and the allocator keeps about one more
# freed copy around (glibc). Development machine, 2026-11-28: +130-160 MB RssAnon over the baseline while sampling
# the 1.48 GB test transformer (largest module 32 MB in float32, activations ~35 MB).
UPCAST_COPIES = 2

# --- VAE decode: VRAM ----------------------------------------------------------------------------------------------
# One later section's decode (18 latents, 69 frames) at 640x608, untiled: 21.8 GB (H100, 2026-11-28,
# bench/bench_engine.py --full-section; docs/benchmarks.md lists it as 21.8 GiB).
VAE_DECODE_REF_PIXELS = 69 * 640 * 608
VAE_DECODE_REF_UNTILED_BYTES = int(21.8 * GB)
# The same decode in spatial tiles (px; diffusers' overlap), largest first, beyond the VAE's 0.49 GB of weights:
# bench/bench_decode.py peaks of 4.25 GiB at 256 px (H100, 2026-11-28) and 6.23, 7.37, 8.63 GiB at 320, 352,
# 384 px (H200, 2026-11-28); docs/benchmarks.md, "VAE tile table".
VAE_TILE_DECODE_BYTES = {384: int(8.77 * GB), 352: int(7.42 * GB), 320: int(6.20 * GB), 256: int(4.07 * GB)}
VAE_SMALLEST_TILE_PX = min(VAE_TILE_DECODE_BYTES)
# With the decoder compiled (compute.compile.compile_vae_decoder: the element-wise work between the convolutions fuses)
# the same decodes peak a third lower. Compiled as one graph: 14.07 GiB untiled (21.63 eager), 2.97 / 4.23 / 4.96 /
# 5.75 / 7.58 GiB in 256 / 320 / 352 / 384 / 448 px tiles, VAE weights included (H200, 2026-11-29,
# bench/bench_decode.py --compiled-pass, diffusers' tiles; docs/benchmarks.md, "Compiled VAE decoder only where it
# buys larger tiles"): the table below before its factor. Compiled region by region (the app's way) the same decode
# peaks up to 9 % higher than as one graph in the same tiles (H100, 2026-12-06: 15.33 / 14.07 GiB untiled, 5.17 /
# 4.79 in 384 px and 3.11 / 2.90 in 256 px even tiles; same section), so every figure takes that factor.
VAE_REGIONAL_OVER_WHOLE_GRAPH = 1.09
VAE_COMPILED_UNTILED_RATIO = 0.65 * VAE_REGIONAL_OVER_WHOLE_GRAPH
VAE_TILE_DECODE_BYTES_COMPILED = {px: int(gb * VAE_REGIONAL_OVER_WHOLE_GRAPH * GB) for px, gb in
                                  {448: 7.65, 384: 5.68, 352: 4.84, 320: 4.05, 256: 2.70}.items()}

# --- VAE decode: seconds -------------------------------------------------------------------------------------------
# Seconds per later section (context decode, 640x608; None: untiled), bench/bench_decode.py. Eager: H200,
# 2026-11-28 (256 px: H100, 2026-11-28); docs/benchmarks.md, "VAE tile table". Compiled with dynamic shapes, in
# tiles of one size (engine/vae.py decode_in_even_tiles: one compile per job; its peak is at most the table's,
# measured with diffusers' largest tile): H200, 2026-11-29; docs/benchmarks.md, "Even spatial tiles for the compiled decoder".
# At 640x608, tiles of 352-448 px all come out 44x42 latents (2.58 s, 4.74 GiB) and 256-320 px 32x31 (3.34 s,
# 2.85 GiB: 9 tiles where diffusers cuts 16).
VAE_DECODE_SECONDS = {None: 2.45, 384: 2.86, 352: 3.37, 320: 3.55, 256: 4.39}
VAE_DECODE_SECONDS_COMPILED = {None: 2.19, 448: 2.58, 384: 2.58, 352: 2.58, 320: 3.34, 256: 3.34}
# Seconds compiling the decoder region by region adds to the first compiled decode of a process, by the state the
# probe reads (compute.compile.decoder_compile_state): with empty caches 62 s (the 8 GB app job's decode phase),
# from the on-disk cache 14 s (the decode bench's first decode, 18.3 s, less its 4.15 s decode). H100, 2026-12-06,
# docs/benchmarks.md "First-job compile costs".
VAE_DECODER_COMPILE_SECONDS = {"ready": 0.0, "cached": 14.0, "cold": 62.0}
