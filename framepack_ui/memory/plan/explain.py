"""A plan in words: the one-line summary, the table the CLI and the UI show, and the sizes in them."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...units import GB, MB
from .vocabulary import Storage, Where

if TYPE_CHECKING:
    from .types import ComponentPlan, LoadPlan


def gb_text(n: int | None) -> str:
    """Bytes as the plan shows them: "750M", "7.25G", "25.7G"; "-" for unknown."""
    if n is None:
        return "-"
    return f"{n / MB:.0f}M" if n < GB else f"{n / GB:.2f}G" if n < 10 * GB else f"{n / GB:.1f}G"


def summary_text(plan: LoadPlan) -> str:
    """One line: each model's place and the predicted peaks."""
    places = ", ".join(f"{c.name} {c.where}" + (f" {c.resident_blocks}/{c.total_blocks}"
                                                 if c.where == Where.GPU_STREAMED else "")
                       + (" fp8" if c.storage == Storage.FP8 else "")
                       for c in plan.components.values())
    vram = f", VRAM {gb_text(plan.peak_vram_bytes)}" if plan.device == "cuda" else ""
    return (f"{places}; predicted peak RAM {gb_text(plan.peak_ram_bytes)}, commit {gb_text(plan.peak_commit_bytes)}"
            f"{vram}")


def explain_text(plan: LoadPlan) -> str:
    """A table for the CLI and the UI: one line per model, one per phase, then the notes."""
    m = plan.machine
    lines = [f"Plan for {m.description}: RAM {gb_text(m.ram_total_bytes)} ({gb_text(m.ram_available_bytes)} free), "
             + (f"VRAM {gb_text(m.vram_total_bytes)} ({gb_text(m.vram_free_bytes)} free, {m.gpu_name})"
                if m.has_cuda else "no CUDA GPU")
             + (f", commit {gb_text(m.commit_available_bytes)} free of {gb_text(m.commit_limit_bytes)}"
                + ("" if m.commit_enforced else " (not enforced)") if m.commit_limit_bytes else "")
             + f"; resolution {plan.resolution}",
             f"Budgets: RAM {gb_text(plan.ram_budget_bytes)}, VRAM {gb_text(plan.vram_budget_bytes)}"
             + (f", commit {gb_text(plan.commit_budget_bytes)}" if plan.commit_budget_bytes is not None else ""),
             "",
             f"{'model':<14}{'where':<20}{'storage':<16}{'compute':<10}{'on disk':>9}{'RAM':>9}{'commit':>9}"
             f"{'VRAM':>9}{'cache':>9}  notes"]
    for c in plan.components.values():
        where = f"{c.where}" + (f" {c.resident_blocks}/{c.total_blocks}" if c.where == Where.GPU_STREAMED else "")
        storage = (f"{'fp8 e4m3' if c.storage == Storage.FP8 else c.storage_dtype} "
                   f"{'map' if c.storage in (Storage.MAP, Storage.FP8) else 'copy'}")
        lines.append(f"{c.name:<14}{where:<20}{storage:<16}{c.compute_dtype:<10}{gb_text(c.file_bytes):>9}"
                     f"{gb_text(c.ram_bytes):>9}{gb_text(c.commit_bytes):>9}{gb_text(c.vram_bytes):>9}"
                     f"{gb_text(c.page_cache_bytes):>9}  {'; '.join(_component_notes(c))}")
    lines += ["", f"{'phase':<14}{'models':<34}{'RAM':>9}{'commit':>9}{'VRAM':>9}{'cache':>9}"]
    for p in plan.phases:
        lines.append(f"{p.phase:<14}{', '.join(p.entries):<34}{gb_text(p.ram_bytes):>9}{gb_text(p.commit_bytes):>9}"
                     f"{gb_text(p.vram_bytes):>9}{gb_text(p.page_cache_bytes):>9}")
    lines.append(f"{'peak':<48}{gb_text(plan.peak_ram_bytes):>9}{gb_text(plan.peak_commit_bytes):>9}"
                 f"{gb_text(plan.peak_vram_bytes):>9}")
    lines += [f"- {n}" for n in plan.notes]
    return "\n".join(lines)


def _component_notes(c: ComponentPlan) -> list[str]:
    notes = [c.note] if c.note else []
    if c.park_for_decode:
        notes.append(f"resident blocks parked while the VAE decodes ({gb_text(c.parked_vram_bytes)} VRAM then)")
    if c.name == "vae" and c.compile:
        notes.append("compiled decoder")
    if c.name == "transformer" and (c.device == "cuda" or c.compile or c.attention or c.fp8_matmul):
        notes.append("compiled" if c.compile else "not compiled")
        notes.append(f"attention {c.attention or 'default'}")
        if c.storage == Storage.FP8:
            notes.append("fp8 matmul" if c.fp8_matmul else "no fp8 matmul (dequantized to bf16)")
    return notes


def decode_name(plan: LoadPlan) -> str:
    """How the plan's VAE decodes, in words: "in 384 px tiles" or "untiled"."""
    vae = plan.components["vae"]
    return f"in {vae.vae_tile_px} px tiles" if vae.vae_tiling else "untiled"


# Resolutions a leaner job may step down to (the bucket scale; below 256 px a video is a thumbnail)
LEANER_RESOLUTIONS = (640, 544, 480, 384, 320, 256)


def leaner_choices(plan: LoadPlan) -> str:
    """What to pick after running out of GPU memory under `plan`, in one line, leanest change first: the
    'streamed' profile where the transformer was all on the GPU, fp8 storage where its blocks were bf16 on the GPU
    (half the VRAM per resident block), a lower resolution (sampling's activations and the decode's tiles grow
    with it). A streamed plan already kept as many blocks on the GPU as the VRAM free at its start allowed: other
    programs that took VRAM since are the first suspect."""
    transformer = plan.components["transformer"]
    choices = []
    if transformer.where == Where.GPU:
        choices.append("the 'streamed' memory profile (--plan streamed)")
    if transformer.device == "cuda" and transformer.storage != Storage.FP8:
        choices.append("fp8 storage of the video model (--fp8)")
    lower = next((r for r in LEANER_RESOLUTIONS if r < plan.resolution), None)
    if lower is not None:
        choices.append(f"resolution {lower} (this job ran at {plan.resolution})")
    close = "close other programs using the GPU"
    if not choices:
        return close
    leaner = "pick " + ", or ".join(choices)
    return f"{close}, or {leaner}" if transformer.where == Where.GPU_STREAMED else leaner
