"""Several GPUs serving one queue (worker/pool.py): a worker per device taking jobs in submit order, one host-wide
division of RAM and commit among them, the gauges per GPU, and `--gpus` checked at startup. CPU devices stand in for
the GPUs; the jobs run the real engine on the tiny models."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from framepack_ui.engine import f1
from framepack_ui.errors import InputError
from framepack_ui.events import Finished, Notice
from framepack_ui.memory.plan.budgets import budgets_for
from framepack_ui.memory.probe import Machine
from framepack_ui.sidecar import sidecar_path
from framepack_ui.telemetry import read_gauges
from framepack_ui.ui import present
from framepack_ui.units import GB
from framepack_ui.worker import Queued, WorkerPool, parse_gpus
from test_telemetry import FakeNVML
from worker_jobs import TIMEOUT_S, all_events, seconds_to_shut_down, spec

REPO = Path(__file__).resolve().parent.parent
HOST_64GB = replace(Machine.supposed(64, 0, os_name="linux"), commit_limit_bytes=72 * GB,
                    commit_available_bytes=60 * GB, commit_enforced=True)


@pytest.fixture
def make_pool(tiny_models_dir, tmp_path):
    pools = []

    def make(devices=("cpu", "cpu"), **options):
        pool = WorkerPool(tiny_models_dir, tmp_path / "outputs", list(devices), host=HOST_64GB, **options)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.shutdown()


def test_two_workers_run_two_jobs_at_once_in_submit_order(make_pool, start_image_80x64):
    """Both lanes take a job at once (each waits at a barrier for the other before the engine runs: run one at a
    time, the barrier breaks and the job fails), the third waits for the first lane free; the settings file of each
    names the device that ran it."""
    both_running = threading.Barrier(2, timeout=TIMEOUT_S)
    started = []

    def run(job_spec, out_path, manager, emit, cancel, **kwargs):
        started.append(job_spec.prompt)
        if job_spec.prompt != "third":
            both_running.wait()
        return f1.run(job_spec, out_path, manager, emit, cancel, **kwargs)

    pool = make_pool(run_job=run)
    with pool._cond:  # all three queued before a lane can take one
        ids = [pool.submit(spec(start_image_80x64, prompt)) for prompt in ("first", "second", "third")]
    results = [all_events(pool, job_id) for job_id in ids]
    assert sorted(started[:2]) == ["first", "second"] and started[2] == "third"
    assert [e.position for e in results[2] if isinstance(e, Queued)] == [3, 2, 1]  # one lane took each ahead of it
    for events in results:
        assert isinstance(events[-1], Finished), events[-1]
        assert events[-1].frames == 37
        assert Notice("running on cpu") in events
        record = json.loads(sidecar_path(events[-1].path).read_text(encoding="utf-8"))
        assert record["device"] == "cpu" and record["status"] == "finished"
    assert len({events[-1].path for events in results}) == 3
    assert [job.status for job in pool.jobs()] == ["finished"] * 3
    assert all(lane._manager is not None for lane in pool.lanes)  # each lane loaded its own models


def test_a_pool_lane_plans_on_its_share_of_the_host_read_at_the_start(make_pool):
    pool = make_pool()
    machine = pool.lane_machine("cpu")
    assert machine.ram_available_bytes == HOST_64GB.ram_available_bytes // 2
    assert budgets_for(machine, cuda=False).ram * 2 <= budgets_for(HOST_64GB, cuda=False).ram
    assert pool._make_plan("auto", 640).ram_budget_bytes == budgets_for(machine, cuda=False).ram


def test_gpus_names_the_devices_and_refuses_a_gpu_the_machine_lacks():
    assert parse_gpus("all", 2) == ["cuda:0", "cuda:1"]
    assert parse_gpus(" 1, 0 ", 2) == ["cuda:1", "cuda:0"]
    with pytest.raises(InputError, match=r"^--gpus 0,2: this machine has no GPU 2 \(it has 2, numbered 0 to 1\)$"):
        parse_gpus("0,2", 2)
    with pytest.raises(InputError, match="this machine has no CUDA GPU"):
        parse_gpus("all", 0)
    with pytest.raises(InputError, match="all or GPU numbers"):
        parse_gpus("first", 2)
    with pytest.raises(InputError, match="named twice"):
        parse_gpus("1,1", 2)


def test_app_refuses_a_gpu_it_lacks_in_one_line(monkeypatch, caplog, tmp_path):
    """The device count injected: a one-GPU machine asked for two."""
    import app
    import framepack_ui.worker

    monkeypatch.setattr(framepack_ui.worker, "cuda_device_count", lambda: 1)
    args = app.parse_args(["--gpus", "0,1", "--outputs", str(tmp_path / "out")])
    with caplog.at_level(logging.ERROR):
        assert app.make_worker(args) is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "--gpus 0,1: this machine has no GPU 1 (it has 1, numbered 0 to 0)"]


def test_app_with_gpus_on_a_machine_without_one_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "app.py", "--outputs", str(tmp_path / "out"), "--gpus", "0,1"],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env={"PATH": "/usr/bin:/bin", "GRADIO_ANALYTICS_ENABLED": "False"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "--gpus 0,1: this machine has no CUDA GPU" in errors[0], output
    assert "Traceback" not in output


class TwoGpuNVML(FakeNVML):
    """Two GPUs, the second busier: each index answers its own figures."""

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetName(self, handle):
        return f"GPU model {handle}"

    def nvmlDeviceGetMemoryInfo(self, handle):
        used = (3 + 10 * handle) * GB
        return SimpleNamespace(used=used, total=24 * GB, free=24 * GB - used)

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=40 + 50 * handle, memory=10)


def test_the_gauges_show_each_gpu():
    g = read_gauges(nvml=TwoGpuNVML())
    assert [(gpu.index, gpu.name, gpu.vram_used_bytes, gpu.util_pct) for gpu in g.gpus] == [
        (0, "GPU model 0", 3 * GB, 40.0), (1, "GPU model 1", 13 * GB, 90.0)]
    assert g.vram_used_bytes == 3 * GB and g.gpu_note == "GPU model 0"  # the first GPU's, as before
    bars = present.gauges_html(g)
    for index, used, busy in ((0, "3.00", 40), (1, "13.00", 90)):
        assert (f'data-gauge="vram {index}" data-pct="{float(used) / 24 * 100:.1f}"' in bars
                and f"{used} / 24.00 GB · GPU model {index}" in bars)
        assert f'data-gauge="gpu{index}" data-pct="{busy:.1f}"' in bars and f"{busy}% busy" in bars


def test_closing_a_pool_does_not_wait_for_a_lanes_compile_between_jobs(make_pool, start_image_80x64, monkeypatch):
    """As a lone worker's (test_worker_download.py): a lane compiling the VAE decoder between jobs is not waited for
    when the app closes. The compile is scripted, held until the test lets it end; the job finishes at once."""
    from framepack_ui.worker import Worker
    from framepack_ui.worker.worker import IDLE_COMPILE_CLOSE_WAIT_S, IDLE_COMPILE_NOTICE

    compiling, finish = threading.Event(), threading.Event()

    def compile_until_told(self) -> None:
        with self._cond:
            self._idle_work = IDLE_COMPILE_NOTICE
        compiling.set()
        finish.wait(TIMEOUT_S)
        with self._cond:
            self._idle_work = None

    def finishing(job_spec, out_path, manager, emit, cancel, **kwargs):
        emit(Finished(str(out_path), "", 0, 0.0))

    monkeypatch.setattr(Worker, "_compile_while_idle", compile_until_told)
    pool = make_pool(run_job=finishing)
    assert isinstance(all_events(pool, pool.submit(spec(start_image_80x64, "first")))[-1], Finished)
    assert compiling.wait(TIMEOUT_S)
    waited = seconds_to_shut_down(pool)
    try:
        assert waited < IDLE_COMPILE_CLOSE_WAIT_S + TIMEOUT_S / 4
        assert [lane._thread.is_alive() for lane in pool.lanes].count(True) == 1  # the compiling one, a daemon
    finally:
        finish.set()
