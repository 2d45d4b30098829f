"""Grow a system-managed Windows pagefile ahead of a load, so the load does not fail with os error 1455.

Windows grows a system-managed pagefile when a commit approaches the commit limit, but a large allocation made
at once can fail before the file has grown. So, when the commit a load needs exceeds what is available, commit
(without touching: touching gigabytes would evict everything else from RAM) in 256 MB steps until the commit
limit has grown far enough, hold that reservation until just before the load takes its memory, then release it:
the grown pagefile stays (Windows shrinks it only when it is unused for long, or at reboot).

Linux has no pagefile to grow: commit is enforced only with vm.overcommit_memory=2, and then a short commit is
a clear one-line MemoryPlanError (add swap, close programs).

The OS calls sit behind a small allocator interface (`available_commit`, `reserve`, `release`,
`pagefile_system_managed`, `can_grow`) so that tests drive the Windows logic on Linux with fake commit values.
The Windows allocator itself is UNTESTED ON WINDOWS: checked here only through ctypes structure sizes and the
parsing of the registry value.
"""
from __future__ import annotations

import ctypes
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ..errors import MemoryPlanError
from ..units import GB
from .probe import MEMORYSTATUSEX, parse_meminfo, windows_pagefile_system_managed

log = logging.getLogger(__name__)

MIB = 1024 * 1024
STEP_BYTES = 256 * MIB
GROW_RETRIES = 3  # a commit can fail while the pagefile is still being extended: retry a step before giving up
RETRY_PAUSE_S = 0.2


@dataclass(frozen=True)
class PrewarmProgress:
    reserved_bytes: int  # committed (untouched) by the pre-warm so far
    target_bytes: int  # reserved + available must reach this (the commit the load needs)
    available_bytes: int  # available commit now (the reservation already taken out)

    @property
    def fraction(self) -> float:
        return min(1.0, (self.reserved_bytes + self.available_bytes) / max(1, self.target_bytes))


class CommitAllocator(Protocol):
    can_grow: bool  # a pagefile that grows on demand can exist here (Windows); Linux: False

    def available_commit(self) -> int | None: ...  # None: commit is not limited (Linux heuristic overcommit)

    def pagefile_system_managed(self) -> bool: ...

    def reserve(self, nbytes: int) -> object | None: ...  # a handle, or None when the commit failed

    def release(self, handle: object) -> None: ...


class Reservation:
    """Commit held by the pre-warm; `release()` (idempotent) gives it all back."""

    def __init__(self, allocator: CommitAllocator | None = None):
        self.allocator = allocator
        self.handles: list[object] = []
        self.reserved_bytes = 0

    def release(self) -> None:
        while self.handles:
            handle = self.handles.pop()
            try:
                self.allocator.release(handle)
            except Exception:  # never leave the rest held because one release failed
                log.exception("releasing a commit reservation failed")
        self.reserved_bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def short_of(needed_bytes: int, allocator: CommitAllocator | None) -> int:
    """Bytes of commit missing for `needed_bytes` now (0 when enough, or when commit is not limited)."""
    if allocator is None:
        return 0
    available = allocator.available_commit()
    return 0 if available is None else max(0, needed_bytes - available)


