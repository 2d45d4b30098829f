"""Telemetry: reads RAM, swap, commit, VRAM, GPU load and disk reads. Reads, never decides; never imports torch."""
from .gauges import Gauges, GpuGauge, read_gauges, starved

__all__ = ["Gauges", "GpuGauge", "read_gauges", "starved"]
