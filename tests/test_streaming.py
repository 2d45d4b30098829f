"""Block streaming mechanics on the CPU (the CUDA path adds streams and events; measured in bench/)."""
from __future__ import annotations

import threading

import pytest

import torch

from framepack_ui.memory import loading
from framepack_ui.compute.compile import transformer_blocks
from framepack_ui.memory.streaming import stream_transformer
from model_inputs import transformer_inputs


def _refuse_host_buffer(monkeypatch, nth: int) -> list[int]:
    """Make the streamer's `nth` host buffer fail as cudaHostRegister does when the OS refuses to lock memory;
    returns the sizes of every buffer asked for."""
    from framepack_ui.memory import streaming

    made: list[int] = []

    lock = threading.Lock()  # the streamer pins several blocks at once

    class Refusing(streaming._HostBuffer):
        def __init__(self, nbytes, pinned, fill=None):
            with lock:
                made.append(nbytes)
                refuse = len(made) == nth
            if refuse:
                raise RuntimeError("cudaHostRegister: out of memory")
            super().__init__(nbytes, pinned, fill)

    monkeypatch.setattr(streaming, "_HostBuffer", Refusing)
    return made


def test_streamed_blocks_give_the_resident_output_exactly(tiny_models_dir):
    transformer = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"))
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        blocks = transformer_blocks(transformer)
        streamer = stream_transformer(transformer, "cpu", resident_blocks=0)
        slot_ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer._slots]
        ran_from_slot = []
        for block in blocks:  # registered after the streamer's hooks, so it sees the swapped weights
            block.register_forward_pre_hook(lambda m, a: ran_from_slot.append(all(
                any(lo <= p.data_ptr() < hi for lo, hi in slot_ranges) for p in m.parameters())))
        try:
            first = transformer(**inputs)[0]
            second = transformer(**inputs)[0]  # the wrap-around prefetch feeds the next forward
        finally:
            streamer.close()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(ran_from_slot) == 2 * len(blocks) and all(ran_from_slot)  # computed from the slot copies
    block_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters())
    assert streamer.bytes_streamed >= 2 * block_bytes  # every streamed block was copied in for each forward
    # between forwards the weights live in their CPU sources, not in a slot
    assert all(p.data_ptr() != 0 and p.device.type == "cpu" for b in blocks for p in b.parameters())


def test_park_points_the_resident_blocks_at_their_sources_and_restore_gives_the_same_output(tiny_models_dir):
    """park() drops the resident blocks' device copies (their parameters share storage with the read-only-mapped
    sources again: nothing copied to RAM); restore() copies them back; the output is unchanged."""
    transformer = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"), storage="map")
    inputs = transformer_inputs(transformer)
    blocks = transformer_blocks(transformer)
    sources = {id(p): p.data for p in blocks[0].parameters()}  # the mapped tensors, before streaming
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        streamer = stream_transformer(transformer, "cpu", resident_blocks=1)
        try:
            resident = list(blocks[0].parameters())

            def on_sources():
                return [p.data_ptr() == sources[id(p)].data_ptr() for p in resident]

            assert not any(on_sources())  # resident: a device copy (on the CPU too, so parking means something)
            before = transformer(**inputs)[0]
            streamer.park()
            assert streamer.parked and all(on_sources())
            assert all(p.untyped_storage().data_ptr() == sources[id(p)].untyped_storage().data_ptr() for p in resident)
            assert streamer._slots == [] and not streamer._pending  # the slots' VRAM is the VAE's too
            streamer.restore()
            assert not streamer.parked and not any(on_sources())
            assert len(streamer._slots) == 2 and 0 in streamer._pending  # the next forward's first block
            after = transformer(**inputs)[0]
        finally:
            streamer.close()
    assert torch.equal(before, expected) and torch.equal(after, expected)


def test_pinned_sources_hold_each_streamed_block_once_in_host_buffers_and_give_the_same_output(tiny_models_dir):
    """pin_sources: each streamed block is copied once into its own host buffer (page-locked on CUDA) and
    uploaded from there with no staging copy; the file map is no longer referenced; the output is unchanged."""
    transformer = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"), storage="map")
    inputs = transformer_inputs(transformer)
    blocks = transformer_blocks(transformer)
    mapped = {id(p): p.untyped_storage().data_ptr() for b in blocks for p in b.parameters()}
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        streamer = stream_transformer(transformer, "cpu", resident_blocks=1, pin_sources=True)
        try:
            buffers = [(h.tensor.data_ptr(), h.tensor.data_ptr() + h.tensor.numel()) for h in streamer._host_buffers]
            assert len(buffers) == len(blocks) - 1 and not streamer._staging
            for index, block in enumerate(blocks[1:]):
                lo, hi = buffers[index]
                assert all(lo <= p.data_ptr() < hi and p.untyped_storage().data_ptr() != mapped[id(p)]
                           for p in block.parameters())
            first = transformer(**inputs)[0]
            second = transformer(**inputs)[0]
        finally:
            streamer.close()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    block_bytes = sum(p.numel() * p.element_size() for b in blocks[1:] for p in b.parameters())
    assert streamer.bytes_streamed >= 2 * block_bytes


