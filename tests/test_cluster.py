"""Machines joined through Ray (worker/cluster.py), on a local Ray cluster on loopback: `ray start --head` as its
own process with two CPU slots standing in for GPUs (a custom resource), the app's pool joining it as Ray's driver.
A job runs on an actor through the real engine on the tiny models and its files come back; a node lost mid-job
(its actor killed) leaves the returned sections in place and the job resumes from them on the other actor; a
cluster address that does not answer, or a cluster without a GPU, stops the app with one line."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from framepack_ui.engine.video import count_frames
from framepack_ui.errors import InputError
from framepack_ui.events import Finished, Notice, SectionSaved, Step, Stopped
from framepack_ui.sidecar import sidecar_path, state_path
from framepack_ui.worker.cluster import connect
from worker_jobs import TIMEOUT_S, all_events, spec

if not sys.platform.startswith("linux"):
    pytest.skip("the Ray extra is for Linux (requirements-dev.txt installs it there)", allow_module_level=True)

REPO = Path(__file__).resolve().parent.parent
SLOT = "framepack_test_slot"  # the CPU slots standing in for GPUs
STARTUP_TIMEOUT_S = 180  # Ray's processes, then each actor importing torch, on 2 shared cores
# the head: Ray's single-machine mode keeps a Linux node on loopback (its cluster mode resolves 127.0.0.1 to the
# LAN address, and advertises and listens there)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


NODE_SCRATCH = Path(tempfile.gettempdir()) / "framepack-node"  # cluster._scratch_root's: a folder per actor


def _listing(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs and 2 slots; stopped by its pid (and any process of it left,
    by theirs) afterwards. Yields (address, pid)."""
    import psutil

    actors_before = set(_listing(NODE_SCRATCH))
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="fpray", dir="/tmp")  # short: Ray's socket paths live under it
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address",
               "127.0.0.1", "--port", str(port), "--num-cpus", "2", "--num-gpus", "0", "--resources",
               json.dumps({SLOT: 2}), "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp]
    log_path = Path(temp) / "head.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **RAY_ENV})
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while "block forever" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start"
            time.sleep(0.5)
        yield address, proc.pid
    finally:
        family = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in family[1:]:  # whatever of the cluster outlived its head: ended by pid
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp, ignore_errors=True)
        for name in set(_listing(NODE_SCRATCH)) - actors_before:  # the folders of this cluster's actors, all ended
            if not psutil.pid_exists(int(name)):
                shutil.rmtree(NODE_SCRATCH / name, ignore_errors=True)


def hold_in_second_section(spec, out_path, manager, emit, cancel, start=None, **kwargs):
    """The engine on the node, held at its second section's first step (the first section goes on being encoded and
    sent back) until the job is stopped or the node lost, unless it continues something. Sent to the nodes by
    value (cloudpickle): they cannot import this test module."""
    from framepack_ui.engine import f1
    from framepack_ui.events import Step as StepEvent

    def held(event):
        emit(event)
        if start is None and isinstance(event, StepEvent) and event.section == 1:
            cancel.wait()  # the engine's own thread: the stop is seen at this step's end

    return f1.run(spec, out_path, manager, held, cancel, **({"start": start} if start else {}), **kwargs)


@pytest.fixture(scope="module")
def pool(cluster, tiny_models_dir, tmp_path_factory):
    os.environ.update(RAY_ENV)  # as connect does for a loopback address, before ray is imported here
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    outputs = tmp_path_factory.mktemp("ray_outputs")
    pool = connect(cluster[0], tiny_models_dir, outputs, slot_resource=SLOT,
                   node_options={"download_missing": None, "run_job": hold_in_second_section})
    try:
        yield pool
    finally:
        pool.shutdown()


