"""One background thread, its own FIFO of jobs, and every job's events kept for replay.

Job state lives here, not in a browser tab: a second page, or a reloaded one, replays a job's events from the
start and then follows it live. Only the newest Step of a job keeps its preview image, so a long job's history
stays small. The engine (and with it torch) is imported in the worker thread when the first job starts, so
importing this module stays light.

Each job runs under a memory plan (memory/plan/) made for its memory profile ("auto" or a forced placement)
and resolution just before it starts; the ModelManager is rebuilt only when the placements change. Missing model
files can be fetched in a background thread the worker owns (`start_download`, `download_status`,
`cancel_download`).
"""
from __future__ import annotations

import gc
import itertools
import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from ..errors import Cancelled, InputError, UserError
from ..events import TERMINAL, Failed, Finished, Notice, Phase, Progress, SectionSaved, Step, Stopped
from ..sidecar import atomic_write_bytes, sidecar_path, write_sidecar
from ..spec import LORA_SUFFIX, Continuation, JobSpec
from ..units import GB
from . import queue_records
from .events import Estimated, Queued
from .gallery import PastOutput, listing_signature, past_outputs, remove_output
from .live import clear_live, live_dir, section_link
from .restore import Restored, settings_from_file
from .speed import SPEED_FILE, UNKNOWN, Estimate, JobShape, add_to_book, estimate, machine_key, measure, read_book
from .timeline import TimelineRecorder

log = logging.getLogger(__name__)

STATUS = {Finished: "finished", Stopped: "stopped", Failed: "failed"}
MAX_ENDED_JOBS = 100  # ended jobs kept for replay and the jobs list; older ones are forgotten

# f1.run(spec, out_path, manager, emit, cancel, record=..., out_of_memory_advice=...) -> Finished | Stopped | Failed
RunJob = Callable[..., object]
DEFAULT_PROFILE = "auto"
DEFAULT_CACHE = object()  # the manager's default prompt cache folder
STORAGE_ASKED = {None: "auto", False: "bf16", True: "fp8"}  # a job's fp8 plan option, in the settings' words
TIMELINE_PLACEHOLDER = "\x00timeline\x00"  # where the compact timeline goes in a settings file's text


@dataclass(frozen=True)
class DownloadStatus:
    """Where the model download stands (one per worker; a second start while one runs is refused)."""
    state: str = "idle"  # idle, running, done, stopped (cancelled; partial files kept), failed
    file: str = ""  # the file being fetched
    done_bytes: int = 0
    total_bytes: int = 0
    message: str = ""  # one line: why it failed or stopped
    models: tuple = ()  # (name, done_bytes, total_bytes) per model, in download order: a bar each
    resumed_bytes: int = 0  # model files already here when it started (whole, or partly fetched): where it resumed
    started_at_s: float | None = None  # time.monotonic() of this run's first report, and the bytes done then:
    started_done_bytes: int = 0  # the rate (and the time left) count from there, not from the resumed bytes
    updated_at_s: float | None = None  # time.monotonic() of the newest report


@dataclass
class _Job:
    id: str
    spec: JobSpec
    out_path: Path
    submitted_at: float  # time.time()
    profile: str = DEFAULT_PROFILE  # memory profile (memory.plan.PLAN_CHOICES)
    plan_options: dict = field(default_factory=dict)  # more PlanOverrides fields for this job (fp8, compile...)
    listener: Callable | None = None  # submit's on_event: called with each event as it happens
    start: Continuation | None = None  # what the job continues (resume, branch, extend), if anything
    continued_sections: int | None = None  # the sections a continuation samples (None: all of spec's)
    record: dict = field(default_factory=dict)  # recorded with the job's settings: the memory plan's decisions
    out_of_memory_advice: str | None = None  # from the job's memory plan: what to pick should the GPU run out
    engine_started: bool = False  # the engine has the job: whatever is at out_path is this job's
    cancel: threading.Event = field(default_factory=threading.Event)
    events: list = field(default_factory=list)
    status: str = "queued"  # queued, waiting (queued before the app restarted: the user starts it), running...
    position: int | None = None
    step_index: int | None = None  # where the newest Step (the only one with a preview) is in `events`
    result: object = None
    timeline: TimelineRecorder | None = None  # the gauges and phases over time, while it runs (timeline.py)
    timeline_record: dict | None = None  # ...and once it ended (also in its settings file)

    @property
    def sections_to_sample(self) -> int:
        """What the job's plan weighs a compile against: a resume samples only the sections its source lacks, a
        branch those from its section on."""
        return self.spec.sections if self.continued_sections is None else self.continued_sections


@dataclass(frozen=True)
class _JobLoras:
    """A job's LoRAs as read, what the plan counts for them, and their identity (LoraSet.key)."""
    lora_set: object = None  # memory.lora.LoraSet; None: no LoRA
    cost: object = None  # memory.plan.LoraCost
    key: tuple = ()


@dataclass(frozen=True)
class JobInfo:
    """A snapshot of one job, for lists and for a page that reattaches."""
    id: str
    status: str  # queued, waiting (queued before the app restarted: `resume` queues it), running, finished...
    position: int | None  # place in the queue (1 = starts next); None unless queued
    spec: JobSpec  # with the seed actually used
    out_path: str
    submitted_at: float  # time.time()
    step: Step | None  # the newest Step
    section: SectionSaved | None  # the newest SectionSaved
    result: Finished | Stopped | Failed | None
    event_count: int


