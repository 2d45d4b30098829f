"""Reads the machine and the weights on disk. Reads only: every decision is in the plan (memory/plan/).

`probe_machine()` returns a frozen `Machine`; tests and `plan --ram/--vram` build a `Machine` directly instead.
`weights_on_disk(models_dir)` reads the safetensors headers (not the data) of every component present.
"""
from __future__ import annotations

import ctypes
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..units import GB
from ..weights.layout import COMPONENTS

log = logging.getLogger(__name__)

KIB = 1024

# Components whose weights the plan places (tokenizers and the feature extractor have none worth counting).
WEIGHT_COMPONENTS = ("text_encoder", "text_encoder_2", "image_encoder", "vae", "transformer")
# (index file, single file) of each component's weights, as in the real repositories
WEIGHT_FILES = {
    "text_encoder": ("model.safetensors.index.json", "model.safetensors"),
    "text_encoder_2": (None, "model.safetensors"),
    "image_encoder": (None, "model.safetensors"),
    "vae": (None, "diffusion_pytorch_model.safetensors"),
    "transformer": ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
}
# The blocks a streamer can move one at a time: the transformer's dual and single blocks, Llama's decoder layers
_BLOCK_KEYS = {"transformer": re.compile(r"^((?:single_)?transformer_blocks)\.(\d+)\."),
               "text_encoder": re.compile(r"^((?:model\.)?layers)\.(\d+)\.")}
_EMBEDDING_TABLE = re.compile(r"(embed_tokens|token_embedding|position_embedding)\.weight$")
# The tensor whose shape gives a component's width (for activation estimates), and which axis
_WIDTH_KEYS = {"text_encoder": ("embed_tokens.weight", 1),
               "text_encoder_2": ("text_model.embeddings.token_embedding.weight", 1),
               "image_encoder": ("vision_model.post_layernorm.weight", 0),
               "vae": ("decoder.conv_out.conv.weight", 1)}


@dataclass(frozen=True)
class Machine:
    """What the machine has, as read (or as supposed, for planning another machine). Bytes throughout."""
    ram_total_bytes: int
    ram_available_bytes: int
    swap_total_bytes: int = 0
    swap_free_bytes: int = 0
    # Commit: Windows' commit limit (RAM + pagefile) and what is left of it; Linux's CommitLimit and
    # CommitLimit - Committed_AS, which the kernel enforces only when vm.overcommit_memory == 2.
    commit_limit_bytes: int | None = None
    commit_available_bytes: int | None = None
    commit_enforced: bool = False
    vram_total_bytes: int = 0  # 0: no CUDA device
    vram_free_bytes: int = 0
    gpu_name: str = ""
    cuda_capability: tuple[int, int] = (0, 0)  # (major, minor) of CUDA device 0; fp8 matmuls need (8, 9)
    compile_supported: bool = False  # torch.compile can generate code for the GPU (compute.backends.compile_supported)
    # The compiled VAE decoder on that GPU (compute.compile.decoder_compile_state): "ready" in this process, "cached"
    # on disk, "cold" (what a planned machine supposes: a fresh start) or "failed"
    decoder_compile: str = "cold"
    disk_free_bytes: int | None = None  # on the models folder's volume
    os_name: str = "linux"  # "linux" | "windows" | "darwin"
    # Windows with a system-managed pagefile: commit can grow (pre-warm, prewarm.py) as far as the disk allows
    pagefile_growable: bool = False
    description: str = "this machine"

    @property
    def has_cuda(self) -> bool:
        return self.vram_total_bytes > 0

    @classmethod
    def supposed(cls, ram_gb: float, vram_gb: float = 0.0, os_name: str = "windows") -> "Machine":
        """Another machine, from its RAM and VRAM sizes alone: all of it free, commit unknown (pagefile)."""
        ram, vram = int(ram_gb * GB), int(vram_gb * GB)
        return cls(ram_total_bytes=ram, ram_available_bytes=ram, vram_total_bytes=vram, vram_free_bytes=vram,
                   gpu_name="supposed GPU" if vram else "", os_name=os_name,
                   description=f"a supposed machine with {ram_gb:g} GB RAM" + (f", {vram_gb:g} GB VRAM" if vram else
                                                                               ", no GPU"))

    def with_returned(self, ram_bytes: int, commit_bytes: int, vram_bytes: int) -> "Machine":
        """This machine as if memory this process holds were free again: the models a worker keeps between jobs
        (it frees them before it places any others), so the next job is not planned around them."""
        commit = self.commit_available_bytes
        return replace(self, ram_available_bytes=min(self.ram_total_bytes, self.ram_available_bytes + ram_bytes),
                       commit_available_bytes=None if commit is None else commit + commit_bytes,
                       vram_free_bytes=min(self.vram_total_bytes, self.vram_free_bytes + vram_bytes))


