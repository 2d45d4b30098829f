"""What the fp32 output projection (compute/precision.py, the official demo's inference setting) costs per step.

    python -m bench.bench_output_precision --out precision.json [--timed-steps 6] [--vram-gb 8] [--tiny]

Full-size F1 transformer (random weights) at 640x608 with a mid-video history, placed by the app's plan and
manager as a job places it: everything on the GPU (compiled where the plan compiles), then an 8 GB card (resident
and streamed blocks). In each placement the steps alternate between the fp32 projection and the all-bf16 one
(ABAB...), so drift of the machine falls on both alike; the median of each is reported, with their ratio and how
far the bf16 projection moves the denoised latent of one step.
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_output_precision.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import statistics

import torch

from bench.common import bench_plan, header, model_dtype, now, one_step_setup, placed_as_planned, rel, write_result
from framepack_ui.compute import precision
from framepack_ui.engine import denoiser as denoiser_ops
from framepack_ui.memory import allocator
from framepack_ui.memory.plan import PlanOverrides


def alternating(model, make, noise, steps: int, dtype) -> dict:
    """Warm both forms (compile, caches), then `steps` timed pairs, fp32 and bf16 projection in turn."""
    sigmas = torch.linspace(0.9, 0.1, steps)
    outputs, times = {}, {"fp32": [], "bf16": []}
    for form in ("fp32", "bf16"):
        set_form(model, form, dtype)
        outputs[form] = make()(noise, torch.tensor(0.7))
    for sigma in sigmas:
        for form in ("fp32", "bf16"):
            set_form(model, form, dtype)
            t = now()
            make()(noise, sigma)
            times[form].append(now() - t)
    set_form(model, "fp32", dtype)
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    return {"s_per_step_fp32_output": fp32, "s_per_step_bf16_output": bf16, "fp32_over_bf16": fp32 / bf16,
            "x0_rel_diff_bf16_vs_fp32": rel(outputs["bf16"], outputs["fp32"])}


def set_form(model, form: str, dtype) -> None:
    if form == "fp32":
        precision.compute_output_in_fp32(model)
    else:
        precision.compute_output_in(model, dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs: a smoke test on any machine")
    p.add_argument("--timed-steps", type=int, default=6, help="timed steps of each form, per placement")
    p.add_argument("--vram-gb", type=float, default=8.0, help="the small card's budget (GiB); 0 skips that row")
    p.add_argument("--out", default="precision.json")
    a = p.parse_args()
    allocator.configure()  # as the app does, before CUDA starts
    R = header(a.tiny, rows={})
    device, model, embeds, noise, cond = one_step_setup(a.tiny)
    dtype = model_dtype(device)

    def make():
        return denoiser_ops.Denoiser(model, embeds, None, 1.0, 0.0, 25, None, conditioning=cond)

    placements = [("all on the GPU", None, PlanOverrides())]
    if a.vram_gb:
        placements.append((f"{a.vram_gb:g} GB card", a.vram_gb, PlanOverrides(plan="streamed", fp8=False)))
    for name, vram_gb, overrides in placements:
        plan = bench_plan(overrides, vram_gb=vram_gb, tiny=a.tiny)
        with placed_as_planned(model, plan, tiny=a.tiny, device=device, vram_gb=vram_gb):
            R["rows"][name] = {"compiled": plan.components["transformer"].compile,
                               **alternating(model, make, noise, a.timed_steps, dtype)}
        print(name, R["rows"][name], flush=True)
    write_result(a.out, R)


if __name__ == "__main__":
    main()
