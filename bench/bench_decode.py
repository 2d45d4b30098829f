"""Section decode of a multi-section F1 video (issue 5: "decode inside an 8 GB budget in 3.5 s or less per
section"): the official decode (the last 18 latents of each later section, 33 frames cross-faded) against the
context decode (`section_ops.decode_latent_count`: the 9 new latents after k older ones), untiled and with spatial tiles,
with cudnn.benchmark off and on. Per configuration: seconds per later section, peak VRAM, and PSNR of the whole
stitched video against the official untiled one (the alternative counts only if its frames match), also against
a single decode of all the latents at once (the VAE's own view of the whole video).

Real VAE config, fp16, random weights; random latents of a start latent + `--sections` sections at 640x608.

    python -m bench.bench_decode --out decode.json          # CUDA: about 2.5-3 min on an H100
    python -m bench.bench_decode --tiny --out tiny.json     # any machine: tiny config, a smoke test of the script

A mechanism on its own (the VAE alone, no plan or manager): the decode the app's plan picks for a card runs in
bench_run.py.

Pass 1 (cudnn.benchmark off) decodes every section of the video for each (tiling, decode) and measures all of
the above. Pass 2 (cudnn.benchmark on) only times: one warm-up decode per tiling (cudnn tunes each new shape; the
official and the context decode share their tile shapes), then one later section per decode. Frame tiles stay
16/12 frames (32 was measured broken); context k = 3 keeps their grid (see section_ops.ALIGNED_CONTEXT).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_decode.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import time

import torch
from torch._dynamo.utils import counters as dynamo_counters

from bench.common import build, header, now, psnr, write_json
from framepack_ui.compute import compile as kernels
from framepack_ui.engine import f1, sections as section_ops, vae as vae_ops
from framepack_ui.engine.video import soft_append

FRAME_TILE, FRAME_STRIDE = 16, 12  # diffusers' default frame tiling, the only one that blends correctly
OFFICIAL = "official"


def section_psnrs(video: torch.Tensor, reference: torch.Tensor, sections: int) -> list[float]:
    """PSNR of the frames each later section touched (its fade and its 36 new frames)."""
    out = []
    for s in range(1, sections):
        end = 1 + 36 * (s + 1)
        out.append(psnr(video[:, end - 36 - section_ops.OVERLAP_FRAMES:end], reference[:, end - 36 - section_ops.OVERLAP_FRAMES:end]))
    return out


def set_tiling(vae, tiling) -> None:
    """tiling: None (untiled: diffusers still decodes frame tiles) or (spatial tile px, spatial stride px)."""
    if tiling is None:
        vae.disable_tiling()
        return
    tile, stride = tiling
    vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile, tile_sample_min_num_frames=FRAME_TILE,
                      tile_sample_stride_height=stride, tile_sample_stride_width=stride,
                      tile_sample_stride_num_frames=FRAME_STRIDE)


def section_tail(latents: torch.Tensor, section: int, context, from_section=section_ops.CONTEXT_FROM_SECTION):
    """What the engine decodes after `section`: the newest `decode_latent_count` latents of the history."""
    end = 1 + f1.LATENT_WINDOW * (section + 1)
    return latents[:, :, end - section_ops.decode_latent_count(section, context, from_section):end]


def timed_decode(vae, tail, device) -> tuple[torch.Tensor, float, float | None]:
    """Pixels (CPU float32, as the engine gets them), seconds, peak VRAM GiB of this decode."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = now()
    pixels = vae_ops.decode(vae, tail)
    seconds = now() - t
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return pixels, seconds, peak


def decode_video(vae, latents, context, from_section, first, device):
    """Stitch the whole video as the engine's writer does (soft_append is its tested reference); `first` is the
    first section's (pixels, s, peak), the same for every decode."""
    sections = (latents.shape[2] - 1) // f1.LATENT_WINDOW
    video, times, peaks = first[0], [], []
    for s in range(1, sections):
        pixels, seconds, peak = timed_decode(vae, section_tail(latents, s, context, from_section), device)
        frames, fade = section_ops.section_frames(pixels, s, context, from_section)
        video = soft_append(video, frames, fade, section_ops.OVERLAP_FRAMES)
        times.append(seconds)
        peaks.append(peak)
        del pixels, frames
    return video, times, peaks


def decodes(tiling, contexts_untiled, contexts_tiled):
    """(name, context, from_section) per decode tried with this tiling; the official decode first."""
    out = [(OFFICIAL, None, section_ops.CONTEXT_FROM_SECTION)]
    for context in (contexts_untiled if tiling is None else contexts_tiled):
        out.append((f"context {context}", context, section_ops.CONTEXT_FROM_SECTION))
    if tiling is None and section_ops.ALIGNED_CONTEXT in contexts_untiled:  # why section 1 stays official
        out.append((f"context {section_ops.ALIGNED_CONTEXT}, section 1 too", section_ops.ALIGNED_CONTEXT, 1))
    return out


