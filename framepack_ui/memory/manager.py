"""Lends models to the engine and decides how long they stay.

The official demo loads everything at start and never frees it (~43 GB of RAM). Here a model is loaded when
first asked for, and the big, once-per-job ones (the 15 GB text encoder, SigLIP) are freed as soon as their
phase ends, so the peak is the largest phase rather than the sum of all models.
"""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import loading

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype
    keep: bool  # stays loaded after use (reused every section) or freed at the end of the phase


def default_placements(device: torch.device) -> dict[str, Placement]:
    """Half precision on the GPU as the official demo; float32 on the CPU, where half-precision kernels are slow."""
    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.float32
    brain = torch.bfloat16 if cuda else torch.float32
    return {
        "text_encoders": Placement(device, half, keep=False),
        "image_encoder": Placement(device, half, keep=False),
        "vae": Placement(device, half, keep=True),
        "transformer": Placement(device, brain, keep=True),
    }


_LOADERS: dict[str, Callable] = {
    "text_encoders": lambda d, p: (*loading.load_tokenizers(d),
                                   loading.load_text_encoder(d, p.dtype, p.device),
                                   loading.load_text_encoder_2(d, p.dtype, p.device)),
    "image_encoder": lambda d, p: loading.load_image_encoder(d, p.dtype, p.device),
    "vae": lambda d, p: loading.load_vae(d, p.dtype, p.device),
    "transformer": lambda d, p: loading.load_transformer(d, p.dtype, p.device),
}


class ModelManager:
    """`with manager.use("vae") as vae:` loads on first use and frees per the placement's `keep`."""

    def __init__(self, models_dir: Path, device: torch.device | str = "cpu",
                 placements: dict[str, Placement] | None = None):
        self.models_dir = Path(models_dir)
        self.device = torch.device(device)
        self.placements = placements or default_placements(self.device)
        self._loaded: dict[str, object] = {}
        self.load_count: dict[str, int] = {}  # how often each was loaded: lets tests check eviction and reuse

    def placement(self, name: str) -> Placement:
        return self.placements[name]

    @contextmanager
    def use(self, name: str):
        if name not in self._loaded:
            log.info("loading %s (%s, %s)", name, self.placements[name].device, self.placements[name].dtype)
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
            if self._loaded.pop(key, None) is not None:
                log.info("freed %s", key)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