def prewarm(needed_bytes: int, allocator: CommitAllocator | None,
            progress: Callable[[PrewarmProgress], None] | None = None, step_bytes: int = STEP_BYTES,
            sleep: Callable[[float], None] = time.sleep) -> Reservation:
    """Make `needed_bytes` of commit available, growing the pagefile if it must; returns the held reservation
    (empty when nothing was needed). Raises MemoryPlanError, with everything released, when it cannot."""
    reservation = Reservation(allocator)
    short = short_of(needed_bytes, allocator)
    if not short:
        return reservation
    available = allocator.available_commit()
    if not allocator.can_grow:
        raise MemoryPlanError(
            f"the commit limit leaves {available / GB:.1f} GB and loading needs {needed_bytes / GB:.1f} GB "
            f"({short / GB:.1f} GB short); Linux enforces it (vm.overcommit_memory=2) and has no pagefile to grow: "
            f"add at least {-(-short // GB)} GB of swap, or close other programs")
    if not allocator.pagefile_system_managed():
        raise MemoryPlanError(
            f"loading needs {needed_bytes / GB:.1f} GB of commit and {available / GB:.1f} GB is available "
            f"({short / GB:.1f} GB short), and the pagefile has a fixed size: enlarge it by at least "
            f"{-(-short // GB)} GB or set it to 'System managed size'")
    log.info("pre-warming the pagefile: %.1f GB of commit short", short / GB)
    try:
        while True:
            available = allocator.available_commit() or 0
            if reservation.reserved_bytes + available >= needed_bytes:
                break
            handle = None
            for attempt in range(GROW_RETRIES):
                handle = allocator.reserve(step_bytes)
                if handle is not None:
                    break
                sleep(RETRY_PAUSE_S)
            if handle is None:
                raise MemoryPlanError(
                    f"the pagefile could not grow far enough: loading needs {needed_bytes / GB:.1f} GB of commit "
                    f"and only {(reservation.reserved_bytes + available) / GB:.1f} GB could be reserved; free disk "
                    f"space on the pagefile's drive, enlarge the pagefile, or close other programs")
            reservation.handles.append(handle)
            reservation.reserved_bytes += step_bytes
            if progress is not None:
                progress(PrewarmProgress(reservation.reserved_bytes, needed_bytes, allocator.available_commit() or 0))
    except BaseException:
        reservation.release()
        raise
    return reservation


# --- Linux ---------------------------------------------------------------------------------------------------------

class LinuxCommit:
    """Reads CommitLimit - Committed_AS when the kernel enforces it; nothing to grow, nothing to reserve."""
    can_grow = False

    def available_commit(self) -> int | None:
        try:
            with open("/proc/sys/vm/overcommit_memory") as f:
                if f.read().strip() != "2":
                    return None
            with open("/proc/meminfo") as f:
                info = parse_meminfo(f.read())
        except OSError:
            return None
        return info["CommitLimit"] - info["Committed_AS"]

    def pagefile_system_managed(self) -> bool:
        return False

    def reserve(self, nbytes: int):
        return None

    def release(self, handle) -> None:
        pass


# --- Windows (UNTESTED ON WINDOWS) -----------------------------------------------------------------------------------

MEM_COMMIT = 0x00001000
MEM_RESERVE = 0x00002000
MEM_RELEASE = 0x00008000
PAGE_READWRITE = 0x04
class WindowsCommit:
    """VirtualAlloc(MEM_RESERVE | MEM_COMMIT) without writing: charged to the commit limit (so the pagefile grows)
    but no page is touched, so nothing is evicted. UNTESTED ON WINDOWS."""
    can_grow = True

    def __init__(self):
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
        self._alloc = kernel32.VirtualAlloc
        self._alloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32, ctypes.c_uint32]
        self._alloc.restype = ctypes.c_void_p
        self._free = kernel32.VirtualFree
        self._free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint32]
        self._free.restype = ctypes.c_int
        self._status = kernel32.GlobalMemoryStatusEx
        self._status.argtypes = [ctypes.POINTER(MEMORYSTATUSEX)]
        self._status.restype = ctypes.c_int

    def available_commit(self) -> int | None:
        status = MEMORYSTATUSEX()
        status.dwLength = ctypes.sizeof(MEMORYSTATUSEX)
        if not self._status(ctypes.byref(status)):
            raise OSError(ctypes.get_last_error(), "GlobalMemoryStatusEx failed")
        return int(status.ullAvailPageFile)

    def pagefile_system_managed(self) -> bool:
        return windows_pagefile_system_managed()

    def reserve(self, nbytes: int):
        address = self._alloc(None, nbytes, MEM_RESERVE | MEM_COMMIT, PAGE_READWRITE)
        return address or None  # NULL: the commit failed (ERROR_COMMITMENT_LIMIT, 1455)

    def release(self, handle) -> None:
        if not self._free(handle, 0, MEM_RELEASE):
            raise OSError(ctypes.get_last_error(), "VirtualFree failed")


def default_allocator() -> CommitAllocator | None:
    if sys.platform == "win32":
        try:
            return WindowsCommit()
        except (OSError, AttributeError):
            log.exception("the Windows commit allocator is unavailable: no pagefile pre-warm")
            return None
    if sys.platform.startswith("linux"):
        return LinuxCommit()
    return None
