"""Job settings the tests share: short jobs on the tiny models. Read-only: a test that needs another value spreads
one into a new dict (`{**FAST, "seconds": 2.4}`)."""
from __future__ import annotations

from types import MappingProxyType

FAST = MappingProxyType(dict(resolution=64, steps=4, seconds=1.2))  # one section of a 64-px bucket
FAST_2_STEPS = MappingProxyType({**FAST, "steps": 2})  # the same with 2 steps
FAST_128PX = MappingProxyType({**FAST_2_STEPS, "resolution": 128, "seed": 7})  # 128-px bucket, 2 steps, seed 7
