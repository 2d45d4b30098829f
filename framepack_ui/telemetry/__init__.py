"""Telemetry: reads RAM, swap, commit, VRAM, GPU load and disk reads. Reads, never decides; never imports torch."""
from .gauges import Gauges, read_gauges, starved

__all__ = ["Gauges", "read_gauges", "starved"]
