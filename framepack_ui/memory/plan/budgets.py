"""What a plan may use of a machine, and the check that a finished plan stays within it (or the shortfall, in GB,
and what would make it fit)."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ...errors import MemoryPlanError
from ...units import GB, MB
from ..probe import ComponentWeights, Machine
from .explain import gb_text
from .types import LoadPlan
from .vocabulary import Where

RAM_RESERVE_BYTES = 4 * GB  # left to the OS, browser and desktop of a laptop: planned RAM stays under total - this
VRAM_MARGIN_BYTES = 750 * MB  # CUDA context (when the figure is supposed), cuBLAS workspaces, fragmentation
COMMIT_MARGIN_BYTES = 1 * GB
# Page-locked memory cannot be paged out or dropped: the streamed blocks are pinned only where this much RAM (and
# commit) stays free beside the plan's largest phase, for the next prompt's text encoder (loaded while the
# transformer is kept), the page cache, the browser and other programs.
PIN_HEADROOM_BYTES = 8 * GB
# Free disk kept beside the fp8 cache when converting (memory/fp8.py refuses to write within 256 MB of full)
FP8_CONVERSION_MARGIN_BYTES = 1 * GB


class DoesNotFit(MemoryPlanError):
    """No placement fits the machine's budgets (overrides that cannot be honoured raise MemoryPlanError itself)."""


@dataclass(frozen=True)
class Budgets:
    """What a plan may use of a machine, in bytes."""
    ram: int
    vram: int
    commit: int | None  # None: commit is not enforced (Linux without vm.overcommit_memory=2) or not known


def budgets_for(machine: Machine, cuda: bool) -> Budgets:
    """RAM: what is free, at most the total less RAM_RESERVE_BYTES; VRAM: what is free less VRAM_MARGIN_BYTES
    (none where the plan leaves the GPU unused); commit: what is left less COMMIT_MARGIN_BYTES, where enforced."""
    ram = max(0, min(machine.ram_available_bytes, machine.ram_total_bytes - RAM_RESERVE_BYTES))
    vram = max(0, machine.vram_free_bytes - VRAM_MARGIN_BYTES) if cuda else 0
    commit = (machine.commit_available_bytes - COMMIT_MARGIN_BYTES
              if machine.commit_enforced and machine.commit_available_bytes is not None else None)
    return Budgets(ram, vram, commit)


def page_cache_room(plan: LoadPlan) -> int:
    """RAM the page cache can keep of the streamed transformer's file while it samples and decodes: the budget less
    the larger of those phases' anonymous memory."""
    return plan.ram_budget_bytes - max(plan.phase("sampling").ram_bytes, plan.phase("decode").ram_bytes)


def spills_from_page_cache(plan: LoadPlan, margin_bytes: int = 0) -> bool:
    """The transformer's blocks are streamed from its file map and the page cache cannot keep them all (with
    `margin_bytes` to spare): each step reads the rest from disk again."""
    t = plan.components["transformer"]
    return (plan.device == "cuda" and t.where == Where.GPU_STREAMED and not t.pinned_sources
            and t.page_cache_bytes + margin_bytes > page_cache_room(plan))


def shortfall(what: str, short_bytes: int, resource: str, fix: str) -> str:
    return f"{what} needs {short_bytes / GB:.1f} GB more {resource} than this machine has to spare: {fix}"


def check(plan: LoadPlan, weights: dict[str, ComponentWeights]) -> LoadPlan:
    """Raise MemoryPlanError (shortfall in GB and what would fit) if a phase exceeds a budget; else add notes."""
    notes = list(plan.notes)
    worst_ram = max(plan.phases, key=lambda p: p.ram_bytes)
    if worst_ram.ram_bytes > plan.ram_budget_bytes:
        short = worst_ram.ram_bytes - plan.ram_budget_bytes
        raise DoesNotFit(
            f"no plan fits: the {worst_ram.phase} phase needs {gb_text(worst_ram.ram_bytes)} of RAM and "
            f"{gb_text(plan.ram_budget_bytes)} can be used (total minus {RAM_RESERVE_BYTES / GB:.0f} GB for the "
            f"system, or what is free now): {short / GB:.1f} GB short; close other programs, add RAM, or lower "
            f"--resolution")
    if plan.commit_budget_bytes is not None and plan.peak_commit_bytes > plan.commit_budget_bytes:
        short = plan.peak_commit_bytes - plan.commit_budget_bytes
        disk = plan.machine.disk_free_bytes
        if plan.machine.pagefile_growable and (disk is None or disk > short + RAM_RESERVE_BYTES):
            # the manager pre-grows the system-managed pagefile before the load (prewarm.py) instead of
            # letting the load die with os error 1455
            notes.append(f"commit is {short / GB:.1f} GB short: the pagefile will be grown by that much before "
                         f"loading (Windows manages it; needs that much free disk)")
        else:
            raise DoesNotFit(
                f"no plan fits the commit limit: {gb_text(plan.peak_commit_bytes)} needed, "
                f"{gb_text(plan.commit_budget_bytes)} available: {short / GB:.1f} GB short; enlarge the pagefile (or "
                f"let Windows manage it) by at least {math.ceil(short / GB)} GB")
    if plan.device == "cuda":
        worst_vram = max(plan.phases, key=lambda p: p.vram_bytes)
        if worst_vram.vram_bytes > plan.vram_budget_bytes:
            short = worst_vram.vram_bytes - plan.vram_budget_bytes
            raise DoesNotFit(
                f"no plan fits the GPU: the {worst_vram.phase} phase needs {gb_text(worst_vram.vram_bytes)} of VRAM "
                f"and {gb_text(plan.vram_budget_bytes)} is free: {short / GB:.1f} GB short; lower --resolution, "
                f"close programs using the GPU, or use --plan mmap (CPU, slow)")
        t = plan.components["transformer"]
        if spills_from_page_cache(plan):
            notes.append(f"the page cache can keep about {gb_text(max(0, page_cache_room(plan)))} of the "
                         f"{gb_text(t.page_cache_bytes)} streamed each step: the rest is read from disk every "
                         f"step (slower, never the pagefile)")
    missing = sorted(n for n, w in weights.items() if not w.on_disk)
    if missing:
        notes.append(f"expected sizes (not on disk): {', '.join(missing)}")
    pinned = plan.components["transformer"].pinned_sources
    if any(c.where == Where.GPU_STREAMED and not c.pinned_sources for c in plan.components.values()):
        notes.append("gpu-streamed: blocks beyond the resident ones are copied from the read-only map each step "
                     "through two pinned block buffers" + ("" if pinned else " (the only pinned memory)"))
    if pinned:
        notes.append(f"pinned: the transformer's streamed blocks are held in page-locked RAM (uploaded without a "
                     f"host copy; {PIN_HEADROOM_BYTES / GB:.0f} GB of RAM stays free beside the largest phase)")
    return replace(plan, notes=tuple(notes))
