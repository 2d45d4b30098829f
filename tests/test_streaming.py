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
