"""What a LoRA costs the full-size F1 transformer in each memory profile: step time and peak VRAM / RAM without a
LoRA and with a random one of each rank, on every block Linear that musubi-tuner's FramePack LoRAs train (all but
the modulation layers; `--targets all` adds those).

    python -m bench.bench_lora --out lora.json [--ranks 32,128] [--profiles gpu,8gb,8gb-fp8] [--timed-steps 3]
        [--targets musubi|all|attention] [--way auto|merge|beside] [--left-operand kernel,torch]
        [--fp8-ways WIDENING:SQUARE:NARROWING,...] [--no-fp8-matmul] [--tiny]

Profiles come from the app's plan, with the LoRA's cost counted (PlanOverrides.lora), and are applied by the app's
ModelManager to one random transformer (bench/common.py `placed_as_planned`): `gpu` everything resident (bf16);
`8gb` a supposed 8 GiB card (a filler allocation takes the rest), bf16, streamed as planned; `8gb-fp8` the same
card with a 32 GiB machine's RAM, fp8 storage (quantized in place on the GPU, as the app's cache stores it; fp8
matmul where the plan takes it). The LoRA is put on the loaded model by `ModelManager.set_loras`, as between two
jobs in the app (`apply_s`: no weights are rewritten, only its tensors uploaded). `--way merge` or `beside` forces
how every LoRA layer adds its update (compute/lora.py chooses per call by the bytes each moves: `auto`), to measure
that choice (with fp8 matmuls `merge` means inside the fp8 product where compute/lora.py would take it);
`--left-operand` runs each fp8-matmul LoRA row with the product's left operand `[x, h]` made by the Triton kernel
(compute/fp8_lora_kernel.py), by torch (then narrowing layers add beside), or both (default: the app's way);
`--fp8-ways` sets how each shape of Linear adds its update (compute/lora.py FP8_WAYS), a row for each;
`--no-fp8-matmul` keeps the fp8 profile's matmuls in bf16 (the LoRA then merges into the dequantized weight rather
than joining the fp8 product). Target (issue 18): with a LoRA, each profile's step within 3 % of its step without
one. Peak RAM is this process's VmHWM and RssAnon since the
row started (/proc/self/clear_refs resets the peak where Linux allows it). Nothing is written to disk but `--out`.
`--tiny` runs the same code on a tiny config on any machine (a smoke test, not a figure).
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_lora.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import json
import statistics
from pathlib import Path

import torch

from bench.common import (bench_plan, header, model_dtype, now, one_step_setup, placed_as_planned, proc_status_mib,
                          quantize_in_place, sampling_s_per_frame, time_steps, write_json)
from framepack_ui.compute import fp8_linear
from framepack_ui.compute import lora as lora_compute
from framepack_ui.engine import denoiser as denoiser_ops
from framepack_ui.engine.lending import TRANSFORMER
from framepack_ui.memory import allocator, fp8
from framepack_ui.memory.lora import LoraFile, LoraLayer, LoraSet
from framepack_ui.memory.plan import LoraCost, PlanOverrides

# profile -> (plan overrides, supposed VRAM GiB, supposed RAM GiB); fp8 profiles come after the bf16 ones (the model
# is quantized in place once)
PROFILES = {
    "gpu": (dict(plan="gpu", fp8=False), None, None),
    "8gb": (dict(plan="streamed", fp8=False), 8.0, None),
    "8gb-fp8": (dict(plan="streamed", fp8=True), 8.0, 32.0),
}
TARGETS = {
    "musubi": lambda name: "norm" not in name,  # musubi-tuner's FramePack network excludes the modulation Linears
    "all": lambda name: True,
    "attention": lambda name: ".attn." in name,
}


def lora_layers(model, targets: str) -> dict[str, tuple[int, int]]:
    """The blocks' Linears a LoRA of `targets` trains: module name -> (out, in)."""
    keep = TARGETS[targets]
    return {name: (m.out_features, m.in_features) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
            and keep(name)}


