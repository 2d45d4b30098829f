"""Following jobs through a Worker in tests: the job spec most worker tests submit, and the events of a job to its
end. The `make_worker` fixture is in conftest.py."""
from __future__ import annotations

import threading
import time

from framepack_ui.spec import JobSpec
from job_settings import FAST_128PX

TIMEOUT_S = 120  # a 2-core machine shared with other work: generous, only hit when something hangs


def spec(image, prompt="a red square moves", **settings) -> JobSpec:
    return JobSpec(image=image, prompt=prompt, **{**FAST_128PX, **settings})


def wait_until(condition, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def all_events(worker, job_id) -> list:
    """Follow a job to its end (in a thread, so a hang fails the test instead of blocking it)."""
    out: list = []
    thread = threading.Thread(target=lambda: out.extend(worker.events(job_id)), daemon=True)
    thread.start()
    thread.join(TIMEOUT_S)
    assert not thread.is_alive(), f"job {job_id} did not end within {TIMEOUT_S} s"
    return out


def record_planned_sections(monkeypatch) -> list:
    """The sections each Worker plan is asked for (PlanOverrides.sections), in order: Worker._make_plan wrapped for
    the test, the real one still planning."""
    from framepack_ui.worker import Worker

    planned = []
    real_plan = Worker._make_plan

    def make_plan(self, profile, resolution, **options):
        planned.append(options.get("sections"))
        return real_plan(self, profile, resolution, **options)

    monkeypatch.setattr(Worker, "_make_plan", make_plan)
    return planned


def seconds_to_shut_down(worker, timeout_s: float = TIMEOUT_S) -> float:
    """How long `worker.shutdown(timeout_s)` (a Worker or a pool) took to return."""
    started = time.monotonic()
    worker.shutdown(timeout_s=timeout_s)
    return time.monotonic() - started
