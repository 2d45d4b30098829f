"""Stream transformer blocks to the GPU: keep some resident, copy the rest in just before they run.

Why our own: diffusers' `apply_group_offloading` with streams measured 1.46 s/step at 8 GB free on an H100
(official-size F1 transformer) but pinned 38.5 GB of host memory (40 GB host in all) to get there; without
pinning (`low_cpu_mem_usage=True`) it fell to 2.05 s/step, and block-level without streams to 19.1 s/step
(shared/reference/framepack-f1.md; docs/benchmarks.md, "Own block streamer instead of diffusers group
offloading"). A laptop with 32 GB of RAM can pin neither. Here the weights stay where
the memory manager put them (RAM or a read-only file map) and pass through two block-sized pinned staging
buffers: a helper thread copies block i+1 into pinned memory and starts its upload on a side stream while the
GPU computes block i, so with a fast enough link the upload hides under compute.

With `pin_sources` (the plan's choice where RAM is plentiful) the streamed blocks are copied once into page-locked RAM
and uploaded from there, skipping the per-step memcpy: on the H100 the two-hop path (pageable -> pinned -> GPU reads
host memory twice) delivered about 22.6 GB/s, short of the 24 GB/s a compiled step at 8 GB needs (0.953 s/step, 1.08x of
resident: docs/benchmarks.md, "Page-locked sources where RAM allows"). Pinned memory is registered with
`cudaHostRegister` rather than allocated through torch's pinned allocator, which rounds each allocation up to a power of
two (a 0.68 GB block would pin 1.07 GB).

Parked resident blocks (the VAE decode borrows their VRAM) come back from their sources after the decode. From the file
map that is a synchronous pageable copy: 0.44-0.60 s per section for 5 blocks on the H200 at 8 GB (docs/benchmarks.md,
"Parking resident blocks for the VAE decode"). With `pin_parked` their sources are page-locked too, and restore() only
queues the copies on the side stream: each resident block's first forward waits for its own copy, so the uploads overlap
the blocks computing before them. Measured (bench/bench_restore.py, H200, 3.4 GB parked): 0.078 s per section, against
0.092 s for a synchronous copy from the same page-locked copies.

Mechanism only: which blocks stay resident, and whether their sources are pinned, is the memory plan's decision.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext

import torch

log = logging.getLogger(__name__)

ALIGN_BYTES = 256  # every tensor view in a slot starts aligned, whatever its dtype

# How the blocks are page-locked: PIN_WORKERS blocks at a time, each in a thread of its own (the copy and
# cudaHostRegister release the GIL), each registered after its copy (the copy faults the new buffer's pages in and
# registering pins them as they are; registering first makes the kernel zero-fill every page, which the copy then
# writes again). 4 threads, registered after: 0.58 s for 24 blocks (10.3 GB) where one at a time registered first
# took 3.28 s, and an 8 GB warm job's loading 2.7 s instead of 8.5 (docs/benchmarks.md, "Page-locked sources where
# RAM allows"); 8 and 16 threads were no faster.
PIN_WORKERS = 4
REGISTER_BEFORE_COPY = False


def _layout(block: torch.nn.Module) -> tuple[list[tuple[torch.nn.Parameter, int, int]], int]:
    """(param, byte offset, byte size) for each parameter of the block, and the total aligned size."""
    entries, offset = [], 0
    for param in block.parameters():
        size = param.numel() * param.element_size()
        entries.append((param, offset, size))
        offset += (size + ALIGN_BYTES - 1) // ALIGN_BYTES * ALIGN_BYTES
    return entries, offset


def _view(buffer: torch.Tensor, offset: int, size: int, like: torch.Tensor) -> torch.Tensor:
    return buffer[offset:offset + size].view(like.dtype).view(like.shape)


class _HostBuffer:
    """`nbytes` of host memory, page-locked with cudaHostRegister when `pinned` (plain RAM without CUDA), `fill`ed
    (called with the buffer) before or after the registration as REGISTER_BEFORE_COPY says."""

    def __init__(self, nbytes: int, pinned: bool, fill=None):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.registered = False
        pinned = pinned and nbytes > 0
        if pinned and REGISTER_BEFORE_COPY:
            self._register()
        try:
            if fill is not None:
                fill(self.tensor)
        except BaseException:
            self.release()  # never leave memory registered that nothing holds
            raise
        if pinned and not self.registered:
            self._register()

    def _register(self) -> None:
        nbytes = self.tensor.numel()
        err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"could not page-lock {nbytes / 1e9:.2f} GB of RAM for streaming (CUDA error "
                               f"{int(err)}): use a plan that streams from the file map")
        self.registered = True

    def release(self) -> None:
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.registered = False


class BlockStreamer:
    """Streams `blocks[resident:]` (each held on the CPU) through `slots` GPU buffers during each forward.

    Blocks must run in list order once per forward (true for the F1 transformer's 20 dual then 40 single blocks;
    TeaCache's skipped calls simply leave the prefetched block unused until the next forward).
    """

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device | str, resident: int, slots: int = 2,
                 pin_sources: bool = False, pin_parked: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.resident = blocks[:resident]
        self.streamed = blocks[resident:]
        # The resident blocks' sources (RAM or the read-only map) stay referenced: park() points the parameters
        # back at them (nothing copied), restore() copies them to the device again. A block that is already on
        # the device gets a RAM source first: keeping its device original beside the copy held 3.2 GiB twice on
        # an "8 GB" card (measured in bench/bench_levers.py, which builds the model on the GPU).
        self._resident_sources = [(p, p.data if p.device.type == "cpu" else p.data.to("cpu"))
                                  for b in self.resident for p in b.parameters()]
        self.parked = False
        self._resident_host = self._pin_resident() if pin_parked else []
        self.pinned_parked = bool(self._resident_host)
        self._resident_ready: list = [None] * len(self.resident)  # per resident block: its restore's copy event
        for block in self.resident:
            _buffers_to(block, self.device)
        self._copy_resident_in(asynchronous=False)
        self._layouts = [_layout(b) for b in self.streamed]
        for block in self.streamed:  # the sources stay on the CPU (RAM or a read-only map): never pinned whole
            for param in block.parameters():
                if param.device.type != "cpu":
                    param.data = param.data.to("cpu")
        pinned = self._pin_blocks(self._layouts, lambda param: param.data,
                                  "streaming from the file map instead of page-locked RAM") if pin_sources else None
        self._host_buffers = [host for host, _ in pinned or ()]
        self.pinned_sources = pinned is not None
        if pinned:  # each streamed block laid out once in page-locked RAM: uploaded from there
            self._cpu_data = [copies for _, copies in pinned]
            for (entries, _), copies in zip(self._layouts, self._cpu_data):
                for (param, _, _), copy in zip(entries, copies):
                    param.data = copy  # the file map's pages are no longer referenced: the OS may drop them
        else:
            self._cpu_data = [[p.data for p, _, _ in entries] for entries, _ in self._layouts]
        slot_bytes = max((size for _, size in self._layouts), default=0)
        self.slot_bytes = slot_bytes
        self._slot_count = slots
        self._slots = self._new_slots()
        self._staging = [] if self.pinned_sources else [_HostBuffer(slot_bytes, self.cuda) for _ in range(2)]
        self._stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._uploaded = [torch.cuda.Event() if self.cuda else None for _ in range(slots)]
        self._slot_free = [torch.cuda.Event() if self.cuda else None for _ in range(slots)]
        self._staging_free = [torch.cuda.Event() if self.cuda else None for _ in range(2)]
        self._pending: dict[int, tuple[Future, int]] = {}  # block index -> (its copy job, its slot)
        self._in_slot: dict[int, int] = {}  # blocks running now -> slot
        self._uploads = 0
        self._copier = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-stream")
        self._lock = threading.Lock()
        self.bytes_streamed = 0  # since construction: lets benchmarks report bytes per step
        self._handles = [block.register_forward_pre_hook(self._make_resident_pre_hook(index))
                         for index, block in enumerate(self.resident)]
        for index, block in enumerate(self.streamed):
            self._handles.append(block.register_forward_pre_hook(self._make_pre_hook(index)))
            self._handles.append(block.register_forward_hook(self._make_post_hook(index)))
        if self.streamed:
            self._prefetch(0)

    def _pin_resident(self) -> list[_HostBuffer]:
        """The resident blocks' sources copied into page-locked RAM (one buffer per block), so that restore() can
        upload them asynchronously; [] (sources stay where they are) where the OS refuses."""
        layouts = [_layout(block) for block in self.resident]
        sources = dict(self._resident_sources)
        pinned = self._pin_blocks(layouts, lambda param: sources[param],
                                  "parked blocks come back from the file map (synchronous copy)")
        if pinned is None:
            return []
        copies = {param: copy for (entries, _), (_, block_copies) in zip(layouts, pinned)
                  for (param, _, _), copy in zip(entries, block_copies)}
        self._resident_sources = [(param, copies[param]) for param, _ in self._resident_sources]
        return [host for host, _ in pinned]

    def _pin_blocks(self, layouts, source_of, fallback: str) -> list[tuple[_HostBuffer, list[torch.Tensor]]] | None:
        """Each block's parameters (`source_of(param)`) copied into one page-locked buffer, PIN_WORKERS blocks at a
        time: [(buffer, the copies in the block's parameter order)], all or none. None where the OS refuses that
        much page-locked memory (or any), said in one warning beginning with `fallback`."""
        refused = threading.Event()

        def pin(layout):
            if refused.is_set():  # another block failed: pinning more would only be released again
                return None
            entries, total = layout
            copies = []

            def fill(buffer: torch.Tensor) -> None:
                copies.extend(_view(buffer, offset, size, source_of(param)).copy_(source_of(param))
                              for param, offset, size in entries)

            try:
                # a new thread's current device is GPU 0: registering there would start a context on a GPU this
                # streamer's worker may not own (worker/pool.py)
                with torch.cuda.device(self.device) if self.cuda else nullcontext():
                    return _HostBuffer(total, self.cuda, fill), copies
            except BaseException:
                refused.set()
                raise

        with ThreadPoolExecutor(max_workers=PIN_WORKERS, thread_name_prefix="pin") as pool:
            futures = [pool.submit(pin, layout) for layout in layouts]
        pinned, failure = [], None
        for future in futures:
            try:
                pinned.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - every block is collected before anything is raised
                failure = failure or exc
        if failure is None:
            return pinned
        for host, _ in filter(None, pinned):
            host.release()
        if not isinstance(failure, (RuntimeError, MemoryError)):
            raise failure  # not a refusal of page-locked memory: nothing pinned is left behind
        # the message only: the failure's traceback holds this frame, whose futures and list hold the copies
        # (gigabytes), and a log record or a cycle through it would keep them until a garbage collection
        log.warning("%s: %s", fallback, str(failure))
        futures = pinned = failure = None
        return None

    def _new_slots(self) -> list[torch.Tensor]:
        return [torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(self._slot_count)]

    # -- hooks ---------------------------------------------------------------------------------------------------

    def _make_resident_pre_hook(self, index: int):
        def pre_hook(module, args):
            ready = self._resident_ready[index]
            if ready is not None:  # restored asynchronously: compute waits for this block's copy only
                torch.cuda.current_stream(self.device).wait_event(ready)
                self._resident_ready[index] = None
            return None
        return pre_hook

    def _make_pre_hook(self, index: int):
        def pre_hook(module, args):
            future, slot = self._pending.pop(index)
            future.result()  # the copy to pinned memory is done and the upload is queued
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(self._uploaded[slot])
            entries, _ = self._layouts[index]
            for param, offset, size in entries:
                param.data = _view(self._slots[slot], offset, size, param.data)
            self._in_slot[index] = slot
            self._prefetch((index + 1) % len(self.streamed))
            return None
        return pre_hook

    def _make_post_hook(self, index: int):
        def post_hook(module, args, output):
            slot = self._in_slot.pop(index)
            if self.cuda:
                self._slot_free[slot].record(torch.cuda.current_stream(self.device))
            entries, _ = self._layouts[index]
            for (param, _, _), cpu in zip(entries, self._cpu_data[index]):
                param.data = cpu  # drop the slot view: the slot is about to hold another block
            return output
        return post_hook

    # -- copies ----------------------------------------------------------------------------------------------------

    def _prefetch(self, index: int) -> None:
        """Queue block `index` into the next slot in turn. Slots (and staging buffers) go round-robin by upload
        order, not by block index, so the previous user of a slot is always the block two uploads back, whose
        post-hook has run by the time this prefetch is queued (the prefetch is queued from the pre-hook of the
        block one upload back)."""
        if index in self._pending:
            return
        sequence = self._uploads
        self._uploads += 1
        slot = sequence % self._slot_count
        self._pending[index] = (self._copier.submit(self._copy_in, index, slot, sequence % 2), slot)

    def _copy_in(self, index: int, slot: int, staging_index: int) -> None:
        # One memcpy of the whole block, then one upload. Chunking it (32 MB pieces, each uploaded as soon as it was
        # staged, so the memcpy overlaps the upload) measured no faster on the H100: 0.960 against 0.953 s/step compiled
        # at 8 GB, 1.205 against 1.180 eager (docs/benchmarks.md, "Whole-block copies through the staging buffers").
        entries, total = self._layouts[index]
        if self.pinned_sources:
            source = self._host_buffers[index].tensor
        else:
            source = self._staging[staging_index].tensor
            if self.cuda:
                self._staging_free[staging_index].synchronize()  # its previous upload has finished reading it
            for (param, offset, size), cpu in zip(entries, self._cpu_data[index]):
                _view(source, offset, size, cpu).copy_(cpu)  # RAM / page cache -> pinned (multithreaded memcpy)
        if self.cuda:
            with torch.cuda.stream(self._stream):
                self._stream.wait_event(self._slot_free[slot])  # the block that used this slot has finished
                self._slots[slot][:total].copy_(source[:total], non_blocking=True)
                self._uploaded[slot].record(self._stream)
                if not self.pinned_sources:
                    self._staging_free[staging_index].record(self._stream)
        else:
            self._slots[slot][:total].copy_(source[:total])
        with self._lock:
            self.bytes_streamed += total

    # -- parking the resident blocks (the VAE decode needs their VRAM) ------------------------------------------------

    def park(self) -> None:
        """Drop the resident blocks' device copies: their parameters point at their CPU sources again (the
        read-only map: nothing is copied to RAM), and free the streaming slots (two blocks' worth of VRAM, which
        lets the VAE decode in larger tiles on an 8 GB card). Call between forwards only; restore() before the
        next one."""
        if self.parked:
            return
        for param, source in self._resident_sources:
            param.data = source
        self._resident_ready = [None] * len(self.resident)  # park() waits for the side stream below
        for future, _ in self._pending.values():  # the next forward's first block, prefetched into a slot
            future.result()
        self._pending.clear()
        if self.cuda:
            self._stream.synchronize()
        self._slots = []
        self.parked = True
        log.debug("parked %d resident blocks", len(self.resident))

    def restore(self) -> None:
        """Copy the parked resident blocks to the device again."""
        if self.parked:
            if self.cuda:
                # The decode's activations sit in the allocator's cache, split around whatever small tensors it
                # left: re-allocating the blocks and slots among them fragmented an 8 GB budget until a sampling
                # activation (650 MiB) failed (H200, bench/bench_run.py --vram-gb 8). Hand them back first.
                torch.cuda.empty_cache()
            self._copy_resident_in(asynchronous=self.cuda and self.pinned_parked)
            self._slots = self._new_slots()
            self.parked = False
            if self.streamed:
                self._prefetch(0)
            log.debug("restored %d resident blocks", len(self.resident))

    def _copy_resident_in(self, asynchronous: bool) -> None:
        if asynchronous:
            self._copy_resident_in_async()
            return
        # copy=True: a device copy even on the CPU, so parking means the same thing on every device
        for param, source in self._resident_sources:
            param.data = source.to(self.device, copy=True)

    def _copy_resident_in_async(self) -> None:
        """Queue each resident block's upload on the side stream and record when it lands. The device tensors are
        allocated on the compute stream (their last user), and the side stream first waits for the work already
        queued there, which may still be using the memory they reuse (the decode just freed it)."""
        compute = torch.cuda.current_stream(self.device)
        sources = dict(self._resident_sources)
        self._stream.wait_stream(compute)
        for index, block in enumerate(self.resident):
            targets = [(param, torch.empty_like(sources[param], device=self.device)) for param in block.parameters()]
            with torch.cuda.stream(self._stream):
                for param, target in targets:
                    target.copy_(sources[param], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self._stream)
            for param, target in targets:
                param.data = target
            self._resident_ready[index] = ready

    def close(self) -> None:
        """Remove the hooks and wait for in-flight copies; the streamed blocks stay on the CPU."""
        for handle in self._handles:
            handle.remove()
        for future, _ in self._pending.values():
            future.result()
        self._pending.clear()
        self._copier.shutdown(wait=True)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for host in self._host_buffers + self._staging + self._resident_host:  # unlocked only: pinned
            host.release()  # sources stay the blocks' RAM
        self._host_buffers, self._staging, self._resident_host = [], [], []


def stream_transformer(transformer, device: torch.device | str, resident_blocks: int,
                       pin_sources: bool = False, pin_parked: bool = False) -> BlockStreamer:
    """Everything but the streamed blocks goes to `device`; blocks past `resident_blocks` are streamed."""
    from ..compute.compile import transformer_blocks  # here: importing compile imports diffusers

    return stream_model(transformer, transformer_blocks(transformer), device, resident_blocks, pin_sources,
                        pin_parked)


def stream_model(model: torch.nn.Module, blocks: list[torch.nn.Module], device: torch.device | str,
                 resident_blocks: int, pin_sources: bool = False, pin_parked: bool = False) -> BlockStreamer:
    """`model`'s parts outside `blocks` go to `device` (embedders, norms: small, resident); the first
    `resident_blocks` blocks are made resident by the streamer (which keeps their sources for park()), the rest
    streamed. Works for any model whose blocks run once each, in list order, per forward (Llama's layers too)."""
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if id(param) not in block_ids:
                param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer.to(device)
    return BlockStreamer(blocks, device, resident_blocks, pin_sources=pin_sources, pin_parked=pin_parked)


def _buffers_to(module: torch.nn.Module, device: torch.device) -> None:
    for sub in module.modules():
        for name, buffer in sub.named_buffers(recurse=False):
            sub._buffers[name] = buffer.to(device)
