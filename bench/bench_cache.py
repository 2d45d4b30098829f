"""Step caches against the uncached run on the same inputs: for each method and threshold, the model calls computed
per section, sampling s/frame, and how far the output is from the uncached one, through the real engine
(`framepack_ui.engine.f1.run`) with its models lent by the app's ModelManager under the app's plan (bench_run.py).

    python -m bench.bench_cache --seconds 4.8 --out cache.json [--teacache 0.1,0.15] [--magcache 0.1:3,0.15:4]
        [--retention 0.2] [--steps 25] [--compile/--no-compile] [--tiny]

The first job is MagCache's calibration (`cache_calibrate`: every call computed, the ratios of these weights and
settings recorded in a temporary folder): it is the uncached reference (the calibration changes no output: tests/
test_magcache.py) and its ratios feed the "magcache calibrated" rows; "magcache published" rows use the ratios
MagCache's authors published for the real F1 weights. Random weights make every difference a proxy: the residuals'
step-to-step behaviour of random weights is not the trained model's (the published ratios were not measured on
them), so the table says what each method costs on these inputs, not what it costs on real videos.

Per job: `computed_per_section` (the engine's CacheReport: computed of all model calls), `sampling_s_per_frame` (the
median over the sections after the first, which holds compile and warm-up, of each section's sampling time / 36
frames), and against the reference's frames (the decoded uint8 frames the encoder receives): PSNR in dB and the mean
absolute difference in 8-bit levels. `--tiny`: the same code on tiny configs at 64 px on any machine (a smoke test,
not a figure).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_cache.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import BENCH_PROMPT, FRAMES_PER_SECTION, bench_manager, bench_plan, cpu_stand_in, header, write_json
from framepack_ui.engine import f1
from framepack_ui.events import CacheReport, Phase
from framepack_ui.memory import allocator
from framepack_ui.memory.plan import PlanOverrides
from framepack_ui.spec import JobSpec

COLUMNS = ("job", "computed_per_section", "sampling_s_per_frame", "speedup", "psnr_db", "mean_abs_diff")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configs at 64 px: a smoke test on any machine")
    p.add_argument("--seconds", type=float, default=4.8, help="video length (sections of 1.2 s)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--teacache", default="0.1,0.15,0.25", help="TeaCache thresholds, comma-separated")
    p.add_argument("--magcache", default="0.1:3,0.15:4,0.25:4",
                   help="MagCache THRESHOLD:K pairs, comma-separated (each run with the published and the "
                        "calibrated ratios)")
    p.add_argument("--retention", type=float, default=0.2, help="MagCache's retention ratio")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile the transformer's blocks (default: the plan's choice)")
    p.add_argument("--out", default="cache.json")
    return p.parse_args(argv)


def jobs(a: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, the JobSpec's step-cache fields) in the order they run; the reference first."""
    out = [("uncached (calibrating)", dict(cache="magcache", cache_calibrate=True))]
    out += [(f"teacache {t:g}", dict(cache="teacache", teacache_threshold=t))
            for t in (float(x) for x in a.teacache.split(",") if x)]
    for pair in (x for x in a.magcache.split(",") if x):
        threshold, _, k = pair.partition(":")
        settings = dict(cache="magcache", magcache_threshold=float(threshold), magcache_max_skip_steps=int(k or 3),
                        magcache_retention_ratio=a.retention)
        out.append((f"magcache published {float(threshold):g} K{int(k or 3)}", {**settings, "published": True}))
        out.append((f"magcache calibrated {float(threshold):g} K{int(k or 3)}", settings))
    return out


def run_job(spec: JobSpec, manager, out: Path, calibration_dir: Path | None) -> dict:
    """One job; its per-section computed calls and sampling times (from the engine's events) and its frames."""
    frames: list[np.ndarray] = []
    sampling_started: dict[int, float] = {}
    sampled_s: dict[int, float] = {}
    computed: list[str] = []

    def on_event(event) -> None:
        t = time.perf_counter()
        if isinstance(event, Phase) and event.name == "sampling":
            sampling_started[len(sampling_started)] = t
        elif isinstance(event, CacheReport):
            sampled_s[event.section] = t - sampling_started[event.section]
            computed.append(f"{event.computed}/{event.calls}")

    result = f1.run(spec, out, manager, on_event, frame_sink=lambda f: frames.append(np.array(f)),
                    calibration_dir=calibration_dir)
    if result.__class__.__name__ != "Finished":
        raise SystemExit(f"{out.name}: {result}")
    steady = [s for section, s in sampled_s.items() if section > 0] or list(sampled_s.values())
    return {"computed_per_section": " ".join(computed),
            "sampling_s_per_frame": statistics.median(steady) / FRAMES_PER_SECTION,
            "frames": np.concatenate(frames)}


def compare(frames: np.ndarray, reference: np.ndarray) -> dict:
    diff = frames.astype(np.float64) - reference.astype(np.float64)
    mse = float((diff ** 2).mean())
    return {"psnr_db": math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse),
            "mean_abs_diff": float(np.abs(diff).mean())}


def main(argv=None) -> None:
    a = parse_args(argv)
    allocator.configure()  # as the app does, before CUDA starts
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    plan = bench_plan(PlanOverrides(compile=a.compile), tiny=a.tiny)
    if not cuda and plan.device == "cuda":
        plan = cpu_stand_in(plan, a.tiny)
    print(plan.explain(), flush=True)
    manager = bench_manager(plan, tiny=a.tiny, device=device)
    R = header(a.tiny, seconds=a.seconds, steps=a.steps, plan=plan.summary(),
               note="random weights: each difference is a proxy for what the method costs on real videos")
    size = (64, 64) if a.tiny else (608, 640)  # (width, height): the 640x608 bucket of the figures
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "start.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(image)
        calibrations = Path(tmp) / "calibrations"
        reference = None
        for index, (name, settings) in enumerate(jobs(a)):
            published = settings.pop("published", False)
            spec = JobSpec(image=str(image), prompt=BENCH_PROMPT, seconds=a.seconds, steps=a.steps, seed=0,
                           resolution=64 if a.tiny else 640, **settings)
            measured = run_job(spec, manager, Path(tmp) / f"job{index}.mp4", None if published else calibrations)
            frames = measured.pop("frames")
            if reference is None:
                reference = frames
                base_s = measured["sampling_s_per_frame"]
            row = {"job": name, **measured, "speedup": base_s / measured["sampling_s_per_frame"],
                   **compare(frames, reference)}
            rows.append(row)
            print(_line(row), flush=True)
    manager.free()
    R["rows"] = rows
    print("\n" + table(rows), flush=True)
    write_json(a.out, R)
    print(f"\nwrote {a.out}", flush=True)


def _line(row: dict) -> str:
    return " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in COLUMNS)


def table(rows: list[dict]) -> str:
    return "\n".join([f"| {' | '.join(COLUMNS)} |", "|" + "---|" * len(COLUMNS), *(f"| {_line(r)} |" for r in rows)])


if __name__ == "__main__":
    main()