def full_pass(vae, latents, tilings, contexts_untiled, contexts_tiled, device, full_video):
    """cudnn.benchmark off: every section, every decode; PSNR against the official untiled video."""
    torch.backends.cudnn.benchmark = False
    sections = (latents.shape[2] - 1) // f1.LATENT_WINDOW
    rows, reference = [], None
    for tiling in tilings:
        same_tiling = None  # this tiling's official video: the context decode's own error, apart from the tiling's
        set_tiling(vae, tiling)
        try:
            first = timed_decode(vae, section_tail(latents, 0, None), device)  # also this tiling's warm-up
        except torch.OutOfMemoryError as exc:
            rows.append({"tiling": tiling, "decode": "all", "cudnn_benchmark": False, "error": f"OOM {exc}"[:160]})
            continue
        for name, context, from_section in decodes(tiling, contexts_untiled, contexts_tiled):
            row = {"tiling": tiling, "decode": name, "context": context, "context_from_section": from_section,
                   "cudnn_benchmark": False, "latents_per_section": [
                       section_ops.decode_latent_count(s, context, from_section) for s in range(sections)]}
            try:
                video, times, peaks = decode_video(vae, latents, context, from_section, first, device)
            except torch.OutOfMemoryError as exc:
                rows.append({**row, "error": f"OOM {exc}"[:160]})
                continue
            if reference is None:  # the first row: official, untiled
                reference = video
            if same_tiling is None:
                same_tiling = video
            # the last section is the steady state (sections from CONTEXT_FROM_SECTION on repeat its decode)
            row.update(s_per_later_section=times[-1], s_later_sections=times, peak_GiB=peaks[-1],
                       first_section_s=first[1], frames=video.shape[1],
                       psnr_vs_official_untiled_dB=psnr(video, reference),
                       psnr_vs_official_same_tiling_dB=psnr(video, same_tiling),
                       psnr_min_section_dB=min(section_psnrs(video, reference, sections)),
                       psnr_vs_full_decode_dB=psnr(video, full_video) if full_video is not None else None)
            rows.append(row)
            print(_line(row), flush=True)
            del video
        del first, same_tiling
    return rows


def timing_pass(vae, latents, tilings, contexts_tiled, device, compiled=False, whole=False):
    """cudnn.benchmark on: a warm-up decode per tiling (tunes the shapes), then one later section per decode.
    `compiled`: the decoder's forward under torch.compile as the app compiles it (compute/compile.py; the first
    warm-up compiles, its seconds are reported), in spatial tiles of one size (engine/vae.py decode_in_even_tiles),
    and each row's PSNR against the eager decode of the same tail in diffusers' tiles. `whole`: the decoder compiled
    as one graph instead of region by region."""
    torch.backends.cudnn.benchmark = True
    last = (latents.shape[2] - 1) // f1.LATENT_WINDOW - 1
    if compiled:
        kernels.compile_vae_decoder(vae, whole=whole)  # as the app does: dynamic shapes, one compile per job
    rows = []
    for tiling in tilings:
        set_tiling(vae, tiling)
        try:
            t = now()
            vae_ops.decode(vae, section_tail(latents, last, None))  # warm-up: cudnn tunes this tiling's shapes
            warm_up_s = now() - t
        except torch.OutOfMemoryError as exc:
            rows.append({"tiling": tiling, "decode": "all", "cudnn_benchmark": True, "error": f"OOM {exc}"[:160]})
            continue
        for context in [None, *contexts_tiled]:
            row = {"tiling": tiling, "decode": OFFICIAL if context is None else f"context {context}",
                   "context": context, "cudnn_benchmark": True, "compiled_decoder": compiled and
                   ("whole" if whole else "regions"),
                   "warm_up_s": warm_up_s, "latents_per_section": section_ops.decode_latent_count(last, context)}
            tail = section_tail(latents, last, context)
            try:
                pixels, seconds, peak = timed_decode(vae, tail, device)
            except torch.OutOfMemoryError as exc:
                rows.append({**row, "error": f"OOM {exc}"[:160]})
                continue
            row.update(s_per_later_section=seconds, peak_GiB=peak)
            if compiled:
                row["graphs_compiled_so_far"] = dynamo_counters["stats"]["unique_graphs"]
                # against diffusers' own tiles, eager: the compile's and the even tiles' error together
                with kernels.decoder_eager(vae):
                    row["psnr_vs_eager_same_tiling_dB"] = psnr(pixels, vae_ops.decode(vae, tail, even_tiles=False))
            rows.append(row)
            print(_line(row), flush=True)
    kernels.uncompile_vae_decoder(vae)
    return rows


def _fmt(value, spec=".2f") -> str:
    if value is None:
        return "-"
    return "identical" if value == float("inf") else format(value, spec)


def _tiling_name(tiling) -> str:
    return "untiled" if tiling is None else f"{tiling[0]}/{tiling[1]} px, {FRAME_TILE}/{FRAME_STRIDE} fr"


