"""What the kernel says about this process and its cgroup, and the page cache: standard library only, so a
benchmark can use it before it imports torch (bench_app reads it around the app's first job, whose own imports it
measures)."""
from __future__ import annotations

import os
from pathlib import Path


def disk_read_bytes() -> int:
    """Bytes this process caused to be read from storage (/proc/self/io read_bytes: page faults on mapped files
    included; 0 where there is no such file)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except OSError:
        return 0


def cgroup_dir() -> Path | None:
    """This process's cgroup v2 folder (None on cgroup v1 or without /sys/fs/cgroup)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    group = next((line.split("::", 1)[1] for line in lines if line.startswith("0::")), None)
    if group is None or not Path("/sys/fs/cgroup/cgroup.controllers").exists():  # v1 or hybrid: not mounted there
        return None
    folder = Path("/sys/fs/cgroup") / group.lstrip("/")
    return folder if folder.is_dir() else None


def cgroup_memory() -> dict:
    """memory.max and memory.peak of this process's cgroup (v2), as the files say them."""
    base = cgroup_dir()
    if base is None:
        return {}
    return {k: (base / k).read_text().strip() for k in ("memory.max", "memory.peak") if (base / k).exists()}


def cgroup_read_bytes() -> int | None:
    """Bytes read from storage by this process's cgroup (v2 io.stat rbytes, every device); None without it."""
    base = cgroup_dir()
    try:
        text = (base / "io.stat").read_text() if base is not None else None
    except OSError:
        return None
    if text is None:
        return None
    return sum(int(field.split("=", 1)[1]) for line in text.splitlines() for field in line.split()[1:]
               if field.startswith("rbytes="))


def drop_page_cache(folder: Path) -> int:
    """Evict every file under `folder` from the page cache (written back first, then POSIX_FADV_DONTNEED), so the
    next reader reads it from disk and a memory cgroup charges that reader for what it caches. Returns the files'
    bytes."""
    total = 0
    for path in Path(folder).rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total