def _wait_for(condition, timeout_s=TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_node_lost_mid_job_resumes_from_its_returned_sections_on_another(pool, start_image_80x64):
    """Two sections: the first node returns section 1 and is lost (its actor killed); section 1 stays in the app's
    outputs, and the other node makes only section 2 from the returned state, the video whole at the end. On the
    way the files and previews come back: the settings name the node's device and the app's own start image."""
    assert pool.devices == ["cpu on Ray node 127.0.0.1"] * 2
    job_id = pool.submit(spec(start_image_80x64, "two sections on two nodes", seconds=2.4))
    _wait_for(lambda: pool.job(job_id).section is not None)
    first = next(lane for lane in pool.lanes if lane._running is not None and lane._running.id == job_id)
    out_path = Path(pool.job(job_id).out_path)
    returned = out_path.read_bytes()  # section 1, back in the app's outputs before the node goes
    assert count_frames(out_path) >= 1 and (state_path(out_path) / "state.json").is_file()
    import ray

    ray.kill(first.actor)
    events = all_events(pool, job_id)
    assert first.lost and not next(lane for lane in pool.lanes if lane is not first).lost
    assert [e.section for e in events if isinstance(e, SectionSaved)] == [0, 1]  # section 1 not made again
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert any("was lost: resuming from its 1 returned section on another node" in m for m in notices), notices
    result = events[-1]
    assert isinstance(result, Finished), result
    assert result.path == str(out_path) and result.frames == 73 and count_frames(out_path) == 73
    assert len(out_path.read_bytes()) > len(returned)
    assert all(Path(e.path).parent == out_path.parent for e in events if isinstance(e, SectionSaved))
    assert any(isinstance(e, Step) and e.preview is not None for e in events)  # the newest one keeps its preview
    record = json.loads(sidecar_path(out_path).read_text(encoding="utf-8"))
    assert record["status"] == "finished" and record["device"] == "cpu on Ray node 127.0.0.1"
    assert record["image"] == start_image_80x64
    assert [p.name for p in pool.past_outputs()] == [out_path.name]  # in the gallery


def test_nothing_of_the_cluster_or_the_app_listens_beyond_loopback(cluster, pool):
    import psutil

    processes = [psutil.Process(), psutil.Process(cluster[1]), *psutil.Process(cluster[1]).children(recursive=True)]
    listening = []
    for process in processes:
        try:
            listening += [(process.name(), c.laddr.ip) for c in process.net_connections(kind="inet")
                          if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # ended meanwhile
            continue
    assert {name for name, _ in listening} >= {"gcs_server", "raylet"}  # the cluster's servers were seen
    assert all(ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for _, ip in listening), listening


def test_a_stop_reaches_the_node_and_keeps_the_returned_section(pool, start_image_80x64):
    """The node holds the job in its second section (hold_in_second_section) until the stop asked in the app reaches
    it: the job stops there, its first section kept in the app's outputs."""
    job_id = pool.submit(spec(start_image_80x64, "stopped on its node", seconds=2.4))
    _wait_for(lambda: pool.job(job_id).section is not None)
    assert pool.cancel(job_id)
    result = all_events(pool, job_id)[-1]
    assert isinstance(result, Stopped), result
    assert result.path == pool.job(job_id).out_path and count_frames(result.path) == result.frames > 0
    record = json.loads(sidecar_path(result.path).read_text(encoding="utf-8"))
    assert record["status"] == "stopped"


def test_a_ray_address_that_does_not_answer_is_one_line(tmp_path):
    port = _free_port()  # nothing listens there now
    with pytest.raises(InputError, match=rf"^--ray 127.0.0.1:{port}: nothing answers there \(.+\)$"):
        connect(f"127.0.0.1:{port}", tmp_path / "models", tmp_path / "outputs")


def test_a_loopback_address_keeps_ray_on_loopback(monkeypatch, tmp_path):
    """Set before Ray is imported (it reads it then): a driver joining a cluster on 127.0.0.1 stays there."""
    from framepack_ui.worker.cluster import SINGLE_MACHINE_ENV

    monkeypatch.delenv(SINGLE_MACHINE_ENV, raising=False)
    with pytest.raises(InputError, match="nothing answers there"):
        connect(f"127.0.0.1:{_free_port()}", tmp_path / "models", tmp_path / "outputs")
    assert os.environ[SINGLE_MACHINE_ENV] == "0"


def test_without_ray_installed_it_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as it would without the extra
    with pytest.raises(InputError, match=r"^--ray needs Ray, an optional extra: pip install ray==2.60.0"):
        connect("127.0.0.1:1", tmp_path / "models", tmp_path / "outputs")


def _app(*args, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "app.py", "--outputs", str(tmp_path / "out"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=STARTUP_TIMEOUT_S,
                          env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **RAY_ENV})


def test_app_with_a_cluster_that_has_no_gpu_exits_2_with_one_line(cluster, tmp_path):
    proc = _app("--ray", cluster[0], tmp_path=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"--ray {cluster[0]}: the cluster has no GPU for a worker" in errors[0], output
    assert "Traceback" not in output


def test_app_with_a_ray_address_that_does_not_answer_exits_2_with_one_line(tmp_path):
    port = _free_port()
    proc = _app("--ray", f"127.0.0.1:{port}", tmp_path=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and f"--ray 127.0.0.1:{port}: nothing answers there" in errors[0], output
