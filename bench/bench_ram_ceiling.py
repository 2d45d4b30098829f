"""The laptop profile at full size: an 8 GB card and a RAM ceiling, the transformer read from disk as the app reads it.

    python -m bench.bench_ram_ceiling prepare DIR [--fp8]                  # random full-size weights as real files
    python -m bench.bench_ram_ceiling run DIR --vram-gb 8 --ram-gb 32 [--fp8] [--compile] [--fp8-matmul] --out X
                                                                          # run this one inside the memory cgroup

`prepare` writes the F1 transformer (real config, random bf16) as the real three safetensors shards in the real
folder layout under DIR (and with `--fp8` the app's fp8 cache beside them, converted and verified by
`fp8.ensure_cache`), then drops the files from the page cache, so the measured process reads them from disk itself
and a memory cgroup charges it for every cached page. `run` makes the app's plan for this machine with a card of
`--vram-gb` GiB and `--ram-gb` GiB of RAM (give the cgroup's size: the probe reads the host's), and the app's
ModelManager loads the transformer from DIR with its own loader (read-only map, or the fp8 cache) and streams it as
the plan says (resident blocks, page-locked sources where the plan pins); a filler leaves the process the card's
budget. Then it times steps. `--compile`, `--fp8-matmul`, `--pinned`: PlanOverrides (default: the plan's choice).

`--tiny`: the tests' tiny model set (framepack_ui.weights.tiny) in DIR, run on any machine (a smoke test).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_ram_ceiling.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import statistics
from pathlib import Path

import torch

from bench.common import (STEPS, BenchManager, bench_plan, build_transformer, cpu_stand_in, header, inputs,
                          latent_hw, now, plan_decisions, proc_status_mib, sampling_s_per_frame, write_result)
from bench.proc import cgroup_memory, disk_read_bytes, drop_page_cache
from framepack_ui.engine import denoiser as denoiser_ops
from framepack_ui.engine.lending import TRANSFORMER
from framepack_ui.memory import allocator
from framepack_ui.memory.plan import PlanOverrides
from framepack_ui.weights.layout import COMPONENTS


def prepare(models_dir: Path, with_fp8: bool, tiny: bool) -> None:
    import time

    folder = COMPONENTS[TRANSFORMER].folder(models_dir)
    t = time.perf_counter()
    if tiny:
        from framepack_ui.weights.tiny import make_tiny_models

        make_tiny_models(models_dir)
    else:
        model = build_transformer(False, torch.device("cuda"), torch.bfloat16)
        model.save_pretrained(folder, max_shard_size="10GB")  # the real repository's three shards
        del model
    print(f"wrote {sum(p.stat().st_size for p in folder.glob('*.safetensors')) / 1e9:.1f} GB in "
          f"{time.perf_counter() - t:.0f} s to {folder}", flush=True)
    if with_fp8:
        from framepack_ui.memory import fp8

        t = time.perf_counter()
        fp8.ensure_cache(folder)  # the app's own one-time conversion, verified
        print(f"fp8 cache {sum(p.stat().st_size for p in fp8.cache_dir(folder).glob('*.safetensors')) / 1e9:.1f} GB "
              f"in {time.perf_counter() - t:.0f} s", flush=True)
    drop_page_cache(models_dir)


def run(a: argparse.Namespace) -> None:
    allocator.configure()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    overrides = PlanOverrides(fp8=a.fp8 or bool(a.fp8_matmul), compile=a.compile, fp8_matmul=a.fp8_matmul,
                              pin_streamed=a.pinned)
    plan = bench_plan(overrides, vram_gb=a.vram_gb, ram_gb=a.ram_gb, tiny=a.tiny)
    if not cuda:
        plan = cpu_stand_in(plan, a.tiny)
    print(plan.explain(), flush=True)
    t_plan = plan.components[TRANSFORMER]
    R = header(a.tiny, vram_gb=a.vram_gb, ram_gb=a.ram_gb, storage=t_plan.storage, compile=t_plan.compile,
               fp8_matmul=t_plan.fp8_matmul, resident_blocks=t_plan.resident_blocks,
               plan=plan.summary(), plan_components=plan_decisions(plan))
    # the app's manager with the app's own loader (memory/loading.py): read-only map or the fp8 cache, from DIR
    manager = BenchManager(a.dir, plan, gpu=device, prompt_cache_dir=None, commit_allocator=None,
                           fill_to_vram_gb=a.vram_gb if cuda else None)
    read0 = disk_read_bytes()
    with manager.use(TRANSFORMER) as transformer:  # loaded and streamed per the plan; the filler goes in after
        R["load_s"] = manager.load_s(TRANSFORMER)  # the map (or the fp8 cache), streaming and pinning set up
        R["load_disk_read_GB"] = (disk_read_bytes() - read0) / 1e9
        streamer = manager.streamer(TRANSFORMER)
        R["pinned_sources"] = streamer.pinned_sources if streamer else False
        R["filler"] = manager.filler_info
        _, dtype = manager.compute_place(TRANSFORMER)
        lh, lw = latent_hw(a.tiny)
        g = torch.Generator("cpu").manual_seed(0)
        embeds, start_latent, history = inputs(dict(transformer.config), lh, lw, device, dtype, g)
        noise = torch.randn(1, 16, 9, lh, lw, generator=g)
        d = denoiser_ops.Denoiser(transformer, embeds, None, 1.0, 0.0, STEPS, None,
                                  conditioning=history.conditioning(start_latent))
        sigmas = torch.linspace(1, 0.1, a.timed_steps + 1)
        read1, t = disk_read_bytes(), now()
        d(noise, sigmas[0])  # the first step reads what the load did not (and compiles)
        R["first_step_s"] = now() - t
        R["first_step_disk_read_GB"] = (disk_read_bytes() - read1) / 1e9
        times, read2 = [], disk_read_bytes()
        for s in sigmas[1:]:
            t = now()
            d(noise, s)
            times.append(now() - t)
        R["s_per_step_median"] = statistics.median(times)
        R["s_per_step_all"] = times
        R["sampling_s_per_frame"] = sampling_s_per_frame(R["s_per_step_median"])
        R["disk_read_GB_per_later_step"] = (disk_read_bytes() - read2) / 1e9 / a.timed_steps
        R["streamed_blocks"] = len(streamer.streamed) if streamer else 0
        if cuda:
            R["peak_vram_GiB_excluding_filler"] = manager.peak_vram_excluding_filler_gib()
        R["host_MiB"] = proc_status_mib()
        R["cgroup"] = cgroup_memory()
    manager.free()
    write_result(a.out, R)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("prepare", "run"))
    p.add_argument("dir", type=Path, help="the models folder (the transformer goes where the app looks for it)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--vram-gb", type=float, default=8)
    p.add_argument("--ram-gb", type=float, default=None,
                   help="plan for this much RAM (GiB): the cgroup's memory.max (default: as probed)")
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--fp8", action="store_true", help="prepare: also write the fp8 cache; run: the plan stores fp8")
    on_off = argparse.BooleanOptionalAction
    p.add_argument("--compile", action=on_off, default=None)
    p.add_argument("--fp8-matmul", action=on_off, default=None)
    p.add_argument("--pinned", action=on_off, default=None, help="streamed blocks in page-locked RAM")
    p.add_argument("--out", default="ram-ceiling.json")
    a = p.parse_args()
    if a.mode == "prepare":
        prepare(a.dir, a.fp8, a.tiny)
    else:
        run(a)


if __name__ == "__main__":
    main()