@dataclass(frozen=True)
class ComponentWeights:
    """A component's weights as stored on disk (from the safetensors headers)."""
    name: str
    file_bytes: int  # tensor data bytes, all shards
    params: int  # elements
    storage_itemsize: int  # bytes per element of the dtype holding most bytes (2 = bf16/fp16)
    largest_tensor_bytes: int  # as stored; embedding tables left out (an upcast converts only the rows looked up)
    block_bytes: tuple[int, ...] = ()  # bytes of each block as stored: transformer dual then single, Llama layers
    hidden_size: int = 0  # transformer width (heads x head dim), for activation estimates
    heads: int = 0
    tokens: int = 0  # image encoder: tokens per image (position embedding rows; 729 for the real SigLIP)
    on_disk: bool = True  # False: the expected size of files not (yet) there
    dtype: str = ""  # safetensors name of the dtype holding most bytes ("BF16", "F16", "F32", "F8_E4M3")
    fp8_cached: bool = False  # transformer: its fp8 cache is on disk (memory/fp8.py), so fp8 needs no conversion
    files: tuple[str, ...] = field(default=(), compare=False)


# --- RAM and commit ---------------------------------------------------------------------------------------------

def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> bytes by key ("MemTotal", "CommitLimit", ...)."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key.strip()] = int(parts[0]) * (KIB if len(parts) > 1 and parts[1] == "kB" else 1)
    return values


def _linux_memory() -> dict:
    try:
        overcommit = int(Path("/proc/sys/vm/overcommit_memory").read_text().strip())
    except (OSError, ValueError):
        overcommit = 0
    return linux_memory_from(Path("/proc/meminfo").read_text(), overcommit, _cgroup_memory())


def linux_memory_from(meminfo: str, overcommit: int, cgroup: tuple[int, int] | None = None) -> dict:
    """Machine fields from /proc/meminfo's text and vm.overcommit_memory. RAM available is the kernel's
    MemAvailable: free memory plus the page cache it can drop, less what it must keep. `cgroup`: (limit, anonymous
    memory in use) of the memory cgroup the app runs in (a container, a `systemd-run -p MemoryMax=`): /proc/meminfo
    describes the whole host, and the app must plan within the group's limit."""
    info = parse_meminfo(meminfo)
    if cgroup is not None and cgroup[0] < info["MemTotal"]:
        limit, anon = cgroup
        info["MemTotal"] = limit
        info["MemAvailable"] = max(0, min(info.get("MemAvailable", info.get("MemFree", 0)), limit - anon))
    limit, committed = info.get("CommitLimit"), info.get("Committed_AS")
    return dict(ram_total_bytes=info["MemTotal"], ram_available_bytes=info.get("MemAvailable", info.get("MemFree", 0)),
                swap_total_bytes=info.get("SwapTotal", 0), swap_free_bytes=info.get("SwapFree", 0),
                commit_limit_bytes=limit,
                commit_available_bytes=None if limit is None or committed is None else limit - committed,
                commit_enforced=overcommit == 2)


def _cgroup_memory(root: Path = Path("/sys/fs/cgroup"), self_cgroup: Path = Path("/proc/self/cgroup")):
    """(limit, anonymous bytes in use) of this process's memory cgroup, v2 or v1; None without a limit. v2: the
    smallest memory.max from the process's group up to the root; v1: the hierarchical limit. Inside a container the
    group's own folder is the mount's root, which is read where the host path is not there."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        v2 = controllers == ""
        if not v2 and "memory" not in controllers.split(","):
            continue
        mount = root if v2 else root / "memory"
        folder = mount / path.lstrip("/")
        if not (folder / "memory.stat").is_file():
            folder = mount
        try:
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines() if " " in line)
        except (OSError, ValueError):
            continue
        limits = [_limit(level / "memory.max") for level in (folder, *folder.parents) if level.is_relative_to(mount)]
        if not v2:
            limits = [_limit(folder / "memory.limit_in_bytes"), _limit_text(stat.get("hierarchical_memory_limit"))]
        limits = [limit for limit in limits if limit is not None]
        if limits:
            return min(limits), int(stat.get("anon" if v2 else "total_rss", 0))
    return None


def _limit(path: Path) -> int | None:
    try:
        return _limit_text(path.read_text().strip())
    except OSError:
        return None


def _limit_text(text: str | None) -> int | None:
    """A cgroup limit in bytes; None for "max" (none) or anything unreadable."""
    return int(text) if text is not None and text.isdigit() else None


class MEMORYSTATUSEX(ctypes.Structure):
    """Windows' MEMORYSTATUSEX (sysinfoapi.h): 64 bytes; dwLength must hold the size before the call."""
    _fields_ = [
        ("dwLength", ctypes.c_uint32),
        ("dwMemoryLoad", ctypes.c_uint32),
        ("ullTotalPhys", ctypes.c_uint64),
        ("ullAvailPhys", ctypes.c_uint64),
        ("ullTotalPageFile", ctypes.c_uint64),  # the commit limit: RAM + pagefiles
        ("ullAvailPageFile", ctypes.c_uint64),  # commit still available
        ("ullTotalVirtual", ctypes.c_uint64),
        ("ullAvailVirtual", ctypes.c_uint64),
        ("ullAvailExtendedVirtual", ctypes.c_uint64),
    ]


