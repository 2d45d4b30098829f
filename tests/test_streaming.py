"""Block streaming mechanics on the CPU (the CUDA path adds streams and events; measured in bench/)."""
from __future__ import annotations

import torch

from framepack_ui.memory import loading
from framepack_ui.memory.streaming import stream_transformer, transformer_blocks
from model_inputs import transformer_inputs


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
            streamer.restore()
            assert not streamer.parked and not any(on_sources())
            after = transformer(**inputs)[0]
        finally:
            streamer.close()
    assert torch.equal(before, expected) and torch.equal(after, expected)
