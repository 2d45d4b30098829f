"""A load that ran out of host memory or commit, in one line: what it needed, what is free now, what to pick.

The plan refuses what cannot fit before anything loads; this is for what the plan did not see: other programs
that took memory since, Windows' commit limit reached while loading ("The paging file is too small for this
operation to complete. (os error 1455)"), or a data limit the probe does not read (Linux `prlimit --data`, the
test stand-in for the commit limit: its allocations fail with ENOMEM).
"""
from __future__ import annotations

import errno
import re
import sys

from ..units import GB
from .plan import ComponentPlan, Where
from .plan.explain import gb_text

WINDOWS_COMMIT_EXHAUSTED = 1455  # ERROR_COMMITMENT_LIMIT: "The paging file is too small..."
# How the libraries word it: torch's CPU allocator (Linux, Windows), safetensors' Rust io errors, the C runtime
_MESSAGES = re.compile(r"can't allocate memory|not enough memory|cannot allocate memory|os error (1455|12)\b|"
                       r"paging file is too small", re.I)


def out_of_host_memory(exc: BaseException) -> bool:
    """Whether `exc` says the process could not get host memory or commit (not VRAM: torch.OutOfMemoryError)."""
    if isinstance(exc, MemoryError):
        return True
    if isinstance(exc, OSError) and (exc.errno == errno.ENOMEM
                                     or getattr(exc, "winerror", None) == WINDOWS_COMMIT_EXHAUSTED):
        return True
    return type(exc).__name__ != "OutOfMemoryError" and bool(_MESSAGES.search(str(exc)))


def commit_free_now() -> int | None:
    """Commit the process can still take: the enforced commit limit's room (Windows; Linux with overcommit 2), or
    under a data limit (`prlimit --data`) the limit less the private memory already mapped (VmData); the smaller.
    None when neither limits it."""
    from .prewarm import default_allocator
    from .probe import read_process_memory

    allocator = default_allocator()
    room = [allocator.available_commit()] if allocator is not None else []
    if sys.platform.startswith("linux"):
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
        if soft != resource.RLIM_INFINITY:
            room.append(soft - read_process_memory().get("VmData", 0))
    room = [r for r in room if r is not None]
    return max(0, min(room)) if room else None


def ram_free_now() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def load_shortfall(name: str, c: ComponentPlan, commit_free: int | None, ram_free: int,
                   os_name: str = sys.platform) -> str:
    """One line: loading `name` as `c` places it failed for memory; what it needs against what is free now, and
    the leaner choices: the file map instead of a RAM copy, fp8 storage, a larger pagefile (Windows) or swap."""
    need_commit = c.commit_bytes + c.load_commit_bytes
    need_ram = c.ram_bytes + c.load_ram_bytes
    if commit_free is not None:
        need, free, what = need_commit, commit_free, "commit"
    else:
        need, free, what = need_ram, ram_free, "RAM"
    short = need - free
    figures = (f"it needs about {gb_text(need)} of {what} and {gb_text(free)} is free now"
               + (f" ({gb_text(short)} short)" if short > 0 else " (other programs may have taken it meanwhile)"))
    fixes = []
    if c.where == Where.CPU:
        fixes.append("the 'mmap' memory profile (--plan mmap: weights read from the file, not copied into RAM)")
    if name == "transformer" and c.storage != "fp8" and c.where != Where.CPU:
        fixes.append("fp8 storage of the video model (--fp8: half the bytes)")
    if os_name == "win32":
        more = f"by at least {-(-max(short, 0) // GB) or 1} GB" if short > 0 else "to 'System managed size'"
        fixes.append(f"a larger pagefile ({more})")
    else:
        fixes.append("closing other programs, or more swap")
    return f"not enough memory to load the {name} ({c.where}): {figures}; try " + ", or ".join(fixes)
