"""Machines joined through Ray: the web app's queue served by a worker on each GPU of a running Ray cluster.

`connect(address, ...)` joins the cluster (Ray is an optional extra, imported here only), starts one actor per GPU
there (`NodeWorker`, one GPU each) and returns a RayPool: a Worker to the UI whose lanes each send a job to their
actor and follow it. An actor runs the job with its own Worker, on its node's models folder (fetched there on first
use) and its node's memory plan (the actors of a node with several GPUs share its RAM: memory.plan.host_share). What
the job writes comes back as it is written: after each section the files that changed (the video, its settings,
the section state), then the event that names them; previews ride on the Step events.

A node lost mid-job (its actor dies): the sections already returned stay in the app's outputs, and the job goes
back to the head of the queue as a resume of its saved section state (engine/continuation.py), which the next free
actor continues; a job with no section back yet starts again. The traffic is Ray's own, between this machine and
the cluster the user names.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..errors import InputError, UserError
from ..events import TERMINAL, Failed, Notice, SectionSaved
from ..sidecar import atomic_write_bytes, sidecar_path, state_path
from ..spec import Continuation, JobSpec
from . import queue_records
from .events import Queued
from .pool import WorkerPool, _Lane
from .worker import Worker

log = logging.getLogger(__name__)

GPU_RESOURCE = "GPU"  # one actor per unit of this Ray resource (tests name a resource of CPU slots instead)
ANSWER_TIMEOUT_S = 5.0  # a cluster address that does not take a connection within this is refused at startup
ACTORS_READY_TIMEOUT_S = 600.0  # each actor imports torch and the engine on its node before it answers
STOP_POLL_S = 0.2  # how soon a stop asked in the app reaches the node
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Ray reads it once, when imported: "0" keeps a Linux node on loopback, as on Windows and macOS (no other node joins)
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
PACKAGE_DIR = Path(__file__).resolve().parent.parent  # framepack_ui/: sent to the nodes (Ray's py_modules)
MANIFEST = "state.json"  # engine/state.py's: read before the state's other files, so it never names a newer one


@dataclass(frozen=True)
class FilesBack:
    """What a node's job wrote since the last FilesBack: bytes by path under its outputs folder, and what it
    removed (a resume's file moved into place)."""
    files: dict
    removed: tuple = ()


@dataclass(frozen=True)
class NodeJob:
    """A job as a node runs it. Paths in `spec` (image, LoRAs) and `start` are relative to the node's job folder,
    where `files` (relative path -> bytes) are written first: the start image, the LoRAs, and for a continued job
    what it continues (video, settings, section state)."""
    spec: JobSpec
    out_name: str  # the video's name, in the job folder's outputs/
    profile: str
    plan_options: dict
    start: Continuation | None
    files: dict


# --- on a node ----------------------------------------------------------------------------------------------------

class _NodeWorker(Worker):
    """A node's worker: its jobs record the node as well as the device, and where several actors share the node
    each plans on its share of the node's RAM and commit, read when the actor started."""

    def __init__(self, *args, node: str, label: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.node, self.label = node, label
        self.actors_on_node = 1
        self.host = None

    def _probe_machine(self, device: str):
        machine = super()._probe_machine(device)
        if self.actors_on_node == 1:
            return machine
        from ..memory.plan import host_share

        return host_share(machine, self.actors_on_node, host=self.host)

    def device_name(self) -> str:
        return f"{self.label} on Ray node {self.node}"


class NodeWorker:
    """The Ray actor on one GPU of a node (made by `connect`): runs the jobs a RayPool lane sends it, one at a time,
    yielding their events and the files they write."""

    def __init__(self, models_dir: str, options: dict):
        import ray

        context = ray.get_runtime_context()
        self.node_id = context.get_node_id()
        # the address the cluster knows the node by (ray.util.get_node_ip_address guesses from the routes instead)
        self.address = next((node["NodeManagerAddress"] for node in ray.nodes() if node["NodeID"] == self.node_id),
                            "unknown")
        self.root = _scratch_root()
        gpus = ray.get_gpu_ids()  # Ray shows the actor its GPU alone, as cuda:0: named by the node's numbering
        self.worker = _NodeWorker(models_dir, self.root / "job" / "outputs", device="cuda" if gpus else "cpu",
                                  serves_pages=False, node=self.address, label=f"GPU {gpus[0]}" if gpus else "cpu",
                                  **options)
        self._job_id: str | None = None

    def describe(self) -> dict:
        return {"node_id": self.node_id, "device": self.worker.device_name()}

    def share_node(self, actors_on_node: int) -> None:
        """This node's RAM and commit are shared with `actors_on_node` actors (this one included), as read now,
        before any of them loads a model."""
        from ..memory.probe import probe_machine

        self.worker.actors_on_node = actors_on_node
        self.worker.host = probe_machine(self.worker.models_dir, cuda=False)

    def stop(self) -> bool:
        return self._job_id is not None and self.worker.cancel(self._job_id)

    def run(self, job: NodeJob):
        """Yields the job's events (paths relative to its outputs folder), each SectionSaved and the end preceded by
        a FilesBack of what changed."""
        folder = self.root / "job"
        shutil.rmtree(folder, ignore_errors=True)  # whatever is in outputs/ now is this job's
        outputs = folder / "outputs"
        outputs.mkdir(parents=True)
        for relative, data in job.files.items():
            path = _inside(folder, relative)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        spec = replace(job.spec, image=str(folder / job.spec.image) if job.spec.image else job.spec.image,
                       loras=tuple(replace(lora, path=str(folder / lora.path)) for lora in job.spec.loras))
        start = replace(job.start, video=str(folder / job.start.video)) if job.start is not None else None
        try:
            self._job_id = self.worker.submit(spec, job.profile, out_path=outputs / job.out_name,
                                              plan_options=job.plan_options, start=start)
        except UserError as exc:
            yield Failed(exc.message, None, exc.reason)
            return
        seen: dict = {}
        try:
            for event in self.worker.events(self._job_id):
                if isinstance(event, Queued):  # the node's own queue: the app says where the job is in its own
                    continue
                if isinstance(event, (SectionSaved, *TERMINAL)):
                    back = _changes(outputs, seen)
                    if back.files or back.removed:
                        yield back
                yield _relative(event, outputs)
        finally:
            self._job_id = None
            shutil.rmtree(folder, ignore_errors=True)  # all of it went back to the app


def _scratch_root() -> Path:
    """This actor's folder for its job's files, under the node's temp folder, named by its process id; the folders of
    actors no longer running (killed mid-job, their node's Ray stopped) are removed first."""
    import psutil

    base = Path(tempfile.gettempdir()) / "framepack-node"
    base.mkdir(exist_ok=True)
    for old in base.iterdir():
        if old.name.isdigit() and not psutil.pid_exists(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    root = base / str(os.getpid())
    root.mkdir(exist_ok=True)
    return root


def _changes(outputs: Path, seen: dict) -> FilesBack:
    """The files under `outputs` new or changed since `seen` (relative path -> (size, mtime)), which it updates."""
    now = {}
    for path in outputs.rglob("*"):
        if path.is_file() and not path.name.startswith("."):  # "." names: an atomic write's temporary file
            stat = path.stat()
            now[path.relative_to(outputs).as_posix()] = (stat.st_size, stat.st_mtime_ns)
    files = {}
    for relative in sorted(now, key=lambda r: (Path(r).name != MANIFEST, r)):
        if seen.get(relative) != now[relative]:
            try:
                files[relative] = (outputs / relative).read_bytes()
            except OSError:  # removed since the listing: the next FilesBack says so
                continue
            seen[relative] = now[relative]
    removed = tuple(relative for relative in list(seen) if relative not in now)
    for relative in removed:
        del seen[relative]
    return FilesBack(files, removed)


def _relative(event, outputs: Path):
    """`event` with its paths relative to `outputs` (the app puts them under its own folder)."""
    changes = {name: Path(value).relative_to(outputs).as_posix() for name in ("path", "settings_path")
               if (value := getattr(event, name, None)) and Path(value).is_relative_to(outputs)}
    return replace(event, **changes) if changes else event


def _inside(folder: Path, relative: str) -> Path:
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise ValueError(f"{relative} is outside {folder}")
    return path


# --- in the app ---------------------------------------------------------------------------------------------------

class _RayLane(_Lane):
    """A lane whose jobs run on a Ray actor: it follows the job's events, writes the files that come back into the
    outputs folder, passes a stop on, and puts the job back in the queue should the actor's node be lost."""

    def __init__(self, pool: "RayPool", description: str, actor, **options):
        super().__init__(pool, description, **options)
        self.actor = actor
        self.lost = False
        self._received: set[Path] = set()  # the files this lane wrote for its current job

    def _run(self, job) -> None:
        import ray.exceptions

        self._emit(job, Notice(f"running on {self.device_name()}"))
        self._received = set()
        try:
            result = self._follow(job)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
            log.warning("job %s: the Ray actor on %s was lost: %s", job.id, self.device_name(), exc)
            if self._put_back(job):
                return
            result = Failed("the Ray node running this job was lost and no other GPU worker is left",
                            self._kept(job))
        except Exception as exc:  # one line for the user, the traceback in the log
            log.exception("job %s failed", job.id)
            result = Failed(f"internal error: {exc.__class__.__name__}: {' '.join(str(exc).split())}"[:300],
                            self._kept(job))
        if result is None:
            result = Failed("internal error: the node ended the job without a result", self._kept(job))
        if isinstance(job.result or result, Failed):
            self._record_failure(job, job.result or result)
        if self.serves_pages:
            queue_records.drop(job.out_path)
        with self._cond:
            if job.result is None:
                self._end(job, result)

    def _follow(self, job):
        import ray

        stream = self.actor.run.options(num_returns="streaming").remote(self._node_job(job))
        done = threading.Event()
        threading.Thread(target=self._pass_stop_on, args=(job, done), daemon=True).start()
        try:
            for ref in stream:
                item = ray.get(ref)
                if isinstance(item, FilesBack):
                    self._write_back(job, item)
                    continue
                event = self._local(job, item)
                self._emit(job, event)
                if isinstance(event, TERMINAL):
                    return event
        finally:
            done.set()
        return None

    def _pass_stop_on(self, job, done: threading.Event) -> None:
        while not done.is_set():
            if job.cancel.wait(STOP_POLL_S):
                self.actor.stop.remote()
                return

    def _node_job(self, job) -> NodeJob:
        """The job with its image, LoRAs and what it continues sent along (the node has none of this machine's
        files)."""
        files, spec = {}, job.spec
        if spec.image:
            files[f"inputs/{Path(spec.image).name}"] = Path(spec.image).read_bytes()
            spec = replace(spec, image=f"inputs/{Path(spec.image).name}")
        loras = []
        for number, lora in enumerate(spec.loras):
            relative = f"inputs/loras/{number}/{Path(lora.path).name}"
            files[relative] = Path(lora.path).read_bytes()
            loras.append(replace(lora, path=relative))
        start = job.start
        if start is not None:
            source = Path(start.video)
            for path in _output_files(source):
                files[f"outputs/{path.relative_to(source.parent).as_posix()}"] = path.read_bytes()
            start = replace(start, video=f"outputs/{source.name}")
        return NodeJob(replace(spec, loras=tuple(loras)), job.out_path.name, job.profile, job.plan_options, start,
                       files)

    def _write_back(self, job, back: FilesBack) -> None:
        folder = job.out_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        for relative, data in back.files.items():
            path = _inside(folder, relative)
            if path == sidecar_path(job.out_path):
                data = self._local_settings(job, data)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
            self._received.add(path)
        for relative in back.removed:
            path = _inside(folder, relative)
            if path in self._received:  # only what this job's node wrote here
                path.unlink(missing_ok=True)
                self._received.discard(path)
        job.engine_started = True  # what is at out_path is this job's now

    @staticmethod
    def _local_settings(job, data: bytes) -> bytes:
        """The settings file with this machine's start image and LoRA paths, not the node's copies."""
        import json

        try:
            record = json.loads(data)
        except ValueError:
            return data
        original = job.spec.settings()
        record.update(image=original["image"], loras=original["loras"])
        return json.dumps(record, indent=2).encode("utf-8")

    @staticmethod
    def _local(job, event):
        folder = job.out_path.parent
        changes = {f.name: str(folder / value) for f in fields(event) if f.name in ("path", "settings_path")
                   and (value := getattr(event, f.name)) is not None}
        return replace(event, **changes) if changes else event

    def _put_back(self, job) -> bool:
        """The job back at the head of the queue for another lane, as a resume of its returned sections where it has
        some; this lane ends. False when no other lane is left (or the app is closing)."""
        with self._cond:
            self.lost, self._closed = True, True
            if self._pool._closed or not any(not lane.lost for lane in self._pool.lanes):
                return False
            returned = _sections_returned(job.out_path)
            if returned:
                job.start = Continuation("resume", str(job.out_path))
            job.status = "queued"
            self._queue.appendleft(job)
            self._renumber()
        where = (f"resuming from its {returned} returned section{'s' if returned != 1 else ''}" if returned
                 else "starting again: no section had come back")
        self._emit(job, Notice(f"the Ray node running this job ({self.device_name()}) was lost: {where} on "
                               f"another node"))
        return True


def _sections_returned(video: Path) -> int:
    """Sections whose state came back from the node (0: none, or no readable state)."""
    import json

    try:
        manifest = json.loads((state_path(video) / MANIFEST).read_text(encoding="utf-8"))
        return len(manifest["sections"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _output_files(video: Path) -> list[Path]:
    """A past output and what is beside it for a continuation: its settings, start image copy and section state."""
    found = [video] + [path for path in (sidecar_path(video),) if path.is_file()]
    found += [path for path in video.parent.glob(f"{video.stem}.input.*") if path.is_file()]
    state = state_path(video)
    if state.is_dir():
        found += sorted(path for path in state.rglob("*") if path.is_file() and not path.name.startswith("."))
    return found


class RayPool(WorkerPool):
    """The app's queue served by Ray actors (`connect` makes it): one lane per actor. Plans are made on the nodes."""

    def __init__(self, models_dir, outputs_dir, actors: list, descriptions: list[str], **options):
        self._actors = list(actors)
        super().__init__(models_dir, outputs_dir, descriptions, **options)

    def _read_host(self):
        return None  # each node plans on its own machine

    def _make_lanes(self, devices: list[str], options: dict) -> list[Worker]:
        return [_RayLane(self, description, actor, **options) for description, actor in zip(devices, self._actors)]

    def plan_text(self, profile: str | None = None, resolution: int = 640, **options) -> str:
        return ("Each node of the Ray cluster plans its own jobs, for its own RAM and GPU (the job's settings file "
                "records the plan and the device it ran on).")

    def attention_problem(self) -> str | None:
        return None  # a node that cannot run it fails the job in one line

    def missing_models(self) -> str:
        return ""  # each node fetches its own on first use

    def shutdown(self, timeout_s: float = 60.0) -> None:
        import ray

        super().shutdown(timeout_s)
        for actor in self._actors:
            ray.kill(actor)
        ray.shutdown()


def _answers(address: str, timeout_s: float) -> str | None:
    """None when something takes a TCP connection at `address` (HOST:PORT, or ray://HOST:PORT), else why not."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return "give it as HOST:PORT (the head node's address, e.g. 192.168.1.20:6379)"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"nothing answers there ({exc.strerror or exc.__class__.__name__})"


def connect(address: str, models_dir: str | Path, outputs_dir: str | Path, *, slot_resource: str = GPU_RESOURCE,
            node_options: dict | None = None, **options) -> RayPool:
    """Join the Ray cluster at `address` and start an actor per `slot_resource` unit there (per GPU). InputError (one
    line) where Ray is not installed, nothing answers at the address, or the cluster has no GPU. `node_options`: the
    nodes' Worker options (keep_models_s, attention, download_missing: default True, fetching missing models on
    first use); `options`: the app's pool's."""
    host = address.removeprefix("ray://").rpartition(":")[0]
    if host in LOOPBACK:
        # a cluster on this machine's loopback: Ray's single-machine mode keeps this process's servers there too
        # (its cluster mode would resolve 127.0.0.1 to the LAN address, and advertise and listen on that)
        os.environ.setdefault(SINGLE_MACHINE_ENV, "0")
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray, an optional extra: pip install ray==2.60.0 (on every node too)") from None
    problem = _answers(address, ANSWER_TIMEOUT_S) if address != "auto" else None
    if problem:
        raise InputError(f"--ray {address}: {problem}")
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"py_modules": [str(PACKAGE_DIR)], "excludes": ["__pycache__"]},
                 # a cluster on this machine's loopback is reached from loopback, and nothing listens wider
                 **({"_node_ip_address": "127.0.0.1"} if host in LOOPBACK else {}))
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError...: whatever Ray says, in one line
        raise InputError(f"--ray {address}: could not join the cluster: {' '.join(str(exc).split())[:200]}") from None
    try:
        slots = int(ray.cluster_resources().get(slot_resource, 0))
        if slots < 1:
            raise InputError(f"--ray {address}: the cluster has no {slot_resource} for a worker")
        actor_class = ray.remote(NodeWorker).options(
            max_concurrency=2,  # run() and a stop() beside it
            num_cpus=0, **({"num_gpus": 1} if slot_resource == GPU_RESOURCE else {"resources": {slot_resource: 1}}))
        node = {"download_missing": True, **(node_options or {})}
        actors = [actor_class.remote(str(Path(models_dir).absolute()), node) for _ in range(slots)]
        described = ray.get([actor.describe.remote() for actor in actors], timeout=ACTORS_READY_TIMEOUT_S)
        per_node: dict = {}
        for item in described:
            per_node[item["node_id"]] = per_node.get(item["node_id"], 0) + 1
        ray.get([actor.share_node.remote(per_node[item["node_id"]]) for actor, item in zip(actors, described)])
    except InputError:
        ray.shutdown()
        raise
    except Exception as exc:  # an actor that could not start (its node lacks a package), or not in time
        ray.shutdown()
        raise InputError(f"--ray {address}: the GPU workers did not start: "
                         f"{' '.join(str(exc).split())[:200]}") from None
    log.info("Ray cluster at %s: %d GPU workers (%s)", address, len(actors),
             ", ".join(item["device"] for item in described))
    return RayPool(models_dir, outputs_dir, actors, [item["device"] for item in described], **options)
