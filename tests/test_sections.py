"""Sections the user owns (#16): state saved per section, resume, branch from a section, extend any video.

Real engine on the tiny models (engine/state.py, engine/continuation.py, f1's seam), the command line as its own
process for a job killed with SIGKILL and for each bad input."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import cpu_manager
from framepack_ui.engine import f1
from framepack_ui.engine.state import RESUME_SECTIONS, load_state
from framepack_ui.engine.video import count_frames
from framepack_ui.errors import Cancelled
from framepack_ui.events import Finished, Notice, Stopped
from framepack_ui.sidecar import sidecar_path, state_path
from framepack_ui.spec import Continuation, JobSpec
from framepack_ui.worker.gallery import past_outputs, remove_output
from worker_jobs import record_planned_sections

REPO = Path(__file__).resolve().parent.parent
SETTINGS = dict(prompt="a red square moves", resolution=64, steps=2, seed=5)


@pytest.fixture(scope="module")
def manager(tiny_models_dir):
    return cpu_manager(tiny_models_dir)


def spec_of(image, **changes) -> JobSpec:
    return JobSpec(image=image, **{**SETTINGS, "seconds": 3.6, **changes})


def stop_at(section_index: int):
    """A section hook that stops the job as section `section_index` (0-based) starts: the ones before it are done."""
    def hook(section):
        if section == section_index:
            raise Cancelled()
    return hook


def decoded(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def latents(video, section: int) -> torch.Tensor:
    return load_file(state_path(video) / f"section_{section + 1:04d}.safetensors")["latents"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def digest(*paths) -> str:
    h = hashlib.sha256()
    for path in paths:
        for file in sorted(Path(path).rglob("*")) if Path(path).is_dir() else [Path(path)]:
            h.update(str(file).encode() + (file.read_bytes() if file.is_file() else b"/"))
    return h.hexdigest()


@pytest.fixture(scope="module")
def uninterrupted(manager, start_image, tmp_path_factory):
    """A 3-section job run through, with every frame handed to its writer."""
    out = tmp_path_factory.mktemp("whole") / "whole.mp4"
    sink = []
    end = f1.run(spec_of(start_image), out, manager, lambda e: None, frame_sink=sink.append)
    assert isinstance(end, Finished)
    return out, np.concatenate(sink)


# --- 1. state saved per section -------------------------------------------------------------------------------------

def test_state_saved_beside_video_per_section_with_its_cap(manager, start_image, uninterrupted, tmp_path):
    out, _ = uninterrupted
    saved = load_state(out)
    assert saved.sections_done == 3 and [e["frames_on_disk"] for e in saved.manifest["sections"]] == [4, 40, 76]
    inputs = saved.inputs()  # the encoders' outputs: a resume loads no encoder
    assert {"start_latent", "image_embeds", "prompt_0_llama", "prompt_0_clip_pooled"} <= set(inputs)
    assert saved.section(2)["latents"].dtype == torch.float32 and saved.section(2)["latents"].shape[2] == 9
    assert saved.manifest["width"] == 64 and saved.manifest["settings"]["seed"] == 5
    # "resume" keeps only the newest sections' latents: enough to resume a 5-section job stopped after 4
    capped = tmp_path / "capped.mp4"
    end = f1.run(spec_of(start_image, seconds=6.0, section_state="resume"), capped, manager, lambda e: None,
                 section_hook=stop_at(4))
    assert isinstance(end, Stopped)
    files = sorted(p.name for p in state_path(capped).glob("section_*"))
    assert files == [f"section_{i:04d}.safetensors" for i in range(5 - RESUME_SECTIONS, 5)]  # sections 2..4
    assert load_state(capped).sections_done == 4
    end = f1.run(spec_of(start_image, seconds=6.0), capped, manager, lambda e: None,
                 start=Continuation("resume", str(capped)))
    assert isinstance(end, Finished) and count_frames(capped) == 1 + 36 * 5


def test_removing_an_output_removes_its_state(uninterrupted, tmp_path):
    out, _ = uninterrupted
    copy = tmp_path / "copy.mp4"
    copy.write_bytes(out.read_bytes())
    sidecar_path(copy).write_text(json.dumps({"status": "finished"}))
    state_path(copy).mkdir()
    (state_path(copy) / "state.json").write_text(json.dumps({"sections": [{}, {}]}))
    assert past_outputs(tmp_path)[0].sections_saved == 2
    removed = remove_output(tmp_path, "copy.mp4")
    assert {"copy.mp4", "copy.json", "copy.state"} <= set(removed)
    assert list(tmp_path.iterdir()) == []


# --- 2. resume ------------------------------------------------------------------------------------------------------

def test_resume_reproduces_the_uninterrupted_latents_and_writer_frames(manager, start_image, uninterrupted, tmp_path):
    whole, whole_frames = uninterrupted
    out = tmp_path / "resumed.mp4"
    end = f1.run(spec_of(start_image), out, manager, lambda e: None, section_hook=stop_at(2))
    assert isinstance(end, Stopped) and end.frames == 73
    stopped = decoded(out)
    sink, events = [], []
    end = f1.run(spec_of(start_image, prompt="ignored: a resume keeps its settings"), out, manager, events.append,
                 frame_sink=sink.append, start=Continuation("resume", str(out)))
    assert isinstance(end, Finished) and end.path == str(out)
    for section in range(3):  # bit for bit
        assert torch.equal(latents(out, section), latents(whole, section))
    resumed_frames = np.concatenate(sink)  # from the newest final frame of section 2 on
    assert np.array_equal(resumed_frames, whole_frames[-len(resumed_frames):])
    assert len(resumed_frames) == 1 + 32 + 36
    frames = decoded(out)
    assert len(frames) == 1 + 36 * 3
    copied = 41 - 1  # section 2's final frames but its newest: copied as packets
    assert np.array_equal(frames[:copied], stopped[:copied])
    # after them a new H.264 stream: within encoder noise of the uninterrupted file (docs/benchmarks.md)
    assert psnr(frames[copied:], decoded(whole)[copied:]) > 35
    assert not list(tmp_path.glob(".resumed.resume-*"))  # the new file was moved into place
    assert json.loads(sidecar_path(out).read_text())["status"] == "finished"


def run_cli(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "framepack_ui", *args], cwd=REPO, capture_output=True, text=True,
                          **kwargs)


def test_a_killed_cli_job_keeps_a_playable_video_and_state_and_resumes(tiny_models_dir, start_image, tmp_path):
    base = ["generate", "--models", str(tiny_models_dir), "--offline", "--no-prompt-cache"]
    settings = ["--image", start_image, "--prompt", "a red square", "--resolution", "64", "--steps", "2",
                "--seconds", "3.6"]
    whole = tmp_path / "whole.mp4"
    assert run_cli(*base, *settings, "--out", str(whole), timeout=300).returncode == 0
    out = tmp_path / "killed.mp4"
    log = tmp_path / "killed.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "framepack_ui", *base, *settings, "--out", str(out)],
                                cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "section 2/3 saved" not in log.read_text() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-way through section 3
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert count_frames(out) >= 41 - 1  # plays: all but the newest frame the writer had
    assert load_state(out).sections_done == 2
    proc = run_cli(*base, "--resume", str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert count_frames(out) == 109
    for section in range(3):
        assert torch.equal(latents(out, section), latents(whole, section))


# --- 3. branch ------------------------------------------------------------------------------------------------------

def test_branch_keeps_the_earlier_sections_and_changes_section_k(manager, start_image, uninterrupted, tmp_path):
    whole, whole_frames = uninterrupted
    before = digest(whole, state_path(whole), sidecar_path(whole))
    out = tmp_path / "branch.mp4"
    sink, events = [], []
    end = f1.run(spec_of(start_image, seed=6), out, manager, events.append, frame_sink=sink.append,
                 start=Continuation("branch", str(whole), from_section=2))
    assert isinstance(end, Finished) and count_frames(out) == 109
    assert torch.equal(latents(out, 0), latents(whole, 0))  # section 1 kept
    assert not torch.equal(latents(out, 1), latents(whole, 1))  # section 2 anew (a fresh generator)
    frames = decoded(out)
    kept = 5 - 1  # section 1's final frames but its newest: copied; the cross-fade into section 2 follows
    assert np.array_equal(frames[:kept], decoded(whole)[:kept])
    # up to the cross-fade into section 2 the writer gets the source's frames (the fade's first weight is 1)
    assert np.array_equal(np.concatenate(sink)[0], whole_frames[kept])
    assert digest(whole, state_path(whole), sidecar_path(whole)) == before  # the original stays
    assert json.loads(sidecar_path(out).read_text())["continued"] == {"kind": "branch", "video": "whole.mp4",
                                                                       "from_section": 2}
    # the same seed and settings continue the source's noise: section 2 comes out as it did
    same = tmp_path / "same.mp4"
    f1.run(spec_of(start_image), same, manager, lambda e: None, start=Continuation("branch", str(whole), 2))
    assert torch.equal(latents(same, 1), latents(whole, 1)) and torch.equal(latents(same, 2), latents(whole, 2))


# --- 4. extend ------------------------------------------------------------------------------------------------------

def test_extending_a_past_output_holds_its_frames_first_and_grows_36_per_section(manager, start_image, uninterrupted,
                                                                                   tmp_path):
    whole, _ = uninterrupted
    out = tmp_path / "longer.mp4"
    events = []
    end = f1.run(spec_of("", seconds=2.4), out, manager, events.append,
                 start=Continuation("extend", str(whole)))
    assert isinstance(end, Finished)
    frames = decoded(out)
    assert len(frames) == 109 + 36 * 2
    assert np.array_equal(frames[:77 - 1], decoded(whole)[:77 - 1])  # its final frames, copied
    for section in range(3):
        assert torch.equal(latents(out, section), latents(whole, section))
    assert any(isinstance(e, Notice) and "whole.mp4's own" in e.message for e in events)


def write_video(path: Path, frames: int, fps: int, width: int = 80, height: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    clip = np.stack([np.stack([(x * 3 + t * 4) % 256, (y * 3 + 2 * t) % 256, np.full_like(x, 90)], -1)
                     for t in range(frames)]).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10"}
        for i, rgb in enumerate(clip):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return clip


def test_extending_any_video_converts_it_to_30fps_and_grows_36_per_section(manager, start_image, tmp_path):
    video = tmp_path / "brought.mp4"
    write_video(video, 40, 24)  # 1.67 s at 24 fps: 50 frames at 30 fps
    out = tmp_path / "extended.mp4"
    events = []
    end = f1.run(JobSpec(image="", **{**SETTINGS, "seconds": 2.4}), out, manager, events.append,
                 start=Continuation("extend", str(video)))
    assert isinstance(end, Finished), end
    frames = decoded(out)
    assert len(frames) == 50 + 36 * 2
    with av.open(str(out)) as container:
        assert container.streams.video[0].average_rate == 30
    source = decoded(video)
    converted = source[[min(int(i * 24 / 30 + 1e-6), 39) for i in range(50)]]  # the newest frame at each 1/30 s
    assert frames.shape[1:] == (48, 64, 3)  # the nearest bucket, centre-cropped
    from framepack_ui.engine.image import resize_and_center_crop
    expected = np.stack([resize_and_center_crop(f, 64, 48) for f in converted])
    assert psnr(frames[:50 - 32], expected[:50 - 32]) > 30  # the video's frames first (re-encoded)
    assert any(isinstance(e, Notice) and "first frame" in e.message for e in events)
    # the user's own start image anchors it instead
    events = []
    f1.run(JobSpec(image=start_image, **{**SETTINGS, "seconds": 1.2}), tmp_path / "anchored.mp4", manager,
           events.append, start=Continuation("extend", str(video)))
    assert any(isinstance(e, Notice) and "image you picked" in e.message for e in events)


# --- 5. bad input ---------------------------------------------------------------------------------------------------

def _break(kind: str, source: Path, tmp_path: Path) -> list[str]:
    """Damage `source` (a copy of a finished output) as `kind` says; returns the CLI arguments that should fail."""
    state = state_path(source)
    if kind == "not a video":
        bad = tmp_path / "text.mp4"
        bad.write_text("not a video")
        return ["--extend", str(bad), "--prompt", "x", "--out", str(tmp_path / "new.mp4")]
    if kind == "no frames":
        empty = tmp_path / "empty.mp4"
        with av.open(str(empty), "w") as container:
            stream = container.add_stream("libx264", rate=30)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            container.start_encoding()  # the header written, no frame
        return ["--extend", str(empty), "--prompt", "x", "--out", str(tmp_path / "new.mp4")]
    if kind == "section past the last":
        return ["--branch", str(source), "--from-section", "4", "--out", str(tmp_path / "new.mp4")]
    if kind == "state missing":
        (state / "state.json").unlink()
        return ["--branch", str(source), "--from-section", "2", "--out", str(tmp_path / "new.mp4")]
    if kind == "state truncated":
        section = state / "section_0001.safetensors"
        section.write_bytes(section.read_bytes()[:-100])
        return ["--branch", str(source), "--from-section", "2", "--out", str(tmp_path / "new.mp4")]
    if kind == "other model":
        manifest = json.loads((state / "state.json").read_text())
        manifest["model_files"]["vae/diffusion_pytorch_model.safetensors"] = "1:other"
        (state / "state.json").write_text(json.dumps(manifest))
        return ["--branch", str(source), "--from-section", "2", "--out", str(tmp_path / "new.mp4")]
    if kind == "other resolution":
        return ["--branch", str(source), "--from-section", "2", "--resolution", "128", "--out",
                str(tmp_path / "new.mp4")]
    raise AssertionError(kind)


@pytest.fixture(scope="module")
def cli_output(tiny_models_dir, start_image, tmp_path_factory):
    """A finished 3-section output of the command line (its state has the models' fingerprint)."""
    out = tmp_path_factory.mktemp("cli") / "past.mp4"
    proc = run_cli("generate", "--models", str(tiny_models_dir), "--offline", "--no-prompt-cache", "--image",
                   start_image, "--prompt", "x", "--resolution", "64", "--steps", "1", "--seconds", "3.6", "--out",
                   str(out), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.mark.parametrize("kind,needle", [
    ("not a video", "not a video"),
    ("no frames", "empty.mp4 has no video frames"),
    ("section past the last", "has 3 sections: cannot branch from section 4"),
    ("state missing", "has no saved section state"),
    ("state truncated", "section_0001.safetensors is truncated"),
    ("other model", "made with other model files (vae/diffusion_pytorch_model.safetensors)"),
    ("other resolution", "keeps past.mp4's resolution"),
])
def test_bad_input_is_refused_in_one_line_and_nothing_is_overwritten(tiny_models_dir, cli_output, tmp_path, kind,
                                                                     needle):
    import shutil

    source = tmp_path / "past.mp4"
    for path in (cli_output, sidecar_path(cli_output), cli_output.with_name("past.input.png")):
        shutil.copy(path, tmp_path / path.name)
    shutil.copytree(state_path(cli_output), state_path(source))
    args = _break(kind, source, tmp_path)
    before = digest(tmp_path)
    proc = run_cli("generate", "--models", str(tiny_models_dir), "--offline", "--no-prompt-cache", *args, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert digest(tmp_path) == before  # nothing started, nothing written


# --- 5. prompts over time in a continued job ------------------------------------------------------------------------

TIMED = "[0s: a red square] [1.2s: a blue circle] [2.4s: a green line]"


def section_texts(video) -> list[str]:
    saved = load_state(video)
    return [p.prompt for p in saved.section_plan()]


def test_continued_jobs_condition_each_section_on_its_own_prompt(text_sensitive_models, start_image, tmp_path):
    """On a transformer that follows the prompt: a resume continues the saved schedule (every distinct prompt's
    embeddings are in the state), a branch takes the new schedule from section K, an extension's times count
    from its own start."""
    lender = cpu_manager(text_sensitive_models)
    whole = tmp_path / "whole.mp4"
    assert isinstance(f1.run(spec_of(start_image, prompt=TIMED), whole, lender, lambda e: None), Finished)
    saved = load_state(whole)
    assert saved.manifest["prompts"] == ["a red square", "a blue circle", "a green line"]
    assert {f"prompt_{i}_llama" for i in range(3)} <= set(saved.inputs())

    resumed = tmp_path / "resumed.mp4"
    assert isinstance(f1.run(spec_of(start_image, prompt=TIMED), resumed, lender, lambda e: None,
                             section_hook=stop_at(1)), Stopped)
    end = f1.run(spec_of(start_image, prompt="ignored"), resumed, lender, lambda e: None,
                 start=Continuation("resume", str(resumed)))
    assert isinstance(end, Finished)
    for section in range(3):  # sections 2 and 3 on their own prompts, as the uninterrupted job
        assert torch.equal(latents(resumed, section), latents(whole, section))

    changed = "[0s: a red square] [1.2s: a yellow star]"
    fresh = tmp_path / "fresh.mp4"  # the changed prompt from the start: its section 1 is the source's
    assert isinstance(f1.run(spec_of(start_image, prompt=changed), fresh, lender, lambda e: None), Finished)
    branched = tmp_path / "branched.mp4"
    end = f1.run(spec_of(start_image, prompt=changed), branched, lender, lambda e: None,
                 start=Continuation("branch", str(whole), from_section=2))
    assert isinstance(end, Finished)
    assert section_texts(branched) == ["a red square", "a yellow star", "a yellow star"]
    assert not torch.equal(latents(branched, 1), latents(whole, 1))  # same noise, the new prompt
    for section in range(3):
        assert torch.equal(latents(branched, section), latents(fresh, section))

    extended = tmp_path / "extended.mp4"
    end = f1.run(spec_of("", prompt="[0s: a pink cube] [1.2s: an orange cone]", seconds=2.4), extended, lender,
                 lambda e: None, start=Continuation("extend", str(whole)))
    assert isinstance(end, Finished)
    assert section_texts(extended) == ["a red square", "a blue circle", "a green line", "a pink cube",
                                       "an orange cone"]
    starts = [c["section_index"] for c in json.loads(sidecar_path(extended).read_text())["prompt_changes"]]
    assert starts == [3, 4]


def test_a_resumed_extension_keeps_its_prompts_and_their_record(text_sensitive_models, start_image, tmp_path):
    lender = cpu_manager(text_sensitive_models)
    source = tmp_path / "source.mp4"
    assert isinstance(f1.run(spec_of(start_image, prompt="a red square", seconds=1.2), source, lender,
                             lambda e: None), Finished)
    extended = tmp_path / "extended.mp4"
    assert isinstance(f1.run(spec_of("", prompt="[0s: a pink cube] [1.2s: an orange cone]", seconds=2.4), extended,
                             lender, lambda e: None, section_hook=stop_at(2),
                             start=Continuation("extend", str(source))), Stopped)
    end = f1.run(spec_of("", prompt=""), extended, lender, lambda e: None,
                 start=Continuation("resume", str(extended)))
    assert isinstance(end, Finished) and count_frames(extended) == 1 + 36 * 3
    assert section_texts(extended) == ["a red square", "a pink cube", "an orange cone"]
    changes = json.loads(sidecar_path(extended).read_text())["prompt_changes"]
    assert [(c["section_index"], c["prompt"]) for c in changes] == [(1, "a pink cube"), (2, "an orange cone")]


def test_a_queued_branch_and_extension_come_back_after_a_restart_with_what_they_continue(
        tiny_models_dir, start_image, uninterrupted, tmp_path, monkeypatch):
    """The web app's worker records a queued branch and extension with what each continues; closed before they
    start, a new worker lists both waiting with it, and the branch, started, continues its source (its settings file
    says so) and is planned for the two sections it samples (3 and 4), not the four it is long. A record whose source
    video is gone is dropped (nothing could run it)."""
    from framepack_ui.worker import Worker

    planned_sections = record_planned_sections(monkeypatch)

    whole, _ = uninterrupted
    outputs = tmp_path / "outputs"
    first = Worker(tiny_models_dir, outputs, device="cpu", prompt_cache_dir=None, background=False)
    branch = first.submit(spec_of(start_image, seconds=4.8), start=Continuation("branch", str(whole), from_section=3))
    extend = first.submit(spec_of("", seconds=1.2), start=Continuation("extend", str(whole)))
    paths = {job.id: Path(job.out_path) for job in first.jobs()}
    first.shutdown()  # the app closed with both queued

    again = Worker(tiny_models_dir, outputs, device="cpu", prompt_cache_dir=None)
    try:
        jobs = again.jobs()
        assert [(j.status, Path(j.out_path)) for j in jobs] == [("waiting", paths[branch]), ("waiting", paths[extend])]
        assert [again._jobs[j.id].start for j in jobs] == [Continuation("branch", str(whole), 3),
                                                          Continuation("extend", str(whole))]
        assert again.resume(jobs[0].id)
        assert isinstance(list(again.events(jobs[0].id))[-1], Finished)
        assert planned_sections == [2]  # sections 1-2 come from the source: a short job's plan
        assert json.loads(sidecar_path(paths[branch]).read_text())["continued"] == {
            "kind": "branch", "video": "whole.mp4", "from_section": 3}
        assert torch.equal(latents(paths[branch], 1), latents(whole, 1))  # sections 1-2 kept from the source
    finally:
        again.shutdown()
    moved = tmp_path / "moved.mp4"
    copy = outputs / "copy.mp4"
    shutil.copy(whole, moved)
    later = Worker(tiny_models_dir, outputs, device="cpu", prompt_cache_dir=None, background=False)
    later.submit(spec_of("", seconds=1.2), out_path=copy, start=Continuation("extend", str(moved)))
    later.shutdown()
    moved.unlink()  # the source is gone before the restart
    last = Worker(tiny_models_dir, outputs, device="cpu", prompt_cache_dir=None)
    try:
        assert [Path(j.out_path) for j in last.jobs()] == [paths[extend]]
        assert not sidecar_path(copy).exists()
    finally:
        last.shutdown()


def test_a_submitted_extension_and_branch_are_planned_for_the_sections_they_sample(
        tiny_models_dir, start_image, uninterrupted, tmp_path, monkeypatch):
    """Continuations submitted to the worker (not restored: their sections come from what they continue): the
    extension by one section is planned for it and for the branch queued behind it, which samples one section of
    its three (sections 1-2 come from the source), 2 in all; then the branch for its one. Not the extended video's
    four sections, nor the branch's three."""
    from framepack_ui.worker import Worker

    planned_sections = record_planned_sections(monkeypatch)
    whole, _ = uninterrupted
    worker = Worker(tiny_models_dir, tmp_path / "outputs", device="cpu", prompt_cache_dir=None, background=False)
    try:
        worker.submit(spec_of("", seconds=1.2), start=Continuation("extend", str(whole)))
        worker.submit(spec_of(start_image), start=Continuation("branch", str(whole), from_section=3))
        worker.run_queued()
        assert [job.status for job in worker.jobs()] == ["finished", "finished"]
    finally:
        worker.shutdown()
    assert planned_sections == [2, 1]
