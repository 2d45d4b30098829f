"""Where each model lives, decided before anything is loaded: a pure function of the machine and the weights.

`make_plan(machine, weights, overrides) -> LoadPlan`. No I/O, no torch: the same call plans this machine (from
`probe.probe_machine()`) or any other (`Machine.supposed(ram_gb=32, vram_gb=8)`). A plan that cannot fit raises
MemoryPlanError with the shortfall in GB and what would make it fit.

Phases run one after another (the engine's order) and a model not kept is freed at the end of its phase, so the
predicted peak is the largest phase, not the sum of all models:

    text      the text encoders (freed after)
    image     SigLIP (freed after) and the VAE (kept: it decodes every section)
    sampling  the transformer (kept for the whole job) and the VAE
    decode    the VAE decoding a section, the transformer still loaded (a streamed one with its resident blocks
              parked when the decode needs their VRAM: streaming.BlockStreamer.park)

The transformer's speed options (torch.compile of its blocks, the attention backend, fp8 matmuls) are decided here
too, from what the probe read (`Machine.compile_supported`, `Machine.cuda_capability`), unless overridden.

Where a component lives:
    gpu           resident in VRAM (loaded from the read-only file map where it can be: no RAM copy)
    gpu-streamed  N blocks resident in VRAM, the others copied in from the read-only file map each step through
                  two block-sized pinned buffers (memory/streaming.py): the transformer's blocks, or the text
                  encoder's decoder layers (once per prompt). Where RAM is plentiful (PIN_HEADROOM_BYTES left
                  beside it), the transformer's streamed blocks are held in page-locked RAM instead and uploaded
                  from there: one host copy fewer per step
    cpu           a private copy in RAM, computed on the CPU
    mmap          computed on the CPU straight from the read-only file map: not charged to the commit limit,
                  the OS can drop and re-read its pages, each module upcast to float32 only while it runs

Figures are bytes. RAM means anonymous memory (RssAnon): file-backed pages of a read-only map are listed apart as
"page cache", which the OS reclaims instead of swapping. Commit is what counts against Windows' commit limit (Linux:
VmData under `prlimit --data`).

The package, one job per module:
    catalogue   what the app loads and how: entries, phases, the dtype policy, the real models' weights
    measured    the benchmark figures the costs are built on, each with its source
    costs       the cost model: what a placement holds, each phase's activations and total
    budgets     what a plan may use of the machine, and the check that a plan fits
    placement   the decisions: make_plan
    explain     a plan in words (LoadPlan.summary, LoadPlan.explain)
    shares      each worker's share of a host with several GPUs (worker/pool.py)
    types       the dataclasses: PlanOverrides, ComponentPlan, PhaseCost, LoadPlan
    vocabulary  the words of a placement: Where, Storage
"""
from .budgets import COMMIT_MARGIN_BYTES, PIN_HEADROOM_BYTES, RAM_RESERVE_BYTES
from .catalogue import PLAN_CHOICES, VAE_TILE_OVERLAP_PX, fp8_weights, real_weights, with_real_defaults
from .costs import sampling_tokens
from .explain import leaner_choices
from .placement import make_plan
from .shares import host_share
from .types import ComponentPlan, LoadPlan, LoraCost, PhaseCost, PlanOverrides
from .vocabulary import Storage, Where

__all__ = ["COMMIT_MARGIN_BYTES", "PIN_HEADROOM_BYTES", "PLAN_CHOICES", "RAM_RESERVE_BYTES", "VAE_TILE_OVERLAP_PX",
           "ComponentPlan", "LoadPlan", "LoraCost", "PhaseCost", "PlanOverrides", "Storage", "Where", "fp8_weights",
           "host_share", "leaner_choices", "make_plan", "real_weights", "sampling_tokens", "with_real_defaults"]
