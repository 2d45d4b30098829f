"""One job over several GPUs, its transformer's sequence split (compute/context_parallel.py, worker/split.py),
checked on CPUs: processes over gloo on the loopback give what one process gives.

Tolerance: float32 throughout; the split changes only the order of the attention's sums (the keys arrive in rank
order) and of the gathers, so outputs agree to rounding: within 1e-5 of the output's largest magnitude, for one
forward (measured: 1.1e-6; attention kept to each rank's own tokens: 1.4) and for a job's latents after 2 sections
of 4 steps (attention kept to each rank's own tokens: 8e-3).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import split_ranks

FORWARD_TOLERANCE = 1e-5  # of max |one-process output|


@pytest.fixture(scope="module")
def one_process_forward(tiny_models_dir):
    transformer = split_ranks.load_sensitive_transformer(tiny_models_dir)
    with torch.no_grad():
        return transformer(**split_ranks.uneven_inputs(transformer))[0]


def test_two_processes_give_the_one_process_forward(tiny_models_dir, one_process_forward, tmp_path):
    """The FramePack plan through diffusers' Ulysses attention: 2 gloo processes, odd token counts (uneven shares),
    each rank's gathered output equals the one-process forward; and the check can fail: attention kept to each
    rank's own tokens (no exchange) is far off."""
    mp.spawn(split_ranks.forward_rank, args=(2, str(tmp_path / "rendezvous"), str(tiny_models_dir), str(tmp_path)),
             nprocs=2, join=True)
    reference = one_process_forward
    scale = reference.abs().max().item()
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["split_attention"] == saved["blocks"]  # every block's attention went through the split
        assert saved["split"].shape == reference.shape
        assert (saved["split"] - reference).abs().max().item() <= FORWARD_TOLERANCE * scale
        assert (saved["local_only"] - reference).abs().max().item() > 100 * FORWARD_TOLERANCE * scale


JOB_TOLERANCE = 1e-5  # of max |one-process latents|, after 2 sections of 4 steps


@pytest.fixture(scope="module")
def attention_models(tiny_models_dir, tmp_path_factory) -> Path:
    """The tiny models with the transformer's attention made to matter (split_ranks.ATTENTION_SCALES): the tiny
    transformer's own outputs barely depend on which tokens attention sees."""
    import shutil

    from conftest import scale_transformer_weights

    dest = tmp_path_factory.mktemp("attention") / "models"
    shutil.copytree(tiny_models_dir, dest)
    scale_transformer_weights(dest, split_ranks.ATTENTION_SCALES)
    return dest


def _job_spec(image):
    from framepack_ui.spec import JobSpec

    # TeaCache on, at a threshold that skips the middle steps: every rank must skip the same calls
    return JobSpec(image=image, prompt="a red square moves", resolution=64, steps=4, seconds=2.4, seed=5,
                   teacache=True, teacache_threshold=1.0)


def _section_latents(video: Path, section: int) -> dict:
    from framepack_ui.engine.state import load_state

    return load_state(video).section(section)


def test_a_split_job_samples_the_one_process_sections(attention_models, start_image_64x64, make_worker, tmp_path):
    """Two sections through the worker and the real engine, one job on two processes (SplitJobRunner, as `--gpus
    0,1 --split` runs it: rank 0 runs f1.run with the split transformer, rank 1 follows its calls), TeaCache
    skipping steps, against the same job in one process; every process started keeps NVLink multicast off and its
    sockets on the loopback."""
    import functools

    from framepack_ui.events import Finished, Step
    from framepack_ui.worker.split import LOOPBACK_ENV, SPLIT_ENV, SplitJobRunner
    from worker_jobs import all_events

    spec = _job_spec(start_image_64x64)
    alone = make_worker(models_dir=attention_models)
    assert isinstance(all_events(alone, alone.submit(spec, out_path=tmp_path / "alone.mp4"))[-1], Finished)
    hooks = {rank: functools.partial(split_ranks.record_environment, str(tmp_path)) for rank in (0, 1)}
    split = make_worker(models_dir=attention_models, run_job=SplitJobRunner(
        [0, 1], device_type="cpu", collective_timeout_s=120, rank_hooks=hooks))
    events = all_events(split, split.submit(spec, out_path=tmp_path / "split.mp4"))
    assert isinstance(events[-1], Finished), events[-1]
    assert sum(isinstance(e, Step) for e in events) == 2 * spec.steps
    for section in range(2):
        reference = _section_latents(tmp_path / "alone.mp4", section)
        got = _section_latents(tmp_path / "split.mp4", section)
        for name, tensor in reference.items():
            if tensor.is_floating_point():
                scale = tensor.abs().max().item()
                assert (got[name] - tensor).abs().max().item() <= JOB_TOLERANCE * scale, (section, name)
    for rank in (0, 1):
        recorded = dict(line.split("=", 1) for line in (tmp_path / f"env-{rank}.txt").read_text().splitlines())
        assert recorded == {**SPLIT_ENV, **LOOPBACK_ENV}