def windows_memory_from(status: MEMORYSTATUSEX) -> dict:
    """Machine fields from a filled MEMORYSTATUSEX (split out so it is tested off Windows)."""
    pagefile = max(0, status.ullTotalPageFile - status.ullTotalPhys)
    return dict(ram_total_bytes=status.ullTotalPhys, ram_available_bytes=status.ullAvailPhys,
                swap_total_bytes=pagefile, swap_free_bytes=None,
                commit_limit_bytes=status.ullTotalPageFile, commit_available_bytes=status.ullAvailPageFile,
                commit_enforced=True)  # Windows never overcommits: a commit beyond the limit fails (os error 1455)


def _windows_memory() -> dict:  # untested on Windows: checked here only through the structure's size and fields
    status = MEMORYSTATUSEX()
    status.dwLength = ctypes.sizeof(MEMORYSTATUSEX)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        raise OSError(ctypes.get_last_error(), "GlobalMemoryStatusEx failed")
    fields = windows_memory_from(status)
    fields["swap_free_bytes"] = max(0, status.ullAvailPageFile - status.ullAvailPhys)
    return fields


def _psutil_memory() -> dict:  # macOS and anything else: no commit figures
    import psutil

    vm, swap = psutil.virtual_memory(), psutil.swap_memory()
    return dict(ram_total_bytes=vm.total, ram_available_bytes=vm.available, swap_total_bytes=swap.total,
                swap_free_bytes=swap.free)


# --- GPU and disk -----------------------------------------------------------------------------------------------

def _cuda(index: int = 0) -> dict:
    """Free and total memory of CUDA device `index`, if torch sees it (this creates the CUDA context: the first CUDA
    use of the app and the CLI, whose plans are made before anything loads, so the allocator is set up here)."""
    from . import allocator

    allocator.configure()
    try:
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return {}
    from ..compute.backends import compile_supported

    free, total = torch.cuda.mem_get_info(index)
    capability = tuple(torch.cuda.get_device_capability(index))
    return dict(vram_free_bytes=int(free), vram_total_bytes=int(total), gpu_name=torch.cuda.get_device_name(index),
                cuda_capability=capability, compile_supported=compile_supported(f"cuda:{index}", capability))


def disk_free_bytes(path: Path) -> int | None:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:  # the models folder may not exist yet
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def probe_machine(models_dir: Path | None = None, cuda: bool = True, cuda_index: int = 0) -> Machine:
    """Read this machine now. `cuda=False` skips the GPU (and torch's CUDA initialisation); `cuda_index`: which
    CUDA device's VRAM is read (a pool's worker on its own GPU)."""
    if sys.platform.startswith("linux"):
        fields, os_name = _linux_memory(), "linux"
    elif sys.platform == "win32":
        fields, os_name = _windows_memory(), "windows"
    else:
        fields, os_name = _psutil_memory(), sys.platform
    if fields.get("swap_free_bytes") is None:
        fields["swap_free_bytes"] = 0
    if cuda:
        fields.update(_cuda(cuda_index))
        if fields.get("compile_supported"):
            from ..compute.compile import decoder_compile_state

            fields["decoder_compile"] = decoder_compile_state(f"cuda:{cuda_index}", models_dir)
    machine = Machine(**fields, os_name=os_name, pagefile_growable=_pagefile_growable(os_name),
                      disk_free_bytes=disk_free_bytes(models_dir) if models_dir is not None else None)
    log.info("machine: %s", machine)
    return machine


def _pagefile_growable(os_name: str) -> bool:
    return os_name == "windows" and windows_pagefile_system_managed()


