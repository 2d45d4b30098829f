"""What parking costs a streamed transformer per section: park the resident blocks, let a stand-in decode use the
VRAM, restore them, run the next step; the extra time of that step over a plain one is the section's restore cost.

    python bench/bench_restore.py --out restore.json [--vram-gb 8] [--rounds 3] [--tiny]

Rows: the restore as the app does it with page-locked parked blocks (asynchronous: each resident block's first
forward waits for its own upload, streaming.BlockStreamer.restore) and the same restore done synchronously from the
same page-locked copies. Session 4's figure for the synchronous restore from the file map (pageable) is
0.44-0.60 s per section at 8 GB on the H200 (bench/bench_run.py). Eager blocks, the real config, random weights.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_engine import REAL_TRANSFORMER, TINY_TRANSFORMER, build, inputs, now, resident_blocks_for  # noqa: E402
from framepack_ui.engine import denoiser  # noqa: E402
from framepack_ui.memory import allocator  # noqa: E402
from framepack_ui.memory.streaming import stream_transformer  # noqa: E402


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
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = TINY_TRANSFORMER if a.tiny else REAL_TRANSFORMER
    lh, lw = (8, 8) if a.tiny else (80, 76)
    model = build(HunyuanVideoFramepackTransformer3DModel, cfg, device, dtype)
    g = torch.Generator("cpu").manual_seed(0)
    embeds, start_latent, history = inputs(cfg, lh, lw, device, dtype, g)
    noise = torch.randn(1, 16, 9, lh, lw, generator=g)
    denoise = denoiser.Denoiser(model, embeds, None, 1.0, 0.0, 25, None, conditioning=history.conditioning(start_latent))
    sigma = torch.tensor(0.7)
    resident = resident_blocks_for(model, a.vram_gb, 2.5) if cuda else 1
    t = now()
    streamer = stream_transformer(model, device, resident, pin_sources=True, pin_parked=True)
    R = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name() if cuda else "cpu",
         "torch": torch.__version__, "command": " ".join(sys.argv), "resident_blocks": resident,
         "pinned_sources": streamer.pinned_sources, "pinned_parked": streamer.pinned_parked,
         "streamer_setup_s": now() - t,
         "parked_GB": sum(q.numel() * q.element_size() for b in streamer.resident for q in b.parameters()) / 1e9}
    gc.collect()
    torch.cuda.empty_cache() if cuda else None
    stand_in = int(4 * 2**30) if cuda else 0
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
    streamer.close()
    print(json.dumps(R, indent=1))
    Path(a.out).write_text(json.dumps(R, indent=1))


if __name__ == "__main__":
    main()