def test_a_failing_process_fails_the_job_in_one_line_and_ends_the_others(tiny_models_dir, start_image_64x64,
                                                                         tmp_path):
    """Rank 1 fails once its transformer is split, leaving rank 0 waiting in a collective: the job fails with
    that rank's one line, and no process of it is left."""
    import psutil

    from conftest import cpu_plan
    from framepack_ui.events import Failed
    from framepack_ui.spec import JobSpec
    from framepack_ui.worker.split import run_split_job

    spec = JobSpec(image=start_image_64x64, prompt="a red square moves", resolution=64, steps=2, seconds=1.2)
    events = []
    result = run_split_job(spec, tmp_path / "failed.mp4", cpu_plan(tiny_models_dir), [0, 1], tiny_models_dir,
                           events.append, device_type="cpu", collective_timeout_s=120,
                           rank_hooks={1: split_ranks.fail_here})
    assert isinstance(result, Failed) and events[-1] is result
    assert result.message == "the split job failed: process 1: RuntimeError: injected failure"
    # the job's processes (multiprocessing's own resource tracker outlives jobs by design)
    assert not [p for p in psutil.Process().children(recursive=True)
                if "spawn_main" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]


GIB = 2**30


@pytest.mark.parametrize("devices, memory, needle", [
    ([0], None, "--split needs at least 2 GPUs (--gpus 0,1), got 1"),
    ([0, 1], [80 * GIB, 24 * GIB], "--split needs GPUs of one memory size"),
    ([0, 1, 2, 3, 4], [80 * GIB] * 5, "24 attention heads do not divide among 5 GPUs (use 2, 3, 4, 6, 8, 12, 24)"),
])
def test_split_refuses_what_it_cannot_run_in_one_line(devices, memory, needle):
    from framepack_ui.errors import InputError
    from framepack_ui.worker.split import check_split_option

    with pytest.raises(InputError) as refused:
        check_split_option(devices, True, memory_bytes=memory)
    assert needle in refused.value.message and "\n" not in refused.value.message


def test_split_takes_gpus_of_one_memory_size_asking_the_probe_for_their_sizes():
    from framepack_ui.errors import InputError
    from framepack_ui.worker.split import check_split_option

    asked = []

    def probe(devices):
        asked.append(list(devices))
        return [140 * GIB, 139 * GIB][: len(devices)]  # one card kind, one with a little more reserved

    check_split_option([2, 3], True, probe=probe)
    assert asked == [[2, 3]]
    check_split_option([0], False, probe=probe)  # without --split nothing is checked
    assert asked == [[2, 3]]
    with pytest.raises(InputError, match="--attention cudnn_fp8"):  # the 8-bit adapters have no Ulysses path
        check_split_option([0, 1], True, memory_bytes=[80 * GIB] * 2, attention="cudnn_fp8")