def random_lora(layers: dict[str, tuple[int, int]], rank: int, device, seed: int = 0) -> LoraSet:
    """A random LoRA of `rank` on `layers` (bf16, made on `device`: nothing through host memory), alpha = rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    made = {}
    for name, (out, into) in layers.items():
        down = torch.randn(rank, into, generator=g, device=device, dtype=torch.bfloat16) * into ** -0.5
        up = torch.randn(out, rank, generator=g, device=device, dtype=torch.bfloat16) * 0.01
        made[name] = LoraLayer(down, up, 1.0)
    lora = LoraFile(Path(f"random-rank-{rank}.safetensors"), "random", made, ("random", rank, seed))
    return LoraSet(((lora, 1.0),))


def lora_cost(layers: dict[str, tuple[int, int]], rank: int) -> LoraCost | None:
    if not rank:
        return None
    return LoraCost(rank * sum(o + i for o, i in layers.values()), max(o * i for o, i in layers.values()), len(layers),
                    max(o for o, _ in layers.values()))


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: "5" to /proc/self/clear_refs); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(model, plan, a, device, lora: LoraSet, make, noise, vram_gb) -> dict:
    """One row: the model placed as `plan` places it, the LoRA put on, the steps timed."""
    reset_peak_rss()
    with placed_as_planned(model, plan, tiny=a.tiny, device=device, vram_gb=vram_gb) as manager:
        t = now()
        manager.set_loras(lora)
        apply_s = now() - t
        t_plan = plan.components[TRANSFORMER]
        times = time_steps(make(), noise, a.timed_steps)  # one warm-up first (compile of a new LoRA layout)
        step = statistics.median(times)
        streamer = manager.streamer(TRANSFORMER)
        r = {"s_per_step": step, "steps_s": times, "sampling_s_per_frame": sampling_s_per_frame(step),
             "apply_s": apply_s, "lora_layers": len(lora_compute.lora_layers(model)),
             "planned_lora_GB": t_plan.lora_bytes / 1e9, "where": str(t_plan.where),
             "resident_blocks": t_plan.resident_blocks, "pinned_sources": t_plan.pinned_sources,
             "fp8_matmul": t_plan.fp8_matmul, "compile": t_plan.compile,
             "planned_peak_vram_GB": plan.peak_vram_bytes / 1e9, "planned_peak_ram_GB": plan.peak_ram_bytes / 1e9,
             "GB_streamed_total": streamer.bytes_streamed / 1e9 if streamer is not None else 0.0,
             **{f"{k}_MiB": v for k, v in proc_status_mib().items()}}
        if device.type == "cuda":
            r["peak_vram_GiB_excluding_filler"] = manager.peak_vram_excluding_filler_gib()
        manager.set_loras(None)  # the model goes back as it was for the next row
    return r


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--timed-steps", type=int, default=3)
    p.add_argument("--ranks", default="32,128", help="comma-separated LoRA ranks (each row also runs without)")
    p.add_argument("--profiles", default=",".join(PROFILES), help=f"comma-separated, of {', '.join(PROFILES)}")
    p.add_argument("--targets", default="musubi", choices=list(TARGETS))
    p.add_argument("--way", default="auto", choices=("auto", "merge", "beside"),
                   help="how each LoRA layer adds its update (auto: compute/lora.py's per-call choice)")
    p.add_argument("--left-operand", default=None,
                   help="comma-separated, of kernel, torch: who makes an fp8 product's [x, h] (each its own row; "
                        "default the app's, compute/fp8_linear.py FUSED_LEFT_OPERAND)")
    p.add_argument("--fp8-ways", default=None,
                   help="comma-separated WIDENING:SQUARE:NARROWING, each inner, outputs or beside: how each shape of "
                        "fp8-matmul Linear adds its update (compute/lora.py FP8_WAYS; each its own row; default the "
                        "app's)")
    p.add_argument("--no-fp8-matmul", action="store_true", help="the fp8 profile multiplies in bf16 (forces the plan)")
    p.add_argument("--out", default="lora.json")
    a = p.parse_args()
    allocator.configure()  # as the app does, before CUDA starts
    # every LoRA layout (none, rank 32, rank 128; bf16 and fp8 Linears) is another version of each compiled block:
    # past dynamo's default 8 a block silently runs eagerly (bench_levers.py met that)
    torch._dynamo.config.cache_size_limit = 64

    if a.way != "auto":  # the per-call choice replaced for this process (read by the LoRA Linears at each call)
        lora_compute.merges_per_call = lambda tokens, in_features, out_features: a.way == "merge"
    ranks = [0] + [int(r) for r in a.ranks.split(",") if r]
    app_left = "kernel" if fp8_linear.FUSED_LEFT_OPERAND else "torch"
    left_operands = a.left_operand.split(",") if a.left_operand else [app_left]
    if not set(left_operands) <= {"kernel", "torch"}:
        p.error(f"--left-operand takes kernel, torch or both, not {a.left_operand}")
    app_ways = dict(lora_compute.FP8_WAYS)
    ways_list = [dict(zip(app_ways, w.split(":"))) for w in a.fp8_ways.split(",")] if a.fp8_ways else [app_ways]
    if any(set(w) != set(app_ways) or not set(w.values()) <= {"inner", "outputs", "beside"} for w in ways_list):
        p.error(f"--fp8-ways takes WIDENING:SQUARE:NARROWING, each inner, outputs or beside, not {a.fp8_ways}")
    variants = [(left, ways) for left in left_operands for ways in ways_list]
    profiles = [name for name in PROFILES if name in a.profiles.split(",")]
    R = header(a.tiny, ranks=ranks, targets=a.targets, way=a.way, left_operands=left_operands, fp8_ways=ways_list,
               rows={}, peak_rss_resettable=reset_peak_rss())
    device, model, embeds, noise, cond = one_step_setup(a.tiny)
    layers = lora_layers(model, a.targets)
    R["lora_target_layers"] = len(layers)

    def make():
        return denoiser_ops.Denoiser(model, embeds, None, 1.0, 0.0, 25, None, conditioning=cond)

    quantized = False
    for profile in profiles:
        overrides, vram_gb, ram_gb = PROFILES[profile]
        if overrides["fp8"] and a.no_fp8_matmul:
            overrides = {**overrides, "fp8_matmul": False}
        if overrides["fp8"] and not quantized:
            R["quantized_linears"] = quantize_in_place(model)
            fp8.apply_fp8_compute(model, model_dtype(device))
            quantized = True
        if a.tiny and device.type != "cuda" and vram_gb is None:
            vram_gb = 80.0  # the all-on-GPU plan needs a GPU: a large one is supposed (the CPU stands in for it)
        base = None
        for rank in ranks:
            fp8_products = overrides["fp8"] and not a.no_fp8_matmul and rank
            for left, ways in variants if fp8_products else variants[:1]:
                fp8_linear.FUSED_LEFT_OPERAND = left == "kernel"  # read at each call; compiled graphs guard on them
                lora_compute.FP8_WAYS.update(ways)
                name = f"{profile}, rank {rank}" if rank else f"{profile}, no LoRA"
                if fp8_products and len(left_operands) > 1:
                    name += f", [x, h] by {left}"
                if fp8_products and len(ways_list) > 1:
                    name += ", ways " + ":".join(ways.values())
                try:
                    plan = bench_plan(PlanOverrides(**overrides, lora=lora_cost(layers, rank)), vram_gb=vram_gb,
                                      ram_gb=ram_gb, tiny=a.tiny)
                    lora = random_lora(layers, rank, device) if rank else LoraSet()
                    r = measure(model, plan, a, device, lora, make, noise, vram_gb if device.type == "cuda" else None)
                    # who made it in fact: torch wherever the kernel cannot run (a CPU, no Triton)
                    r["left_operand"] = (("kernel" if fp8_linear.fused_left_operand(torch.empty(0, device=device), rank)
                                          else "torch") if fp8_products else None)
                    r["fp8_ways"] = dict(ways) if fp8_products else None
                    if rank and base is not None:
                        r["vs_no_lora"] = r["s_per_step"] / base["s_per_step"]
                        r["within_3_percent"] = r["vs_no_lora"] <= 1.03
                    base = r if not rank else base
                    del lora
                except Exception as exc:  # one failing row must not lose the others' figures
                    r = {"error": f"{exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}"}
                R["rows"][name] = r
                print(f"{name}: {json.dumps({k: v for k, v in r.items() if k != 'steps_s'})}", flush=True)
                write_json(a.out, R)
    fp8_linear.FUSED_LEFT_OPERAND = app_left == "kernel"
    lora_compute.FP8_WAYS.update(app_ways)

    print(f"\n{'row':40} {'s/step':>8} {'vs none':>8} {'VRAM GiB':>9} {'VmHWM GiB':>10} {'RssAnon GiB':>12} "
          f"{'resident':>9} {'apply s':>8}")
    for name, r in R["rows"].items():
        if "error" in r:
            print(f"{name:40} {r['error'][:90]}")
            continue
        vram = r.get("peak_vram_GiB_excluding_filler")
        print(f"{name:40} {r['s_per_step']:8.3f} {r.get('vs_no_lora', 1.0):8.3f} "
              f"{'-' if vram is None else f'{vram:.2f}':>9} {r.get('VmHWM_MiB', 0) / 1024:10.2f} "
              f"{r.get('RssAnon_MiB', 0) / 1024:12.2f} {str(r['resident_blocks']):>9} {r['apply_s']:8.2f}")
    write_json(a.out, R)
    print(f"\nwrote {a.out}", flush=True)


if __name__ == "__main__":
    main()