def _line(row) -> str:
    decode = row["decode"] + (f" (decoder compiled: {row['compiled_decoder']})" if row.get("compiled_decoder") else "")
    return (f"| {_tiling_name(row['tiling'])} | {decode} | {'on' if row['cudnn_benchmark'] else 'off'} | "
            f"{_fmt(row.get('s_per_later_section'))} | {_fmt(row.get('peak_GiB'))} | "
            f"{_fmt(row.get('psnr_vs_official_untiled_dB'), '.1f')} | {_fmt(row.get('psnr_min_section_dB'), '.1f')} | "
            f"{_fmt(row.get('psnr_vs_official_same_tiling_dB'), '.1f')} | "
            f"{_fmt(row.get('psnr_vs_full_decode_dB'), '.1f')} |" + (f" {row['error']}" if "error" in row else "")
            + (f" {_fmt(row['psnr_vs_eager_same_tiling_dB'], '.1f')} dB vs eager, warm-up {row['warm_up_s']:.0f} s"
               if "psnr_vs_eager_same_tiling_dB" in row else ""))


HEADER = ("| tiling | decode | cudnn.benchmark | s per later section | peak VRAM GiB | PSNR vs official untiled dB | "
          "worst section dB | PSNR vs official same tiling dB | PSNR vs one whole decode dB |\n"
          "|---|---|---|---|---|---|---|---|---|")


def parse_tilings(text: str) -> list:
    """'0,256/192' -> [None, (256, 192)]; 0 is untiled."""
    out = []
    for item in filter(None, text.split(",")):
        out.append(None if item == "0" else tuple(int(v) for v in item.split("/")))
    return out


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in filter(None, text.split(","))]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true", help="the tests' tiny VAE at 32x32 on the CPU (smoke test)")
    p.add_argument("--height", type=int, default=640)
    p.add_argument("--width", type=int, default=608)
    p.add_argument("--sections", type=int, default=3, help="sections of 9 latents after the start latent")
    p.add_argument("--tilings", default=None, help="0 = untiled, TILE/STRIDE px; default 0,256/192,320/256,384/320")
    p.add_argument("--contexts", default="2,3,6", help="context latents tried untiled")
    p.add_argument("--tiled-contexts", default="3", help="context latents tried with each spatial tiling")
    p.add_argument("--no-timing-pass", action="store_true", help="skip the cudnn.benchmark-on pass")
    p.add_argument("--compiled-pass", action="store_true",
                   help="time each tiling again with the decoder under torch.compile")
    p.add_argument("--compile-whole", action="store_true",
                   help="the compiled pass compiles the decoder as one graph (the app compiles it region by region)")
    p.add_argument("--no-full-pass", action="store_true", help="skip the PSNR pass (timing passes only)")
    p.add_argument("--no-full-decode", action="store_true", help="skip the one-decode reference of all latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="decode.json")
    a = p.parse_args()
    started = time.perf_counter()

    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    h, w = (32, 32) if a.tiny else (a.height, a.width)
    tilings = parse_tilings(a.tilings or ("0,24/16" if a.tiny else "0,256/192,320/256,384/320"))
    if tilings[0] is not None:
        tilings.insert(0, None)  # the official untiled decode is every row's reference
    from diffusers import AutoencoderKLHunyuanVideo

    config = {}
    if a.tiny:  # the tests' tiny VAE: narrow, so the CPU run takes seconds
        from framepack_ui.weights.tiny import vae_config
        config = {k: v for k, v in vae_config().items() if not k.startswith("_")}
    vae = build(AutoencoderKLHunyuanVideo, config, device, dtype)
    g = torch.Generator("cpu").manual_seed(a.seed)
    # scaled latents as the engine keeps them (vae_ops.decode divides by the scaling factor)
    latents = torch.randn(1, 16, 1 + f1.LATENT_WINDOW * a.sections, h // 8, w // 8, generator=g) * 0.8
    R = header(a.tiny, height=h, width=w, latents=list(latents.shape), sections=a.sections, dtype=str(dtype),
               frame_tile=[FRAME_TILE, FRAME_STRIDE])
    if device.type != "cuda":
        R["card"] = "cpu"

    full_video = None
    if not a.no_full_decode:
        set_tiling(vae, None)
        vae_ops.decode(vae, latents[:, :, :f1.LATENT_WINDOW + 1])  # warm-up of the device and kernels
        full_video, seconds, peak = timed_decode(vae, latents, device)
        R["full_decode"] = {"s": seconds, "peak_GiB": peak, "frames": full_video.shape[1]}
        print(f"one decode of all {latents.shape[2]} latents: {seconds:.2f} s, peak {_fmt(peak)} GiB", flush=True)
    print(HEADER, flush=True)
    rows = [] if a.no_full_pass else full_pass(vae, latents, tilings, parse_ints(a.contexts),
                                               parse_ints(a.tiled_contexts), device, full_video)
    if not a.no_timing_pass:
        rows += timing_pass(vae, latents, tilings, parse_ints(a.tiled_contexts), device)
    if a.compiled_pass:
        rows += timing_pass(vae, latents, tilings, parse_ints(a.tiled_contexts), device, compiled=True,
                            whole=a.compile_whole)
    R["rows"] = rows
    R["total_s"] = time.perf_counter() - started

    print("\n" + HEADER)
    for row in rows:
        print(_line(row))
    print(f"\ntotal {R['total_s']:.0f} s")
    write_json(a.out, R)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
