"""One reading of the machine's gauges (psutil + NVML), cheap enough to take every second.

Reads only: nothing here decides anything, and nothing imports torch (torch's own VRAM figure is read only when
some other module has already imported it). NVML failures (no NVIDIA driver, no GPU) never raise: the reading
says so in `gpu_note` instead.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..units import MB

log = logging.getLogger(__name__)

STARVED_GPU_UTIL_PCT = 20  # below this the GPU is mostly waiting...
STARVED_DISK_READ_MB_S = 200  # ...while the disk reads this much: weights are being paged back in from disk
NO_GPU_NOTE = "no NVIDIA GPU found"


@dataclass(frozen=True)
class GpuGauge:
    """One GPU's reading (NVML's numbering, which is CUDA's unless CUDA_VISIBLE_DEVICES reorders them)."""
    index: int
    name: str
    vram_used_bytes: int
    vram_total_bytes: int
    util_pct: float


@dataclass(frozen=True)
class Gauges:
    taken_at_s: float  # time.monotonic() of the reading
    ram_used_bytes: int
    ram_total_bytes: int
    process_rss_bytes: int  # this process (the app and its models)
    swap_used_bytes: int  # Linux swap; Windows pagefile
    swap_total_bytes: int
    commit_used_bytes: int  # Linux Committed_AS; elsewhere RAM + swap in use (an approximation)
    commit_limit_bytes: int  # Linux CommitLimit (enforced only with vm.overcommit_memory=2); elsewhere RAM + swap
    disk_read_bytes_total: int | None  # system-wide counter (None when the OS gives none); kept for the next delta
    disk_read_mb_s: float | None  # system-wide reads since the previous reading (None on the first one)
    gpu_available: bool
    gpu_note: str  # the GPU's name, or why there are no GPU figures, in words
    vram_used_bytes: int | None = None  # all processes, as NVML sees it
    vram_total_bytes: int | None = None
    torch_reserved_bytes: int | None = None  # this process's CUDA caching allocator, if torch is loaded
    gpu_util_pct: float | None = None
    gpus: tuple[GpuGauge, ...] = ()  # every GPU (the fields above are the first one's): a pool works on several


def read_gauges(nvml=None, previous: Gauges | None = None) -> Gauges:
    """Read every gauge now. `nvml` is a pynvml-like module (None: import `pynvml` from nvidia-ml-py);
    `previous` is the last reading, from which the disk read rate is computed."""
    now_s = time.monotonic()
    ram = psutil.virtual_memory()
    swap = psutil.swap_memory()
    commit_used, commit_limit = _commit(ram, swap)
    disk_total = _disk_read_bytes()
    rate = None
    if previous is not None and previous.disk_read_bytes_total is not None and disk_total is not None:
        span_s = now_s - previous.taken_at_s
        if span_s > 0:
            rate = max(disk_total - previous.disk_read_bytes_total, 0) / span_s / MB
    gpu = _read_gpu(nvml)
    return Gauges(
        taken_at_s=now_s,
        ram_used_bytes=int(ram.total - ram.available),  # what programs hold; cache the OS can drop is not "used"
        ram_total_bytes=int(ram.total),
        process_rss_bytes=_process_rss(),
        swap_used_bytes=int(swap.used),
        swap_total_bytes=int(swap.total),
        commit_used_bytes=commit_used,
        commit_limit_bytes=commit_limit,
        disk_read_bytes_total=disk_total,
        disk_read_mb_s=rate,
        torch_reserved_bytes=_torch_reserved(),
        **gpu,
    )


def starved(g: Gauges, generating: bool = True) -> str | None:
    """Plain-words warning when the GPU idles while the disk is busy reading during a generation: the models
    do not fit in RAM and are being read back from the pagefile/swap every step. None when that is not the case."""
    if not generating or not g.gpu_available or g.gpu_util_pct is None or g.disk_read_mb_s is None:
        return None
    if g.gpu_util_pct >= STARVED_GPU_UTIL_PCT or g.disk_read_mb_s <= STARVED_DISK_READ_MB_S:
        return None
    return (f"The GPU is waiting for the disk (GPU {g.gpu_util_pct:.0f}% busy, disk reading "
            f"{g.disk_read_mb_s:.0f} MB/s): the models do not fit in RAM and are read back from disk at every "
            "step, which makes generation many times slower. Fix: close other programs, choose a smaller memory "
            "profile, or add more RAM.")


def _commit(ram, swap) -> tuple[int, int]:
    meminfo = Path("/proc/meminfo")
    if sys.platform.startswith("linux") and meminfo.is_file():
        try:
            fields = dict(line.split(":", 1) for line in meminfo.read_text().splitlines() if ":" in line)
            kib = 1024
            return (int(fields["Committed_AS"].split()[0]) * kib, int(fields["CommitLimit"].split()[0]) * kib)
        except (OSError, KeyError, ValueError):
            log.debug("reading /proc/meminfo failed", exc_info=True)
    # Windows: psutil's swap is the pagefile part of GlobalMemoryStatusEx's commit figures
    return int(ram.total - ram.available + swap.used), int(ram.total + swap.total)


def _disk_read_bytes() -> int | None:
    # System-wide on purpose: Windows per-process I/O counters leave out paging reads, the very thing to see.
    try:
        counters = psutil.disk_io_counters()
    except (OSError, RuntimeError):
        return None
    return int(counters.read_bytes) if counters is not None else None


def _process_rss() -> int:
    try:
        return int(psutil.Process(os.getpid()).memory_info().rss)
    except psutil.Error:
        return 0


def _torch_reserved() -> int | None:
    torch = sys.modules.get("torch")  # never import it here: the UI process stays light until a job runs
    if torch is None:
        return None
    try:
        if torch.cuda.is_initialized():  # asking anything else could initialise CUDA
            return int(torch.cuda.memory_reserved())
    except Exception:  # a half-imported or broken torch must not break the gauges
        log.debug("torch.cuda.memory_reserved failed", exc_info=True)
    return None


def _read_device(nvml, index: int) -> GpuGauge:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    name = nvml.nvmlDeviceGetName(handle)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    util = nvml.nvmlDeviceGetUtilizationRates(handle)
    return GpuGauge(index, name.decode() if isinstance(name, bytes) else str(name), int(memory.used),
                    int(memory.total), float(util.gpu))


def _read_gpu(nvml) -> dict:
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return dict(gpu_available=False, gpu_note=f"{NO_GPU_NOTE} (nvidia-ml-py is not installed)")
    try:
        nvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded...: no NVIDIA driver here
        log.debug("nvmlInit failed", exc_info=True)
        return dict(gpu_available=False, gpu_note=NO_GPU_NOTE)
    try:
        count = nvml.nvmlDeviceGetCount()
        if count < 1:
            return dict(gpu_available=False, gpu_note=NO_GPU_NOTE)
        gpus = tuple(_read_device(nvml, index) for index in range(count))
        first = gpus[0]
        return dict(gpu_available=True, gpu_note=first.name, vram_used_bytes=first.vram_used_bytes,
                    vram_total_bytes=first.vram_total_bytes, gpu_util_pct=first.util_pct, gpus=gpus)
    except Exception as exc:  # a GPU that stops answering (driver reset, lost device) is a note, not a crash
        log.debug("NVML query failed", exc_info=True)
        return dict(gpu_available=False, gpu_note=f"NVIDIA GPU not readable: {' '.join(str(exc).split())[:120]}")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)