class Worker:
    """`job_id = submit(spec)`, `cancel(job_id)`, `for ev in events(job_id): ...`, `jobs()`, `shutdown()`.

    `run_job` defaults to the F1 engine's `run`; `manager` to a ModelManager that applies the job's memory plan
    (a given `manager` is used as it is, with no plan). Both are made in the worker thread. `profile` is the
    memory profile of jobs submitted without one.
    """

    def __init__(self, models_dir: str | Path, outputs_dir: str | Path, device: str | None = None,
                 run_job: RunJob | None = None, manager=None, profile: str = DEFAULT_PROFILE,
                 keep_models_s: float | None = 0, attention: str | None = None,
                 download_missing: bool | None = None, prompt_cache_dir: Path | None | object = DEFAULT_CACHE,
                 serves_pages: bool = True, background: bool = True, compile_when_idle: bool = True):
        """`download_missing`: None: a job does not look for missing model files (the web app offers the download
        itself); True: a job first fetches what is missing; False: a job with files missing fails at once, with
        one line naming them. `prompt_cache_dir`: where prompt embeddings are kept (default: under the models
        folder; None: in memory only). `serves_pages`: the web app's worker, which drops the section-video links an
        earlier run left (live.py); the command line's leaves them alone, since an app may be serving that folder.
        The web app's worker also keeps its queue on disk: jobs queued but not started when the app closed (or was
        killed) come back, waiting for the user to `resume` or `cancel` them (queue_records.py).
        `background`: jobs run on the worker's own thread; without it, on the thread that calls `run_queued` (the
        command line: its main thread, where Ctrl+C reaches the job as a stop). `compile_when_idle`: after a job
        whose plan left the VAE decoder's compile for later (its sections would not pay it back), compile it while
        the queue is empty, so the next jobs decode compiled (the web app's; a one-job command line has no later)."""
        self.models_dir = Path(models_dir)
        self.download_missing = download_missing
        self.prompt_cache_dir = prompt_cache_dir
        self.attention = attention  # the transformer's attention backend for every job (None: the plan's default)
        # after the queue empties: 0 frees the models at once, N keeps them N seconds for a quick next job,
        # None keeps them until the app closes
        self.keep_models_s = keep_models_s
        self.compile_when_idle = compile_when_idle
        self._idle_work: str | None = None  # what the worker does between jobs now (a job submitted meanwhile waits)
        self._idle_compile_failed = False
        self.outputs_dir = Path(outputs_dir)
        self.profile = profile
        self._device = device
        self._run_job = run_job
        self._manager = manager
        self._fixed_manager = manager is not None
        self._manager_key = None  # the placements the current manager applies
        self._manager_loras = None  # the LoRA set (LoraSet.key) of the current manager's last job
        self._placement_kept = False  # the current manager was kept for a LoRA change (_keep_placement)
        self._download = DownloadStatus()
        self._download_thread: threading.Thread | None = None
        self._download_cancel = threading.Event()
        self._device_name: str | None = None  # the GPU's name or "cpu", read once (speed.machine_key)
        self._profiles = self.plan_choices()  # read once: submit stays quick
        self._cond = threading.Condition()
        self._jobs: dict[str, _Job] = {}  # in submission order
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self.serves_pages = serves_pages
        if serves_pages:
            clear_live(self.outputs_dir)
            self._restore_waiting()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._loop, name="framepack-worker", daemon=True)
            self._thread.start()

    # ---------------------------------------------------------------------------------------------------- API

    def submit(self, spec: JobSpec, profile: str | None = None, *, out_path: str | Path | None = None,
               plan_options: dict | None = None, on_event: Callable | None = None,
               start: Continuation | None = None) -> str:
        """Validate (InputError names the bad field; nothing is queued then) and queue; returns the job id.
        `profile`: the memory profile for this job (default: the worker's `profile`). `out_path`: the video's path
        (default: a new name in the outputs folder). `plan_options`: more of the memory plan's overrides
        (memory.plan.PlanOverrides fields: fp8, compile, attention, fp8_matmul, pin_streamed). `on_event(event)`:
        called as each of the job's events happens, in the thread that emits it (the job's, or the encoder's for
        SectionSaved), with the worker's lock held, before anyone iterating `events` sees it: keep it quick (the
        command line prints there, so its lines keep time with the work). `start`: continue an earlier output
        (spec.Continuation), checked here: a resume writes to that output, with its saved settings."""
        spec = spec.validate(image_required=start is None).with_seed()  # the seed is fixed now, so the file name
        continued_sections = None
        if start is not None:  # and the events carry it
            spec, out_path, continued_sections = self._check_continuation(start, spec, out_path)
        profile = profile or self.profile
        if profile not in self._profiles:
            raise InputError(f"memory profile must be one of {', '.join(self._profiles)}, not {profile!r}")
        with self._cond:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            path = Path(out_path) if out_path is not None else self._output_path(spec.seed)
            job = _Job(str(next(self._ids)), spec, path, time.time(), profile, dict(plan_options or {}), on_event,
                       start, continued_sections)
            # before it can start: the engine's own settings file then replaces the record
            if self.serves_pages:
                queue_records.write(job.out_path, job.spec, job.profile, job.plan_options, job.submitted_at, start)
            self._jobs[job.id] = job
            self._queue.append(job)
            if self._idle_work is not None:
                self._tell_waiting(job)
            self._renumber()
            self._cond.notify_all()
        log.info("job %s queued: %s", job.id, job.out_path.name)
        return job.id

    def _check_continuation(self, start: Continuation, spec: JobSpec,
                            out_path) -> tuple[JobSpec, Path | None, int]:
        """InputError (one line) unless `start` can be continued with these models; nothing is queued then. The
        engine (and torch) is imported here, for a continued job only. Returns the job's spec, its file and the
        sections it will sample."""
        from ..engine.continuation import open_origin
        from ..weights.layout import model_fingerprint

        source = Path(start.video).resolve()
        if start.kind == "resume":
            out_path = source
        elif out_path is not None and Path(out_path).resolve() == source:
            made = "an extension" if start.kind == "extend" else f"a {start.kind}"
            raise InputError(f"{made} is a new output: choose another file than {source.name}")
        with self._cond:
            busy = {j.out_path.resolve() for j in self._jobs.values() if j.result is None}
        if source in busy:
            raise InputError(f"{source.name} is being written by a job: wait for it to end")
        origin = open_origin(start, spec, model_fingerprint(self.models_dir))
        return ((origin.spec if start.kind == "resume" else spec), out_path,
                origin.spec.sections - origin.first_section)

    def cancel(self, job_id: str) -> bool:
        """A queued or waiting job is dropped (with its record); the running one stops at its next step and keeps
        its finished sections. False when the job is unknown or already ended."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.result is not None:
                return False
            if job in self._queue or job.status == "waiting":
                if job in self._queue:
                    self._queue.remove(job)
                queue_records.drop(job.out_path)
                self._end(job, Stopped(None, 0))
                self._renumber()
            else:
                job.cancel.set()
            log.info("job %s: stop asked", job_id)
            return True

    def resume(self, job_id: str) -> bool:
        """Queue a job that waits since the app restarted (status "waiting"); False for any other job."""
        with self._cond:
            job = self._jobs.get(job_id)
            if job is None or job.status != "waiting" or self._closed:
                return False
            job.status = "queued"
            self._queue.append(job)
            if self._idle_work is not None:
                self._tell_waiting(job)
            self._renumber()
        log.info("job %s: queued again after the restart", job_id)
        return True

    def _restore_waiting(self) -> None:
        """The jobs an earlier run of the app had queued but not started, back in the list, waiting."""
        for record in queue_records.read_all(self.outputs_dir):
            job = _Job(str(next(self._ids)), record.spec, record.out_path, record.submitted_at, record.profile,
                       record.plan_options, start=record.start, status="waiting",
                       continued_sections=_recorded_continuation_sections(record.spec, record.start))
            job.events.append(Notice("queued before the app was closed: waiting for you to start or drop it"))
            self._jobs[job.id] = job
            log.info("job %s restored, waiting: %s", job.id, job.out_path.name)

    def events(self, job_id: str, since: int = 0) -> Iterator[object]:
        """Every event of the job from index `since`, then live ones; ends after Finished, Stopped or Failed."""
        index = since
        while True:
            batch = self.wait_events(job_id, index, timeout_s=None)
            yield from batch
            index += len(batch)
            if not batch or isinstance(batch[-1], TERMINAL):
                return

    def wait_events(self, job_id: str, since: int = 0, timeout_s: float | None = None) -> list:
        """The job's events from index `since`, waiting up to `timeout_s` (None: for ever) for at least one.
        An empty list means the wait timed out, or the job had already ended before `since`."""
        with self._cond:
            job = self._job(job_id)
            self._cond.wait_for(lambda: len(job.events) > since or job.result is not None, timeout_s)
            return job.events[since:]

    def jobs(self) -> list[JobInfo]:
        """A snapshot of every job the worker remembers, oldest first."""
        with self._cond:
            return [self._info(job) for job in self._jobs.values()]

    def job(self, job_id: str) -> JobInfo:
        with self._cond:
            return self._info(self._job(job_id))

    @property
    def loras_dir(self) -> Path:
        """Where the web app's LoRA picker looks: `models/loras/`."""
        from ..weights.layout import LORAS_DIR

        return self.models_dir / LORAS_DIR

    def lora_files(self) -> list[str]:
        """The LoRA files (.safetensors) in `loras_dir`, by name, sorted; [] when the folder is missing."""
        try:
            return sorted(p.name for p in self.loras_dir.iterdir()
                          if p.is_file() and p.suffix.lower() == LORA_SUFFIX and not p.name.startswith("."))
        except OSError:
            return []

    def missing_models(self) -> str:
        """"" when every model file is in place, else one line naming what is missing and where it goes."""
        from ..weights.download import describe_missing  # huggingface_hub: only when asked

        return describe_missing(self.models_dir)

    # ----------------------------------------------------------------------------------------- memory plan

    @staticmethod
    def plan_choices() -> tuple[str, ...]:
        """The memory profiles a job may ask for: "auto" first, then the forced placements."""
        from ..memory.plan import PLAN_CHOICES  # pure module, but it stays out of the UI's imports

        return tuple(PLAN_CHOICES)

    def plan_text(self, profile: str | None = None, resolution: int = 640, loras: tuple = (), **options) -> str:
        """The plan a job with this profile, resolution, LoRAs (spec.LoraChoice) and plan options (`fp8`...) would
        run under, as a table (LoadPlan.explain()); when none fits, one line saying why. Reads the machine now
        (imports torch on the first call) and the LoRA files (their memory is the plan's to place)."""
        try:
            cost = None
            if loras:
                from ..memory.lora import read_lora_set

                lora_set, linears = read_lora_set(loras, self.models_dir)
                cost = lora_set.cost(linears)
            return self._make_plan(profile or self.profile, int(resolution), lora=cost, **options).explain()
        except UserError as exc:
            return f"No memory plan fits: {exc.message}"

    def _make_plan(self, profile: str, resolution: int, **options):
        from ..memory.plan import PlanOverrides, make_plan
        from ..memory.probe import weights_on_disk

        machine = self._probe_machine(self._device or _default_device())
        if self._manager is not None and not self._fixed_manager:
            # what this worker's own kept models hold is the next plan's to place again (freed before any reload)
            machine = machine.with_returned(*self._manager.held_memory())
        options = {key: value for key, value in options.items() if value is not None}  # None: the plan's default
        options.setdefault("attention", self.attention)
        return make_plan(machine, weights_on_disk(self.models_dir),
                         PlanOverrides(profile, resolution=resolution, **options))

    def _probe_machine(self, device: str):
        """The machine a job's plan is made for: this machine as read now, with `device`'s VRAM (a pool's worker
        plans on its share of the host instead: worker/pool.py)."""
        from ..memory.probe import probe_machine

        return probe_machine(self.models_dir, cuda=device.startswith("cuda"), cuda_index=cuda_index(device))

    def _manager_gpu(self) -> dict:
        """The ModelManager's `gpu` where this worker was given a CUDA device (cuda:1 on a machine with two)."""
        return {"gpu": self._device} if self._device is not None and self._device.startswith("cuda") else {}

    def device_name(self) -> str:
        """The device this worker's jobs run on, as recorded in their settings: "cuda:1" or "cpu"."""
        device = self._device or _default_device()
        return "cuda:0" if device == "cuda" else device

    def attention_problem(self) -> str | None:
        """Why jobs cannot run the attention backend the worker was given, in one line (None: they can, or none
        was given): asked once at startup rather than failing every job."""
        if self.attention is None:
            return None
        try:
            self._make_plan(self.profile, 640)
        except UserError as exc:  # the plan's attention check says "--attention NAME needs ..."
            return exc.message if exc.message.startswith("--attention") else None
        return None

    # ------------------------------------------------------------------------------- timeline and estimate

    def timeline(self, job_id: str) -> dict | None:
        """The job's timeline (timeline.py: gauges and phases over time): so far while it runs, whole once it
        ended; None for a job that has not started."""
        with self._cond:
            job = self._job(job_id)
            recorder, record = job.timeline, job.timeline_record
        if record is not None:
            return record
        return recorder.snapshot() if recorder is not None else None

    @property
    def speed_path(self) -> Path:
        """Where the measured speed of past jobs is kept (speed.py)."""
        return self.outputs_dir / SPEED_FILE

    def estimate(self, shape: JobShape, profile: str | None = None, storage: str = "auto") -> Estimate:
        """How long a job of `shape` would take with this memory profile and storage asked (auto, bf16, fp8), from
        this machine's measured speed or the card's known figures (speed.py). Reads a small file, no torch."""
        key = machine_key(self._device_label(), profile or self.profile, storage)
        return estimate(read_book(self.speed_path), key, shape)

    def _job_estimate(self, job: _Job) -> Estimated:
        storage = STORAGE_ASKED.get(job.plan_options.get("fp8"), "auto")
        try:
            # a continuation's time is that of the sections it samples, not its whole video's
            guess = self.estimate(replace(JobShape.of(job.spec), sections=job.sections_to_sample), job.profile,
                                  storage)
        except Exception:  # an estimate is never a reason for a job to fail
            log.exception("job %s: its estimate failed", job.id)
            return Estimated(None, UNKNOWN)
        return Estimated(guess.total_s, guess.source)

    def _device_label(self) -> str:
        """The GPU's name (NVML, no torch), or "cpu" for jobs on the CPU: the machine part of the speed's key."""
        if self._device_name is None:
            gpu = self._read_gauges(None)
            on_cpu = (self._device or "").startswith("cpu") or gpu is None or not gpu.gpu_available
            self._device_name = "cpu" if on_cpu else gpu.gpu_note
        return self._device_name

    @staticmethod
    def _read_gauges(previous):
        from ..telemetry import read_gauges

        return read_gauges(previous=previous)

    def _keep_timeline(self, job: _Job, result) -> None:
        """End the job's timeline; put it in its settings file; a finished new job's speed goes to the book the
        next estimates read."""
        if job.timeline is None or job.timeline_record is not None:
            return
        record = job.timeline_record = job.timeline.stop()
        path = sidecar_path(job.out_path)
        try:
            settings = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            if isinstance(settings, dict):
                # on one line: the readings would otherwise fill the file a number a line
                settings["timeline"] = TIMELINE_PLACEHOLDER
                text = json.dumps(settings, indent=2, ensure_ascii=False) + "\n"  # parsed from JSON: all serializable
                text = text.replace(json.dumps(TIMELINE_PLACEHOLDER), json.dumps(record, separators=(",", ":")), 1)
                atomic_write_bytes(path, text.encode("utf-8"))
            if isinstance(result, Finished) and job.start is None:  # a continued job's sections differ
                measured = measure(record, JobShape.of(job.spec))
                if measured is not None:
                    key = machine_key(self._device_label(), job.profile,
                                      STORAGE_ASKED.get(job.plan_options.get("fp8"), "auto"))
                    add_to_book(self.speed_path, key, measured)
        except Exception:  # the plot and the estimate are a view on the job: never a reason for it to fail
            log.exception("job %s: keeping its timeline failed", job.id)

    # -------------------------------------------------------------------------------------- past outputs

    def past_outputs(self) -> list[PastOutput]:
        """The videos in the outputs folder with their settings, newest first (see gallery.py)."""
        with self._cond:
            running = {str(self._running.out_path.resolve())} if self._running is not None else set()
        return past_outputs(self.outputs_dir, running)

    def remove_output(self, name: str) -> list[str]:
        """Delete a past output and everything beside it (settings, start image, section state); refused for one a
        job is writing. Returns the names removed."""
        with self._cond:
            busy = {j.out_path.name for j in self._jobs.values() if j.result is None}
        if name in busy:
            raise InputError(f"{name} is being written by a job: stop it first")
        return remove_output(self.outputs_dir, name)

    def outputs_signature(self) -> tuple:
        """Changes when the outputs folder's videos or settings files change (reads no file)."""
        with self._cond:
            running = self._running.id if self._running is not None else None
        return running, listing_signature(self.outputs_dir)

    def settings_from_file(self, path: str | Path) -> Restored:
        """The settings of a past video or settings file, and its start image where it was saved (beside the file,
        or in the outputs folder); InputError (one line) when the file holds none (restore.py)."""
        return settings_from_file(path, (self.outputs_dir,))

    def live_dir(self) -> Path:
        """Where section_video's links live (serve it in place: see live.py)."""
        return live_dir(self.outputs_dir)

    def section_video(self, path: str, sections: int) -> str:
        """The growing video `path` under a name new for each finished section, without a copy (live.py)."""
        return section_link(path, sections, self.outputs_dir)

    # ------------------------------------------------------------------------------------- model download

    def download_need(self) -> tuple[int, int | None]:
        """(bytes still to fetch, estimated from the real models' sizes; bytes free where they go)."""
        import shutil

        from ..weights import layout

        need = 0
        for name, paths in layout.missing(self.models_dir).items():
            component = layout.COMPONENTS[name]
            need += component.approx_bytes * len(paths) // len(component.files)
        folder = self.models_dir.absolute()
        while not folder.exists() and folder != folder.parent:  # the models folder may not exist yet
            folder = folder.parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = None
        return need, free

    def start_download(self) -> bool:
        """Fetch the missing model files in a background thread; False if a download is already running."""
        models, here = self._models_to_fetch(), self._model_bytes_here()  # they read the folder: outside the lock
        with self._cond:
            if self._closed or (self._download_thread is not None and self._download_thread.is_alive()):
                return False
            self._download = DownloadStatus("running", models=models, resumed_bytes=here)
            self._download_cancel.clear()
            self._download_thread = threading.Thread(target=self._fetch_models, name="framepack-download",
                                                     daemon=True)
            self._download_thread.start()
        return True

    def cancel_download(self) -> bool:
        """Stop the running download after its current chunk; the partial files are kept, so the next start
        resumes them. False when no download is running."""
        with self._cond:
            if self._download.state != "running":
                return False
            self._download_cancel.set()
        log.info("model download: stop asked")
        return True

    def missing_model_files(self) -> list:
        """Each model with files missing (weights.download.MissingModel: repository, folder, files), for a list
        to copy them from by hand; [] when none is."""
        from ..weights.download import missing_models  # huggingface_hub: only when asked

        return missing_models(self.models_dir)

    def _models_to_fetch(self) -> tuple:
        """(name, 0, estimated bytes) per model with files missing: the bars before the hub gives the sizes."""
        return tuple((model.name, 0, model.approx_bytes) for model in self.missing_model_files())

    def _model_bytes_here(self) -> int:
        """Bytes of model files in the models folder, whole or partly fetched (kept by a stopped download)."""
        from ..weights import layout

        here = 0
        for component in layout.COMPONENTS.values():
            for path in (component.folder(self.models_dir) / name for name in component.files):
                for found in (path, *path.parent.glob(f"{path.name}.*.incomplete")):
                    here += found.stat().st_size if found.is_file() else 0
        return here

    def download_status(self) -> DownloadStatus:
        with self._cond:
            return self._download

    def _fetch_models(self) -> None:
        from ..weights.download import ensure_models  # huggingface_hub: only when asked

        def progress(p) -> None:
            now_s = time.monotonic()
            with self._cond:
                old = self._download
                models = dict((name, (done, total)) for name, done, total in old.models)
                models[p.component] = (p.model_done, p.model_total)
                first = old.started_at_s is None
                self._download = DownloadStatus(
                    "running", f"{p.component}/{p.file}", p.overall_done, p.overall_total,
                    models=tuple((name, *figures) for name, figures in models.items()),
                    resumed_bytes=old.resumed_bytes, started_at_s=now_s if first else old.started_at_s,
                    started_done_bytes=p.overall_done if first else old.started_done_bytes, updated_at_s=now_s)

        log.info("downloading the missing model files into %s", self.models_dir)
        try:
            ensure_models(self.models_dir, progress=progress, cancel=self._download_cancel)
            status = DownloadStatus("done", "", self._download.total_bytes, self._download.total_bytes)
        except Cancelled:
            got = self._download
            status = replace(got, state="stopped",
                             message="download stopped; what it fetched is kept, start it again to resume")
        except UserError as exc:
            status = DownloadStatus("failed", message=exc.message)
        except Exception as exc:  # one line for the user, the traceback in the log
            log.exception("model download failed")
            status = DownloadStatus("failed", message=f"download failed: {exc.__class__.__name__}: "
                                                      f"{' '.join(str(exc).split())}"[:300])
        with self._cond:
            self._download = status
        log.info("model download %s %s", status.state, status.message)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Drop the queue, stop the running job (its finished sections are kept) and end the thread; a compile
        between jobs is not waited for (see `_thread_wait_s`)."""
        with self._cond:
            self._closed = True
            self._download_cancel.set()
            while self._queue:
                self._end(self._queue.popleft(), Stopped(None, 0))
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
            wait_s = self._thread_wait_s(timeout_s)
        if self._thread is not None:
            self._thread.join(wait_s)

    def _thread_wait_s(self, timeout_s: float) -> float:
        """How long closing waits for this worker's thread (with self._cond held): a compile between jobs (up to a
        minute) cannot be stopped and holds nothing the user made, so the app closes without it (a daemon thread;
        the compilers write their caches whole or not at all)."""
        return min(timeout_s, IDLE_COMPILE_CLOSE_WAIT_S) if self._idle_work is not None else timeout_s

    # ------------------------------------------------------------------------------------------- the thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:  # closed and nothing left
                    return
            self._run_next()

    def run_queued(self) -> None:
        """Run the queued jobs one after another in the calling thread, then return (a worker made with
        `background=False`)."""
        if self._thread is not None:
            raise RuntimeError("this worker runs its jobs on its own thread")
        while True:
            with self._cond:
                if not self._queue or self._closed:
                    return
            self._run_next()

    def _run_next(self) -> None:
        with self._cond:
            if not self._queue:  # a sibling worker sharing this queue took the job first (worker/pool.py)
                return
            job = self._running = self._queue.popleft()
            job.status, job.position = "running", None
            self._renumber()
        try:
            self._run(job)
        finally:
            with self._cond:
                self._running = None
                idle = not self._queue
        if idle and isinstance(job.result, Finished):  # not after a stop or a failure: the user may be about to
            self._compile_while_idle()                  # submit again, and would wait for the compile
            with self._cond:
                idle = not self._queue
        if idle:
            self._free_memory()

    def _compile_while_idle(self) -> None:
        """The VAE decoder's compile that the last job's plan left for the idle time (ComponentPlan.compile_later),
        with no job beside it on the GPU, once the queue has stayed empty for IDLE_COMPILE_GRACE_S. A job submitted
        meanwhile waits for it, and is told why. A compile that fails is not tried again in this process: the
        next jobs decode eagerly."""
        manager = self._manager
        plan = getattr(manager, "plan", None)  # a lender given to the worker (tests, benches) may have none
        vae = plan.components.get("vae") if plan is not None else None
        if not (self.compile_when_idle and vae is not None and vae.compile_later and not self._idle_compile_failed
                and hasattr(manager, "compile_vae_decoder_now")):
            return
        with self._cond:
            self._cond.wait_for(lambda: self._queue or self._closed, timeout=IDLE_COMPILE_GRACE_S)
            if self._queue or self._closed:
                return  # a job goes first (the compile waits for a later idle time), or the app is closing
            self._idle_work = IDLE_COMPILE_NOTICE
        started = time.perf_counter()
        try:
            ready = manager.compile_vae_decoder_now()
            log.info("VAE decoder compiled while idle in %.1f s%s", time.perf_counter() - started,
                     "" if ready else ": its compiler failed, so jobs decode without it")
        except Exception:  # the worker outlives it
            self._idle_compile_failed = True
            log.exception("compiling the VAE decoder while idle failed: jobs decode without compiling it")
        finally:
            with self._cond:
                self._idle_work = None

    def _tell_waiting(self, job: _Job) -> None:
        """A queued job hears what the idle worker finishes before it starts (with self._cond held; the caller's
        _renumber wakes whoever follows the job's events)."""
        event = Notice(self._idle_work)
        self._tell(job, event)
        job.events.append(event)

    def _run(self, job: _Job) -> None:
        recorder = job.timeline = TimelineRecorder(self._read_gauges).start()

        def emit(event) -> None:
            recorder.event(event)
            if isinstance(event, TERMINAL):  # in the settings file before anyone sees the end
                self._keep_timeline(job, event)
            self._emit(job, event)

        log.info("job %s started", job.id)
        result = None
        try:
            emit(Phase("starting", "starting the engine"))
            emit(self._job_estimate(job))
            run_job, manager = self._engine(job, emit)
            job.engine_started = True
            more = {"start": job.start} if job.start is not None else {}
            more["calibration_dir"] = self._calibration_dir()
            result = run_job(job.spec, job.out_path, manager, emit, job.cancel, record=job.record,
                             out_of_memory_advice=job.out_of_memory_advice, **more)
        except Cancelled:  # stopped before the engine started (e.g. while fetching the models)
            result = Stopped(self._kept(job), 0)
        except UserError as exc:  # e.g. the models folder cannot be read
            result = Failed(exc.message, self._kept(job), exc.reason)
        except Exception as exc:  # the worker must outlive any job: one line for the user, the traceback in the log
            log.exception("job %s failed", job.id)
            result = Failed(f"internal error: {exc.__class__.__name__}: {' '.join(str(exc).split())}"[:300],
                            self._kept(job))
        if job.result is None and not isinstance(result, TERMINAL):
            result = Failed("internal error: the job ended without a result", self._kept(job))
        if isinstance(job.result or result, Failed) and (self.serves_pages or job.engine_started):
            # before the end is seen: the file says so by then (the gallery lists it; the command line's job
            # that never started writes nothing beside its --out)
            self._record_failure(job, job.result or result)
        if self.serves_pages:  # the engine never took it (stopped first, or an engine that writes no settings)
            queue_records.drop(job.out_path)
        if job.result is None:
            self._keep_timeline(job, result)
        with self._cond:
            if job.result is None:  # run_job normally emits its own result; make sure every job ends
                self._end(job, result)
        log.info("job %s %s", job.id, job.status)

    def _calibration_dir(self) -> Path:
        """Where MagCache's calibrations are kept (engine/step_cache.py): under the models folder."""
        from ..engine.step_cache import default_calibration_folder

        return default_calibration_folder(self.models_dir)

    def import_engine(self) -> None:
        """Import the engine (torch, diffusers) now instead of when the first job starts. The web app calls it before
        it serves: loading those libraries holds Python's interpreter lock for seconds at a time, which would stall
        every page's gauges and streams while the first job starts (tests/test_busy_lan.py)."""
        if self._run_job is None:
            from ..engine.f1 import run
            from ..memory.loading import import_model_classes

            import_model_classes()
            self._run_job = run
            # the libraries' objects live as long as the app: kept out of the garbage collector's scans, each model
            # free's gc.collect() (memory/manager.py) takes milliseconds instead of 0.3-0.8 s with the lock held
            gc.freeze()

    def _engine(self, job: _Job, emit):
        if self._run_job is None:
            from ..engine.f1 import run  # torch and diffusers: imported here, in the worker thread, once

            self._run_job = run
        if self.download_missing is not None:
            self._ensure_models(job, emit)
        loras = self._read_loras(job, emit)  # before anything is planned, converted or loaded
        if not self._fixed_manager:
            # Planned before anything loads: a plan that cannot fit fails the job here (MemoryPlanError, one
            # line), not half-way through; so do broken model files (the plan reads every safetensors header, and
            # the small JSON files are read first). The same decisions keep the manager and the models it holds.
            from ..weights.layout import check_small_files

            check_small_files(self.models_dir)
            options = dict(job.plan_options, lora=loras.cost, sections=self._sections_ahead(job))
            plan = self._make_plan(job.profile, job.spec.resolution, **options)
            from ..memory.manager import ModelManager, applied_decisions
            from ..memory.plan import leaner_choices

            key = applied_decisions(plan)
            if (self._manager is not None and key != self._manager_key
                    and (loras.key != self._manager_loras or self._placement_kept)):
                plan, key = self._keep_placement(job, plan, key, options)
                self._placement_kept = key == self._manager_key
            if self._manager is None or key != self._manager_key:
                if self._manager is not None:
                    self._manager.free()
                self._manager = None  # free first: the old and the new models never share the memory
                cache = {} if self.prompt_cache_dir is DEFAULT_CACHE else {"prompt_cache_dir": self.prompt_cache_dir}
                self._manager = ModelManager(self.models_dir, plan, on_prewarm=self._prewarm_progress,
                                             **self._manager_gpu(), **cache)
                self._manager_key = key
            self._manager.plan = plan  # the same decisions; the costs of this job (its LoRAs)
            self._manager_loras = loras.key
            log.info("job %s plan (%s): %s", job.id, job.profile, plan.summary())
            emit(Phase("plan", plan.summary()))
            transformer = plan.components["transformer"]
            if transformer.storage == "fp8":
                self._convert_fp8(job, emit)
            storage = "fp8" if transformer.storage == "fp8" else transformer.storage_dtype
            # what the page asked (restored by settings from a file), what the plan made of it, and why
            job.record = {"memory": {"profile": job.profile,
                                     "storage_asked": STORAGE_ASKED.get(job.plan_options.get("fp8"), "auto"),
                                     "transformer_storage": storage, "plan": plan.summary(),
                                     "notes": list(plan.notes)}}
            job.out_of_memory_advice = leaner_choices(plan)
        if hasattr(self._manager, "set_loras"):
            self._manager.set_loras(loras.lora_set)  # None takes the previous job's off
        elif loras.lora_set is not None:
            raise InputError("this worker's model lender takes no LoRAs")
        from ..weights.layout import model_fingerprint

        job.record["model_files"] = model_fingerprint(self.models_dir)  # kept with the section state
        job.record["device"] = self.device_name()  # which GPU made it, where several serve the queue
        return self._run_job, self._manager

    def _read_loras(self, job: _Job, emit) -> "_JobLoras":
        """The job's LoRA files read and checked against the transformer's layers (memory/lora.py): a file that
        does not fit fails the job here, in one line, before anything is converted or loaded."""
        if not job.spec.loras:
            return _JobLoras()
        from ..memory.lora import read_lora_set

        lora_set, linears = read_lora_set(job.spec.loras, self.models_dir)
        emit(Phase("lora", lora_set.describe()))
        for notice in lora_set.notices:
            emit(Notice(notice))
        return _JobLoras(lora_set, lora_set.cost(linears), lora_set.key)

    def _sections_ahead(self, job: _Job) -> int:
        """The sections a compile made in this job would pay back over: its own and those of the jobs queued behind
        it (a command-line batch, a backlog in the web app; a lone short job leaves the compile to the idle time
        after it)."""
        with self._cond:
            return job.sections_to_sample + sum(queued.sections_to_sample for queued in self._queue)

    def _keep_placement(self, job: _Job, plan, key, options: dict):
        """A new LoRA set whose plan differs from the loaded models' only in how many transformer blocks are
        resident (more fit without a LoRA, or with a smaller one): the loaded placement is kept where it fits this
        job's plan too, rather than reloading the transformer for the LoRA's few hundred MB; and kept so for the
        jobs after, until it no longer fits. `options`: the job's plan options, as its own plan was made with.
        Returns (plan, its applied decisions)."""
        resident = self._manager.plan.components["transformer"].resident_blocks
        if resident is None:
            return plan, key
        try:
            kept = self._make_plan(job.profile, job.spec.resolution, **{**options, "resident_blocks": resident})
        except UserError:
            return plan, key
        from ..memory.manager import applied_decisions

        if self._manager.plan.components["transformer"].park_for_decode:
            # the loaded placement parks its resident blocks while the VAE decodes, which frees VRAM only: it fits
            # a plan that need not park too
            kept = kept.with_component("transformer", park_for_decode=True)
        kept_key = applied_decisions(kept)
        return (kept, kept_key) if kept_key == self._manager_key else (plan, key)

    def _convert_fp8(self, job: _Job, emit) -> None:
        """The fp8 cache made before the engine starts, where the plan stores the transformer as fp8 and the cache is
        not on disk yet (about 13 GB written once): a phase of the job with its progress and time left; a stop
        ends it with nothing half-written kept (memory/fp8.py)."""
        from ..memory import fp8
        from ..weights.layout import COMPONENTS

        folder = COMPONENTS["transformer"].folder(self.models_dir)
        if fp8.cache_recorded(folder):
            return  # the load verifies it
        task = "converting the transformer to fp8 (once)"
        emit(Phase("convert", task))
        started, shown = time.monotonic(), [-1]

        def progress(done: int, total: int) -> None:
            if job.cancel.is_set():
                raise Cancelled()
            percent = 100 * done // max(1, total)
            if percent != shown[0]:  # one event per percent: a job's events stay few
                shown[0] = percent
                elapsed = time.monotonic() - started
                # time left from the rate so far, once a percent is written (the first chunk is a header's 8 bytes)
                emit(Progress(task, done, total, elapsed / done * (total - done) if percent else None))

        fp8.ensure_cache(folder, progress)

    def _ensure_models(self, job: _Job, emit) -> None:
        from ..weights.download import ensure_models  # huggingface_hub: only when asked

        ensure_models(self.models_dir, allow_download=self.download_missing, cancel=job.cancel,
                      progress=lambda p: emit(Phase("download", p.line())))

    def _prewarm_progress(self, p) -> None:
        """The manager grows the pagefile before a load (Windows): said in the running job's events."""
        with self._cond:
            job = self._running
        if job is not None:
            self._emit(job, Phase("prewarm", f"growing the pagefile: {p.reserved_bytes / GB:.2f} GB reserved, "
                                             f"{p.fraction * 100:.0f}% of {p.target_bytes / GB:.1f} GB commit"))

    def _record_failure(self, job: _Job, result: Failed) -> None:
        """A job that failed before the engine wrote its settings file (no plan fits, the engine did not start)
        still gets one saying so, so the past outputs list it as failed; one left at "running" is corrected."""
        path = sidecar_path(job.out_path)
        try:
            record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
            if isinstance(record, dict) and record.get("status") not in ("running", queue_records.QUEUED):
                return  # the engine recorded how it ended
            if not isinstance(record, dict):
                record = job.spec.settings()
            record.update(status="failed", frames=record.get("frames") or 0, message=result.message)
            image = Path(job.spec.image)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_sidecar(job.out_path, record, image if image.is_file() else None)
        except (OSError, ValueError):
            log.exception("job %s: writing its settings file failed", job.id)

    def _free_memory(self) -> None:
        if self._manager is None:
            return
        try:
            self._manager.release_after_job(self.keep_models_s)  # the queue is empty: give the memory back
        except Exception:
            log.exception("freeing the models failed")

    # ------------------------------------------------------------------------------ with self._cond held

    def _emit(self, job: _Job, event) -> None:
        with self._cond:
            if job.result is not None:
                log.warning("job %s: event after its end ignored: %r", job.id, event)
                return
            if isinstance(event, TERMINAL):
                self._end(job, event)
                return
            self._tell(job, event)
            if isinstance(event, Step):
                if job.step_index is not None:  # only the newest Step keeps its preview image
                    old = job.events[job.step_index]
                    job.events[job.step_index] = replace(old, preview=None)
                job.step_index = len(job.events)
            job.events.append(event)
            self._cond.notify_all()

    def _end(self, job: _Job, result) -> None:
        self._tell(job, result)
        job.result, job.status, job.position = result, STATUS[type(result)], None
        job.events.append(result)
        self._cond.notify_all()
        ended = [j for j in self._jobs.values() if j.result is not None]
        for old in ended[:-MAX_ENDED_JOBS]:
            del self._jobs[old.id]

    @staticmethod
    def _tell(job: _Job, event) -> None:
        if job.listener is not None:
            try:
                job.listener(event)
            except Exception:  # a listener's failure never stops the job or the worker
                log.exception("job %s: its event listener failed", job.id)

    def _renumber(self) -> None:
        for position, job in enumerate(self._queue, start=1):
            if job.position != position:
                job.position = position
                job.events.append(Queued(position))
        self._cond.notify_all()

    def _job(self, job_id: str) -> _Job:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise KeyError(f"no job {job_id!r}") from None

    def _info(self, job: _Job) -> JobInfo:
        step = job.events[job.step_index] if job.step_index is not None else None
        section = next((e for e in reversed(job.events) if isinstance(e, SectionSaved)), None)
        return JobInfo(job.id, job.status, job.position, job.spec, str(job.out_path), job.submitted_at, step,
                       section, job.result, len(job.events))

    def _output_path(self, seed: int) -> Path:
        """outputs/20260101_120000_31337.mp4, with _2, _3... when that name is taken (on disk or by a job)."""
        stem = f"{time.strftime('%Y%m%d_%H%M%S')}_{seed}"
        taken = {j.out_path for j in self._jobs.values()}
        for n in itertools.count(1):
            path = self.outputs_dir / (f"{stem}.mp4" if n == 1 else f"{stem}_{n}.mp4")
            if path not in taken and not path.exists() and not path.with_suffix(".json").exists():
                return path
        raise AssertionError("unreachable")

    @staticmethod
    def _kept(job: _Job) -> str | None:
        """The job's video, where the engine had the job and wrote some (a file there before is not this job's)."""
        return (str(job.out_path) if job.engine_started and job.out_path.is_file() and job.out_path.stat().st_size > 0
                else None)


def _recorded_continuation_sections(spec: JobSpec, start: Continuation | None) -> int | None:
    """The sections a continuation queued before a restart samples, from its record alone: a branch's from its
    section on. None where that is all of the spec's: an extension's spec is its added length, and a resume is not
    recorded (it is its source file)."""
    if start is not None and start.kind == "branch" and start.from_section:
        return max(spec.sections - (start.from_section - 1), 1)
    return None


# How long the queue stays empty after a job before the worker compiles: a user submitting again at once (a batch
# from the page, a retry) does not wait for the compile.
IDLE_COMPILE_GRACE_S = 2.0
IDLE_COMPILE_CLOSE_WAIT_S = 1.0  # what closing the app waits for a compile between jobs
IDLE_COMPILE_NOTICE = ("waiting for the VAE decoder's compile, which the app does once while idle (up to a minute or "
                       "two): it makes this job's decodes faster")


def cuda_index(device: str) -> int:
    """0 for "cuda" (and "cpu"), 1 for "cuda:1"."""
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