def test_cli_split_with_one_gpu_exits_2_with_one_line(tiny_models_dir, start_image, tmp_path, capsys):
    from framepack_ui.cli import main as cli_main

    code = cli_main(["generate", "--models", str(tiny_models_dir), "--image", start_image, "--prompt", "a square",
                     "--out", str(tmp_path / "one.mp4"), "--split"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --split needs at least 2 GPUs (--gpus 0,1), got 1: one GPU runs the job without --split"
    assert not list(tmp_path.iterdir())


def test_bench_split_tiny_times_one_and_two_processes(tmp_path):
    """bench/bench_split.py --tiny: the GPU benchmark's own code on CPU processes (a smoke test, never a figure)."""
    import json

    from bench import bench_split

    out = tmp_path / "split.json"
    bench_split.main(["--tiny", "--out", str(out), "--timed-steps", "1", "--resolutions", "640"])
    result = json.loads(out.read_text())
    assert [(c["gpus"], c["resolution"]) for c in result["cases"]] == [(1, 640), (2, 640)]
    assert all(c["median_step_s"] > 0 and len(c["step_s"]) == 1 for c in result["cases"])
    assert result["cases"][0]["speedup"] == 1.0 and result["split_env"]["NCCL_NVLS_ENABLE"] == "0"
    assert "topology" in result


def test_stopping_a_split_job_keeps_its_finished_section(tiny_models_dir, start_image_64x64, tmp_path):
    """Stop asked in the worker's process after the first section: rank 0 stops at its next step as a one-GPU job
    does (the others are released), and the finished section stays playable."""
    import threading

    from conftest import cpu_plan
    from framepack_ui.events import SectionSaved, Stopped
    from framepack_ui.spec import JobSpec
    from framepack_ui.worker.split import run_split_job

    spec = JobSpec(image=start_image_64x64, prompt="a red square moves", resolution=64, steps=2, seconds=3.6)
    cancel, events = threading.Event(), []

    def emit(event) -> None:
        events.append(event)
        if isinstance(event, SectionSaved):
            cancel.set()

    result = run_split_job(spec, tmp_path / "stopped.mp4", cpu_plan(tiny_models_dir), [0, 1], tiny_models_dir,
                           emit, cancel, device_type="cpu", collective_timeout_s=120)
    assert isinstance(result, Stopped), result
    # the first section (1 + 36 frames), or two: its SectionSaved may come while the second samples; never all 3
    assert result.frames in (37, 73) and (tmp_path / "stopped.mp4").exists()


def test_a_magcache_split_job_is_refused_in_one_line_before_any_process_starts(tiny_models_dir, start_image_64x64,
                                                                               make_worker, tmp_path):
    """MagCache's hooks skip blocks on rank 0 alone: a split job with it would leave the other ranks waiting in a
    block's all-to-all until the collective timeout. It is refused as bad input (the CLI exits 2), no process
    started."""
    import multiprocessing

    from framepack_ui.events import Failed
    from framepack_ui.spec import JobSpec
    from framepack_ui.worker.split import SplitJobRunner
    from worker_jobs import all_events

    spec = JobSpec(image=start_image_64x64, prompt="a red square moves", resolution=64, steps=2, seconds=1.2,
                   cache="magcache")
    worker = make_worker(models_dir=tiny_models_dir, run_job=SplitJobRunner([0, 1], device_type="cpu",
                                                                          collective_timeout_s=60))
    end = all_events(worker, worker.submit(spec, out_path=tmp_path / "magcache.mp4"))[-1]
    assert isinstance(end, Failed) and end.reason == "input", end
    assert end.message == "MagCache does not run with --split yet: use --cache teacache or off for a split job"
    assert not multiprocessing.active_children() and not (tmp_path / "magcache.mp4").exists()


def test_the_memory_probe_reads_each_devices_total_from_nvml():
    from types import SimpleNamespace

    from framepack_ui.worker.split import gpu_memory_bytes

    totals = {2: 80 * GIB, 3: 24 * GIB}
    calls = []
    nvml = SimpleNamespace(nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
                           nvmlDeviceGetHandleByIndex=lambda index: index,
                           nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(total=totals[handle]))
    assert gpu_memory_bytes([2, 3], nvml=nvml) == [80 * GIB, 24 * GIB]
    assert calls == ["init", "shutdown"]

    def no_driver():
        raise RuntimeError("NVML Shared Library Not Found")

    assert gpu_memory_bytes([0, 1], nvml=SimpleNamespace(nvmlInit=no_driver)) is None


@pytest.mark.parametrize("args, line", [
    (["--gpus", "0,1", "--split"], "error: --gpus 0,1: this machine has no CUDA GPU"),
    (["--gpus", "0,1"], "error: --gpus names the GPUs of a --split job; one job on one GPU takes --device cuda:N"),
])
def test_cli_gpus_names_the_split_jobs_gpus_and_refuses_what_it_cannot_in_one_line(tiny_models_dir, start_image,
                                                                                   tmp_path, capsys, args, line):
    from framepack_ui.cli import main as cli_main

    code = cli_main(["generate", "--models", str(tiny_models_dir), "--image", start_image, "--prompt", "a square",
                     "--out", str(tmp_path / "one.mp4"), *args])
    assert code == 2 and capsys.readouterr().err.strip() == line
    assert not list(tmp_path.iterdir())


def test_the_app_with_gpus_and_split_runs_each_job_over_all_of_them(monkeypatch, caplog, tmp_path):
    """app.py --gpus 0,1 --split: one worker (planned on the first GPU) whose run_job is the split job over both,
    not a worker per GPU; --split without --gpus is refused in one line. The device count is injected (no GPU here: the
    probe of their memory sizes finds none to compare)."""
    import logging

    import app
    import framepack_ui.worker
    from framepack_ui.worker import WorkerPool, split

    monkeypatch.setattr(framepack_ui.worker, "cuda_device_count", lambda: 2)
    worker = app.make_worker(app.parse_args(["--gpus", "0,1", "--split", "--outputs", str(tmp_path / "out")]))
    try:
        assert not isinstance(worker, WorkerPool) and worker.device_name() == "cuda:0"
        assert isinstance(worker._run_job, split.SplitJobRunner) and worker._run_job.devices == [0, 1]
    finally:
        worker.shutdown()
    with caplog.at_level(logging.ERROR):
        assert app.make_worker(app.parse_args(["--split", "--outputs", str(tmp_path / "out")])) is None
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "--split needs --gpus naming 2 or more GPUs (e.g. --gpus 0,1 --split)"]
