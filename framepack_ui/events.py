"""Typed events that flow back from the engine (and later the worker) to whoever drives it.

Small frozen dataclasses rather than string-tagged tuples: a consumer matches on the type.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Phase:
    """A named stage started: loading a model, encoding the prompt, decoding a section..."""
    name: str
    detail: str = ""


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not an error (a truncated prompt, a picked seed)."""
    message: str


@dataclass(frozen=True)
class Step:
    """One sampler step finished. `preview` is a uint8 (H, W, 3) strip of the section's frames, or None."""
    section: int  # 0-based
    sections: int
    step: int  # 1-based within the section
    steps: int
    elapsed_s: float
    eta_s: float | None
    preview: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SectionSaved:
    """A section is decoded and its final frames are on disk; `path` plays up to them."""
    section: int  # 0-based
    sections: int
    path: str
    frames_written: int  # frames the file holds now (held-back overlap frames and the muxer's newest excluded)
    elapsed_s: float


@dataclass(frozen=True)
class Progress:
    """A long task of a phase, part way: `done` of `total` (bytes, for the fp8 conversion), time left if known."""
    task: str  # what, in words
    done: int
    total: int
    eta_s: float | None = None


@dataclass(frozen=True)
class Finished:
    path: str
    settings_path: str
    frames: int
    elapsed_s: float


@dataclass(frozen=True)
class Stopped:
    """The user stopped the job; the finished sections are kept in `path` (None if nothing was made)."""
    path: str | None
    frames: int


@dataclass(frozen=True)
class Failed:
    message: str  # one line, for the user
    path: str | None = None  # what was kept, if anything
    reason: str = "internal"  # "input", "models", "memory", "disk" (the user can act on it) or "internal"


TERMINAL = (Finished, Stopped, Failed)  # how a job ends: exactly one of these is its last event


@dataclass(frozen=True)
class CacheReport:
    """A section's model calls and how many of them the step cache computed (the others reused the residual the
    blocks added at the last computed call); `method`: spec.CACHE_METHODS."""
    section: int  # 0-based
    sections: int
    method: str
    computed: int
    calls: int
