"""What the worker does around the model download and between jobs, driven directly (no browser): a job's own fetch
of missing model files (Worker._ensure_models, the `download_missing` option) against the loopback hub
(tests/fake_hub.py); the page's download (`start_download`, `_fetch_models`) where test_worker.py's tests of it
cannot look (the status before the hub answers, the rate's start, quitting while the hub is stalled); and the
bookkeeping of the VAE decoder's compile in the idle time after a job, with a scripted model lender.

The engine is scripted throughout: what is checked here happens before it starts or after it ends.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from fake_hub import FakeHub, guard_loopback_only, isolate_hf, repos_of
from framepack_ui.events import Failed, Finished, Phase, Stopped
from framepack_ui.weights import download, layout
from framepack_ui.worker import Queued
from framepack_ui.worker.events import Estimated
from worker_jobs import TIMEOUT_S, all_events, seconds_to_shut_down, spec, wait_until

VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"
VAE_WEIGHTS_IN_REPO = f"vae/{VAE_WEIGHTS}"
FEATURE_CONFIG = "preprocessor_config.json"
CHUNK = 4096  # the client's read size here: the tiny VAE's weights come in many chunks, so a stop lands mid-file


@pytest.fixture
def hub(tiny_models_dir, tmp_path, monkeypatch):
    """The loopback hub serving the tiny models' files; any other host is refused."""
    from huggingface_hub import constants as hf_constants

    guard_loopback_only(monkeypatch)
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", CHUNK)
    # the client's read timeout outlasts a hold however slow the machine is: a timed-out read would resume on its own
    monkeypatch.setattr(hf_constants, "HF_HUB_DOWNLOAD_TIMEOUT", 10 * TIMEOUT_S)
    with FakeHub(repos_of(tiny_models_dir)) as fake:
        isolate_hf(monkeypatch, tmp_path, fake.url)
        yield fake


@pytest.fixture
def models_lacking_two_files(tiny_models_dir, tmp_path):
    """A copy of the tiny models without the VAE's weights and the feature extractor's config: two models, one
    large (LFS, through the hub's CDN) and one small file missing."""
    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models, ignore=shutil.ignore_patterns(".cache"))
    (layout.COMPONENTS["vae"].folder(models) / VAE_WEIGHTS).unlink()
    (layout.COMPONENTS["feature_extractor"].folder(models) / FEATURE_CONFIG).unlink()
    assert set(layout.missing(models)) == {"vae", "feature_extractor"}
    return models


def recording_engine(calls: list):
    """A scripted engine: records that it started and finishes at once."""
    def engine(spec_, out_path, manager, emit, cancel, **kwargs):
        calls.append(spec_.prompt)
        emit(Finished(str(out_path), "", 0, 0.0))
    return engine


def record_download_reports(monkeypatch) -> list:
    """The progress reports the real `ensure_models` gives the worker, recorded on their way through."""
    real, reports = download.ensure_models, []

    def recording(*args, progress=None, **kwargs):
        def tee(p):
            reports.append(p)
            progress(p)
        return real(*args, progress=tee if progress is not None else None, **kwargs)

    monkeypatch.setattr(download, "ensure_models", recording)
    return reports


def after_queued(events: list) -> list:
    """A job's events from its start: the queue positions it was told before are left out."""
    return [e for e in events if not isinstance(e, Queued)]


