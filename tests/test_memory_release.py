"""Issue 3: memory given back after a job (now or after an idle timeout) and the Windows pagefile pre-warm,
driven on Linux through a fake commit allocator."""
from __future__ import annotations

import ctypes
import time

import pytest

from framepack_ui.errors import MemoryPlanError
from framepack_ui.memory import manager as manager_mod
from framepack_ui.memory import prewarm, probe
from framepack_ui.memory.manager import ModelManager
from conftest import cpu_manager
from framepack_ui.memory.plan import PlanOverrides, make_plan
from framepack_ui.memory.probe import MEMORYSTATUSEX, Machine, weights_on_disk
from framepack_ui.units import GB

STEP = prewarm.STEP_BYTES


# --- release after a job ------------------------------------------------------------------------------------------

def test_release_after_job_frees_now_or_after_an_idle_timeout(tiny_models_dir):
    manager = cpu_manager(tiny_models_dir, prompt_cache_dir=None)
    with manager.use("vae"):
        pass
    manager.release_after_job(None)  # keep
    assert manager.is_loaded("vae")
    manager.release_after_job(0)  # free at once
    assert not manager.is_loaded("vae")

    manager.release_idle_s = 0.3  # the configured default
    with manager.use("vae"):
        pass
    manager.release_after_job()
    assert manager.is_loaded("vae") and manager.idle_release_pending
    time.sleep(1.0)
    assert not manager.is_loaded("vae") and manager.load_count["vae"] == 2


def test_a_new_use_cancels_the_idle_timer(tiny_models_dir):
    manager = cpu_manager(tiny_models_dir, prompt_cache_dir=None, release_idle_s=0.4)
    with manager.use("vae"):
        pass
    manager.release_after_job()
    with manager.use("vae"):  # the next job starts before the timeout
        time.sleep(0.6)  # and is still using it when the timer would have fired
    time.sleep(0.3)
    assert manager.is_loaded("vae") and not manager.idle_release_pending and manager.load_count["vae"] == 1
    manager.release_after_job()
    time.sleep(0.9)
    assert not manager.is_loaded("vae")


# --- pagefile pre-warm ----------------------------------------------------------------------------------------------

class FakeCommit:
    """A Windows commit limit that grows (a system-managed pagefile) up to `max_limit`. Reserves are never
    touched (the fake has no pages), as VirtualAlloc(MEM_COMMIT) without writing."""
    can_grow = True

    def __init__(self, limit, committed, max_limit, managed=True):
        self.limit, self.committed, self.max_limit, self.managed = limit, committed, max_limit, managed
        self.reserves: list[int] = []
        self.held: dict[int, int] = {}

    def available_commit(self):
        return self.limit - self.committed

    def pagefile_system_managed(self):
        return self.managed

    def reserve(self, nbytes):
        self.reserves.append(nbytes)
        if self.committed + nbytes > self.limit:
            if self.committed + nbytes > self.max_limit:
                return None  # ERROR_COMMITMENT_LIMIT: the pagefile cannot grow further
            self.limit = self.committed + nbytes  # the pagefile grows; it does not shrink on release
        self.committed += nbytes
        handle = len(self.reserves)
        self.held[handle] = nbytes
        return handle

    def release(self, handle):
        self.committed -= self.held.pop(handle)


def test_prewarm_grows_the_pagefile_in_256mb_steps_until_enough_then_releases():
    fake = FakeCommit(limit=10 * GB, committed=9 * GB, max_limit=30 * GB)
    seen = []
    reservation = prewarm.prewarm(3 * GB, fake, progress=seen.append, sleep=lambda s: None)
    assert set(fake.reserves) == {256 * 1024 * 1024}
    # the reservation first takes the 1 GB still available, then every step grows the limit
    assert reservation.reserved_bytes + fake.available_commit() >= 3 * GB
    assert reservation.reserved_bytes - STEP < 3 * GB  # and not a step more than needed
    assert len(seen) == len(fake.reserves) and seen[-1].fraction == 1.0
    assert [p.reserved_bytes for p in seen] == [STEP * (i + 1) for i in range(len(seen))]
    reservation.release()
    assert fake.committed == 9 * GB and not fake.held  # everything given back
    assert fake.available_commit() >= 3 * GB  # ... and the grown limit stays for the load


