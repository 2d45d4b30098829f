"""The laptop profile at full size: an 8 GB card and a RAM ceiling, the transformer read-only-mapped from disk.

    python bench/bench_ram_ceiling.py prepare DIR          # random full-size weights as real safetensors shards
    python bench/bench_ram_ceiling.py run DIR --vram-gb 8   # run this one inside the memory cgroup

`prepare` writes the F1 transformer (real config, random bf16) in the real file layout and drops the files
from the page cache, so the measured process reads them from disk itself and a memory cgroup charges it for
every cached page. `run` maps the files read-only (framepack_ui.memory.storage), keeps as many blocks resident
as fit the VRAM budget and streams the rest through framepack_ui.memory.streaming, then times steps.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from bench_engine import REAL_TRANSFORMER, build, inputs, now, proc_status_mib, resident_blocks_for  # noqa: E402
from framepack_ui.engine import denoiser  # noqa: E402
from framepack_ui.memory.storage import load_mapped_transformer  # noqa: E402
from framepack_ui.memory.streaming import stream_transformer, transformer_blocks  # noqa: E402

STEPS = 25
FRAMES_PER_SECTION = 36


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.rglob("*.safetensors"):  # the bf16 shards and the fp8 cache under fp8/
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def prepare(folder: Path, with_fp8: bool) -> None:
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = build(HunyuanVideoFramepackTransformer3DModel, REAL_TRANSFORMER, torch.device("cuda"), torch.bfloat16)
    t = time.perf_counter()
    model.save_pretrained(folder, max_shard_size="10GB")
    print(f"wrote {sum(p.stat().st_size for p in folder.glob('*.safetensors')) / 1e9:.1f} GB in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    del model
    if with_fp8:
        from framepack_ui.compute import fp8_linear
        from framepack_ui.memory import fp8

        t = time.perf_counter()
        fp8.ensure_cache(folder)  # the app's own one-time conversion, verified
        print(f"fp8 cache {sum(p.stat().st_size for p in fp8.cache_dir(folder).glob('*.safetensors')) / 1e9:.1f} GB "
              f"in {time.perf_counter() - t:.0f} s", flush=True)
    drop_from_page_cache(folder)


def disk_read_bytes() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))


def cgroup_memory() -> dict:
    try:
        group = Path("/proc/self/cgroup").read_text().strip().split("::")[-1]
        base = Path("/sys/fs/cgroup") / group.lstrip("/")
        return {k: (base / k).read_text().strip() for k in ("memory.max", "memory.peak") if (base / k).exists()}
    except OSError as exc:
        return {"error": str(exc)}


def run(folder: Path, vram_gb: float, timed_steps: int, reserve_gb: float, out: str, storage: str = "map",
        compile_blocks: bool = False, fp8_matmul: bool = False) -> None:
    device = torch.device("cuda")
    R: dict = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
               "vram_gb": vram_gb, "storage": storage, "compile": compile_blocks, "fp8_matmul": fp8_matmul}
    read0, t = disk_read_bytes(), now()
    if storage == "fp8":
        from framepack_ui.compute import fp8_linear
        from framepack_ui.memory import fp8

        transformer = fp8.load_fp8_transformer(folder, torch.bfloat16)  # maps the verified fp8 cache
        fp8_linear.set_fp8_matmul(transformer, fp8_matmul)
    else:
        transformer = load_mapped_transformer(folder, compute_dtype=None)  # bf16 files: compute in bf16
    if compile_blocks:
        from framepack_ui.compute import compile as kernels

        kernels.compile_blocks(transformer)
    R["map_s"] = now() - t
    blocks = transformer_blocks(transformer)
    resident = resident_blocks_for(transformer, vram_gb, reserve_gb)
    streamer = stream_transformer(transformer, device, resident)
    used = torch.cuda.memory_allocated()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(max(0, int(free - max(vram_gb * 2**30 - used, 0))), dtype=torch.uint8, device=device)
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator("cpu").manual_seed(0)
    embeds, start_latent, history = inputs(REAL_TRANSFORMER, 80, 76, device, torch.bfloat16, g)
    noise = torch.randn(1, 16, 9, 80, 76, generator=g)
    d = denoiser.Denoiser(transformer, embeds, None, 1.0, 0.0, STEPS, None,
                    conditioning=history.conditioning(start_latent))
    sigmas = torch.linspace(1, 0.1, timed_steps + 1)
    t = now()
    d(noise, sigmas[0])  # the first step reads the weights from disk (and compiles)
    R["first_step_s"] = now() - t
    R["first_step_disk_read_GB"] = (disk_read_bytes() - read0) / 1e9
    times, read1 = [], disk_read_bytes()
    for s in sigmas[1:]:
        t = now()
        d(noise, s)
        times.append(now() - t)
    R["s_per_step_median"] = statistics.median(times)
    R["s_per_step_all"] = times
    R["sampling_s_per_frame"] = R["s_per_step_median"] * STEPS / FRAMES_PER_SECTION
    R["disk_read_GB_per_later_step"] = (disk_read_bytes() - read1) / 1e9 / timed_steps
    R["resident_blocks"], R["streamed_blocks"] = resident, len(blocks) - resident
    R["peak_vram_GiB_excluding_filler"] = (torch.cuda.max_memory_allocated() - filler.numel()) / 2**30
    R["host_MiB"] = proc_status_mib()
    R["cgroup"] = cgroup_memory()
    streamer.close()
    print(json.dumps(R, indent=1), flush=True)
    Path(out).write_text(json.dumps(R, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("prepare", "run"))
    p.add_argument("dir", type=Path)
    p.add_argument("--vram-gb", type=float, default=8)
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--activation-reserve-gb", type=float, default=2.5)
    p.add_argument("--fp8", action="store_true", help="prepare: also write the fp8 cache; run: map it")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fp8-matmul", action="store_true")
    p.add_argument("--out", default="ram-ceiling.json")
    a = p.parse_args()
    if a.mode == "prepare":
        prepare(a.dir, a.fp8)
    else:
        run(a.dir, a.vram_gb, a.timed_steps, a.activation_reserve_gb, a.out, "fp8" if a.fp8 else "map",
            a.compile, a.fp8_matmul)


if __name__ == "__main__":
    main()
