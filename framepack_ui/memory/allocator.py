"""The CUDA caching allocator's settings, applied before CUDA starts: by the probe (the app's and the CLI's first CUDA
use: a plan is made before anything loads) and by the benchmarks.

Growable segments instead of fixed ones, so the VAE decode's large activations and the transformer's blocks can take
turns in an 8 GB budget without fragmenting it: with fixed segments the simulated 8 GB card ran out of memory allocating
650 MiB in the first step after a decode, with 7.4 GiB of its 8 in use (H200, bench/bench_run.py --vram-gb 8;
docs/benchmarks.md, "Expandable segments and the decode cache handed back"). Linux only: torch does not support them on
Windows. A value the user set wins.
"""
from __future__ import annotations

import os
import sys

ALLOC_CONF = "PYTORCH_CUDA_ALLOC_CONF"


def configure(environ=os.environ, platform: str = sys.platform) -> None:
    """Set the allocator's defaults in `environ` (read by torch when CUDA first starts, not at import)."""
    if platform == "linux":
        environ.setdefault(ALLOC_CONF, "expandable_segments:True")
