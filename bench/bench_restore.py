"""What parking costs a streamed transformer per section: park the resident blocks, let a stand-in decode use the
VRAM, restore them, run the next step; the extra time of that step over a plain one is the section's restore cost.

    python -m bench.bench_restore --out restore.json [--vram-gb 8] [--rounds 3] [--tiny]

Rows: the restore as the app does it with page-locked parked blocks (asynchronous: each resident block's first forward
waits for its own upload, streaming.BlockStreamer.restore) and the same restore done synchronously from the same
page-locked copies. The synchronous restore from the file map (pageable) measured 0.44-0.60 s per section at 8 GB on the
H200 (docs/benchmarks.md, "Parking resident blocks for the VAE decode"). Eager blocks, the real config, random weights,
placed as the app's plan places them on a card of `--vram-gb` GiB (page-locked), by the app's ModelManager; the park and
restore themselves are called on its streamer directly (the mechanism measured alone).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_restore.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import statistics

import torch

from bench.common import GiB, bench_plan, header, now, one_step_setup, placed_as_planned, write_result
from framepack_ui.engine import denoiser as denoiser_ops
from framepack_ui.engine.lending import TRANSFORMER
from framepack_ui.memory import allocator
from framepack_ui.memory.plan import PlanOverrides


def step_after_restore(streamer, denoise, noise, sigma, stand_in_bytes: int, device, asynchronous: bool) -> dict:
    """Park, fill the freed VRAM as a decode would, restore, and time restore + the next step."""
    streamer.park()
    if device.type == "cuda":
        decode = torch.empty(stand_in_bytes, dtype=torch.uint8, device=device)
        decode.fill_(1)  # the stand-in decode's kernels are still queued when the restore starts
        del decode
    pinned = streamer.pinned_parked
    streamer.pinned_parked = asynchronous and pinned  # False: the synchronous copy, from the same sources
    try:
        t = now()
        streamer.restore()
        restore_call = now() - t if not asynchronous else None
        t_call = now()
        denoise(noise, sigma)
        step = now() - t_call
    finally:
        streamer.pinned_parked = pinned
    return {"restore_plus_step_s": (now() - t), "step_s": step, "restore_s_synchronous": restore_call}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--vram-gb", type=float, default=8.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="restore.json")
    a = p.parse_args()
    allocator.configure()

    device, model, embeds, noise, cond = one_step_setup(a.tiny)
    cuda = device.type == "cuda"
    denoise = denoiser_ops.Denoiser(model, embeds, None, 1.0, 0.0, 25, None, conditioning=cond)
    sigma = torch.tensor(0.7)
    # the card's placement as the plan makes it, page-locked (parked blocks too: the plan pins them with the
    # streamed ones), applied by the app's manager; no filler: the restore's cost is the copies, not the budget
    plan = bench_plan(PlanOverrides(plan="streamed", pin_streamed=True, compile=False), vram_gb=a.vram_gb,
                      tiny=a.tiny)
    with placed_as_planned(model, plan, tiny=a.tiny, device=device, vram_gb=None) as manager:
        streamer = manager.streamer(TRANSFORMER)
        R = header(a.tiny, vram_gb=a.vram_gb, resident_blocks=len(streamer.resident),
                   park_for_decode=manager.plan.components[TRANSFORMER].park_for_decode,
                   pinned_sources=streamer.pinned_sources, pinned_parked=streamer.pinned_parked,
                   streamer_setup_s=manager.load_s(TRANSFORMER),
                   parked_GB=sum(q.numel() * q.element_size() for b in streamer.resident for q in b.parameters()) / 1e9)
        stand_in = int(4 * GiB) if cuda else 0
        denoise(noise, sigma)  # warm-up
        plain = []
        for _ in range(a.rounds):
            t = now()
            denoise(noise, sigma)
            plain.append(now() - t)
        R["plain_step_s"] = statistics.median(plain)
        for name, asynchronous in (("asynchronous (app)", True), ("synchronous, same page-locked sources", False)):
            runs = [step_after_restore(streamer, denoise, noise, sigma, stand_in, device, asynchronous)
                    for _ in range(a.rounds)]
            cost = statistics.median(r["restore_plus_step_s"] for r in runs) - R["plain_step_s"]
            R[name] = {"runs": runs, "restore_cost_s": cost}
            print(f"{name}: restore costs {cost:.3f} s per section ({R['parked_GB']:.2f} GB parked, plain step "
                  f"{R['plain_step_s']:.3f} s)", flush=True)
    write_result(a.out, R)


if __name__ == "__main__":
    main()
