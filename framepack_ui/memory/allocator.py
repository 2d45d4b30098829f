"""The allocators: the CUDA caching allocator's settings, and the C heap handing freed memory back.

The CUDA caching allocator's settings, applied before CUDA starts: by the probe (the app's and the CLI's first CUDA
use: a plan is made before anything loads) and by the benchmarks.

Growable segments instead of fixed ones, so the VAE decode's large activations and the transformer's blocks can take
turns in an 8 GB budget without fragmenting it: with fixed segments the simulated 8 GB card ran out of memory allocating
650 MiB in the first step after a decode, with 7.4 GiB of its 8 in use (H200, bench/bench_run.py --vram-gb 8;
docs/benchmarks.md, "Expandable segments and the decode cache handed back"). Linux only: torch does not support them on
Windows. A value the user set wins.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def configure(environ=os.environ, platform: str = sys.platform) -> None:
    """Set the allocator's defaults in `environ` (read by torch when CUDA first starts, not at import)."""
    if platform == "linux":
        environ.setdefault(ALLOC_CONF, "expandable_segments:True")


@functools.cache
def glibc_function(name: str):
    """glibc's function `name` (ctypes), or None where there is no glibc or no such function (Windows, macOS, musl,
    an older glibc)."""
    try:
        return getattr(ctypes.CDLL("libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def return_freed_heap(platform: str = sys.platform) -> bool:
    """Hand the C heap's freed pages back to the system (glibc's malloc_trim); True where it was called.

    Why: a model loaded through the CPU frees its tensors of up to 32 MiB into malloc's arenas, which keep them (glibc
    raises its mmap threshold after the first large free): a second job in one process held 0.87 GiB more
    anonymous memory than the first, 0.66 GiB of it freed memory malloc kept (docs/benchmarks.md, "Section state
    size").
    Called after each load and after models are freed: milliseconds."""
    trim = glibc_function("malloc_trim") if platform == "linux" else None
    if trim is None:
        return False
    trim(0)
    return True
