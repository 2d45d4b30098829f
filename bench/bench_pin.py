"""What page-locking the streamed blocks costs at each load (the plan's pinned sources: an 8 GB card's warm job spends
most of its loading here): a BlockStreamer built over blocks whose weights are a read-only file map in the page cache,
as the app's are, with pin_sources, timed per way of pinning.

    python -m bench.bench_pin --out pin.json [--blocks 24] [--block-gb 0.43] [--file /var/tmp/pin-source.bin]

Rows: each block registered before its copy (the kernel zero-fills each page, then the copy writes it) or after it
(the copy faults the pages in, registering pins them as they are), one block at a time or PIN_WORKERS blocks at a time
(streaming.PIN_WORKERS, REGISTER_BEFORE_COPY). The source file is written once and read once before the rows, so every
row copies from the page cache (a warm job: job 2 of bench_app read 0 GB from disk). Each row checks its copies against
the file.
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_pin.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import os
import time
from pathlib import Path

import torch

from bench.common import header, table, write_json
from framepack_ui.memory import streaming

PARAMS_PER_BLOCK = 12
CHUNK_BYTES = 64 * 2**20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=24)
    p.add_argument("--block-gb", type=float, default=0.43, help="bytes per block (the F1's single block: 0.43 GB)")
    p.add_argument("--file", type=Path, default=Path("/var/tmp/pin-source.bin"))
    p.add_argument("--workers", default="1,8,16", help="PIN_WORKERS values to try")
    p.add_argument("--out", default="pin.json")
    return p.parse_args(argv)


def source_blocks(path: Path, blocks: int, block_bytes: int) -> list[torch.nn.Module]:
    """Blocks of PARAMS_PER_BLOCK bf16 parameters each, viewing one file map (written once, then read through)."""
    param_bytes = block_bytes // PARAMS_PER_BLOCK // 2 * 2
    total = param_bytes * PARAMS_PER_BLOCK * blocks
    if not path.is_file() or path.stat().st_size != total:
        chunk = torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8).numpy().tobytes()
        with open(path, "wb") as f:
            for start in range(0, total, CHUNK_BYTES):
                f.write(chunk[:min(CHUNK_BYTES, total - start)])
    with open(path, "rb") as f:  # into the page cache
        while f.read(CHUNK_BYTES):
            pass
    mapped = torch.from_file(str(path), shared=True, size=total // 2, dtype=torch.bfloat16)
    out = []
    per = param_bytes // 2
    for b in range(blocks):
        block = torch.nn.Module()
        for i in range(PARAMS_PER_BLOCK):
            start = (b * PARAMS_PER_BLOCK + i) * per
            block.register_parameter(f"w{i}", torch.nn.Parameter(mapped[start:start + per], requires_grad=False))
        out.append(block)
    return out


def pin_row(path: Path, blocks: int, block_bytes: int, workers: int, register_first: bool) -> dict:
    made = source_blocks(path, blocks, block_bytes)
    sources = [[p.data for p in b.parameters()] for b in made]
    streaming.PIN_WORKERS, streaming.REGISTER_BEFORE_COPY = workers, register_first
    torch.cuda.synchronize()
    t = time.perf_counter()
    streamer = streaming.BlockStreamer(made, "cuda", 0, pin_sources=True)
    seconds = time.perf_counter() - t
    try:
        pinned_bytes = sum(h.tensor.numel() for h in streamer._host_buffers)
        exact = all(torch.equal(copy.view(torch.int16), source.view(torch.int16))  # random bits: NaNs among them
                    for copies, block_sources in zip(streamer._cpu_data, sources)
                    for copy, source in zip(copies, block_sources))
        registered = all(h.registered for h in streamer._host_buffers)
    finally:
        streamer.close()
    return {"workers": workers, "register_before_copy": register_first, "seconds": seconds,
            "GB": pinned_bytes / 1e9, "GB_per_s": pinned_bytes / 1e9 / seconds, "exact": exact,
            "all_registered": registered and streamer.pinned_sources}


def main(argv=None) -> None:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_pin needs a CUDA GPU (page-locking is CUDA's)")
    block_bytes = int(a.block_gb * 1e9)
    rows = []
    for workers in [int(w) for w in a.workers.split(",")]:
        for register_first in (True, False):
            row = pin_row(a.file, a.blocks, block_bytes, workers, register_first)
            rows.append(row)
            print(f"workers {workers:2d}, register {'before' if register_first else 'after '} the copy: "
                  f"{row['seconds']:6.2f} s, {row['GB_per_s']:5.2f} GB/s, exact {row['exact']}", flush=True)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    R = header(False, blocks=a.blocks, block_gb=a.block_gb, cpus=os.cpu_count(),
               transparent_hugepage=thp.read_text().strip() if thp.exists() else None, rows=rows)
    for row in rows:
        R[f"w{row['workers']}_{'before' if row['register_before_copy'] else 'after'}_s"] = row["seconds"]
    print("\n" + table(R), flush=True)
    write_json(a.out, R)


if __name__ == "__main__":
    main()
