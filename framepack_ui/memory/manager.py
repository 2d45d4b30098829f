"""Lends models to the engine and decides how long they stay.

The official demo loads everything at start and never frees it (~43 GB of RAM). Here a model is loaded when
first asked for, and the big, once-per-job ones (the 15 GB text encoder, SigLIP) are freed as soon as their
phase ends, so the peak is the largest phase rather than the sum of all models.

Where each model lives comes from a LoadPlan (plan.py) turned into Placements: the manager applies it and decides
nothing. Without a plan, `default_placements` keeps the old behaviour, except that the transformer is always read
from its read-only file map (same numbers, no RAM copy, nothing charged to the commit limit).
"""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import MemoryPlanError
from . import loading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype  # compute dtype
    keep: bool  # stays loaded after use (reused every section) or freed at the end of the phase
    storage: str = "ram"  # "map": weights read-only-mapped from the files (storage.py); "ram": the library's loader
    resident_blocks: int | None = None  # set: stream the transformer's other blocks to the GPU (streaming.py)
    vae_tiling: bool = False


def default_placements(device: torch.device) -> dict[str, Placement]:
    """Half precision on the GPU as the official demo; float32 on the CPU, where half-precision kernels are slow."""
    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    brain = torch.bfloat16 if cuda else torch.float32
    return {
        "text_encoders": Placement(device, half, keep=False),
        "image_encoder": Placement(device, half, keep=False),
        "vae": Placement(device, half, keep=True),
        "transformer": Placement(device, brain, keep=True, storage="map"),
    }


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def placements_from_plan(plan) -> dict[str, Placement]:
    """A LoadPlan's decisions in the manager's terms (no decision is made here)."""
    result = {}
    for name, c in plan.components.items():
        result[name] = Placement(torch.device(c.device), _DTYPES[c.compute_dtype], c.keep, c.storage,
                                 c.resident_blocks if c.where == "gpu-streamed" else None, c.vae_tiling)
    return result


def _check_supported(placements: dict[str, Placement]) -> None:
    streamed = [name for name, p in placements.items() if p.resident_blocks is not None]
    if streamed not in ([], ["transformer"]) or (streamed and placements["transformer"].storage != "map"):
        raise MemoryPlanError("only the transformer can be streamed, and only from its read-only file map")


def _load_transformer(d: Path, p: Placement):
    if p.resident_blocks is None:
        return loading.load_transformer(d, p.dtype, p.device, p.storage)
    from .streaming import stream_transformer

    # Streamed: mapped on the CPU first (the streamed blocks' sources stay there, file-backed), then the
    # embedders and the first `resident_blocks` blocks go to the device and the rest pass through the
    # streamer's two pinned block buffers each forward.
    model = loading.load_transformer(d, p.dtype, torch.device("cpu"), "map")
    model._framepack_streamer = stream_transformer(model, p.device, p.resident_blocks)
    return model


_LOADERS: dict[str, Callable] = {
    "text_encoders": lambda d, p: (*loading.load_tokenizers(d),
                                   loading.load_text_encoder(d, p.dtype, p.device, p.storage),
                                   loading.load_text_encoder_2(d, p.dtype, p.device, p.storage)),
    "image_encoder": lambda d, p: loading.load_image_encoder(d, p.dtype, p.device),
    "vae": lambda d, p: loading.load_vae(d, p.dtype, p.device, p.vae_tiling),
    "transformer": _load_transformer,
}


class ModelManager:
    """`with manager.use("vae") as vae:` loads on first use and frees per the placement's `keep`."""

    def __init__(self, models_dir: Path, device: torch.device | str = "cpu",
                 placements: dict[str, Placement] | None = None, plan=None):
        self.models_dir = Path(models_dir)
        self.device = torch.device(plan.device if plan is not None else device)
        self.plan = plan  # the LoadPlan applied, if any (the UI and CLI show plan.explain())
        self.placements = placements or (placements_from_plan(plan) if plan is not None
                                         else default_placements(self.device))
        _check_supported(self.placements)  # before anything loads: never fail half-way through a job
        self._loaded: dict[str, object] = {}
        self.load_count: dict[str, int] = {}  # how often each was loaded: lets tests check eviction and reuse

    def placement(self, name: str) -> Placement:
        return self.placements[name]

    @contextmanager
    def use(self, name: str):
        if name not in self._loaded:
            p = self.placements[name]
            log.info("loading %s (%s, %s, %s)", name, p.device, p.dtype,
                     "read-only file map" if p.storage == "map" else "RAM copy")
            self._loaded[name] = _LOADERS[name](self.models_dir, self.placements[name])
            self.load_count[name] = self.load_count.get(name, 0) + 1
        try:
            yield self._loaded[name]
        finally:
            if not self.placements[name].keep:
                self.free(name)

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def free(self, name: str | None = None) -> None:
        """Drop one model (or all) and give the memory back to the system."""
        for key in [name] if name else list(self._loaded):
            model = self._loaded.pop(key, None)
            if model is not None:
                streamer = getattr(model, "_framepack_streamer", None)
                if streamer is not None:
                    streamer.close()  # waits for in-flight copies, removes its hooks
                log.info("freed %s", key)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