def test_pinned_sources_fall_back_to_staging_when_the_os_refuses_page_locked_memory(tiny_models_dir, monkeypatch):
    """Fault injected at the allocation boundary (Windows may refuse to lock gigabytes): the streamer streams
    from the file map through its staging buffers instead of failing the load, with the same output."""
    made = _refuse_host_buffer(monkeypatch, 2)
    transformer = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"), storage="map")
    inputs = transformer_inputs(transformer)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        streamer = stream_transformer(transformer, "cpu", resident_blocks=0, pin_sources=True)
        try:
            got = transformer(**inputs)[0]
        finally:
            streamer.close()
    # the blocks tried (the refused one, and any pinned meanwhile: released), then the two staging buffers
    assert not streamer.pinned_sources and len(made) >= 4 and made[-2:] == [streamer.slot_bytes] * 2
    assert streamer._host_buffers == []
    assert torch.equal(got, expected)


def test_parked_blocks_come_back_from_their_own_host_buffers_with_pin_parked(tiny_models_dir):
    """pin_parked: the resident blocks' sources are copied once into host buffers (page-locked on CUDA, where
    restore() then uploads them asynchronously), no longer the file map; park() points the parameters there,
    restore() copies them back, and the output is unchanged."""
    transformer = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"), storage="map")
    inputs = transformer_inputs(transformer)
    blocks = transformer_blocks(transformer)
    mapped = {id(p): p.untyped_storage().data_ptr() for p in blocks[0].parameters()}
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        streamer = stream_transformer(transformer, "cpu", resident_blocks=1, pin_sources=True, pin_parked=True)
        try:
            assert streamer.pinned_parked and len(streamer._resident_host) == 1
            host = streamer._resident_host[0].tensor
            lo, hi = host.data_ptr(), host.data_ptr() + host.numel()
            assert all(lo <= source.data_ptr() < hi and source.untyped_storage().data_ptr() != mapped[id(param)]
                       for param, source in streamer._resident_sources)
            streamer.park()
            assert all(lo <= p.data_ptr() < hi for p in blocks[0].parameters())
            streamer.restore()
            assert not any(lo <= p.data_ptr() < hi for p in blocks[0].parameters())
            after = transformer(**inputs)[0]
        finally:
            streamer.close()
    assert torch.equal(after, expected)
    assert streamer._resident_host == []  # released with the streamer


def test_pin_parked_falls_back_to_the_map_when_the_os_refuses(tiny_models_dir, monkeypatch):
    """Fault injected at the allocation: the parked blocks keep their mapped sources (restored synchronously)."""
    _refuse_host_buffer(monkeypatch, 1)  # the parked block's buffer; the staging buffers come after
    transformer = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"), storage="map")
    inputs = transformer_inputs(transformer)
    mapped = {id(p): p.data_ptr() for p in transformer_blocks(transformer)[0].parameters()}
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        streamer = stream_transformer(transformer, "cpu", resident_blocks=1, pin_parked=True)
        try:
            assert not streamer.pinned_parked
            assert all(source.data_ptr() == mapped[id(param)] for param, source in streamer._resident_sources)
            streamer.park()
            streamer.restore()
            got = transformer(**inputs)[0]
        finally:
            streamer.close()
    assert torch.equal(got, expected)


def _linear_blocks(count: int) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [torch.nn.Linear(16, 8) for _ in range(count)]


def test_a_host_buffer_is_filled_before_it_is_registered_unless_told_otherwise(monkeypatch):
    """Filled, then page-locked (the pages already there to pin), or page-locked, then filled, as
    REGISTER_BEFORE_COPY says (bench/bench_pin.py compares them); a fill that fails releases what was registered
    before it (page-locked memory nothing holds would stay locked). The defaults are the measured ones: several
    blocks at a time, each registered after its copy (docs/benchmarks.md, "Page-locked sources where RAM allows").
    cudaHostRegister injected (no CUDA here)."""
    from framepack_ui.memory import streaming

    assert streaming.PIN_WORKERS > 1 and streaming.REGISTER_BEFORE_COPY is False
    source = torch.arange(64, dtype=torch.uint8)
    seen, released = [], []

    def register(self):
        seen.append(torch.equal(self.tensor, source))
        self.registered = True

    def release(self):
        released.append(self.registered)
        self.registered = False

    monkeypatch.setattr(streaming._HostBuffer, "_register", register)
    monkeypatch.setattr(streaming._HostBuffer, "release", release)
    for register_first in (False, True):
        monkeypatch.setattr(streaming, "REGISTER_BEFORE_COPY", register_first)
        host = streaming._HostBuffer(64, True, lambda buffer: buffer.copy_(source))
        assert host.registered and torch.equal(host.tensor, source)
    assert seen == [True, False] and released == []

    def fill_part_way(buffer: torch.Tensor) -> None:
        buffer[:32].copy_(source[:32])
        raise OSError("the source file could not be read")

    with pytest.raises(OSError):
        streaming._HostBuffer(64, True, fill_part_way)  # registered first, as set last above
    assert seen == [True, False, False] and released == [True]