def test_prewarm_stops_with_a_clear_error_when_the_pagefile_cannot_grow():
    fake = FakeCommit(limit=10 * GB, committed=9 * GB, max_limit=11 * GB)
    with pytest.raises(MemoryPlanError, match="pagefile could not grow") as err:
        prewarm.prewarm(5 * GB, fake, sleep=lambda s: None)
    assert "\n" not in str(err.value)
    assert fake.committed == 9 * GB and not fake.held  # released on failure too


def test_prewarm_does_nothing_when_enough_and_refuses_a_fixed_pagefile_or_linux():
    fake = FakeCommit(limit=10 * GB, committed=2 * GB, max_limit=30 * GB)
    assert prewarm.prewarm(3 * GB, fake).reserved_bytes == 0 and fake.reserves == []
    fixed = FakeCommit(limit=10 * GB, committed=9 * GB, max_limit=30 * GB, managed=False)
    with pytest.raises(MemoryPlanError, match="fixed size"):
        prewarm.prewarm(3 * GB, fixed)
    assert fixed.reserves == []

    class EnforcedLinux(prewarm.LinuxCommit):
        def available_commit(self):
            return 1 * GB

    with pytest.raises(MemoryPlanError, match="swap") as err:
        prewarm.prewarm(3 * GB, EnforcedLinux())
    assert "\n" not in str(err.value)
    assert prewarm.short_of(100 * GB, None) == 0  # no allocator (macOS): nothing to check


def test_pagefile_registry_value_and_windows_structures():
    assert probe.pagefile_system_managed_from(["?:\\pagefile.sys"])
    assert probe.pagefile_system_managed_from(["C:\\pagefile.sys 0 0"])
    assert probe.pagefile_system_managed_from(["C:\\pagefile.sys"])
    assert not probe.pagefile_system_managed_from(["C:\\pagefile.sys 4096 8192"])
    assert not probe.pagefile_system_managed_from([])
    # sysinfoapi.h: GlobalMemoryStatusEx fails unless dwLength == 64; VirtualAlloc takes a pointer-sized SIZE_T
    assert ctypes.sizeof(MEMORYSTATUSEX) == 64 and MEMORYSTATUSEX.ullAvailPageFile.offset == 32
    assert ctypes.sizeof(ctypes.c_size_t) == ctypes.sizeof(ctypes.c_void_p)
    assert (prewarm.MEM_COMMIT, prewarm.MEM_RESERVE, prewarm.MEM_RELEASE, prewarm.PAGE_READWRITE) == (
        0x1000, 0x2000, 0x8000, 0x04)


def test_manager_prewarms_before_loading_when_commit_is_short(tiny_models_dir, monkeypatch):
    plan = make_plan(Machine.supposed(32, 0), weights_on_disk(tiny_models_dir), PlanOverrides(resolution=64))
    fake = FakeCommit(limit=10 * GB, committed=int(9.5 * GB), max_limit=30 * GB)
    seen, at_load = [], []
    load = manager_mod.BUILDERS["transformer"]

    def loader(d, c, device):
        at_load.append((fake.committed, len(fake.reserves)))
        return load(d, c, device)

    manager = ModelManager(tiny_models_dir, plan, prompt_cache_dir=None, commit_allocator=fake,
                           on_prewarm=seen.append, builders={"transformer": loader})
    with manager.use("transformer"):
        pass
    assert fake.reserves and seen and manager.prewarm_count == 1
    assert at_load == [(int(9.5 * GB), len(fake.reserves))]  # pre-warmed, then released just before the load
    with manager.use("transformer"):  # loaded already: no second pre-warm
        pass
    assert manager.prewarm_count == 1

    fake.max_limit = fake.limit  # the pagefile cannot grow: one line before the load, nothing loaded
    fake.committed = int(9.9 * GB)
    manager.free()
    with pytest.raises(MemoryPlanError, match="pagefile could not grow"):
        with manager.use("transformer"):
            pass
    assert not manager.is_loaded("transformer") and len(at_load) == 1
