"""Elapsed time and the ETA of a job, from its own measured steps and section decodes."""
from __future__ import annotations

import time


class EtaClock:
    """Elapsed time and ETA from this job's own measured time per step and per section decode (the encode runs
    beside the next section's sampling)."""

    def __init__(self, started: float, steps: int, sections: int):
        self.started, self.steps, self.sections = started, steps, sections
        self.steps_done = self.sections_done = 0
        self.sampling_s = self.finishing_s = 0.0

    def step(self, step_s: float) -> tuple[float, float]:
        self.steps_done += 1
        self.sampling_s += step_s
        sampling_left = self.sampling_s / self.steps_done * (self.steps * self.sections - self.steps_done)
        # every unfinished section still needs its decode and write; guess 0 until one was measured
        finishing_left = (self.finishing_s / self.sections_done if self.sections_done else 0.0) * (
            self.sections - self.sections_done)
        return time.monotonic() - self.started, sampling_left + finishing_left

    def section_finished(self, finishing_s: float) -> None:
        self.sections_done += 1
        self.finishing_s += finishing_s
