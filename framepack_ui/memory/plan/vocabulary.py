"""The placement vocabulary: where a component lives (Where) and where its weights are read from (Storage). Each
member is the str it stands for: it compares, hashes and prints as "gpu", "map", ..."""
from __future__ import annotations

from enum import Enum


class _Word(str, Enum):
    """A str-valued enum that prints as its value (str(), f-strings, format specs), like the plain string it
    stands for, on every Python version."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Where(_Word):
    """Where a component lives and computes."""
    GPU = "gpu"  # resident in VRAM
    GPU_STREAMED = "gpu-streamed"  # some blocks resident in VRAM, the others copied in each step
    CPU = "cpu"  # a private copy in RAM, computed on the CPU
    MMAP = "mmap"  # computed on the CPU from the read-only file map


class Storage(_Word):
    """Where a component's weights are read from."""
    MAP = "map"  # the read-only file map of the safetensors files
    RAM = "ram"  # a private copy made by the library's loader
    FP8 = "fp8"  # the read-only map of the fp8 cache (memory/fp8.py)