@pytest.mark.parametrize("error, raised", [(RuntimeError("cudaHostRegister: out of memory"), False),
                                           (MemoryError("no RAM left for the copies"), False),
                                           (KeyError("a bug"), True)], ids=["refused", "out of RAM", "bug"])
def test_pinning_that_fails_part_way_releases_every_block_it_pinned(monkeypatch, caplog, error, raised):
    """Blocks are pinned several at a time; where one fails, every block pinned meanwhile is released (page-locked
    memory nothing holds would stay locked). A refusal of page-locked memory falls back (None, one warning) and
    leaves no copy alive (gigabytes at full size) waiting for a garbage collection; anything else propagates."""
    import gc
    import weakref
    from types import SimpleNamespace

    from framepack_ui.memory import streaming

    monkeypatch.setattr(streaming, "PIN_WORKERS", 4)  # several at a time: others are pinned meanwhile
    blocks = _linear_blocks(6)
    layouts = [streaming._layout(b) for b in blocks]
    released, started, made, copies = [], [], [], []  # ids, and weak references to the copies' buffers
    real_init = streaming._HostBuffer.__init__

    def init(self, nbytes, pinned, fill=None):
        started.append(id(self))
        if len(started) == 3:
            raise type(error)(*error.args)  # a new one, as in use: the parameter's would keep its traceback
        real_init(self, nbytes, pinned, fill)
        made.append(id(self))
        copies.append(weakref.ref(self.tensor))

    monkeypatch.setattr(streaming._HostBuffer, "__init__", init)
    monkeypatch.setattr(streaming._HostBuffer, "release", lambda self: released.append(id(self)))
    streamer = SimpleNamespace(cuda=False, device=torch.device("cpu"))
    gc.disable()  # what is freed must be freed by reference counting alone
    try:
        with caplog.at_level("WARNING"):
            if raised:
                with pytest.raises(KeyError):
                    streaming.BlockStreamer._pin_blocks(streamer, layouts, lambda p: p.data, "falling back")
            else:
                assert streaming.BlockStreamer._pin_blocks(streamer, layouts, lambda p: p.data,
                                                           "falling back") is None
                assert copies and all(ref() is None for ref in copies)
    finally:
        gc.enable()
    assert len(made) == len(started) - 1 and set(released) == set(made)
    assert any(r.message == f"falling back: {error}" for r in caplog.records) != raised


def test_pinning_one_block_at_a_time_starts_no_block_after_one_fails(monkeypatch):
    """The blocks after a failed one are not pinned at all (they would only be copied, gigabytes, and released
    again): with PIN_WORKERS 1 nothing else is under way when the second block fails, so only two are started."""
    from types import SimpleNamespace

    from framepack_ui.memory import streaming

    monkeypatch.setattr(streaming, "PIN_WORKERS", 1)
    layouts = [streaming._layout(b) for b in _linear_blocks(5)]
    started, released = [], []
    real_init = streaming._HostBuffer.__init__

    def init(self, nbytes, pinned, fill=None):
        started.append(nbytes)
        if len(started) == 2:
            raise RuntimeError("cudaHostRegister: out of memory")
        real_init(self, nbytes, pinned, fill)

    monkeypatch.setattr(streaming._HostBuffer, "__init__", init)
    monkeypatch.setattr(streaming._HostBuffer, "release", lambda self: released.append(self))
    streamer = SimpleNamespace(cuda=False, device=torch.device("cpu"))
    assert streaming.BlockStreamer._pin_blocks(streamer, layouts, lambda p: p.data, "falling back") is None
    assert len(started) == 2 and len(released) == 1


@pytest.mark.parametrize("workers", [1, 4])
def test_pinned_blocks_hold_exact_copies_in_parameter_order(monkeypatch, workers):
    """What the streamer uploads from, pinned several blocks at a time: each block's copies inside its own buffer,
    laid out in its parameter order, equal to the sources."""
    from types import SimpleNamespace

    from framepack_ui.memory import streaming

    monkeypatch.setattr(streaming, "PIN_WORKERS", workers)
    blocks = _linear_blocks(5)
    layouts = [streaming._layout(b) for b in blocks]
    pinned = streaming.BlockStreamer._pin_blocks(SimpleNamespace(cuda=False, device=torch.device("cpu")), layouts,
                                                 lambda p: p.data, "falling back")
    for block, (host, copies) in zip(blocks, pinned):
        assert [c.data_ptr() for c in copies] == sorted(c.data_ptr() for c in copies)  # laid out in order
        assert all(host.tensor.data_ptr() <= c.data_ptr() < host.tensor.data_ptr() + host.tensor.numel()
                   for c in copies)
        assert all(torch.equal(c, p) for c, p in zip(copies, block.parameters()))
