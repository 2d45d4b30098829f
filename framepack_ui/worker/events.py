"""Events the worker adds to the engine's (framepack_ui.events) for a job that waits in its queue."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Queued:
    """The job waits in the worker's queue; sent on submit and again whenever it moves up."""
    position: int  # 1 = starts next (after the running job, if any)


@dataclass(frozen=True)
class Estimated:
    """How long the job is expected to take, said as it starts (speed.py); the engine's ETA takes over from its
    first step."""
    total_s: float | None  # None: unknown
    source: str  # where the figure comes from, in words
