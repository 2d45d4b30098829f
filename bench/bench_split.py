"""Sampling speed of one job split over 1, 2, 4 GPUs (worker/split.py, compute/context_parallel.py).

For each GPU count and resolution: one process per GPU (the split job's own environment: SPLIT_ENV, the loopback,
CUDA_VISIBLE_DEVICES; NCCL between the GPUs, gloo for the host-side tensors), the F1 transformer built at its real
config on each GPU in bf16 with random weights (random weights cost the same compute as real ones), split with
the FramePack plan, rank 0 driving the engine's own Denoiser and the others following its calls (Lockstep, as in a
split job: each call's inputs are sent first). Times `--timed-steps` sampler steps after a warm-up, TeaCache off,
eager (no compile), at the square image's bucket of each resolution (640: 640x608; 960: 960x912). Also records
`nvidia-smi topo -m` (how the GPUs are linked). Prints a table and writes JSON.

    python -m bench.bench_split --out split.json [--gpus 1,2,4] [--resolutions 640,960] [--timed-steps 5]

`--tiny` runs the same code on CPU processes over gloo with a tiny config (a smoke test of the script, never a
figure).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_split.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import os
import queue
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from bench.common import (build_transformer, header, inputs, model_dtype, now, sampling_s_per_frame,
                          transformer_config, write_result)
from framepack_ui.engine import image as image_ops
from framepack_ui.worker.split import LOOPBACK_ENV, SPLIT_ENV

SQUARE = 1024  # a square start image: its bucket at each resolution
TINY_RESOLUTION = 64


def latent_hw(resolution: int) -> tuple[int, int]:
    height, width = image_ops.nearest_bucket(SQUARE, SQUARE, resolution)
    return height // 8, width // 8


def topology() -> str:
    """`nvidia-smi topo -m`, or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    done = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=60)
    return done.stdout if done.returncode == 0 else f"nvidia-smi topo -m failed: {done.stderr.strip()}"


def bench_rank(rank: int, world_size: int, tiny: bool, resolution: int, steps: int, init_file: str, results):
    """One process: build, split, then rank 0 times the steps and the others follow."""
    import datetime

    import torch.distributed as dist

    from framepack_ui.compute.context_parallel import apply_sequence_split
    from framepack_ui.engine.denoiser import Denoiser
    from framepack_ui.worker.split import Lockstep

    os.environ.update(SPLIT_ENV)
    os.environ.update(LOOPBACK_ENV)
    cuda = not tiny and torch.cuda.is_available()
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    if world_size > 1:
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", init_method=f"file://{init_file}",
                                rank=rank, world_size=world_size, timeout=datetime.timedelta(minutes=20))
    try:
        dtype = model_dtype(device)
        model = build_transformer(tiny, device, dtype)
        if world_size > 1:
            apply_sequence_split(model)
        if rank > 0:
            Lockstep.follow(model)
            return
        if world_size > 1:
            Lockstep.lead(model)
        lh, lw = latent_hw(TINY_RESOLUTION if tiny else resolution)
        g = torch.Generator("cpu").manual_seed(0)
        embeds, start_latent, history = inputs(transformer_config(tiny), lh, lw, device, dtype, g)
        noise = torch.randn(1, 16, 9, lh, lw, generator=g)
        denoise = Denoiser(model, embeds, None, 1.0, 0.0, steps + 1, None,
                           conditioning=history.conditioning(start_latent))
        sigmas = torch.linspace(1, 0.1, steps + 1)
        denoise(noise, sigmas[0])  # warm-up: kernels, NCCL communicators
        times = []
        for sigma in sigmas[1:]:
            started = now()
            denoise(noise, sigma)
            times.append(now() - started)
        peak = torch.cuda.max_memory_allocated(device) if cuda else 0
        results.put({"gpus": world_size, "resolution": resolution, "latent_hw": [lh, lw], "step_s": times,
                     "peak_vram_gib": peak / 2**30})
        if world_size > 1:
            Lockstep.release_followers()
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def run_case(world_size: int, tiny: bool, resolution: int, steps: int, devices: list[int]) -> dict:
    """One GPU count at one resolution, in fresh processes (each case builds its own models)."""
    previous = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not tiny:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in devices[:world_size])
    context = mp.get_context("spawn")
    results = context.Queue()
    workdir = tempfile.mkdtemp(prefix="bench-split-")
    try:
        processes = mp.start_processes(bench_rank, args=(world_size, tiny, resolution, steps,
                                                         os.path.join(workdir, "rdv"), results),
                                       nprocs=world_size, join=False, start_method="spawn")
        result = None
        while result is None:
            try:
                result = results.get(timeout=1.0)
            except queue.Empty:
                if processes.join(timeout=0):  # a process that failed raises here
                    raise RuntimeError("the benchmark's processes ended without a result") from None
        try:
            while not processes.join(timeout=60):
                pass
        except ProcessException as exc:
            # after the result: the process group's teardown (gloo's threads once aborted a CPU run here), which the
            # figures do not depend on; the split job itself ends on rank 0's result too (worker/split.py)
            print(f"warning: after its result, {exc}", file=sys.stderr)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if previous is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = previous


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench-split.json")
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts to time (those above the machine's are skipped)")
    ap.add_argument("--resolutions", default="640,960")
    ap.add_argument("--timed-steps", type=int, default=5)
    ap.add_argument("--devices", default=None, help="which GPUs (default: 0..N-1)")
    ap.add_argument("--tiny", action="store_true", help="CPU processes, tiny config: a smoke test, not a figure")
    args = ap.parse_args(argv)
    os.environ.update(SPLIT_ENV)  # this process too: it starts the others
    available = 2 if args.tiny else torch.cuda.device_count()
    counts = [n for n in (int(x) for x in args.gpus.split(",")) if n <= available]
    devices = [int(d) for d in args.devices.split(",")] if args.devices else list(range(available))
    R = header(tiny=args.tiny, topology=topology(), gpu_counts=counts, timed_steps=args.timed_steps,
               split_env=SPLIT_ENV, cases=[])
    for resolution in (int(x) for x in args.resolutions.split(",")):
        base = None
        for count in counts:
            case = run_case(count, args.tiny, resolution, args.timed_steps, devices)
            step_s = statistics.median(case["step_s"])
            base = base or (step_s if count == 1 else None)
            case.update(median_step_s=step_s, sampling_s_per_frame=sampling_s_per_frame(step_s),
                        speedup=(base / step_s) if base else None)
            R["cases"].append(case)
            key = f"{resolution}px_{count}gpu"
            R[f"{key}_s_per_step"] = step_s
            if case["speedup"] is not None:
                R[f"{key}_speedup"] = case["speedup"]
            print(f"{resolution} px, {count} GPU(s): {step_s:.3f} s/step"
                  + (f", {case['speedup']:.2f}x" if case["speedup"] else ""), flush=True)
    print("\n" + R["topology"], flush=True)
    write_result(args.out, R, keys=[k for k in R if k != "topology"])  # the topology is printed as it came
    return R


if __name__ == "__main__":
    main()
