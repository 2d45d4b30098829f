"""Nothing lost under faults (issue 21): a fault injected at a boundary of the real engine on tiny models (out of GPU
memory at a section, a full disk at the writer, a killed process, broken weights, no memory at load), and each time
one line for the user, the finished sections playable and the next job running."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from framepack_ui import sidecar
from framepack_ui.engine import f1, video
from framepack_ui.engine.video import count_frames
from framepack_ui.events import Failed, Finished, Phase, SectionSaved
from framepack_ui.memory import exhaustion, loading
from framepack_ui.memory.plan import PlanOverrides, leaner_choices, make_plan, real_weights
from framepack_ui.memory.plan.explain import gb_text
from framepack_ui.memory.probe import Machine
from framepack_ui.sidecar import sidecar_path
from framepack_ui.spec import JobSpec
from framepack_ui.weights import layout
from framepack_ui.weights.tiny import make_tiny_models
from framepack_ui.worker import Worker
from framepack_ui.worker.gallery import past_outputs
from worker_jobs import TIMEOUT_S, all_events, spec


# --- out of GPU memory during a section --------------------------------------------------------------------------

def test_out_of_memory_advice_names_the_leaner_choice_of_the_plan():
    """The line after an out-of-memory names what is leaner than the plan the job ran under."""
    real = real_weights()

    def advice(ram_gb, vram_gb, **overrides):
        plan = make_plan(Machine.supposed(ram_gb, vram_gb), real, PlanOverrides(**overrides))
        return plan.components["transformer"], leaner_choices(plan)

    resident, said = advice(128, 80, plan="gpu")
    assert resident.where == "gpu" and resident.storage != "fp8"
    assert said == ("pick the 'streamed' memory profile (--plan streamed), or fp8 storage of the video model "
                    "(--fp8), or resolution 544 (this job ran at 640)")
    streamed, said = advice(64, 8, fp8=False, resolution=480)
    assert streamed.where == "gpu-streamed"
    assert said == ("close other programs using the GPU, or pick fp8 storage of the video model (--fp8), or "
                    "resolution 384 (this job ran at 480)")
    leanest, said = advice(64, 8, fp8=True, resolution=256)  # streamed, fp8, the smallest resolution: nothing left
    assert leanest.where == "gpu-streamed" and leanest.storage == "fp8"
    assert said == "close other programs using the GPU"
    _, said = advice(64, 0)  # no GPU: only the resolution is left to lower
    assert said == "pick resolution 544 (this job ran at 640)"


def test_out_of_gpu_memory_mid_job_names_the_leaner_plan_keeps_the_sections_and_the_next_job_runs(
        make_worker, start_image_80x64):
    """The first job runs out of GPU memory as its second section starts (injected at the engine's section
    boundary): it fails with one line ending in the leaner choices of the plan it ran under, its first section
    plays, and the queued job after it finishes."""
    calls = []

    def out_of_memory_in_the_first_job(spec, out_path, manager, emit, cancel, **kwargs):
        calls.append(spec.prompt)

        def hook(section):
            if len(calls) == 1 and section == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\n(injected)")

        return f1.run(spec, out_path, manager, emit, cancel, section_hook=hook, **kwargs)

    worker = make_worker(out_of_memory_in_the_first_job)
    first = worker.submit(spec(start_image_80x64, "runs out", seconds=2.4))
    second = worker.submit(spec(start_image_80x64, "runs next"))
    events = all_events(worker, first)
    failed = events[-1]
    plan = worker._make_plan("auto", 128)  # the plan the job ran under (this machine, its profile, resolution)
    assert isinstance(failed, Failed) and failed.reason == "memory"
    assert failed.message == ("out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB (injected)): "
                              + leaner_choices(plan))
    assert failed.path and count_frames(failed.path) == 37  # the finished section plays
    assert [e.section for e in events if isinstance(e, SectionSaved)] == [0]
    settings = json.loads(sidecar_path(failed.path).read_text())
    assert (settings["status"], settings["frames"], settings["message"]) == ("failed", 37, failed.message)
    assert isinstance(all_events(worker, second)[-1], Finished)
    assert calls == ["runs out", "runs next"]


# --- the process killed mid-job ----------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
SAVED_LINE = re.compile(r"section (\d+)/(\d+) saved: (\d+) frames in ")


def kill_after_section(command: list[str], section: int, pattern: re.Pattern) -> list[str]:
    """Start `command`, read its output until a line matching `pattern` names 1-based `section`, then kill -9 it.
    Returns every line it printed, those read after the kill too."""
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            match = pattern.search(line)
            if match and int(match.group(1)) == section:
                proc.send_signal(signal.SIGKILL)  # as the OS or a user would: no handler, no flush, no cleanup
                break
        lines += [line.rstrip("\n") for line in proc.stdout]
    finally:
        proc.kill()
        proc.wait(TIMEOUT_S)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL, "\n".join(lines)
    return lines


def test_a_killed_generate_leaves_a_video_with_the_frames_it_last_reported(tiny_models_dir, start_image, tmp_path):
    """kill -9 of the command line after its second section: the video plays and holds exactly the frames the last
    "saved" line said (the file holds all but the muxer's newest frame: reporting the frames encoded said one more)."""
    out = tmp_path / "killed.mp4"
    lines = kill_after_section(
        [sys.executable, "-m", "framepack_ui", "generate", "--models", str(tiny_models_dir), "--image", start_image,
         "--prompt", "killed mid-job", "--seconds", "6", "--resolution", "64", "--steps", "4", "--offline",
         "--device", "cpu", "--no-prompt-cache", "--out", str(out)], 2, SAVED_LINE)
    reported = [int(m.group(3)) for m in map(SAVED_LINE.search, lines) if m]
    assert len(reported) >= 2 and reported[1] == 1 + 36 * 2 - 32 - 1  # 32 wait for the cross-fade, 1 for the muxer
    assert count_frames(out) == reported[-1]
    [entry] = past_outputs(tmp_path)  # its settings file was left at "running": the gallery says interrupted
    assert entry.status == "interrupted" and entry.video == str(out.resolve())


WORKER_SCRIPT = """
import sys, threading
from framepack_ui.events import SectionSaved
from framepack_ui.spec import JobSpec
from framepack_ui.weights import layout
from framepack_ui.weights.tiny import make_tiny_models
from framepack_ui.worker import Worker
from framepack_ui.worker.gallery import past_outputs

models, outputs, image = sys.argv[1:4]
worker = Worker(models, outputs, device="cpu", prompt_cache_dir=None)
def job(prompt, seconds, on_event=None):
    return worker.submit(JobSpec(image=image, prompt=prompt, seconds=seconds, resolution=64, steps=4, seed=1),
                         on_event=on_event)
def said(event):
    if isinstance(event, SectionSaved):
        print(f"section {event.section + 1}/{event.sections} saved: {event.frames_written} frames", flush=True)
with worker._cond:  # all three queued before the first starts
    job("running when killed", 6.0, said)
    job("queued second", 1.2)
    job("queued third", 1.2)
threading.Event().wait()  # until killed
"""


def test_jobs_queued_when_the_app_was_killed_come_back_waiting_for_the_user(tiny_models_dir, start_image_80x64,
                                                                          tmp_path):
    """An app's worker (in its own process) is killed -9 during its first job, with two more queued. A new worker on
    the same outputs folder lists the two as waiting, in submit order, and runs neither until the user says so;
    started, one finishes; dropped, the other leaves nothing behind; the killed job's video plays with the frames
    it last reported and the gallery says it was interrupted."""
    outputs = tmp_path / "outputs"
    lines = kill_after_section([sys.executable, "-c", WORKER_SCRIPT, str(tiny_models_dir), str(outputs),
                                start_image_80x64], 1, re.compile(r"section (\d+)/\d+ saved: (\d+) frames"))
    frames_said = int(re.search(r"saved: (\d+) frames", lines[-1]).group(1))

    worker = Worker(tiny_models_dir, outputs, device="cpu", prompt_cache_dir=None)
    try:
        jobs = worker.jobs()
        assert [(j.spec.prompt, j.status, j.position) for j in jobs] == [("queued second", "waiting", None),
                                                                       ("queued third", "waiting", None)]
        assert all(Path(j.spec.image).parent == outputs for j in jobs)  # the copy kept beside the record
        assert "waiting for you" in worker.events(jobs[0].id).__next__().message
        with worker._cond:
            assert not worker._queue and worker._running is None  # nothing started on its own
        [killed] = worker.past_outputs()  # the queued ones are jobs, not past outputs
        assert killed.status == "interrupted" and count_frames(killed.video) == frames_said

        second, third = (j.id for j in jobs)
        assert worker.resume(second) and not worker.resume(second)
        assert isinstance(all_events(worker, second)[-1], Finished)
        assert worker.cancel(third) and worker.job(third).status == "stopped"
        assert {e.status for e in worker.past_outputs()} == {"interrupted", "finished"}
        assert not list(outputs.glob(f"{Path(jobs[1].out_path).stem}.*"))  # the dropped job left nothing
    finally:
        worker.shutdown()
    again = Worker(tiny_models_dir, outputs, device="cpu", prompt_cache_dir=None)
    assert again.jobs() == []  # nothing waits any more
    again.shutdown()


# --- corrupt or truncated weights --------------------------------------------------------------------------------

def _truncate(path: Path, by: int = 100) -> None:
    os.truncate(path, path.stat().st_size - by)


def _zero(path: Path) -> None:
    path.write_bytes(b"\0" * path.stat().st_size)  # a preallocated download that never got its bytes


def _cut_json(path: Path) -> None:
    path.write_text(path.read_text()[:20])


BROKEN_FILES = {  # what is broken: (file under the models folder, how)
    "truncated VAE weights": (f"{layout.HUNYUAN_REPO}/vae/diffusion_pytorch_model.safetensors", _truncate),
    "zeroed transformer shard": (f"{layout.F1_REPO}/diffusion_pytorch_model-00001-of-00003.safetensors", _zero),
    "cut transformer config": (f"{layout.F1_REPO}/config.json", _cut_json),
    "cut shard index": (f"{layout.HUNYUAN_REPO}/text_encoder/model.safetensors.index.json", _cut_json),
    "cut tokenizer": (f"{layout.HUNYUAN_REPO}/tokenizer/tokenizer.json", _cut_json),
}


@pytest.mark.parametrize("broken", list(BROKEN_FILES))
def test_broken_model_files_fail_the_job_at_its_start_naming_the_file_and_the_fix(
        broken, make_worker, tiny_models_dir, tmp_path, start_image_80x64):
    """Each broken file is found when the job starts, from the safetensors headers and the small JSON files
    (no hashing): one line naming it and the fix, before any model loads or any output is written."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    relative, damage = BROKEN_FILES[broken]
    damage(models / relative)
    worker = make_worker(models_dir=models)
    events = all_events(worker, worker.submit(spec(start_image_80x64)))
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.reason == "models" and failed.path is None
    assert "\n" not in failed.message and str(models / relative) in failed.message
    assert "corrupt or incomplete: delete it and download again" in failed.message
    assert [e.name for e in events if isinstance(e, Phase)] == ["starting"]  # no plan, no settings, no model


def test_the_command_line_refuses_a_truncated_transformer_with_one_line_and_exit_2(tiny_models_dir, tmp_path,
                                                                                 start_image):
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    shard = models / layout.F1_REPO / "diffusion_pytorch_model-00003-of-00003.safetensors"
    _truncate(shard, 8)
    proc = subprocess.run([sys.executable, "-m", "framepack_ui", "generate", "--models", str(models), "--image",
                           start_image, "--prompt", "x", "--offline", "--device", "cpu", "--out",
                           str(tmp_path / "x.mp4")], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and str(shard) in errors[0] and "is truncated" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "x.mp4").exists()


# --- a full disk -------------------------------------------------------------------------------------------------

class Disk:
    """The disk the outputs go to, as the video writer and the settings file see it: `full` makes every write fail
    with ENOSPC, as the OS would, until space is back."""

    def __init__(self):
        self.full = False

    def check(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def file(self, real):
        disk = self

        class FileOnDisk:
            def write(self, data):
                disk.check()
                return real.write(data)

            def __getattr__(self, name):
                return getattr(real, name)

        return FileOnDisk()


def test_a_full_disk_while_writing_the_video_fails_one_line_keeps_what_is_written_and_the_next_job_runs(
        make_worker, start_image_80x64, monkeypatch):
    """The disk fills up right after the first section is saved: the job fails with one line, its video plays with
    the frames that section reported; once space is back the next job finishes."""
    disk = Disk()
    open_output = video.open_output
    monkeypatch.setattr(video, "open_output", lambda path: disk.file(open_output(path)))

    def fill_after_the_first_section(event):
        if isinstance(event, SectionSaved):
            disk.full = True
        if isinstance(event, Failed):
            disk.full = False  # space is back before the next job starts

    worker = make_worker()
    first = worker.submit(spec(start_image_80x64, "fills the disk", seconds=2.4),
                          on_event=fill_after_the_first_section)
    second = worker.submit(spec(start_image_80x64, "after space is back"))
    events = all_events(worker, first)
    failed, [saved] = events[-1], [e for e in events if isinstance(e, SectionSaved)]
    assert isinstance(failed, Failed) and failed.reason == "disk" and "\n" not in failed.message
    assert failed.message == (f"the disk is full ({Path(worker.outputs_dir)}): free some space, then run the job "
                              f"again")
    assert failed.path and count_frames(failed.path) == saved.frames_written == 4
    settings = json.loads(sidecar.sidecar_path(failed.path).read_text())  # only the video's disk was full here
    assert (settings["status"], settings["frames"]) == ("failed", 4)  # read back: the encoder counted one more
    assert isinstance(all_events(worker, second)[-1], Finished)


def test_a_full_disk_while_writing_the_settings_fails_one_line_before_any_model_loads(
        make_worker, start_image_80x64, monkeypatch):
    disk = Disk()
    write_bytes = sidecar.atomic_write_bytes

    def atomic_write_bytes(path, data):
        disk.check()
        write_bytes(path, data)

    monkeypatch.setattr(sidecar, "atomic_write_bytes", atomic_write_bytes)
    disk.full = True
    worker = make_worker()
    events = all_events(worker, worker.submit(spec(start_image_80x64, "no room for its settings")))
    failed = events[-1]
    assert isinstance(failed, Failed) and failed.reason == "disk" and failed.path is None
    assert failed.message.startswith("the disk is full (") and "\n" not in failed.message
    assert not any(isinstance(e, Phase) and e.name in ("text", "transformer") for e in events)
    disk.full = False
    assert isinstance(all_events(worker, worker.submit(spec(start_image_80x64, "space is back")))[-1], Finished)


# --- out of host memory or commit while loading --------------------------------------------------------------------

def test_what_counts_as_out_of_host_memory():
    assert exhaustion.out_of_host_memory(MemoryError())
    assert exhaustion.out_of_host_memory(OSError(errno.ENOMEM, "Cannot allocate memory"))
    assert exhaustion.out_of_host_memory(RuntimeError(  # safetensors' Rust io error on Windows
        "Error while deserializing: The paging file is too small for this operation to complete. (os error 1455)"))
    assert exhaustion.out_of_host_memory(RuntimeError(
        "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 14745600 "
        "bytes. Error code 12 (Cannot allocate memory)"))
    assert not exhaustion.out_of_host_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not exhaustion.out_of_host_memory(RuntimeError("size mismatch for weight"))
    assert not exhaustion.out_of_host_memory(OSError(errno.ENOENT, "No such file"))


def test_the_shortfall_line_names_what_the_load_needed_and_the_leaner_choices():
    plan = make_plan(Machine.supposed(128, 0), real_weights(), PlanOverrides("cpu"))
    copy = plan.components["transformer"]  # a RAM copy, computed on the CPU
    need = copy.commit_bytes + copy.load_commit_bytes
    line = exhaustion.load_shortfall("transformer", copy, commit_free=need - 3 * 10**9, ram_free=0, os_name="win32")
    assert line == (f"not enough memory to load the transformer (cpu): it needs about {gb_text(need)} of commit and "
                    f"{gb_text(need - 3 * 10**9)} is free now (3.00G short); try the 'mmap' memory profile "
                    f"(--plan mmap: weights read from the file, not copied into RAM), or a larger pagefile (by at "
                    f"least 3 GB)")
    mapped = make_plan(Machine.supposed(64, 0), real_weights(), PlanOverrides("mmap")).components["transformer"]
    line = exhaustion.load_shortfall("transformer", mapped, commit_free=None, ram_free=10**9, os_name="linux")
    assert "of RAM and 1.00G is free now (other programs may have taken it meanwhile)" in line and "'mmap'" not in line
    assert line.endswith("try fp8 storage of the video model (--fp8: half the bytes), or closing other programs, or "
                         "more swap")


@pytest.mark.parametrize("error", [
    MemoryError(),
    RuntimeError("Error while deserializing header: The paging file is too small for this operation to complete. "
                 "(os error 1455)"),
])
def test_out_of_memory_while_loading_fails_one_line_with_the_shortfall_and_the_next_job_runs(
        error, make_worker, start_image_80x64, monkeypatch):
    """The transformer's loader fails for memory (Python's MemoryError; Windows' commit limit as safetensors words
    it): one line with what it needed, what is free and what to pick, not a "corrupt files" line; the next job
    loads it and finishes."""
    load_transformer, calls = loading.load_transformer, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise error
        return load_transformer(*args, **kwargs)

    monkeypatch.setattr(loading, "load_transformer", fails_once)
    worker = make_worker()
    first = worker.submit(spec(start_image_80x64, "no memory"))
    second = worker.submit(spec(start_image_80x64, "memory back"))
    failed = all_events(worker, first)[-1]
    assert isinstance(failed, Failed) and failed.reason == "memory" and "\n" not in failed.message
    assert re.fullmatch(r"not enough memory to load the transformer \(mmap\): it needs about \S+ of (commit|RAM) and "
                        r"\S+ is free now \(.*\); try fp8 storage of the video model \(--fp8: half the bytes\), or "
                        r"closing other programs, or more swap", failed.message), failed.message
    assert isinstance(all_events(worker, second)[-1], Finished)


@pytest.fixture(scope="module")
def models_300mb(tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("models300")
    make_tiny_models(models, transformer_mb=300, seed=0)
    return models


# Above what `generate` needs before the transformer loads (the imports and the tiny encoders: about 340 MB of
# VmData, tests/test_cli.py), below that plus the 300 MB transformer copied into RAM in float32 (about 900 MB)
DATA_LIMIT_BYTES = 800_000_000


def test_generate_under_a_data_limit_too_small_for_a_ram_copy_says_the_shortfall_in_one_line(
        models_300mb, start_image, tmp_path):
    """The commit-limit stand-in (`prlimit --data`, which the plan does not read): the transformer's RAM copy
    (--plan cpu) cannot be allocated; the command line says what it needed and that the file map would do."""
    assert shutil.which("prlimit"), "needs util-linux prlimit (Linux)"
    out = tmp_path / "limited.mp4"
    proc = subprocess.run(["prlimit", f"--data={DATA_LIMIT_BYTES}", sys.executable, "-m", "framepack_ui", "generate",
                           "--models", str(models_300mb), "--image", start_image, "--prompt", "x", "--resolution",
                           "64", "--steps", "1", "--seconds", "1.2", "--offline", "--plan", "cpu", "--device", "cpu",
                           "--no-prompt-cache", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = proc.stderr.strip().splitlines()
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert re.fullmatch(r"error: not enough memory to load the transformer \(cpu\): it needs about \S+ of commit and "
                        r"\S+ is free now \(\S+ short\); try the 'mmap' memory profile .*", errors[0]), errors[0]
