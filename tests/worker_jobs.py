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
