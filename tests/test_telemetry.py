"""Gauges: readable without an NVIDIA GPU (with a note that says so), NVML errors never raise, and the
"GPU starved by paging" warning fires only on its stated thresholds."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from framepack_ui.telemetry import Gauges, read_gauges, starved
from framepack_ui.units import GB

REPO = Path(__file__).resolve().parent.parent


class FakeNVML:
    """The few pynvml calls the gauges make; `fail_at` names the call that raises (NVML errors are Exceptions)."""

    def __init__(self, fail_at: str | None = None, used=3 * GB, total=8 * GB, util=87):
        self.fail_at, self.used, self.total, self.util = fail_at, used, total, util
        self.shutdowns = 0

    def _call(self, name, value):
        if self.fail_at == name:
            raise RuntimeError(f"NVML {name} failed")
        return value

    def nvmlInit(self):
        return self._call("init", None)

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self._call("count", 1)

    def nvmlDeviceGetHandleByIndex(self, index):
        return self._call("handle", object())

    def nvmlDeviceGetName(self, handle):
        return self._call("name", "NVIDIA GeForce RTX 4060 Laptop GPU")

    def nvmlDeviceGetMemoryInfo(self, handle):
        return self._call("memory", SimpleNamespace(used=self.used, total=self.total, free=self.total - self.used))

    def nvmlDeviceGetUtilizationRates(self, handle):
        return self._call("util", SimpleNamespace(gpu=self.util, memory=10))


def test_without_an_nvidia_gpu_the_gauges_say_so():
    g = read_gauges()  # this machine has no NVIDIA driver
    assert not g.gpu_available and g.gpu_note == "no NVIDIA GPU found"
    assert g.vram_used_bytes is None and g.gpu_util_pct is None
    assert 0 < g.ram_used_bytes <= g.ram_total_bytes and g.process_rss_bytes > 0
    assert g.commit_limit_bytes > 0 and g.swap_total_bytes >= 0
    assert g.disk_read_mb_s is None  # no earlier reading to compare with yet
    failing = read_gauges(nvml=FakeNVML(fail_at="init"))
    assert not failing.gpu_available and failing.gpu_note == "no NVIDIA GPU found"


def test_an_nvidia_gpu_is_read_and_its_errors_never_raise():
    nvml = FakeNVML()
    g = read_gauges(nvml=nvml)
    assert g.gpu_available and g.gpu_note == "NVIDIA GeForce RTX 4060 Laptop GPU"
    assert (g.vram_used_bytes, g.vram_total_bytes, g.gpu_util_pct) == (3 * GB, 8 * GB, 87)
    assert nvml.shutdowns == 1
    for call in ("count", "handle", "name", "memory", "util"):
        broken = read_gauges(nvml=FakeNVML(fail_at=call))
        assert not broken.gpu_available and f"NVML {call} failed" in broken.gpu_note


def test_disk_read_rate_is_the_system_wide_delta_since_the_previous_reading():
    first = read_gauges()
    assert first.disk_read_bytes_total is not None, "psutil.disk_io_counters() gave nothing on this machine"
    # pretend 400 MB were read in the 2 s before this reading
    previous = replace(first, taken_at_s=first.taken_at_s - 2.0,
                       disk_read_bytes_total=first.disk_read_bytes_total - 400_000_000)
    g = read_gauges(previous=previous)
    assert 150 < g.disk_read_mb_s < 250


def test_telemetry_never_imports_torch():
    code = ("import sys, framepack_ui.telemetry as t; g = t.read_gauges(); t.read_gauges(previous=g); "
            "assert 'torch' not in sys.modules, 'telemetry imported torch'; assert g.torch_reserved_bytes is None")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def busy_gpu() -> Gauges:
    return replace(read_gauges(nvml=FakeNVML()), gpu_util_pct=95.0, disk_read_mb_s=5.0)


def test_starved_warns_when_the_gpu_idles_while_the_disk_reads(busy_gpu):
    assert starved(busy_gpu) is None  # busy GPU, quiet disk: all is well
    paging = replace(busy_gpu, gpu_util_pct=6.0, disk_read_mb_s=900.0)
    warning = starved(paging)
    assert warning and "\n" not in warning
    assert "6% busy" in warning and "900 MB/s" in warning
    for fix in ("more RAM", "smaller memory profile", "close other programs"):
        assert fix in warning
    assert starved(paging, generating=False) is None  # an idle app reading files is no problem
    assert starved(replace(paging, gpu_util_pct=20.0)) is None  # thresholds: util < 20 %, reads > 200 MB/s
    assert starved(replace(paging, disk_read_mb_s=200.0)) is None
    assert starved(replace(paging, gpu_util_pct=19.9, disk_read_mb_s=200.1)) is not None
    assert starved(replace(paging, disk_read_mb_s=None)) is None  # first reading: no rate yet
    no_gpu = replace(paging, gpu_available=False, gpu_util_pct=None, gpu_note="no NVIDIA GPU found")
    assert starved(no_gpu) is None  # nothing to starve