def test_a_job_that_may_download_fetches_the_missing_files_first_and_says_so_in_download_phases(
        make_worker, models_lacking_two_files, hub, start_image_80x64, monkeypatch):
    """With `download_missing=True`, a job on a models folder lacking files fetches them from the hub before it is
    planned, each progress report said as a Phase("download", its line) (and timed in the job's timeline), and then
    runs. The files on disk are the hub's bytes, and nothing else was asked for: what the job's plan and engine need
    is complete before they run."""
    models = models_lacking_two_files
    reports = record_download_reports(monkeypatch)
    calls = []
    worker = make_worker(recording_engine(calls), models_dir=models, download_missing=True)

    job_id = worker.submit(spec(start_image_80x64, "fetch first"))
    events = after_queued(all_events(worker, job_id))

    assert isinstance(events[-1], Finished) and calls == ["fetch first"]
    downloads = [e for e in events if isinstance(e, Phase) and e.name == "download"]
    assert reports and downloads == [Phase("download", p.line()) for p in reports]
    vae_bytes = hub.repos[layout.HUNYUAN_REPO][VAE_WEIGHTS_IN_REPO]
    config_bytes = hub.repos[layout.REDUX_REPO][f"feature_extractor/{FEATURE_CONFIG}"]
    assert reports[-1].overall_done == reports[-1].overall_total == len(vae_bytes) + len(config_bytes)
    assert {(p.component, p.file) for p in reports} == {("vae", VAE_WEIGHTS), ("feature_extractor", FEATURE_CONFIG)}
    # after the start, before the plan: the plan reads every weight file's header
    names = [e.name for e in events if isinstance(e, Phase)]
    assert names[0] == "starting" and names.index("plan") > max(i for i, n in enumerate(names) if n == "download")
    assert [name for _, name in worker.timeline(job_id)["phases"]] == ["starting", "download", "plan"]  # timed too
    assert (layout.COMPONENTS["vae"].folder(models) / VAE_WEIGHTS).read_bytes() == vae_bytes
    assert (layout.COMPONENTS["feature_extractor"].folder(models) / FEATURE_CONFIG).read_bytes() == config_bytes
    assert layout.missing(models) == {}
    assert hub.files_requested() == {(layout.HUNYUAN_REPO, VAE_WEIGHTS_IN_REPO),
                                     (layout.REDUX_REPO, f"feature_extractor/{FEATURE_CONFIG}")}


def test_a_job_that_may_not_download_fails_at_once_naming_the_missing_files_on_one_line(
        make_worker, models_lacking_two_files, hub, start_image_80x64):
    """With `download_missing=False` (downloads turned off), a job on a folder lacking files fails before anything
    is planned or loaded, with one line naming each missing file and where it goes, and asks the hub nothing."""
    models = models_lacking_two_files
    calls = []
    worker = make_worker(recording_engine(calls), models_dir=models, download_missing=False)

    events = after_queued(all_events(worker, worker.submit(spec(start_image_80x64, "no downloads"))))

    message = f"{download.describe_missing(models)} (downloads are turned off)"
    assert [type(e) for e in events] == [Phase, Estimated, Failed]
    assert events[0] == Phase("starting", "starting the engine")
    assert events[-1] == Failed(message, None, "models") and "\n" not in message
    assert f"vae ({layout.HUNYUAN_REPO}: {VAE_WEIGHTS_IN_REPO}) -> put them in " \
           f"{layout.COMPONENTS['vae'].folder(models)}" in message
    assert f"feature_extractor ({layout.REDUX_REPO}: feature_extractor/{FEATURE_CONFIG})" in message
    assert hub.requests == [] and calls == []
    assert set(layout.missing(models)) == {"vae", "feature_extractor"}


