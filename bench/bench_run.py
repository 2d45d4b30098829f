"""A whole multi-section job through the real engine (`framepack_ui.engine.f1.run`) at full size, its models lent
by the app's own ModelManager applying the app's own memory plan: sampling, VAE decode and video encode of every
section, timed from the engine's own events.

    python -m bench.bench_run --seconds 4.8 --decode-context 3 --out run.json [--vram-gb 8] [--compile]
        [--compile-vae] [--pinned] [--vae-tile 384/320] [--fp8-matmul] [--attention NAME] [--teacache] [--tiny]

The plan is `make_plan` for this machine as probed (`--vram-gb 8`: its GPU supposed to have 8 GiB, all free) and
the real weights; what the flags force goes through `PlanOverrides` where the plan has the field, else into the
plan's component afterwards (`LoadPlan.with_component`). The manager then loads, streams, parks, restores,
compiles and frees as it does in the app; only the reading of the weights is replaced (bench/common.py
`bench_manager`): random weights at the real configs, built on the GPU in the plan's dtypes. The text encoders
never load: the prompt's embeddings (random, real shape) are in the manager's prompt cache, as for a known prompt
(they run once per new prompt, not per section). SigLIP, the VAE and x264 run for real. With `--vram-gb` a filler
allocation leaves the process that budget once the transformer is placed.

The summary (comparable with docs/benchmarks.md's rows, same keys): per later section, the time between two decode
starts (one sampling, one decode, whatever of the encode is not hidden) and its sampling time (the median interval
between step events times the steps); steady figures are the median of the sections that repeat the video's decode;
peak VRAM counts from the transformer's placement, the filler excluded; host memory; mean GPU utilisation over the
job; each VAE use (entering: the transformer's blocks parked where the plan parks them, and the VAE's load the first
time; leaving: their restore). `wall_s` includes building the random models (`load_s` / `build_s` say how long).

`--tiny`: the same code on tiny configs at 64 px on any machine (a smoke test, not a figure), under the plan of the
full-size run (real weights, 640 px; RAM supposed 64 GiB unless `--ram-gb`); without CUDA the plan is the CPU's,
or with `--vram-gb` the supposed card's, run on the CPU standing in for the GPU (float32).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_run.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import (BENCH_PROMPT, FRAMES_PER_SECTION, Utilisation, bench_manager, bench_plan, cpu_stand_in,
                          header, plan_decisions, proc_status_mib, table, write_json)
from framepack_ui.engine import f1
from framepack_ui.engine.lending import TRANSFORMER, VAE
from framepack_ui.events import Phase, Step
from framepack_ui.memory import allocator
from framepack_ui.memory.plan import LoadPlan, PlanOverrides
from framepack_ui.spec import JobSpec

SUMMARY_KEYS = ("frames", "sections", "steady_section_s", "steady_s_per_frame", "steady_sampling_s_per_frame",
                "steady_finishing_s", "first_step_s", "wall_s", "peak_vram_GiB_excluding_filler", "gpu_util_pct",
                "resident_blocks", "pinned_sources", "compile", "compile_vae", "vae_tile_px", "fp8_matmul",
                "attention")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--tiny", action="store_true", help="tiny configs at 64 px: a smoke test on any machine")
    p.add_argument("--seconds", type=float, default=6.0, help="video length (sections of 1.2 s)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--teacache", action="store_true", help="TeaCache on (threshold 0.15; off by default here)")
    p.add_argument("--decode-context", type=int, default=None,
                   help="later sections decode their 9 new latents after this many older ones (engine option; "
                        "default: the official 18-latent decode; the app's default is 3)")
    p.add_argument("--vram-gb", type=float, default=None,
                   help="simulate a card with this many GiB free: the plan is made for it and a filler "
                        "allocation leaves the process that budget")
    p.add_argument("--ram-gb", type=float, default=None,
                   help="plan for this many GiB of RAM (default: as probed; with --tiny: 64)")
    p.add_argument("--compile", action=on_off, default=None,
                   help="compile the transformer's blocks (PlanOverrides.compile; default: the plan's choice, "
                        "on where CUDA and Triton are)")
    p.add_argument("--compile-vae", action=on_off, default=None,
                   help="compile the VAE decoder (forces the plan's choice, which compiles it where the room it "
                        "frees buys a faster decode)")
    p.add_argument("--pinned", action=on_off, default=None,
                   help="streamed (and parked) blocks in page-locked RAM (PlanOverrides.pin_streamed; default: "
                        "the plan's choice, where RAM allows)")
    p.add_argument("--resident-blocks", type=int, default=None,
                   help="stream the transformer with this many blocks resident (PlanOverrides.resident_blocks)")
    p.add_argument("--tiled-decode", action=on_off, default=None,
                   help="tile the VAE decode (PlanOverrides.vae_tiling; default: the plan's choice)")
    p.add_argument("--vae-tile", default=None, metavar="TILE[/STRIDE]",
                   help="spatial tile in px, e.g. 384/320 (forces the plan's choice; the stride is always "
                        "TILE-64, the app's overlap), or 0 for untiled")
    p.add_argument("--fp8", action=on_off, default=None,
                   help="transformer blocks stored as fp8 (PlanOverrides.fp8; default: the plan's choice, fp8 where "
                        "the bf16 blocks streamed from disk would not stay in the page cache)")
    p.add_argument("--fp8-matmul", action=on_off, default=None,
                   help="fp8 storage multiplied in fp8 (PlanOverrides.fp8 and fp8_matmul); --no-fp8-matmul with "
                        "--fp8: dequantized to bf16 per call (default with --fp8: the plan's choice)")
    p.add_argument("--attention", default=None, help="attention backend (PlanOverrides.attention: one of "
                                                     "compute/backends.py ATTENTION_BACKENDS)")
    p.add_argument("--out", default="run.json")
    return p.parse_args(argv)


def parse_tile(text: str | None) -> int | None | bool:
    """'384/320' or '384' -> 384; '0' -> None (untiled); not given -> False (the plan's choice)."""
    if text is None:
        return False
    tile, _, stride = text.partition("/")
    tile = int(tile)
    if tile == 0:
        return None
    if stride and int(stride) != tile - 64:
        raise SystemExit(f"--vae-tile {text}: the app's tiles overlap by 64 px, so the stride is {tile - 64}")
    return tile


def run_plan(a: argparse.Namespace, cuda: bool) -> LoadPlan:
    """The app's plan for this machine (or the supposed card), with what the flags force."""
    tile = parse_tile(a.vae_tile)
    overrides = PlanOverrides(compile=a.compile, attention=a.attention,
                              fp8=True if a.fp8_matmul else a.fp8, fp8_matmul=a.fp8_matmul, pin_streamed=a.pinned,
                              resident_blocks=a.resident_blocks,
                              vae_tiling=(tile is not None) if tile is not False else a.tiled_decode)
    # --tiny plans the real weights at 640 px as the full-size run does (only the models are tiny)
    plan = bench_plan(overrides, vram_gb=a.vram_gb, ram_gb=a.ram_gb, tiny=a.tiny)
    if a.compile_vae is not None:
        plan = plan.with_component(VAE, compile=a.compile_vae)
    if tile:
        plan = plan.with_component(VAE, vae_tiling=True, vae_tile_px=tile)
    if not cuda and plan.device == "cuda":
        plan = cpu_stand_in(plan, a.tiny)
    return plan


def main(argv=None) -> None:
    a = parse_args(argv)
    allocator.configure()  # as the app does, before CUDA starts
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    plan = run_plan(a, cuda)
    print(plan.explain(), flush=True)
    t_plan, v_plan = plan.components[TRANSFORMER], plan.components[VAE]
    R = header(a.tiny, decode_context=a.decode_context, compile=t_plan.compile, compile_vae=v_plan.compile,
               vram_gb=a.vram_gb, fp8=t_plan.storage == "fp8", fp8_matmul=t_plan.fp8_matmul,
               attention=t_plan.attention, vae_tiling=v_plan.vae_tiling,
               vae_tile_px=v_plan.vae_tile_px if v_plan.vae_tiling else None,
               resident_blocks=t_plan.resident_blocks, plan=plan.summary(), plan_components=plan_decisions(plan),
               plan_notes=list(plan.notes))
    manager = bench_manager(plan, tiny=a.tiny, device=device, fill_to_vram_gb=a.vram_gb if cuda else None)

    size = (64, 64) if a.tiny else (608, 640)  # (width, height): the 640x608 bucket of the figures
    events: list[tuple[float, object]] = []
    util = Utilisation()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "start.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(image)
        spec = JobSpec(image=str(image), prompt=BENCH_PROMPT, seconds=a.seconds, steps=a.steps, teacache=a.teacache,
                       resolution=64 if a.tiny else 640, seed=0)
        started = time.perf_counter()
        with util.measure():
            result = f1.run(spec, Path(tmp) / "run.mp4", manager,
                            lambda e: events.append((time.perf_counter() - started, e)),
                            decode_context=a.decode_context)
        wall = time.perf_counter() - started
    R["result"] = type(result).__name__
    R["events"] = [(round(t, 3), type(e).__name__, getattr(e, "detail", None) or getattr(e, "section", None))
                   for t, e in events if not type(e).__name__.startswith("Preview")]
    write_json(a.out, R)  # the timeline survives a failing summary
    ready = manager.transformer_ready_at - started if manager.transformer_ready_at is not None else None
    R.update(summarise(events, result, wall, ready))
    streamer = manager.streamer(TRANSFORMER)
    if streamer is not None:
        R["pinned_sources"], R["pinned_parked"] = streamer.pinned_sources, streamer.pinned_parked
        R["GB_streamed"] = streamer.bytes_streamed / 1e9
    R["park_count"] = manager.park_count
    R["build_s"] = manager.build_s
    R["load_s"] = {name: manager.load_s(name) for name in ("image_encoder", VAE, TRANSFORMER)}
    if manager.load_s(TRANSFORMER) is not None and TRANSFORMER in manager.build_s:
        # what the manager did after the build: streaming (and pinning) per the plan, speed options
        R["streamer_setup_s"] = manager.load_s(TRANSFORMER) - manager.build_s[TRANSFORMER]
    R["vae_uses"] = [{"park_s": u["enter_s"], "vae_s": u["use_s"], "restore_s": u["exit_s"], "loaded": u["loaded"]}
                     for u in manager.uses if u["name"] == VAE]
    R["gpu_util_pct"] = util.mean
    if cuda:
        R["peak_vram_GiB_excluding_filler"] = manager.peak_vram_excluding_filler_gib()
        # allocated_GiB_when_the_transformer_starts (as before), reserved_, left_free_, filler_GiB_...
        R.update({f"{k}_when_the_transformer_starts": v for k, v in manager.filler_info.items()})
    R["host_MiB"] = proc_status_mib()
    manager.free()
    print("\n" + table(R, SUMMARY_KEYS), flush=True)
    write_json(a.out, R)
    print(f"\nwrote {a.out}", flush=True)


def summarise(events, result, wall: float, transformer_ready: float | None) -> dict:
    """Per later section, from the engine's events: section_s is the time between the starts of two decodes
    (one sampling, one decode, and whatever of the encode is not hidden); sampling_s: its steps at their median."""
    if result.__class__.__name__ != "Finished":
        return {"result_detail": repr(result)}
    decode_starts, step_times = [], {}
    for t, e in events:
        if isinstance(e, Phase) and e.name == "decode" and e.detail.startswith("decoding section"):
            decode_starts.append(t)  # not the compile notice a compiled decoder adds at its first decode
        if isinstance(e, Step):
            step_times.setdefault(e.section, []).append(t)
    rows = []
    for i in range(1, len(decode_starts)):
        times = step_times[i]
        # the median time between step events, times the steps: the engine reports a step once the next one is
        # queued, so the first and last intervals are not a step's (the last one measured 0.58 s against 0.86)
        sampling = statistics.median(b - a for a, b in zip(times, times[1:])) * len(times) if len(times) > 1 else 0.0
        section = decode_starts[i] - decode_starts[i - 1]
        rows.append({"section": i, "section_s": section, "sampling_s": sampling, "finishing_s": section - sampling})
    out = {"frames": result.frames, "sections": len(decode_starts), "wall_s": wall,
           "wall_s_per_frame": wall / result.frames, "per_section": rows}
    if transformer_ready is not None and step_times:
        # from the transformer's placement (load, streaming and pinning done) to the first step's report: the
        # first step with its compile, as the earlier benches' models were built before the job
        out["first_step_s"] = step_times[0][0] - transformer_ready
    if not rows:
        return out
    # Row i holds section i-1's decode: row 1 section 0's short one, row 2 section 1's (always the official 18
    # latents); from row 3 on the decode repeats for the rest of the video.
    later = rows[2:] or rows[-1:]
    per_section = statistics.median(r["section_s"] for r in later)
    out.update(steady_section_s=per_section, steady_s_per_frame=per_section / FRAMES_PER_SECTION,
               steady_sampling_s_per_frame=statistics.median(r["sampling_s"] for r in later) / FRAMES_PER_SECTION,
               steady_finishing_s=statistics.median(r["finishing_s"] for r in later))
    return out


if __name__ == "__main__":
    main()
