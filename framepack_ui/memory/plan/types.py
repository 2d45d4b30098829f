"""What a plan is made of: the overrides a user may force, each entry's placement, each phase's cost, the plan."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..probe import Machine
from .explain import explain_text, summary_text
from .measured import VAE_SMALLEST_TILE_PX
from .vocabulary import Storage, Where


@dataclass(frozen=True)
class LoraCost:
    """What a job's LoRAs add to the transformer (memory/lora.py LoraSet.cost): their tensors on the compute device,
    and while a layer runs either its weight merged with its update or its output with the update added beside
    (compute/lora.py), at most the largest layer's."""
    params: int  # elements of every down and up matrix together
    largest_layer_params: int  # in x out of the largest layer with a LoRA
    layers: int
    largest_out_features: int = 0  # the widest output of a layer with a LoRA (the update added beside: tokens x out)


@dataclass(frozen=True)
class PlanOverrides:
    """What the user may force. `plan`: "auto", or one placement for the big models (see PLAN_CHOICES)."""
    plan: str = "auto"
    resolution: int = 640  # bucket scale in px: activations and VAE decode grow with it
    resident_blocks: int | None = None  # gpu-streamed: force N resident blocks
    vae_tiling: bool | None = None  # None: tile only when untiled decode does not fit
    # Transformer blocks stored as fp8 (memory/fp8.py): about half the bytes, bf16 compute. None: chosen by the
    # plan (fp8 where the bf16 blocks streamed from disk would not stay in the page cache and the fp8 ones would)
    fp8: bool | None = None
    # How the transformer computes (framepack_ui.compute); None: decided from the machine
    compile: bool | None = None  # torch.compile of each block's forward (auto: CUDA with Triton)
    attention: str | None = None  # one of compute.backends.ATTENTION_BACKENDS; None: diffusers' default (SDPA's choice)
    fp8_matmul: bool | None = None  # e4m3 matmuls (auto: fp8 storage on a GPU of compute capability 8.9+)
    pin_streamed: bool | None = None  # streamed transformer blocks in page-locked RAM (auto: where RAM allows)
    lora: LoraCost | None = None  # the job's LoRAs: counted beside the transformer
    # The sections to make, the job's and those queued after it: where they would not pay back compiling the VAE
    # decoder first, the job decodes eagerly and the decoder compiles in the idle time after it
    # (ComponentPlan.compile_later). None: as for a long job.
    sections: int | None = None


@dataclass(frozen=True)
class ComponentPlan:
    """One manager entry: where it lives and what it costs while loaded (and, transiently, while loading)."""
    name: str
    where: Where
    storage: Storage
    storage_dtype: str
    compute_dtype: str
    keep: bool
    ram_bytes: int  # anonymous RAM while loaded
    commit_bytes: int
    vram_bytes: int
    page_cache_bytes: int  # file pages it reads from (reclaimable, not commit)
    load_ram_bytes: int = 0  # extra, while loading only
    load_commit_bytes: int = 0
    resident_blocks: int | None = None  # gpu-streamed
    total_blocks: int | None = None
    vae_tiling: bool = False
    vae_tile_px: int = VAE_SMALLEST_TILE_PX  # with vae_tiling: the spatial tile (stride: VAE_TILE_OVERLAP_PX less)
    file_bytes: int = 0
    note: str = ""
    # gpu-streamed: the VRAM it holds with its resident blocks parked, and whether it parks them while the VAE
    # decodes (only where the decode needs their room)
    parked_vram_bytes: int = 0
    park_for_decode: bool = False
    pinned_sources: bool = False  # gpu-streamed: the streamed blocks held in page-locked RAM, not read from the map
    # transformer speed options (framepack_ui.compute)
    compile: bool = False
    # the VAE: not compiled for this job, but to be compiled while the worker is idle after it (the plans after that
    # compile it: PlanOverrides.sections)
    compile_later: bool = False
    attention: str | None = None
    fp8_matmul: bool = False
    lora_bytes: int = 0  # the LoRAs' tensors and their transient merge, included in vram_bytes or ram_bytes

    @property
    def device(self) -> str:
        return "cuda" if self.where in (Where.GPU, Where.GPU_STREAMED) else "cpu"


@dataclass(frozen=True)
class PhaseCost:
    phase: str
    entries: tuple[str, ...]
    ram_bytes: int  # anonymous, including the runtime baseline
    commit_bytes: int
    vram_bytes: int
    page_cache_bytes: int
    activation_ram_bytes: int
    activation_vram_bytes: int
    frames_ram_bytes: int = 0  # decoded frames held on the host (costs.frames_on_host)


@dataclass(frozen=True)
class LoadPlan:
    machine: Machine
    device: str  # "cuda" or "cpu": where the engine computes by default
    components: dict[str, ComponentPlan]
    phases: tuple[PhaseCost, ...]
    ram_budget_bytes: int
    vram_budget_bytes: int
    commit_budget_bytes: int | None
    resolution: int
    notes: tuple[str, ...] = ()

    @property
    def peak_ram_bytes(self) -> int:
        return max(p.ram_bytes for p in self.phases)

    @property
    def peak_commit_bytes(self) -> int:
        return max(p.commit_bytes for p in self.phases)

    @property
    def peak_vram_bytes(self) -> int:
        return max(p.vram_bytes for p in self.phases)

    def summary(self) -> str:
        """One line: each model's place and the predicted peaks."""
        return summary_text(self)

    def phase(self, name: str) -> PhaseCost:
        return next(p for p in self.phases if p.phase == name)

    def explain(self) -> str:
        """A table for the CLI and the UI: one line per model, one per phase, then the notes."""
        return explain_text(self)

    def with_component(self, name: str, **changes) -> LoadPlan:
        """A copy whose component `name` is `dataclasses.replace(old, **changes)`: for forcing one placement, e.g.
        in tests. The phase costs are not recomputed."""
        return replace(self, components={**self.components, name: replace(self.components[name], **changes)})
