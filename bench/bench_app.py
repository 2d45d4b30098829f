"""The whole app path: jobs submitted to the real Worker (the object the web app and the command line use) on a
models folder, back to back, each timed from its submit to its finished file, phase by phase.

    python -m bench.bench_app --models DIR [--jobs 2] [--seconds 5] [--resolution 640] [--fp8 auto|on|off]
        [--vram-gb G] [--hold-ram-gb N] [--drop-page-cache] [--keep-models S] [--compile-cache DIR]
        [--extend | --extend-from N] [--trace-allocator]
        --out X.json

Nothing of the app is replaced: the Worker probes the machine, plans (the automatic plan unless `--profile` or
`--fp8` force it), converts the fp8 cache when the plan stores fp8, and the engine loads every model from DIR with
the app's loaders, encodes a new prompt with the 8 B text encoder (the first job's prompt is new to the prompt cache
unless `--prompt` names a known one; later jobs repeat it, as a user's second job does), SigLIP, the VAE, samples,
decodes and writes the MP4. Full-size random weights in the real layout come from
`python -m framepack_ui make-tiny-models DIR --full-size --device cuda`.

The machine around it:
- `--vram-gb G`: a separate child process fills the GPU so that the app's own probe sees G GiB free (the app's CUDA
  context is made first, so it is outside the G, as on a real card of that size where the context is inside the
  card's total: the app is left exactly G).
- `--hold-ram-gb N`: a plain child process (so in the bench's own cgroup) allocates and touches N GiB of anonymous
  memory and holds it for the whole run, as the other programs on a laptop do.
- `--drop-page-cache`: every file under DIR is evicted from the page cache before the first job (cold reads; a
  memory cgroup then charges the bench for all it caches).
- `--compile-cache DIR`: where torch.compile's caches go (TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR): an empty
  folder for a cold start, the same folder again for a warm one.

Per job, from the Worker's events (one clock, time.perf_counter, stamped as each event is emitted) and the
manager's log lines ("loading X", "loaded X in N s"): the plan's choice (profile, transformer storage and the plan's
notes, from the job's settings file), time from submit to the first preview (the first Step event), to the first
SectionSaved and to Finished; a list of segments, each from one phase's start event to the next phase's (queued,
starting: importing the engine on the first job, the models check, the probe and the plan, the manager; convert;
settings; text; image; transformer; sampling and decode per section; writing: the last section's encode and the
end of the job), each with its peak RSS (VmHWM, reset at each segment start through /proc/self/clear_refs), peak
anonymous RSS and system Committed_AS and the cgroup's memory.current (sampled every 50 ms), peak VRAM
(torch.cuda.max_memory_allocated, reset at each segment start; NVML's device-wide use, sampled, less what was in
use before the bench's CUDA context), bytes read from disk (/proc/self/io read_bytes; the cgroup's io.stat rbytes
where there is one) and torch.compile time (dynamo's own compile timers). From those, the phases of issue 19:
probe+plan, loading (the manager's loads, wherever they fall), text and image encoding (their segments less the
loads inside them), conversion, sampling, decoding, writing, compiling (inside sampling and decoding: the compiler
runs at a model's first call), and the rest. Disk bytes read per transformer step after the first: from the first
Step event of the job to its last, divided by the steps between them (decodes in between included; their own reads
are also given alone).

`--tiny`-style smoke runs need nothing special: point `--models` at a tiny set (`make-tiny-models DIR`) and lower
`--resolution`, `--seconds` and `--steps`; on a machine without CUDA the plan is the CPU's.
"""
from __future__ import annotations

if not __package__:  # run as `python bench/bench_app.py`: see bench/_repo.py
    import _repo  # noqa: F401

import argparse
import ctypes
import functools
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 2**30
SAMPLE_PERIOD_S = 0.05
START_IMAGE_SIZE = (608, 640)  # (width, height): the 640x608 bucket of docs/benchmarks.md's full-size figures
DEFAULT_PROMPT = "The girl dances gracefully, with clear movements, full of charm."
# the segments that are the video's own work (issue 19: the rest of a warm job is at most 10 % of it)
VIDEO_WORK = ("sampling", "decode", "writing")
SUMMARY_KEYS = ("first_preview_s", "first_section_s", "finished_s", "probe_plan_s", "loading_s", "text_s",
                "image_s", "conversion_s", "sampling_s", "decoding_s", "writing_s", "compiling_s",
                "outside_video_work_s", "outside_video_work_fraction", "s_per_frame", "peak_rss_GiB",
                "peak_vram_allocated_GiB", "disk_read_GB", "disk_read_MB_per_step_after_first", "transformer_storage")