PAGING_FILES_KEY = r"SYSTEM\CurrentControlSet\Control\Session Manager\Memory Management"


def pagefile_system_managed_from(paging_files: list[str]) -> bool:
    """From the registry's PagingFiles (REG_MULTI_SZ): "?:\\pagefile.sys" is "automatically manage for all
    drives"; "C:\\pagefile.sys 0 0" (or no sizes) is system managed on that drive; "C:\\pagefile.sys 4096 8192"
    is a fixed size. System managed if any pagefile is."""
    for entry in paging_files:
        parts = entry.split()
        if not parts:
            continue
        if parts[0].startswith("?:") or len(parts) == 1 or parts[1:3] == ["0", "0"]:
            return True
    return False


def windows_pagefile_system_managed() -> bool:
    """Whether Windows manages a pagefile's size (so committing more grows it). UNTESTED ON WINDOWS."""
    import winreg  # type: ignore[import-not-found]

    try:
        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, PAGING_FILES_KEY) as key:
            value, _ = winreg.QueryValueEx(key, "PagingFiles")
    except OSError:
        return False
    return pagefile_system_managed_from(list(value) if isinstance(value, (list, tuple)) else [str(value)])


# --- weights on disk --------------------------------------------------------------------------------------------

def weights_on_disk(models_dir: Path) -> dict[str, ComponentWeights]:
    """Each weight-bearing component whose files are all present, from its safetensors headers."""
    from .storage import read_header, shard_files

    result = {}
    for name in WEIGHT_COMPONENTS:
        component = COMPONENTS[name]
        if component.missing_files(models_dir):
            continue
        files = shard_files(component.folder(models_dir), *WEIGHT_FILES[name])
        by_dtype: dict[int, int] = {}
        by_name: dict[str, int] = {}
        blocks: dict[tuple[str, int], int] = {}
        params = largest = width = tokens = 0
        for path in files:
            entries, _ = read_header(path)
            for e in entries.values():
                itemsize = e.nbytes // max(1, _numel(e.shape)) if e.nbytes else 0
                params += _numel(e.shape)
                if not _EMBEDDING_TABLE.search(e.name):
                    largest = max(largest, e.nbytes)
                by_dtype[itemsize] = by_dtype.get(itemsize, 0) + e.nbytes
                by_name[e.dtype] = by_name.get(e.dtype, 0) + e.nbytes
                if name in _WIDTH_KEYS and e.name == _WIDTH_KEYS[name][0]:
                    width = e.shape[_WIDTH_KEYS[name][1]]
                if name == "image_encoder" and e.name.endswith("embeddings.position_embedding.weight"):
                    tokens = e.shape[0]
                match = _BLOCK_KEYS[name].match(e.name) if name in _BLOCK_KEYS else None
                if match:
                    key = (match.group(1), int(match.group(2)))
                    blocks[key] = blocks.get(key, 0) + e.nbytes
        total = sum(by_dtype.values())
        hidden, heads = _transformer_width(component.folder(models_dir)) if name == "transformer" else (width, 0)
        ordered = [blocks[k] for k in sorted(blocks, key=lambda k: (k[0] != "transformer_blocks", k[1]))]
        fp8_cached = False
        if name == "transformer":
            from .fp8 import cache_recorded

            fp8_cached = cache_recorded(component.folder(models_dir))
        result[name] = ComponentWeights(
            name=name, file_bytes=total, params=params,
            storage_itemsize=max(by_dtype, key=by_dtype.get) if by_dtype else 2,
            largest_tensor_bytes=largest, block_bytes=tuple(ordered), hidden_size=hidden, heads=heads, tokens=tokens,
            dtype=max(by_name, key=by_name.get) if by_name else "", files=tuple(str(p) for p in files),
            fp8_cached=fp8_cached)
    return result


def weights_bytes(models_dir: Path) -> dict[str, int]:
    """Bytes of weights on disk per component present (the brief's form of `weights_on_disk`)."""
    return {name: w.file_bytes for name, w in weights_on_disk(models_dir).items()}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _transformer_width(folder: Path) -> tuple[int, int]:
    import json

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        heads = int(config["num_attention_heads"])
        return heads * int(config["attention_head_dim"]), heads
    except (OSError, ValueError, KeyError, TypeError):
        return 0, 0


def read_process_memory(pid: int | str = "self") -> dict[str, int]:
    """VmData, RssAnon, RssFile, VmHWM... of a process in bytes (Linux /proc/PID/status; {} elsewhere)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v for k, v in parse_meminfo(text).items() if k.startswith(("Vm", "Rss"))}

