"""Several GPUs serve one queue: one worker per device, every one taking jobs from one FIFO in submit order.

`WorkerPool` is a Worker to the UI (submit, events, jobs, cancel... unchanged): it keeps the queue, the jobs and
their events, and runs nothing itself. Its lanes do: one Worker per device, sharing the pool's queue, lock and job
list, each with its own thread, ModelManager and memory plan. A lane plans on its share of the host's RAM and
commit (memory.plan.host_share) with its own GPU's VRAM, so the lanes' plans together never ask more of the host
than one plan could. The host is read once, when the pool starts: a reading taken later would count the models one
lane holds against every other lane's share too.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from ..errors import InputError
from ..events import Notice
from .worker import Worker, cuda_index

log = logging.getLogger(__name__)


def cuda_device_count() -> int:
    """CUDA devices torch sees (imports torch: asked only when --gpus is given)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(text: str, device_count: int) -> list[str]:
    """`--gpus` -> the CUDA devices, one worker each: "all" -> every one; "0,1" -> cuda:0 and cuda:1. InputError
    (one line) for a GPU the machine does not have, a repeated one, or anything else."""
    text = text.strip().lower()
    if device_count < 1:
        raise InputError(f"--gpus {text}: this machine has no CUDA GPU")
    if text == "all":
        return [f"cuda:{i}" for i in range(device_count)]
    parts = [part.strip() for part in text.split(",")]
    if not parts or not all(part.isdigit() for part in parts):
        raise InputError(f"--gpus must be all or GPU numbers separated by commas (e.g. 0,1), not {text!r}")
    indexes = [int(part) for part in parts]
    missing = [i for i in indexes if i >= device_count]
    if missing:
        raise InputError(f"--gpus {text}: this machine has no GPU {missing[0]} (it has {device_count}, numbered "
                         f"0 to {device_count - 1})")
    if len(set(indexes)) != len(indexes):
        raise InputError(f"--gpus {text}: a GPU is named twice")
    return [f"cuda:{i}" for i in indexes]


class _Lane(Worker):
    """One device's worker: the pool's queue, lock and jobs, its own thread, models and plan."""

    def __init__(self, pool: "WorkerPool", device: str, **options):
        super().__init__(pool.models_dir, pool.outputs_dir, device=device, serves_pages=False, background=False,
                         **options)
        self._pool = pool
        # the pool's: a job queued there is taken by the first lane free, and its events go to the pool's list
        self._cond, self._jobs, self._queue = pool._cond, pool._jobs, pool._queue
        self.serves_pages = pool.serves_pages  # queue records and failure records, as the pool's own worker would

    def _probe_machine(self, device: str):
        return self._pool.lane_machine(device)

    def _run(self, job) -> None:
        if self._device.startswith("cuda"):  # torch's current device is per thread: this lane's, for the streams
            import torch  # and kernels that name none

            torch.cuda.set_device(cuda_index(self._device))
        self._emit(job, Notice(f"running on {self.device_name()}"))
        super()._run(job)

    def _convert_fp8(self, job, emit) -> None:
        with self._pool.fp8_lock:  # one conversion of the shared models folder at a time; the next lane finds it
            super()._convert_fp8(job, emit)


class WorkerPool(Worker):
    """One job queue served by a worker per device (`devices`: e.g. ["cuda:0", "cuda:1"]; tests stand "cpu" in for
    each GPU). `host`: the host's reading whose RAM and commit the lanes share (default: read now). Other options
    as Worker's (a fixed `manager` is refused: each lane owns its models)."""

    def __init__(self, models_dir: str | Path, outputs_dir: str | Path, devices: list[str], host=None,
                 **options):
        if not devices:
            raise ValueError("a pool needs at least one device")
        if options.get("manager") is not None:
            raise ValueError("each lane of a pool owns its models: no fixed manager")
        if options.pop("background", True) is False:
            raise ValueError("a pool's lanes run on their own threads")
        serves_pages = options.pop("serves_pages", True)
        super().__init__(models_dir, outputs_dir, device=devices[0], serves_pages=serves_pages, background=False,
                         **options)
        self.host = host if host is not None else self._read_host()
        self.fp8_lock = threading.Lock()
        self.lanes = self._make_lanes(devices, {k: v for k, v in options.items() if k != "profile"})
        for number, lane in enumerate(self.lanes):
            lane._thread = threading.Thread(target=lane._loop, name=f"framepack-worker-{number}", daemon=True)
            lane._thread.start()
        log.info("worker pool: %s", ", ".join(devices))

    def _read_host(self):
        from ..memory.probe import probe_machine

        return probe_machine(self.models_dir, cuda=False)

    def _make_lanes(self, devices: list[str], options: dict) -> list[Worker]:
        return [_Lane(self, device, **options) for device in devices]

    @property
    def devices(self) -> list[str]:
        return [lane.device_name() for lane in self.lanes]

    def lane_machine(self, device: str):
        """The machine a lane on `device` plans for: its GPU read now, its share of the host as read at the start."""
        from ..memory.plan import host_share
        from ..memory.probe import probe_machine

        read = probe_machine(self.models_dir, cuda=device.startswith("cuda"), cuda_index=cuda_index(device))
        return host_share(read, len(self.lanes), host=self.host)

    def _make_plan(self, profile: str, resolution: int, **options):
        return self.lanes[0]._make_plan(profile, resolution, **options)  # what any lane's job would run under

    def _running_jobs(self) -> list:
        with self._cond:
            return [lane._running for lane in self.lanes if lane._running is not None]

    def past_outputs(self):
        from .gallery import past_outputs

        return past_outputs(self.outputs_dir, {str(job.out_path.resolve()) for job in self._running_jobs()})

    def outputs_signature(self) -> tuple:
        from .gallery import listing_signature

        return tuple(job.id for job in self._running_jobs()), listing_signature(self.outputs_dir)

    def run_queued(self) -> None:
        raise RuntimeError("a pool runs its jobs on its lanes' threads")

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """As Worker.shutdown, for every lane: the queue dropped, the running jobs stopped (their finished sections
        kept), the threads ended."""
        with self._cond:
            for lane in self.lanes:
                lane._closed = True
                lane._download_cancel.set()
        super().shutdown(timeout_s)
        with self._cond:
            for lane in self.lanes:
                if lane._running is not None:
                    lane._running.cancel.set()
            self._cond.notify_all()
            waits = [lane._thread_wait_s(timeout_s) for lane in self.lanes]
        for lane, wait_s in zip(self.lanes, waits):
            lane._thread.join(wait_s)