# A child that takes the GPU's memory but what leaves `G` GiB free, then holds it until its stdin closes.
VRAM_FILLER = """
import json, sys, torch
leave = int(float(sys.argv[1]) * 2**30)
free, total = torch.cuda.mem_get_info()
filler = torch.empty(max(0, free - leave), dtype=torch.uint8, device="cuda")
left, _ = torch.cuda.mem_get_info()
print(json.dumps({"pid": __import__("os").getpid(), "filler_bytes": filler.numel(), "free_before_bytes": free,
                  "free_after_bytes": left, "total_bytes": total}), flush=True)
sys.stdin.read()
"""

# A child that allocates and touches N GiB of anonymous memory and holds it until its stdin closes.
RAM_HOLDER = """
import json, mmap, os, sys
size = int(float(sys.argv[1]) * 2**30)
held = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # anonymous, not shared
block = b"\\x5a" * (16 << 20)
for offset in range(0, size, len(block)):  # written, not just mapped: every page becomes resident
    held.write(block[:size - offset])
print(json.dumps({"pid": os.getpid(), "bytes": size}), flush=True)
sys.stdin.read()
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=Path, required=True, help="models folder in the real layout")
    p.add_argument("--jobs", type=int, default=2, help="jobs, one after another (default %(default)s)")
    p.add_argument("--seconds", type=float, default=5.0, help="video length of each job (default %(default)s)")
    p.add_argument("--resolution", type=int, default=640)
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the app's)")
    p.add_argument("--prompt", default=None,
                   help="every job's prompt (default: one new to the prompt cache for this run, repeated by the "
                        "later jobs: the first job runs the text encoder, the later ones find the prompt cached)")
    p.add_argument("--profile", default="auto", help="the memory profile (default: auto, the plan's choice)")
    p.add_argument("--fp8", choices=("auto", "on", "off"), default="auto",
                   help="the transformer's storage: auto (the plan's choice), on (fp8), off (bf16)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--vram-gb", type=float, default=None,
                   help="leave the app G GiB of free VRAM (a filler held by a separate child process)")
    p.add_argument("--hold-ram-gb", type=float, default=None,
                   help="a child process holds N GiB of touched anonymous memory for the run")
    p.add_argument("--drop-page-cache", action="store_true",
                   help="evict every file under --models from the page cache before the first job")
    p.add_argument("--keep-models", type=float, default=0.0, metavar="S",
                   help="keep the models loaded S seconds after a job (the app's --keep-models; default 0)")
    p.add_argument("--compile-cache", type=Path, default=None, metavar="DIR",
                   help="torch.compile's cache folder (TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR under it)")
    p.add_argument("--extend-from", type=int, default=None, metavar="N",
                   help="job N and each after it extend the one before's video by --seconds (jobs before N are plain: "
                        "a warm plain job to set an extension's memory beside)")
    p.add_argument("--extend", action="store_true",
                   help="as --extend-from 2: each job after the first extends the one before's video by --seconds "
                        "(its last frames encoded by the VAE into the history), as the web app's Extend does")
    p.add_argument("--trace-allocator", action="store_true",
                   help="at each phase's end, where the anonymous memory is: malloc's figures and /proc/self/smaps by "
                        "mapping (a few ms to tens of ms a phase, charged to the job)")
    p.add_argument("--pin-workers", type=int, default=None, metavar="N",
                   help="page-lock N streamed blocks at a time (streaming.PIN_WORKERS; default: the app's)")
    p.add_argument("--pin-register", choices=("before", "after"), default=None,
                   help="register each pinned block before or after its copy (streaming.REGISTER_BEFORE_COPY; "
                        "default: the app's)")
    p.add_argument("--outputs", type=Path, default=None, help="where the videos go (default: a temporary folder)")
    p.add_argument("--out", default="app.json")
    a = p.parse_args(argv)
    problems = [(a.jobs < 1, "--jobs must be at least 1"),
                (a.hold_ram_gb is not None and a.hold_ram_gb <= 0, "--hold-ram-gb must be more than 0"),
                (a.vram_gb is not None and a.vram_gb <= 0, "--vram-gb must be more than 0"),
                (a.pin_workers is not None and a.pin_workers < 1, "--pin-workers must be at least 1"),
                (not (a.models / "lllyasviel").is_dir(), f"--models {a.models}: no models in the real layout there"),
                (a.extend and a.extend_from is not None, "--extend is --extend-from 2: give one of them"),
                (a.extend_from is not None and not 2 <= a.extend_from <= a.jobs,
                 "--extend-from N needs 2 <= N <= --jobs (job 1 has no video before it)")]
    for bad, message in problems:
        if bad:
            refuse(message)
    if a.extend:
        a.extend_from = 2
    return a


def refuse(message: str) -> None:
    """One line on stderr, exit status 2 (as the app's command line)."""
    print(f"bench_app: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


# --- the machine around the app -------------------------------------------------------------------------------

class Helper:
    """A child process started with one of the scripts above: ready once it printed its JSON line, held until the
    bench closes its stdin, ended by its own pid."""

    def __init__(self, script: str, amount: float, what: str):
        self.what = what
        self.process = subprocess.Popen([sys.executable, "-c", script, str(amount)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            refuse(f"the {what} child ended before it was ready (exit {self.process.returncode})")
        self.info = json.loads(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()  # the child returns from its read and exits
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def process_memory(pid: int | str) -> dict:
    """RssAnon, VmRSS and VmSwap of a process in bytes (Linux), and its cgroup line."""
    from framepack_ui.memory.probe import read_process_memory

    status = read_process_memory(pid)
    try:
        cgroup = Path(f"/proc/{pid}/cgroup").read_text().strip()
    except OSError:
        cgroup = None
    return {"rss_anon_bytes": status.get("RssAnon"), "rss_bytes": status.get("VmRSS"),
            "swap_bytes": status.get("VmSwap"), "cgroup": cgroup}


def held_ram(holder: Helper) -> dict:
    mine, theirs = process_memory("self"), process_memory(holder.pid)
    return {"pid": holder.pid, "requested_bytes": holder.info["bytes"], **theirs,
            "same_cgroup_as_bench": theirs["cgroup"] is not None and theirs["cgroup"] == mine["cgroup"]}


# --- meters ---------------------------------------------------------------------------------------------------

def _meminfo_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux 4.0+: "5" to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.cache
def _mallinfo2():
    from framepack_ui.memory import allocator

    function = allocator.glibc_function("mallinfo2")  # glibc 2.33 and later
    if function is not None:
        function.restype = _MallInfo2
    return function


def _allocator_bytes(cuda: bool) -> dict:
    """Where the anonymous memory is at this moment: C malloc's bytes in use (heap and its own mmaps) and the free
    bytes it keeps in its arenas, and torch's page-locked host allocator (reserved, in use). What RssAnon holds beyond
    these is other mmaps: page-locked block buffers (cudaHostRegister), the CUDA driver's, compiled code."""
    out = {}
    mallinfo2 = _mallinfo2()
    if mallinfo2 is not None:
        info = mallinfo2()
        out["malloc_in_use"] = info.uordblks + info.hblkhd
        out["malloc_kept_free"] = info.fordblks
    if cuda:
        import torch

        stats = torch.cuda.host_memory_stats()
        out["pinned_allocator_reserved"] = stats.get("reserved_bytes.current", 0)
        out["pinned_allocator_in_use"] = stats.get("allocated_bytes.current", 0)
    return out


LARGE_MAPPING_BYTES = 64 * 2**20  # glibc's thread arenas are heaps of exactly this size: counted as small


def _anonymous_by_mapping() -> dict:
    """This process's anonymous resident bytes by kind of mapping (/proc/self/smaps): the brk heap, large unnamed
    mappings (tensors malloc'd with mmap, page-locked block buffers), small unnamed ones (Python's object arenas,
    thread stacks, compiled kernels' code) and file mappings' private copies."""
    out = {"anon_heap": 0, "anon_large_maps": 0, "anon_small_maps": 0, "anon_file_private": 0}
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return {}
    kind = None
    for line in lines:
        head = line.split(maxsplit=6)
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            start, end = (int(x, 16) for x in head[0].split("-"))
            name = head[5] if len(head) > 5 else ""
            kind = ("anon_heap" if name == "[heap]" else "anon_file_private" if name.startswith("/") else
                    "anon_large_maps" if end - start > LARGE_MAPPING_BYTES else "anon_small_maps")
        elif head[0] == "Anonymous:" and kind is not None:
            out[kind] += int(head[1]) * 1024
    return out


def _compile_seconds() -> float:
    """Seconds torch.compile has spent so far in this process (dynamo's timer of each frame's whole compile,
    Inductor and Triton included); 0 where torch does not keep it. Read only once the app has imported the
    compiler: importing it here (1.5 s) would be charged to the job."""
    utils = sys.modules.get("torch._dynamo.utils")
    metrics = getattr(utils, "compilation_time_metrics", None) if utils is not None else None
    return float(sum(metrics.get("_compile.compile_inner", []))) if isinstance(metrics, dict) else 0.0


@functools.cache
def _nvml_device():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML (no driver, no GPU): the figure is left out
        return None


def nvml_used_bytes() -> int | None:
    """Device 0's memory in use, all processes (NVML); None without NVML."""
    device = _nvml_device()
    if device is None:
        return None
    nvml, handle = device
    return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)


class Meters:
    """Per segment: its peaks (exact where the kernel or torch keep one, else sampled every SAMPLE_PERIOD_S) and
    its disk reads and compile time (counters read at its start and end)."""

    def __init__(self, cuda: bool, nvml_baseline_bytes: int | None, trace_allocator: bool = False):
        from bench.proc import cgroup_dir, cgroup_read_bytes, disk_read_bytes

        self.cuda = cuda
        self.trace_allocator = trace_allocator
        self.nvml_baseline_bytes = nvml_baseline_bytes
        self._disk_read, self._cgroup_read = disk_read_bytes, cgroup_read_bytes
        group = cgroup_dir()
        self._cgroup_current = group / "memory.current" if group is not None and (group / "memory.current").exists() \
            else None
        self._lock = threading.Lock()
        self._sampled: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_loop, name="bench-meters", daemon=True)
        self._thread.start()

    def counters(self) -> dict:
        return {"read": self._disk_read(), "cgroup_read": self._cgroup_read(), "compile_s": _compile_seconds()}

    def start_segment(self) -> dict:
        """Reset the peaks; returns the counters at the start."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        with self._lock:
            self._sampled = {}
        self.rss_reset = _reset_peak_rss()
        return self.counters()

    def end_segment(self, start: dict) -> dict:
        """The segment's figures (GiB, GB read, seconds compiling)."""
        import torch

        from framepack_ui.memory.probe import read_process_memory

        self._sample()  # the moment of the boundary too
        end = self.counters()
        with self._lock:
            sampled = dict(self._sampled)
        status = read_process_memory("self")
        figures = {
            # VmHWM since the reset at the segment's start; without the reset it is the process's peak so far
            "peak_rss_GiB": status.get("VmHWM", 0) / GiB if self.rss_reset else None,
            "peak_rss_anon_GiB": sampled.get("rss_anon", 0) / GiB,
            "peak_committed_as_GiB": sampled["committed_as"] / GiB if "committed_as" in sampled else None,
            "peak_cgroup_current_GiB": sampled["cgroup_current"] / GiB if "cgroup_current" in sampled else None,
            "peak_vram_allocated_GiB": torch.cuda.max_memory_allocated() / GiB if self.cuda else None,
            "peak_vram_reserved_GiB": torch.cuda.max_memory_reserved() / GiB if self.cuda else None,
            "peak_nvml_used_GiB": ((sampled["nvml"] - (self.nvml_baseline_bytes or 0)) / GiB
                                   if "nvml" in sampled else None),
            "disk_read_GB": (end["read"] - start["read"]) / 1e9,
            "cgroup_disk_read_GB": ((end["cgroup_read"] - start["cgroup_read"]) / 1e9
                                    if end["cgroup_read"] is not None and start["cgroup_read"] is not None else None),
            "compile_s": end["compile_s"] - start["compile_s"],
            **({f"end_{key}_GiB": value / GiB for key, value in
                {**_allocator_bytes(self.cuda), **_anonymous_by_mapping()}.items()} if self.trace_allocator else {}),
            "end_rss_anon_GiB": status.get("RssAnon", 0) / GiB,
        }
        return figures

    def _sample(self) -> None:
        import torch

        from framepack_ui.memory.probe import read_process_memory

        reading = {"rss_anon": read_process_memory("self").get("RssAnon", 0)}
        committed = _meminfo_bytes("Committed_AS")
        if committed is not None:
            reading["committed_as"] = committed
        if self._cgroup_current is not None:
            try:
                reading["cgroup_current"] = int(self._cgroup_current.read_text())
            except (OSError, ValueError):
                pass
        nvml = nvml_used_bytes() if self.cuda else None
        if nvml is not None:
            reading["nvml"] = nvml
        if self.cuda:
            reading["vram_allocated"] = torch.cuda.memory_allocated()
        with self._lock:
            for key, value in reading.items():
                self._sampled[key] = max(value, self._sampled.get(key, value))

    def _sample_loop(self) -> None:
        while not self._stop.wait(SAMPLE_PERIOD_S):
            self._sample()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


# --- one job's timeline -----------------------------------------------------------------------------------------

class ManagerLog(logging.Handler):
    """The model manager's own log lines, stamped on the bench's clock: which model loaded when and for how long
    (its "loaded X in N s" line), and when one was freed."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "framepack_ui.memory.manager" or not isinstance(record.args, tuple) or not record.args:
            return
        t = time.perf_counter()
        if record.msg.startswith("loaded "):
            name, seconds = record.args[0], float(record.args[1])
            self.records.append({"what": "load", "name": name, "start": t - seconds, "end": t, "seconds": seconds})
        elif record.msg.startswith("freed "):
            self.records.append({"what": "freed", "name": record.args[0], "end": t})


class JobTimeline:
    """The Worker's events of one job, each stamped as it is emitted (the listener runs in the emitting thread),
    cut into segments at each new phase name (the main sequence of the job; SectionSaved comes from the encoder
    thread and only marks a time)."""

    def __init__(self, meters: Meters, submitted_at: float, label: str):
        self.meters, self.submitted_at, self.label = meters, submitted_at, label
        self.events: list[tuple[float, object]] = []
        self.segments: list[dict] = []
        self.step_reads: list[tuple[float, int, int | None]] = []  # (t, read_bytes, cgroup rbytes) at each Step
        self.notices: list[str] = []
        self._current = {"name": "queued", "detail": "", "start": submitted_at}
        self._start_counters = meters.start_segment()

    def on_event(self, event) -> None:
        from bench.proc import cgroup_read_bytes, disk_read_bytes
        from framepack_ui.events import TERMINAL, Phase, SectionSaved, Step

        t = time.perf_counter()
        self.events.append((t, event))
        if isinstance(event, Step):
            self.step_reads.append((t, disk_read_bytes(), cgroup_read_bytes()))
            if event.step in (1, event.steps):
                self._say(t, f"section {event.section + 1}/{event.sections} step {event.step}/{event.steps}")
        elif isinstance(event, SectionSaved):
            self._say(t, f"section {event.section + 1}/{event.sections} saved ({event.frames_written} frames)")
        elif isinstance(event, Phase):
            if event.name == self._current["name"]:
                self.notices.append(f"{event.name}: {event.detail}")  # a notice within the phase
            else:
                self._cut(t, event.name, event.detail)
            self._say(t, f"[{event.name}] {event.detail}")
        elif isinstance(event, TERMINAL):
            self._cut(t, None, "")
            self._say(t, f"{type(event).__name__}")

    def _cut(self, t: float, name: str | None, detail: str) -> None:
        figures = self.meters.end_segment(self._start_counters)
        self.segments.append({**self._current, "end": t, "seconds": t - self._current["start"], **figures})
        if name is not None:
            self._current = {"name": name, "detail": detail, "start": t}
            self._start_counters = self.meters.start_segment()

    def _say(self, t: float, text: str) -> None:
        print(f"{self.label} +{t - self.submitted_at:7.1f}s {text}", flush=True)


def summarise_job(timeline: JobTimeline, loads: list[dict], result, record: dict) -> dict:
    """Issue 19's per-job figures from the timeline (see the module's docstring for each definition)."""
    from framepack_ui.events import SectionSaved, Step
    from framepack_ui.spec import FRAMES_PER_SECTION

    t0, segments = timeline.submitted_at, timeline.segments
    first = {kind: next((t for t, e in timeline.events if isinstance(e, kind)), None) for kind in (Step, SectionSaved)}
    end = segments[-1]["end"] if segments else None
    memory = record.get("memory", {})
    J = {"result": type(result).__name__, "result_detail": repr(result)[:300],
         "plan_profile": memory.get("profile"), "transformer_storage": memory.get("transformer_storage"),
         "plan": memory.get("plan"), "plan_notes": memory.get("notes"),
         "first_preview_s": first[Step] - t0 if first[Step] else None,
         "first_section_s": first[SectionSaved] - t0 if first[SectionSaved] else None,
         "finished_s": end - t0 if end is not None else None}

    def total(*names) -> float:
        return sum(s["seconds"] for s in segments if s["name"] in names)

    def loads_in(*names) -> float:
        spans = [(s["start"], s["end"]) for s in segments if s["name"] in names]
        return sum(load["seconds"] for load in loads if any(a <= load["end"] <= b for a, b in spans))

    J["loads"] = [{"name": load["name"], "at_s": load["start"] - t0, "seconds": load["seconds"]} for load in loads]
    J["loading_s"] = sum(load["seconds"] for load in loads)
    # "starting" holds the engine's import on a process's first job, the models check, the probe, the plan and the
    # manager; "plan" only the moment between the plan's event and the next phase
    J["probe_plan_s"] = total("queued", "starting", "plan", "download")
    J["conversion_s"] = total("convert")
    J["text_s"] = total("text") - loads_in("text")  # the prompt's encoding (and the text encoder's free)
    J["image_s"] = total("image") - loads_in("image")  # SigLIP and the start latent's VAE encode
    J["transformer_setup_s"] = total("transformer") - loads_in("transformer")  # the writer's start, TeaCache hooks
    J["sampling_s"] = total("sampling")
    J["decoding_s"] = total("decode")
    # the last section's encode and the end of the job (freeing what the plan does not keep); earlier sections'
    # encodes overlap the next sampling: their latency is in writer_s_per_section
    J["writing_s"] = total("writing")
    J["prepare_s"] = total("settings")
    J["compiling_s"] = sum(s["compile_s"] for s in segments)  # inside sampling and decoding, not beside them
    if J["finished_s"]:
        J["outside_video_work_s"] = J["finished_s"] - total(*VIDEO_WORK)
        J["outside_video_work_fraction"] = J["outside_video_work_s"] / J["finished_s"]
    J["writer_s_per_section"] = _writer_latency(timeline)
    sections = sum(1 for s in segments if s["name"] == "sampling")
    frames = getattr(result, "frames", None)
    J["frames"], J["sections"] = frames, sections
    J["s_per_frame"] = J["finished_s"] / frames if frames and J["finished_s"] else None
    J["sampling_s_per_frame"] = J["sampling_s"] / (FRAMES_PER_SECTION * sections) if sections else None
    steps = [t for t, e in timeline.events if isinstance(e, Step)]
    intervals = [b - a for a, b in zip(steps, steps[1:])]
    J["step_event_intervals_s"] = {"first": intervals[0] if intervals else None,
                                   "median": statistics.median(intervals) if intervals else None}
    J.update(_reads(timeline, segments))
    J["peak_rss_GiB"] = _max(s["peak_rss_GiB"] for s in segments)
    J["peak_vram_allocated_GiB"] = _max(s["peak_vram_allocated_GiB"] for s in segments)
    J["peak_nvml_used_GiB"] = _max(s["peak_nvml_used_GiB"] for s in segments)
    J["peak_committed_as_GiB"] = _max(s["peak_committed_as_GiB"] for s in segments)
    J["peak_cgroup_current_GiB"] = _max(s["peak_cgroup_current_GiB"] for s in segments)
    J["by_phase"] = _by_phase(segments)
    J["segments"] = [{**{k: v for k, v in s.items() if k not in ("start", "end")}, "start_s": s["start"] - t0}
                     for s in segments]
    J["notices"] = timeline.notices
    # what the worker estimated as the job started (worker/speed.py: from the jobs before it, or the card's figures)
    from framepack_ui.worker.events import Estimated

    said = next((e for _, e in timeline.events if isinstance(e, Estimated)), None)
    J["estimated_s"], J["estimate_source"] = (said.total_s, said.source) if said else (None, None)
    J["estimate_error"] = (J["estimated_s"] / J["finished_s"] - 1 if J["estimated_s"] and J["finished_s"]
                           else None)
    return J


def _writer_latency(timeline: JobTimeline) -> list[float]:
    """Per section: from the end of its decode (the next phase's start) to its SectionSaved (on disk)."""
    from framepack_ui.events import SectionSaved

    ends = [s["end"] for s in timeline.segments if s["name"] == "decode"]
    saved = {e.section: t for t, e in timeline.events if isinstance(e, SectionSaved)}
    return [saved[i] - end for i, end in enumerate(ends) if i in saved]


def _reads(timeline: JobTimeline, segments: list[dict]) -> dict:
    reads = {"disk_read_GB": sum(s["disk_read_GB"] for s in segments)}
    cgroup = [s["cgroup_disk_read_GB"] for s in segments]
    reads["cgroup_disk_read_GB"] = sum(cgroup) if cgroup and None not in cgroup else None
    steps = timeline.step_reads
    if len(steps) >= 2:
        # from the first Step event (the first step's reads behind it) to the last: every later step, and the
        # decodes between sections, whose reads are also given alone
        after_first = steps[-1][1] - steps[0][1]
        between = [s for s in segments if s["name"] == "decode" and steps[0][0] <= s["start"] <= steps[-1][0]]
        reads["disk_read_MB_per_step_after_first"] = after_first / 1e6 / (len(steps) - 1)
        if steps[0][2] is not None and steps[-1][2] is not None:  # the whole cgroup: the kernel's readahead too
            reads["cgroup_disk_read_MB_per_step_after_first"] = (steps[-1][2] - steps[0][2]) / 1e6 / (len(steps) - 1)
        reads["disk_read_GB_in_decodes_between_steps"] = sum(s["disk_read_GB"] for s in between)
    return reads


def _by_phase(segments: list[dict]) -> dict:
    """Seconds, and the peaks over the segments of each phase name."""
    out: dict[str, dict] = {}
    for s in segments:
        o = out.setdefault(s["name"], {"seconds": 0.0, "count": 0})
        o["seconds"] += s["seconds"]
        o["count"] += 1
        for key, value in s.items():
            if key.startswith("peak_") and value is not None:
                o[key] = max(value, o.get(key, value))
            elif key in ("disk_read_GB", "compile_s") or (key == "cgroup_disk_read_GB" and value is not None):
                o[key] = o.get(key, 0.0) + value
    return out


def _max(values):
    present = [v for v in values if v is not None]
    return max(present) if present else None


# --- the run ----------------------------------------------------------------------------------------------------

def start_image(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    path = folder / "start.png"
    width, height = START_IMAGE_SIZE
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def setup_compile_cache(folder: Path | None) -> dict:
    """Point the compilers' caches at `folder` (before torch is imported); what was in it at the start."""
    if folder is None:
        return {"dir": None}
    folder = folder.absolute()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"dir": str(folder), "files_at_start": len(files), "bytes_at_start": sum(p.stat().st_size for p in files)}


def main(argv=None) -> None:
    started = time.perf_counter()
    a = parse_args(argv)
    # a time limit's SIGTERM ends the run through the `finally`s: the filler's VRAM and the holder's RAM are given
    # back, and the jobs already finished are in --out
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    for name in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # as the CLI
        os.environ.setdefault(name, "1" if name.startswith("HF_") else "error")
    compile_cache = setup_compile_cache(a.compile_cache)

    # The bench needs torch before the first job (its CUDA context, the memory counters); the app imports it in
    # its first job's "starting" phase: that import is timed here instead. bench.common (diffusers through the
    # engine) waits until the jobs are done, so the first job imports the engine itself, as the app's does.
    t = time.perf_counter()
    import torch  # after the compile cache's variables

    torch_import_s = time.perf_counter() - t
    from bench.proc import drop_page_cache
    from framepack_ui.memory import allocator
    from framepack_ui.spec import Continuation, JobSpec
    from framepack_ui.weights.layout import COMPONENTS
    from framepack_ui.worker import Worker

    allocator.configure()  # as the app does, before CUDA starts
    from framepack_ui.memory import streaming  # torch only: the engine's imports stay in the first job's start

    if a.pin_workers is not None:
        streaming.PIN_WORKERS = a.pin_workers
    if a.pin_register is not None:
        streaming.REGISTER_BEFORE_COPY = a.pin_register == "before"
    cuda = torch.cuda.is_available() and (a.device or "cuda").startswith("cuda")
    if a.vram_gb is not None and not cuda:
        refuse("--vram-gb needs a CUDA GPU")
    transformer_folder = COMPONENTS["transformer"].folder(a.models)
    transformer_GB = sum(p.stat().st_size for p in transformer_folder.glob("*.safetensors")) / 1e9
    R = dict(models=str(a.models), jobs_asked=a.jobs, seconds=a.seconds, resolution=a.resolution, steps=a.steps,
             profile=a.profile, fp8=a.fp8, vram_gb=a.vram_gb, hold_ram_gb=a.hold_ram_gb,
             drop_page_cache=a.drop_page_cache, keep_models_s=a.keep_models, compile_cache=compile_cache,
             torch_import_s=torch_import_s, pid=os.getpid(),
             pin_workers=streaming.PIN_WORKERS,
             pin_register="before" if streaming.REGISTER_BEFORE_COPY else "after")
    R["models_GB"] = sum(p.stat().st_size for p in a.models.rglob("*.safetensors")) / 1e9  # fp8 cache included
    helpers: list[Helper] = []
    holder = meters = None
    try:
        # NVML's device-wide figure, less what is not the app's: other processes, then the filler child (its
        # context and tensor), read around its start; the app's own CUDA context counts as the app's
        others = nvml_used_bytes() if cuda else None
        if cuda:
            torch.cuda.mem_get_info()  # the bench's (the app's) CUDA context first: the filler leaves G beside it
        if a.vram_gb is not None:
            before = nvml_used_bytes()
            filler = Helper(VRAM_FILLER, a.vram_gb, "VRAM filler")
            helpers.append(filler)
            after = nvml_used_bytes()
            R["vram_filler"] = {**filler.info, "nvml_bytes": after - before if None not in (before, after) else None}
            others = others + R["vram_filler"]["nvml_bytes"] if None not in (others, R["vram_filler"]["nvml_bytes"]) \
                else None
        if a.hold_ram_gb is not None:
            holder = Helper(RAM_HOLDER, a.hold_ram_gb, "RAM holder")
            helpers.append(holder)
            R["hold_ram"] = held_ram(holder)
        R["nvml_not_the_apps_GiB"] = others / GiB if others is not None else None
        meters = Meters(cuda, others, a.trace_allocator)
        if a.drop_page_cache:
            R["page_cache_dropped_GB"] = drop_page_cache(a.models) / 1e9
        R["jobs"] = []
        run_jobs(a, meters, JobSpec, Worker, R, Continuation)
        if holder is not None:
            R["hold_ram_at_end"] = held_ram(holder)
    finally:
        if meters is not None:
            meters.close()
        for helper in reversed(helpers):
            helper.stop()
    R["cgroup"] = cgroup_summary()
    R["wall_s"] = time.perf_counter() - started
    from bench.common import header, table, write_json

    R = header(transformer_GB < 20, **R)  # full-size weights or not; date, card, versions, command
    for n, job in enumerate(R["jobs"], start=1):
        R.update({f"job{n}_{key}": job.get(key) for key in SUMMARY_KEYS})
    print("\n" + phase_table(R["jobs"]), flush=True)
    print("\n" + table(R, [f"job{n}_{key}" for n in range(1, len(R["jobs"]) + 1) for key in SUMMARY_KEYS]),
          flush=True)
    write_json(a.out, R)
    print(f"\nwrote {a.out}", flush=True)


def run_jobs(a: argparse.Namespace, meters: Meters, JobSpec, Worker, R: dict, Continuation) -> None:
    """The jobs through one Worker, as the command line runs them (background=False: on this thread), each
    submitted when the one before has ended, as a user's next job (with --extend, continuing its video). Each job's
    figures go to R["jobs"] and, at once, to the --out file (a run stopped by a time limit keeps the jobs it
    finished)."""
    handler = ManagerLog()
    manager_log = logging.getLogger("framepack_ui.memory.manager")
    manager_log.addHandler(handler)
    manager_log.setLevel(logging.INFO)
    prompt = a.prompt or f"{DEFAULT_PROMPT} (bench run {time.time_ns()})"
    spec_options = {"steps": a.steps} if a.steps is not None else {}
    plan_options = {"fp8": {"auto": None, "on": True, "off": False}[a.fp8]}
    with tempfile.TemporaryDirectory() as tmp:
        outputs = a.outputs or Path(tmp) / "outputs"
        image = start_image(Path(tmp))
        # download_missing=None: the models folder is the bench's own; looking for missing files would import the
        # hub client, which the device image's older huggingface_hub lacks (httpx2)
        worker = Worker(a.models, outputs, device=a.device, profile=a.profile, keep_models_s=a.keep_models,
                        download_missing=None, serves_pages=False, background=False)
        try:
            for n in range(1, a.jobs + 1):
                spec = JobSpec(image=str(image), prompt=prompt, seconds=a.seconds, resolution=a.resolution, seed=n,
                               **spec_options)
                out_path = outputs / f"job{n}.mp4"
                start = (Continuation("extend", str(outputs / f"job{n - 1}.mp4"))
                         if a.extend_from is not None and n >= a.extend_from else None)
                handler.records.clear()
                submitted = time.perf_counter()
                timeline = JobTimeline(meters, submitted, f"job {n}")
                worker.submit(spec, out_path=out_path, plan_options=plan_options, on_event=timeline.on_event,
                              start=start)
                worker.run_queued()  # the job, then the release after it (keep_models_s)
                released = time.perf_counter()
                result = timeline.events[-1][1]
                sidecar = out_path.with_suffix(".json")
                record = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
                job = summarise_job(timeline, [r for r in handler.records if r["what"] == "load"], result, record)
                job["after_job_release_s"] = released - timeline.segments[-1]["end"]
                job["freed"] = [{"name": r["name"], "at_s": r["end"] - submitted} for r in handler.records
                                if r["what"] == "freed"]
                job["prompt_encoded"] = any(load["name"] == "text_encoders" for load in job["loads"])
                job["extends"] = start.video if start is not None else None
                print(f"job {n}: first preview {_s(job['first_preview_s'])}, first section {_s(job['first_section_s'])}"
                      f", finished {_s(job['finished_s'])}; {job['transformer_storage']}; after it (the idle compile "
                      f"where the plan left one, the release) {_s(job['after_job_release_s'])}", flush=True)
                R["jobs"].append(job)
                Path(a.out).write_text(json.dumps(R, indent=1, default=str))
        finally:
            worker.shutdown()
            manager_log.removeHandler(handler)


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


def cgroup_summary() -> dict:
    """The bench's cgroup (v2): its limit, peak (page cache and the RAM holder included) and memory events."""
    from bench.proc import cgroup_dir

    group = cgroup_dir()
    if group is None:
        return {}
    out = {"path": str(group)}
    for name in ("memory.max", "memory.peak", "memory.current", "memory.swap.max", "memory.events"):
        path = group / name
        if path.exists():
            out[name] = path.read_text().strip()
    return out


def phase_table(jobs: list[dict]) -> str:
    """Seconds and peaks per phase, one column per job."""
    names = list(dict.fromkeys(name for job in jobs for name in job["by_phase"]))
    lines = ["| phase | " + " | ".join(f"job {n} s, RSS/VRAM GiB, read GB" for n in range(1, len(jobs) + 1)) + " |",
             "|---|" + "---|" * len(jobs)]
    for name in names:
        cells = []
        for job in jobs:
            p = job["by_phase"].get(name)
            if p is None:
                cells.append("")
                continue
            vram = p.get("peak_vram_allocated_GiB")
            cells.append(f"{p['seconds']:.2f}, {p.get('peak_rss_GiB') or 0:.1f}/"
                         f"{'-' if vram is None else f'{vram:.1f}'}, {p['disk_read_GB']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
