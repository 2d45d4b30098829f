"""One job over several GPUs of one host: the transformer's sequence split across them (`--gpus 0,1 --split`).

The worker starts one process per GPU (torch.distributed: NCCL between GPUs, gloo on CPUs and for the host-side
tensors) and relays rank 0's events. Rank 0 runs the job as ever (encoders, VAE, the video writer: engine/f1.py)
through a lender whose transformer is split (compute/context_parallel.py); the other ranks hold the same
transformer, as the same memory plan places it on their own card, and follow: before each transformer call, rank 0
sends the call's inputs, and every rank computes it together (each its share of the tokens; the attention
exchanges them). The user starts nothing; the processes end with the job.

Every process started keeps NVLink multicast off (SPLIT_ENV): the lent several-GPU machines need it.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..errors import InputError
from ..events import TERMINAL, Failed

log = logging.getLogger(__name__)

# NVLink multicast off in every process started (the device tool's KINDS.md: the lent machines need it)
SPLIT_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
# every socket on the loopback: one host, nothing reachable from outside
LOOPBACK_ENV = {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
TRANSFORMER_HEADS = 24  # the F1 transformer's attention heads (the split gives each GPU whole heads)
# GPUs whose memory differs by more than this cannot share one memory plan (each holds the whole transformer and
# an equal share of the tokens, so the plan is one for all); a few percent is the same card with another reserve
MEMORY_SPREAD = 0.05
# how long a rank waits for the next collective: rank 0 encodes the prompts and decodes each section while the
# others wait (minutes with a cold text encoder), never an hour
COLLECTIVE_TIMEOUT_S = 3600.0
FOLLOWERS_GRACE_S = 60.0  # after rank 0's result, how long the others get to finish before they are ended
LOCKSTEP_HOOK = "framepack_split_lockstep"
DEFAULT_PROMPT_CACHE = "default"  # each rank's ModelManager keeps its default prompt cache folder


def split_problem(devices: Sequence, memory_bytes: Sequence[int] | None, heads: int = TRANSFORMER_HEADS,
                  attention: str | None = None) -> str | None:
    """Why `--split` cannot run on `devices` (their total memory `memory_bytes`, None where unknown) with the
    attention backend `attention` (None: diffusers' choice), in one line; None if it can."""
    from ..compute.backends import SPLIT_ATTENTION_BACKENDS, split_heads_problem  # no torch: runs at startup

    if len(devices) < 2:
        return (f"--split needs at least 2 GPUs (--gpus 0,1), got {len(devices)}: "
                "one GPU runs the job without --split")
    problem = split_heads_problem(heads, len(devices))
    if problem:
        return f"--split: {problem}"
    if attention is not None and attention not in SPLIT_ATTENTION_BACKENDS:
        return (f"--split runs attention through {', '.join(SPLIT_ATTENTION_BACKENDS)}, not --attention "
                f"{attention}")
    if memory_bytes:
        smallest, largest = min(memory_bytes), max(memory_bytes)
        if largest > smallest * (1 + MEMORY_SPREAD):
            sizes = ", ".join(f"GPU {d}: {m / 2**30:.0f} GiB" for d, m in zip(devices, memory_bytes))
            return (f"--split needs GPUs of one memory size (each holds the whole video model and an equal share "
                    f"of the work), got {sizes}: run them as separate workers without --split")
    return None


def gpu_memory_bytes(devices: Sequence[int], nvml=None) -> list[int] | None:
    """Each device's total memory from NVML (no torch, no CUDA context), or None where NVML is missing."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError:
            return None
    try:
        nvml.nvmlInit()
    except Exception:  # no driver: the job itself will say so
        log.debug("nvmlInit failed", exc_info=True)
        return None
    try:
        return [int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(int(d))).total) for d in devices]
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def check_split_option(devices: Sequence, split: bool, memory_bytes: Sequence[int] | None = None,
                       probe: Callable[[Sequence], list[int] | None] = gpu_memory_bytes,
                       attention: str | None = None) -> None:
    """At startup (CLI and app): raise InputError (one line; the CLI exits 2) when `--split` cannot run on
    `devices`. `memory_bytes` or `probe(devices)` give each device's memory (injectable for tests)."""
    if not split:
        return
    if len(devices) >= 2 and memory_bytes is None:
        memory_bytes = probe(devices)
    problem = split_problem(devices, memory_bytes, attention=attention)
    if problem:
        raise InputError(problem)


class SplitJobRunner:
    """The worker's `run_job` for `--gpus ... --split`: the worker plans the job and makes its (still empty)
    ModelManager as for one GPU; this runs the job on `devices` with that plan, loading nothing in the worker's own
    process. Worker(models_dir, outputs_dir, run_job=SplitJobRunner(devices))."""

    def __init__(self, devices: Sequence, device_type: str = "cuda", **options):
        self.devices, self.device_type, self.options = list(devices), device_type, options

    def __call__(self, spec, out_path, manager, emit, cancel=None, *, record=None, out_of_memory_advice=None,
                 start=None, calibration_dir=None):
        prompt_cache = getattr(manager, "prompt_cache", None)
        cache_dir = prompt_cache.cache_dir if prompt_cache is not None else DEFAULT_PROMPT_CACHE
        return run_split_job(spec, out_path, manager.plan, self.devices, manager.models_dir, emit, cancel,
                             record=record, out_of_memory_advice=out_of_memory_advice, start=start,
                             calibration_dir=calibration_dir, prompt_cache_dir=cache_dir,
                             loras=getattr(manager, "_loras", None), device_type=self.device_type, **self.options)


@dataclass(frozen=True)
class _RankFailed:
    rank: int
    message: str


@dataclass(frozen=True)
class _Rank:
    """What one process of the job needs (pickled to it)."""
    rank: int
    world_size: int
    device: str  # "cuda:R" (R its rank: CUDA_VISIBLE_DEVICES holds the job's GPUs in order) or "cpu"
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES for every process of the job; None on CPUs
    init_file: str
    backend: str
    models_dir: str
    plan: object  # memory.plan LoadPlan: one for every card (split_problem: one memory size)
    prompt_cache_dir: object  # a folder, None (in memory only) or DEFAULT_PROMPT_CACHE
    loras: object  # memory.lora LoraSet or None: every rank's transformer computes with them
    collective_timeout_s: float


def run_split_job(spec, out_path, plan, devices: Sequence, models_dir, emit, cancel: threading.Event | None = None,
                  *, record: dict | None = None, out_of_memory_advice: str | None = None, start=None,
                  calibration_dir=None, prompt_cache_dir=DEFAULT_PROMPT_CACHE, loras=None, device_type: str = "cuda",
                  start_method: str = "spawn",
                  followers_grace_s: float = FOLLOWERS_GRACE_S, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
                  rank_hooks: dict | None = None):
    """Run one job with the transformer's sequence split over `devices` (GPU indices; on CPUs with gloo,
    `device_type="cpu"` and `devices` just counts the processes). Emits the job's events as rank 0 makes them and
    returns its result (Finished, Stopped or Failed), as engine.f1.run does. A process that dies ends the others
    and fails the job in one line. `rank_hooks`: {rank: callable(transformer)} called in that rank's process once
    its transformer is split (fault injection in tests; pickled, so module-level)."""
    import multiprocessing

    if spec.cache_method == "magcache":
        # its hooks skip the blocks on rank 0 alone (the followers mirror TeaCache only), and a rank that skips a
        # block's all-to-all leaves the others waiting in it until the collective timeout
        raise InputError("MagCache does not run with --split yet: use --cache teacache or off for a split job")
    cancel = cancel or threading.Event()
    # engine.f1.run's own options, for rank 0 (it runs the job; the others follow its transformer calls)
    run_options = {"calibration_dir": calibration_dir, **({"start": start} if start is not None else {})}
    context = multiprocessing.get_context(start_method)
    events, stop = context.Queue(), context.Event()
    workdir = tempfile.mkdtemp(prefix="framepack-split-")
    cuda = device_type == "cuda"
    ranks = [_Rank(rank, len(devices), f"cuda:{rank}" if cuda else "cpu",
                   ",".join(str(d) for d in devices) if cuda else None, os.path.join(workdir, "rendezvous"),
                   "cpu:gloo,cuda:nccl" if cuda else "gloo", str(models_dir), plan, prompt_cache_dir, loras,
                   collective_timeout_s)
             for rank in range(len(devices))]
    processes = [context.Process(target=_rank_main, name=f"framepack-split-{r.rank}", daemon=True,
                                 args=(r, spec, str(out_path), record, out_of_memory_advice, run_options, events, stop,
                                       (rank_hooks or {}).get(r.rank)))
                 for r in ranks]
    clean = False
    try:
        for process in processes:
            process.start()
        result, clean = _relay(processes, events, emit, cancel, stop)
    finally:
        # a rank that failed leaves the others waiting in a collective: end them at once
        _end_processes(processes, followers_grace_s if clean else 0)
        with contextlib.suppress(OSError):
            for name in os.listdir(workdir):
                os.remove(os.path.join(workdir, name))
            os.rmdir(workdir)
    return result


def _relay(processes, events, emit, cancel, stop) -> tuple[object, bool]:
    """Rank 0's events to `emit` until its result, watching every process: (the result, or a Failed; whether every
    process is on its way to a clean end)."""
    while True:
        if cancel.is_set():
            stop.set()  # rank 0 stops at its next step, as a one-GPU job does
        try:
            event = events.get(timeout=0.2)
        except queue.Empty:
            ended = _ended_early(processes)
            if ended is None:
                continue
            # what it (or another) said before exiting comes first: a failing rank puts its reason, rank 0 its result
            event = _last_words(events, emit) or _RankFailed(*ended)
        if isinstance(event, _RankFailed):
            result = Failed(f"the split job failed: process {event.rank}: {event.message}", None, "internal")
            emit(result)
            return result, False
        emit(event)
        if isinstance(event, TERMINAL):
            return event, True


def _ended_early(processes) -> tuple[int, str] | None:
    """(rank, why) of a process that ended before the job's result, or None."""
    for rank, process in enumerate(processes):
        if process.exitcode is not None and (process.exitcode != 0 or rank == 0):
            return rank, f"ended with exit code {process.exitcode}"
    return None


def _last_words(events, emit):
    """The events still queued, emitted, up to a result or a rank's failure (returned); None if none comes."""
    with contextlib.suppress(queue.Empty):
        while True:
            event = events.get(timeout=1.0)
            if isinstance(event, (_RankFailed, *TERMINAL)):
                return event
            emit(event)
    return None


def _end_processes(processes, grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for process in processes:
        if process.pid is None:
            continue
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("ending split process %s (pid %s)", process.name, process.pid)
            process.kill()
            process.join(10)


def _rank_main(rank: _Rank, spec, out_path: str, record, out_of_memory_advice, run_options, events, stop,
               rank_hook):
    """One process of the split job (the entry point `run_split_job` starts)."""
    os.environ.update(SPLIT_ENV)
    os.environ.update(LOOPBACK_ENV)
    if rank.visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = rank.visible_devices
    try:
        _run_rank(rank, spec, out_path, record, out_of_memory_advice, run_options, events, stop, rank_hook)
    except BaseException as exc:  # the parent ends the others and fails the job with this line
        log.exception("split process %d failed", rank.rank)
        events.put(_RankFailed(rank.rank, f"{exc.__class__.__name__}: {' '.join(str(exc).split())}"[:200]))
        raise SystemExit(1)


def _run_rank(rank: _Rank, spec, out_path, record, out_of_memory_advice, run_options, events, stop,
              rank_hook) -> None:
    import torch
    import torch.distributed as dist

    from ..memory.manager import ModelManager

    device = torch.device(rank.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # the CPU processes share the cores rather than each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rank.world_size))
    dist.init_process_group(rank.backend, init_method=f"file://{rank.init_file}", rank=rank.rank,
                            world_size=rank.world_size, timeout=datetime.timedelta(seconds=rank.collective_timeout_s))
    try:
        cache = ({} if rank.prompt_cache_dir == DEFAULT_PROMPT_CACHE else
                 {"prompt_cache_dir": rank.prompt_cache_dir})
        manager = ModelManager(Path(rank.models_dir), rank.plan, gpu=device, **cache)
        if rank.loras is not None:
            manager.set_loras(rank.loras)
        try:
            if rank.rank == 0:
                _lead(manager, spec, out_path, record, out_of_memory_advice, run_options, events, stop, rank_hook)
            else:
                _follow(manager, rank_hook)
        finally:
            manager.free()
    finally:
        dist.destroy_process_group()


def _lead(manager, spec, out_path, record, out_of_memory_advice, run_options, events, stop, rank_hook) -> None:
    from ..engine.f1 import run

    lender = SplitLender(manager, rank_hook)
    try:
        run(spec, out_path, lender, events.put, stop, record=record, out_of_memory_advice=out_of_memory_advice,
            **run_options)
    finally:
        Lockstep.release_followers()


def _follow(manager, rank_hook) -> None:
    from ..engine.f1 import TRANSFORMER

    with manager.use(TRANSFORMER) as transformer:
        _split(transformer, rank_hook)
        Lockstep.follow(transformer)


def _split(transformer, rank_hook) -> None:
    from ..compute.context_parallel import apply_sequence_split, is_sequence_split

    if not is_sequence_split(transformer):
        apply_sequence_split(transformer)
        if rank_hook is not None:
            rank_hook(transformer)


class SplitLender:
    """Rank 0's lender: the manager's models, the transformer split across the ranks and leading them (each call
    sent to the others first: Lockstep)."""

    def __init__(self, manager, rank_hook=None):
        self._manager, self._rank_hook = manager, rank_hook

    @contextlib.contextmanager
    def use(self, name: str):
        from ..engine.f1 import TRANSFORMER

        with self._manager.use(name) as model:
            if name == TRANSFORMER:
                _split(model, self._rank_hook)
                Lockstep.lead(model)
            yield model

    def __getattr__(self, name):  # compute_place, cached_prompt, cache_prompt, first_use_notice: the manager's
        return getattr(self._manager, name)


class Lockstep:
    """Rank 0 sends each transformer call's inputs to the other ranks, and every rank then runs it.

    A diffusers hook on rank 0's transformer sends, before the forward, what the call is: its keyword inputs
    (their shapes and dtypes, then the tensors themselves, each where it lives: the text mask stays on the host
    and goes over gloo, the rest over NCCL) and TeaCache's state. TeaCache's hooks sit outside the split (registered
    per job, after it), so every rank judges the same whole sequence; its skip decision is still agreed by all
    ranks (skip only if all would), so that no rank can enter a block's all-to-all that another skipped.
    """

    @staticmethod
    def lead(transformer) -> None:
        from diffusers.hooks import HookRegistry

        registry = HookRegistry.check_if_exists_or_initialize(transformer)
        if registry.get_hook(LOCKSTEP_HOOK) is None:
            registry.register_hook(_leader_hook(), LOCKSTEP_HOOK)

    @staticmethod
    def release_followers() -> None:
        """Tell the other ranks the job is over (rank 0, at the job's end, whatever its end)."""
        import torch.distributed as dist

        dist.broadcast_object_list([None], src=0)

    @staticmethod
    def follow(transformer) -> None:
        """Run rank 0's transformer calls until it says the job is over."""
        import torch

        mirror = _TeaCacheMirror(transformer)
        while True:
            call = _receive_call()
            if call is None:
                break
            kwargs, teacache = call
            mirror.follow(teacache)
            with torch.no_grad():
                transformer(**kwargs)
        mirror.remove()


def _leader_hook():
    from diffusers.hooks import ModelHook

    class LeaderHook(ModelHook):
        """Sends each call to the other ranks before rank 0 runs it (Lockstep)."""

        def pre_forward(self, module, *args, **kwargs):
            if args:
                raise TypeError("a split transformer takes keyword inputs only (they are sent to the other ranks)")
            _send_call(kwargs, _teacache_state(module))
            return args, kwargs

    return LeaderHook()


def _send_call(kwargs: dict, teacache) -> None:
    import torch
    import torch.distributed as dist

    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    described = {k: (tuple(v.shape), v.dtype, v.device.type) for k, v in tensors.items()}
    values = {k: v for k, v in kwargs.items() if k not in tensors}
    dist.broadcast_object_list([(described, values, teacache)], src=0)
    for name in sorted(tensors):
        dist.broadcast(tensors[name].contiguous(), src=0)


def _receive_call():
    import torch
    import torch.distributed as dist

    message = [None]
    dist.broadcast_object_list(message, src=0)
    if message[0] is None:
        return None
    described, values, teacache = message[0]
    kwargs = dict(values)
    for name in sorted(described):
        shape, dtype, device_type = described[name]
        # where rank 0's lives, on this rank's own device (not transformer.device: a streamed transformer's first
        # parameters stay on the host, and a tensor on the wrong side would meet the other backend's broadcast)
        device = torch.device("cpu") if device_type == "cpu" else torch.device(device_type, torch.cuda.current_device())
        tensor = torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        kwargs[name] = tensor
    return kwargs, teacache


def _teacache_of(transformer):
    from ..engine.teacache import TEACACHE_HOOK, transformer_blocks

    registry = getattr(transformer_blocks(transformer)[0], "_diffusers_hook", None)
    hook = registry.get_hook(TEACACHE_HOOK) if registry is not None else None
    return hook.cache if hook is not None else None


def _teacache_state(transformer):
    """What the other ranks need to judge this call as rank 0's TeaCache will: (threshold, step, steps, branch,
    whether it was just reset), or None without TeaCache."""
    cache = _teacache_of(transformer)
    if cache is None:
        return None
    _agree_on_skips(cache)
    # reset() clears the branches; decide() fills them: empty before a call means a reset since the last one
    return (cache.threshold, cache._step, cache._steps, cache._branch, not cache._branches)


def _agree_on_skips(cache) -> None:
    """Make `cache.decide` agree across the ranks: skip only where every rank would (one small all-reduce per
    call, over gloo). Identical inputs give identical judgements; this keeps a rounding difference near the
    threshold from sending one rank into the blocks' collectives alone."""
    if getattr(cache, "_split_agreed", False):
        return
    import torch
    import torch.distributed as dist

    local_decide = cache.decide

    def decide(modulated):
        skip = local_decide(modulated)
        vote = torch.tensor([1 if skip else 0], dtype=torch.int32)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        agreed = bool(vote.item())
        if skip and not agreed:  # run after all: as decide() leaves a computed call
            cache._branches[cache._branch].accumulated = 0.0
            cache.skipped_calls -= 1
            cache.computed_calls += 1
        cache.skipping = agreed
        return agreed

    cache.decide = decide
    cache._split_agreed = True


class _TeaCacheMirror:
    """A follower's TeaCache, kept as rank 0's: on when it is on, reset when it was reset, at its step."""

    def __init__(self, transformer):
        self.transformer, self.cache = transformer, None

    def follow(self, state) -> None:
        from ..engine.teacache import apply_teacache

        if state is None or (self.cache is not None and self.cache.threshold != state[0]):
            self.remove()
        if state is None:
            return
        threshold, step, steps, branch, was_reset = state
        if self.cache is None:
            self.cache = apply_teacache(self.transformer, threshold)
            _agree_on_skips(self.cache)
        if was_reset:
            self.cache.reset()
        self.cache.begin(step, steps, branch)

    def remove(self) -> None:
        from ..engine.teacache import remove_teacache

        if self.cache is not None:
            remove_teacache(self.transformer)
            self.cache = None