def test_stopping_a_job_while_it_downloads_stops_the_download_and_keeps_the_partial_file(
        make_worker, models_lacking_two_files, hub, start_image_80x64):
    """A job stopped while it fetches its models ends Stopped with nothing kept, at the next chunk: the weights
    file is not completed (its partial is kept, for a later fetch to resume) and the engine never starts."""
    models = models_lacking_two_files
    data = hub.repos[layout.HUNYUAN_REPO][VAE_WEIGHTS_IN_REPO]
    assert len(data) > 8 * CHUNK
    reached, release = hub.hold(layout.HUNYUAN_REPO, VAE_WEIGHTS_IN_REPO, at=len(data) // 2)
    dest = layout.COMPONENTS["vae"].folder(models) / VAE_WEIGHTS

    def written() -> int:  # the partial file's size: what the client has read (the hub holds at half)
        return sum(p.stat().st_size for p in dest.parent.glob(f"{VAE_WEIGHTS}.*.incomplete"))

    calls = []
    worker = make_worker(recording_engine(calls), models_dir=models, download_missing=True)
    job_id = worker.submit(spec(start_image_80x64, "stopped while fetching"))
    try:
        assert reached.wait(TIMEOUT_S), "the job never reached the VAE's weights"
        wait_until(lambda: written() >= len(data) // 4)
        assert worker.cancel(job_id)  # while the hub holds the rest of the file back
    finally:
        release.set()

    events = after_queued(all_events(worker, job_id))

    assert events[-1] == Stopped(None, 0) and worker.job(job_id).status == "stopped"
    assert calls == [] and not any(isinstance(e, Phase) and e.name == "plan" for e in events)
    assert not dest.exists()  # nothing half-fetched looks complete
    [partial] = dest.parent.glob(f"{VAE_WEIGHTS}.*.incomplete")
    kept = partial.stat().st_size
    assert len(data) // 4 <= kept < len(data) and partial.read_bytes() == data[:kept]


def test_a_started_download_shows_a_bar_per_missing_model_at_once_and_each_report_fills_its_own(
        make_worker, models_lacking_two_files, monkeypatch):
    """The page's download (`start_download`): before the hub has said anything, the status has a bar per model with
    files missing, in download order, at 0 of its estimated size, and the model bytes already here (what the rate
    leaves out). Each report then fills its own model's bar and leaves the other's; the rate's start (time and bytes)
    is the first report's, kept by the later ones. The fetch is a stand-in that sends two reports when the test says,
    so nothing races these looks; test_worker.py runs the real fetch against the loopback hub."""
    from framepack_ui.weights.download import DownloadProgress
    from framepack_ui.worker.worker import DownloadStatus

    models = models_lacking_two_files
    entered, go_on, seen = threading.Event(), threading.Event(), []
    reports = (DownloadProgress("vae", VAE_WEIGHTS, 5, 10, 5, 17, model_done=5, model_total=10),
               DownloadProgress("feature_extractor", FEATURE_CONFIG, 7, 7, 12, 17, model_done=7, model_total=7))

    def held_fetch(models_dir, progress=None, cancel=None):
        assert Path(models_dir) == models and not cancel.is_set()
        entered.set()
        assert go_on.wait(TIMEOUT_S)
        for report in reports:
            progress(report)
            seen.append(worker.download_status())

    monkeypatch.setattr(download, "ensure_models", held_fetch)
    worker = make_worker(models_dir=models)
    here = sum(path.stat().st_size for component in layout.COMPONENTS.values() for name in component.files
               if (path := component.folder(models) / name).is_file())
    estimated = (("vae", 0, layout.COMPONENTS["vae"].approx_bytes // 2),  # one of its two files
                 ("feature_extractor", 0, layout.COMPONENTS["feature_extractor"].approx_bytes))
    try:
        assert worker.start_download()
        assert entered.wait(TIMEOUT_S)
        assert worker.download_status() == DownloadStatus("running", models=estimated, resumed_bytes=here)
    finally:
        go_on.set()
    wait_until(lambda: worker.download_status().state != "running")

    first, second = seen
    assert first.started_at_s is not None and first.updated_at_s == first.started_at_s
    assert second.started_at_s == first.started_at_s and second.updated_at_s >= first.updated_at_s
    assert [replace(s, started_at_s=None, updated_at_s=None) for s in seen] == [
        DownloadStatus("running", f"vae/{VAE_WEIGHTS}", 5, 17, models=(("vae", 5, 10), estimated[1]),
                       resumed_bytes=here, started_done_bytes=5),
        DownloadStatus("running", f"feature_extractor/{FEATURE_CONFIG}", 12, 17,
                       models=(("vae", 5, 10), ("feature_extractor", 7, 7)), resumed_bytes=here,
                       started_done_bytes=5)]
    assert worker.download_status() == DownloadStatus("done", "", 17, 17)


def test_a_download_failing_with_a_long_error_says_it_in_at_most_300_characters(make_worker, tmp_path, monkeypatch):
    """An unexpected error's text can be long (a hub's whole answer): the failed status keeps the first 300
    characters of its one line, as a job's internal error does (test_worker.py tests the short ones)."""
    from framepack_ui.worker.worker import DownloadStatus

    def fail(*args, **kwargs):
        raise RuntimeError("x" * 400)

    monkeypatch.setattr(download, "ensure_models", fail)
    worker = make_worker(models_dir=tmp_path / "models")
    assert worker.start_download()
    wait_until(lambda: worker.download_status().state != "running")
    assert worker.download_status() == DownloadStatus("failed", message=("download failed: RuntimeError: "
                                                                        + "x" * 400)[:300])


QUIT_DURING_A_STALLED_DOWNLOAD = """
import sys, threading
from framepack_ui.weights import download
download.ensure_models = lambda *args, **kwargs: threading.Event().wait()  # a read that never returns
from framepack_ui.worker import Worker
worker = Worker(sys.argv[1], sys.argv[2], device="cpu", run_job=lambda *args, **kwargs: None, background=False)
assert worker.start_download()
print("downloading", flush=True)
worker.shutdown()  # what the app does on Ctrl+C, then its main thread ends
"""


def test_the_app_quits_at_once_while_a_download_is_stalled(models_lacking_two_files, tmp_path):
    """The download's thread never holds the process open: an app closed (Ctrl+C: `shutdown`, then the main thread
    ends) while the hub has stopped sending ends at once, not when the read times out or the file completes. A
    fresh Python, as the app's own; the fetch is a stand-in stuck in its read."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", QUIT_DURING_A_STALLED_DOWNLOAD, str(models_lacking_two_files),
                           str(tmp_path / "outputs")], cwd=root, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert (done.returncode, done.stdout) == (0, "downloading\n"), done.stderr


# --- what the worker does between jobs (the VAE decoder's compile left for the idle time): its bookkeeping, with a
# scripted lender. test_worker.py runs the real compile; these show what it cannot: a job's listener hears the wait, a
# job submitted while nothing runs hears nothing, and the compile never delays a job already queued.

class IdleCompileLender:
    """A model lender whose plan left the VAE decoder's compile for the idle time: records each compile (and what the
    worker said it was doing then) and each release of the memory; `during_compile()` runs inside the compile, as a
    user submitting a job meanwhile would."""

    def __init__(self, worker_of=lambda: None, during_compile=lambda: None):
        from types import SimpleNamespace

        self.plan = SimpleNamespace(components={"vae": SimpleNamespace(compile_later=True)})
        self.compiles, self.released, self.during_compile, self._worker_of = [], [], during_compile, worker_of

    def compile_vae_decoder_now(self) -> bool:
        self.compiles.append(self._worker_of()._idle_work)
        self.during_compile()
        return True

    def release_after_job(self, keep_s) -> None:
        self.released.append(keep_s)


def finishing_engine(spec_, out_path, manager, emit, cancel, **kwargs):
    emit(Finished(str(out_path), "", 0, 0.0))


@pytest.fixture
def short_idle_grace(monkeypatch):
    """The worker compiles after the queue has stayed empty 0.05 s instead of 2 (the tests wait for no user)."""
    from framepack_ui.worker import worker as worker_module

    monkeypatch.setattr(worker_module, "IDLE_COMPILE_GRACE_S", 0.05)


def test_a_job_submitted_during_the_idle_compile_hears_why_it_waits_and_one_submitted_otherwise_hears_nothing(
        make_worker, start_image_80x64, short_idle_grace):
    """After a job, with the queue empty, the worker compiles (saying so in `_idle_work`); a job submitted meanwhile
    gets a Notice of the wait, through its listener too, before it starts, and the worker keeps its models for it;
    the job submitted while nothing ran gets none. The worker releases the models only once the queue is empty."""
    from framepack_ui.events import Notice
    from framepack_ui.worker.worker import IDLE_COMPILE_NOTICE

    worker, heard, meanwhile = None, [], []

    def submit_meanwhile() -> None:
        if not meanwhile:
            meanwhile.append(worker.submit(spec(start_image_80x64, "meanwhile"), on_event=heard.append))

    lender = IdleCompileLender(lambda: worker, submit_meanwhile)
    worker = make_worker(finishing_engine, manager=lender, background=False)
    first = worker.submit(spec(start_image_80x64, "first"), on_event=heard.append)

    worker.run_queued()

    assert lender.compiles == [IDLE_COMPILE_NOTICE, IDLE_COMPILE_NOTICE]  # after each job; busy while at it
    assert worker._idle_work is None and [j.status for j in worker.jobs()] == ["finished", "finished"]
    assert lender.released == [0]  # not between the two jobs: the second was queued by the end of the compile
    first_events, meanwhile_events = all_events(worker, first), all_events(worker, meanwhile[0])
    assert not any(isinstance(e, Notice) for e in first_events)
    told = Notice(IDLE_COMPILE_NOTICE)
    assert [e for e in meanwhile_events if isinstance(e, Notice)] == [told]
    assert meanwhile_events.index(told) < meanwhile_events.index(Phase("starting", "starting the engine"))
    assert heard.count(told) == 1 and heard.index(told) < heard.index(meanwhile_events[-1])


def test_the_idle_compile_gives_way_to_a_queued_job_and_is_done_only_where_the_plan_left_it(
        make_worker, start_image_80x64, caplog, short_idle_grace):
    """The compile starts only with the queue empty: a job queued by then goes first, and the compile waits for the
    next idle time. Only a plan that left the compile for later gets one: after a job whose plan compiled the decoder
    with the job (or had no VAE), the worker compiles nothing. A given lender without `compile_vae_decoder_now` is
    never asked (no error is logged), even where its plan leaves the compile for later."""
    from framepack_ui.worker.worker import IDLE_COMPILE_NOTICE

    worker = None
    lender = IdleCompileLender(lambda: worker)
    worker = make_worker(finishing_engine, manager=lender, background=False)
    worker.submit(spec(start_image_80x64, "queued"))

    worker._compile_while_idle()  # as when a job comes in between the end of the last one and the compile

    assert lender.compiles == [] and worker._idle_work is None
    worker.run_queued()
    assert lender.compiles == [IDLE_COMPILE_NOTICE] and lender.released == [0]

    lender.plan.components["vae"].compile_later = False  # the plan compiles it with the job
    worker.submit(spec(start_image_80x64, "compiled with the job"))
    worker.run_queued()
    del lender.plan.components["vae"]  # a plan without the VAE
    worker.submit(spec(start_image_80x64, "no VAE"))
    worker.run_queued()
    assert lender.compiles == [IDLE_COMPILE_NOTICE] and lender.released == [0, 0, 0]

    class LenderWithoutCompile:
        plan, released = IdleCompileLender().plan, []

        def release_after_job(self, keep_s) -> None:
            self.released.append(keep_s)

    other = LenderWithoutCompile()
    plain = make_worker(finishing_engine, manager=other, background=False)
    with caplog.at_level("ERROR"):
        plain.submit(spec(start_image_80x64, "no compiler"))
        plain.run_queued()
    assert [j.status for j in plain.jobs()] == ["finished"] and other.released == [0]
    assert [r.message for r in caplog.records if r.levelname == "ERROR"] == []


def test_a_job_submitted_within_the_grace_starts_at_once_and_a_closing_worker_never_compiles(
        make_worker, start_image_80x64, monkeypatch):
    """The compile waits for the queue to stay empty IDLE_COMPILE_GRACE_S after a finished job: a job submitted
    by then (the user's next click) starts without it and hears of no compile. Shutting the worker down during the
    grace after that job ends the wait at once (the thread ends) and compiles nothing: not while the app closes.
    The grace is made far longer than any wait here, so nothing depends on how fast the machine is."""
    from framepack_ui.events import Notice
    from framepack_ui.worker import worker as worker_module

    assert 1 <= worker_module.IDLE_COMPILE_GRACE_S <= 10  # the app's: past a quick resubmit, yet soon after a job
    monkeypatch.setattr(worker_module, "IDLE_COMPILE_GRACE_S", 10 * TIMEOUT_S)
    worker = None
    lender = IdleCompileLender(lambda: worker)
    worker = make_worker(finishing_engine, manager=lender)
    assert isinstance(all_events(worker, worker.submit(spec(start_image_80x64, "first")))[-1], Finished)
    wait_until(lambda: worker._running is None)  # the job is over with the queue empty: the grace has begun

    events = all_events(worker, worker.submit(spec(start_image_80x64, "within the grace")))

    assert isinstance(events[-1], Finished) and not any(isinstance(e, Notice) for e in events)
    wait_until(lambda: worker._running is None)  # in the grace after the second job
    worker.shutdown()
    assert not worker._thread.is_alive()
    assert lender.compiles == [] and lender.released == [0]  # the models kept between the jobs, freed at the end


def test_the_idle_compile_follows_only_a_finished_job(make_worker, start_image_80x64, short_idle_grace):
    """After a job the user stopped, or one that failed, the worker compiles nothing (the user may be about to
    submit again, and would wait for it): it frees the models at once. After a finished one it compiles."""
    from framepack_ui.worker.worker import IDLE_COMPILE_NOTICE

    def ending_as_asked(spec_, out_path, manager, emit, cancel, **kwargs):
        emit({"stopped": Stopped(None, 0), "failed": Failed("the engine broke (scripted)")}.get(
            spec_.prompt, Finished(str(out_path), "", 0, 0.0)))

    worker = None
    lender = IdleCompileLender(lambda: worker)
    worker = make_worker(ending_as_asked, manager=lender, background=False)
    for prompt in ("stopped", "failed"):
        worker.submit(spec(start_image_80x64, prompt))
        worker.run_queued()
    assert [j.status for j in worker.jobs()] == ["stopped", "failed"]
    assert lender.compiles == [] and lender.released == [0, 0]
    worker.submit(spec(start_image_80x64, "finished"))
    worker.run_queued()
    assert lender.compiles == [IDLE_COMPILE_NOTICE] and lender.released == [0, 0, 0]


def test_a_waiting_job_resumed_during_the_idle_compile_hears_why_it_waits_and_one_resumed_otherwise_hears_nothing(
        make_worker, start_image_80x64, short_idle_grace):
    """A job an earlier run of the app left queued, resumed while the worker compiles between jobs, gets the same
    Notice of the wait as a job submitted then, before it starts; one resumed while nothing is compiling gets
    none."""
    from framepack_ui.events import Notice
    from framepack_ui.worker.worker import IDLE_COMPILE_NOTICE

    earlier = make_worker(background=False)  # the app closes before running these
    earlier.submit(spec(start_image_80x64, "resumed meanwhile"))
    earlier.submit(spec(start_image_80x64, "resumed later"))
    worker = None
    lender = IdleCompileLender(lambda: worker, lambda: worker.resume(waiting["resumed meanwhile"]))
    worker = make_worker(finishing_engine, manager=lender, background=False)
    waiting = {j.spec.prompt: j.id for j in worker.jobs()}
    worker.submit(spec(start_image_80x64, "first"))

    worker.run_queued()  # the first job, the compile (the first waiting job resumed then), that job, a compile

    assert lender.compiles == [IDLE_COMPILE_NOTICE, IDLE_COMPILE_NOTICE]
    assert worker.resume(waiting["resumed later"])  # nothing compiling now
    worker.run_queued()
    assert [j.status for j in worker.jobs()] == ["finished"] * 3
    told = Notice(IDLE_COMPILE_NOTICE)
    meanwhile, later = (all_events(worker, waiting[prompt]) for prompt in ("resumed meanwhile", "resumed later"))
    restored, *meanwhile_told = [e for e in meanwhile if isinstance(e, Notice)]
    assert restored.message.startswith("queued before the app was closed") and meanwhile_told == [told]
    assert meanwhile.index(told) < meanwhile.index(Phase("starting", "starting the engine"))
    assert [e for e in later if isinstance(e, Notice)] == [restored]


def test_closing_the_app_does_not_wait_for_a_compile_between_jobs(make_worker, start_image_80x64, short_idle_grace):
    """The idle compile cannot be stopped (a minute cold) and holds nothing the user made: shutting the worker down
    while it runs returns at once instead of waiting up to `timeout_s` for the thread (a daemon: the process ends
    without it). A job's own work is still waited for (test_worker's shutdown tests)."""
    import threading

    from framepack_ui.worker.worker import IDLE_COMPILE_CLOSE_WAIT_S

    assert IDLE_COMPILE_CLOSE_WAIT_S <= 5  # the app's: closing is not held up by a compile (0 would do as well)
    compiling, finish = threading.Event(), threading.Event()

    def compile_until_told() -> None:
        compiling.set()
        finish.wait(TIMEOUT_S)

    worker = None
    lender = IdleCompileLender(lambda: worker, compile_until_told)
    worker = make_worker(finishing_engine, manager=lender)
    assert isinstance(all_events(worker, worker.submit(spec(start_image_80x64, "first")))[-1], Finished)
    assert compiling.wait(TIMEOUT_S)
    waited = seconds_to_shut_down(worker)
    try:
        assert worker._thread.is_alive() and waited < IDLE_COMPILE_CLOSE_WAIT_S + TIMEOUT_S / 4
    finally:
        finish.set()
    wait_until(lambda: not worker._thread.is_alive())


def test_closing_the_app_still_waits_for_a_running_job_to_stop(make_worker, start_image_80x64, monkeypatch):
    """Only a compile between jobs goes unwaited: a job stopping as the app closes (saving what it made) is waited
    for up to `timeout_s`, however short the wait for a compile is (made 0 here)."""
    import time

    from framepack_ui.worker import worker as worker_module

    monkeypatch.setattr(worker_module, "IDLE_COMPILE_CLOSE_WAIT_S", 0.0)
    running, stopped = threading.Event(), []

    def stopping_slowly(spec_, out_path, manager, emit, cancel, **kwargs):
        running.set()
        assert cancel.wait(TIMEOUT_S)
        time.sleep(0.5)  # saving its last section
        stopped.append(spec_.prompt)
        emit(Stopped(None, 0))

    worker = make_worker(stopping_slowly, manager=IdleCompileLender())
    worker.submit(spec(start_image_80x64, "running"))
    assert running.wait(TIMEOUT_S)
    worker.shutdown(timeout_s=TIMEOUT_S)
    assert not worker._thread.is_alive() and stopped == ["running"]
