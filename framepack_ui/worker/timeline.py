"""A job's timeline: the machine's gauges over time beside what the job was doing, so a slow job shows why.

The worker records one per job: a reading of the gauges (telemetry.read_gauges: GPU use, VRAM, RAM, disk reads)
every second on a small thread of its own, and the time of each phase change and section from the job's events.
It is kept compact, for the job's settings file: at most MAX_POINTS readings (when a long job fills them, every
other one is dropped and the interval doubles), one mark per phase change, one row per section. The page draws it
(ui/present.job_plot_svg) and the estimate before the next job learns from it (speed.py). Times are seconds since
the job started.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from ..events import Phase, SectionSaved, Step
from ..units import GB
from .events import Estimated

log = logging.getLogger(__name__)

SAMPLE_INTERVAL_S = 1.0
MAX_POINTS = 600  # a 10-minute job at one reading a second; longer ones keep every 2nd, 4th... reading
SERIES = ("gpu_util_pct", "vram_used_gb", "ram_used_gb", "disk_read_mb_s")  # what each reading keeps
# a section's row: when its sampling started and its last step ended, when its decode started and ended
SECTION_FIELDS = ("sampling_start_s", "sampling_end_s", "decode_start_s", "decode_end_s")


class TimelineRecorder:
    """`start()`, `event(ev)` for each of the job's events, `snapshot()` at any time, `stop()` -> the record.

    `read(previous)` takes one reading of the gauges (telemetry.read_gauges by default); it runs on the
    recorder's thread, and a reading that fails is skipped (the job never notices)."""

    def __init__(self, read: Callable | None = None, interval_s: float = SAMPLE_INTERVAL_S,
                 max_points: int = MAX_POINTS, clock: Callable[[], float] = time.monotonic):
        if read is None:
            from ..telemetry import read_gauges

            read = lambda previous: read_gauges(previous=previous)  # noqa: E731
        self._read, self._interval_s, self._max_points, self._clock = read, interval_s, max_points, clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = clock()
        self._stride = 1  # keep every `stride`-th reading
        self._taken = 0
        self._previous = None
        self._gpu = ""
        self._t: list[float] = []
        self._series: dict[str, list] = {name: [] for name in SERIES}
        self._phases: list[list] = []  # [t_s, name] at each change of phase
        self._sections: list[dict] = []  # per section: SECTION_FIELDS, "steps"
        self._ended_s: float | None = None
        self._estimated_s: float | None = None  # what the worker expected as the job started

    def start(self) -> "TimelineRecorder":
        self._started = self._clock()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="framepack-timeline", daemon=True)
        self._thread.start()
        return self

    def event(self, event) -> None:
        """Note one of the job's events (any thread); events that mark nothing are ignored."""
        now = self._clock() - self._started
        with self._lock:
            if isinstance(event, Phase):
                self._phase(now, event)
            elif isinstance(event, Step) and self._sections:
                section = self._sections[-1]
                section["sampling_end_s"], section["steps"] = round(now, 3), event.steps
            elif isinstance(event, Estimated):
                self._estimated_s = event.total_s
            elif isinstance(event, SectionSaved) and event.section < len(self._sections):
                self._sections[event.section].setdefault("saved_s", round(now, 3))

    def _phase(self, now: float, event: Phase) -> None:
        if event.name == "sampling":  # a section starts; the one before it has finished its decode
            self._close_decode(now)
            self._sections.append({"sampling_start_s": round(now, 3)})
        elif event.name == "decode" and self._sections and "decode_start_s" not in self._sections[-1]:
            self._sections[-1]["decode_start_s"] = round(now, 3)
        elif event.name == "writing":
            self._close_decode(now)
        if not self._phases or self._phases[-1][1] != event.name:
            self._phases.append([round(now, 3), event.name])

    def _close_decode(self, now: float) -> None:
        if self._sections and "decode_start_s" in self._sections[-1] and "decode_end_s" not in self._sections[-1]:
            self._sections[-1]["decode_end_s"] = round(now, 3)

    def stop(self) -> dict:
        """End the recording (one last reading) and return it (see `snapshot`)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5 * self._interval_s + 5)
        with self._lock:
            if self._ended_s is None:
                self._ended_s = self._clock() - self._started
        self._sample(force=True)
        return self.snapshot()

    def snapshot(self) -> dict:
        """The record so far, JSON-ready: {"interval_s", "gpu", "t_s", one list per SERIES (None where the machine
        gives no figure), "phases": [[t_s, name]...], "sections": [{SECTION_FIELDS, "steps"}...], "ended_s",
        "estimated_s"}."""
        with self._lock:
            return {"interval_s": self._interval_s * self._stride, "gpu": self._gpu, "t_s": list(self._t),
                    **{name: list(values) for name, values in self._series.items()},
                    "phases": [list(p) for p in self._phases], "sections": [dict(s) for s in self._sections],
                    "ended_s": None if self._ended_s is None else round(self._ended_s, 3),
                    "estimated_s": None if self._estimated_s is None else round(self._estimated_s, 1)}

    def _loop(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self._sample()

    def _sample(self, force: bool = False) -> None:
        try:
            reading = self._read(self._previous)
        except Exception:  # the gauges are a view on the job, never a reason for it to fail
            log.debug("a gauges reading failed", exc_info=True)
            return
        self._previous = reading
        now = self._clock() - self._started
        with self._lock:
            self._taken += 1
            if not force and (self._taken - 1) % self._stride:
                return
            self._gpu = reading.gpu_note if reading.gpu_available else ""
            self._t.append(round(now, 2))
            values = {"gpu_util_pct": reading.gpu_util_pct, "vram_used_gb": _gb(reading.vram_used_bytes),
                      "ram_used_gb": _gb(reading.ram_used_bytes), "disk_read_mb_s": reading.disk_read_mb_s}
            for name in SERIES:
                value = values[name]
                self._series[name].append(None if value is None else round(float(value), 2))
            if len(self._t) > self._max_points:  # keep the whole job in as many points: every other one
                self._t = self._t[::2]
                for name in SERIES:
                    self._series[name] = self._series[name][::2]
                self._stride *= 2


def _gb(n: int | None) -> float | None:
    return None if n is None else n / GB
