"""The Llama text encoder with its decoder layers streamed (streaming.py), on the CPU: the same embeddings as the
resident encoder, and the manager loads, uses and frees it as the plan's gpu-streamed placement says."""
from __future__ import annotations

import torch

from framepack_ui.engine import text
from framepack_ui.memory import loading
from framepack_ui.memory import manager as manager_mod
from framepack_ui.memory.streaming import stream_model
from conftest import cpu_manager, cpu_plan, streamed_on_cpu

PROMPT = "a cat walks on the grass"


def test_streamed_text_encoder_gives_the_resident_embeddings(tiny_models_dir):
    cpu = torch.device("cpu")
    tokenizer, tokenizer_2 = loading.load_tokenizers(tiny_models_dir)
    clip = loading.load_text_encoder_2(tiny_models_dir, torch.float32, cpu, "map")
    resident = loading.load_text_encoder(tiny_models_dir, torch.float32, cpu, "map")
    streamed = loading.load_text_encoder(tiny_models_dir, torch.float32, cpu, "map")
    streamer = stream_model(streamed, list(streamed.layers), cpu, 1)
    try:
        assert len(streamer.resident) == 1 and len(streamer.streamed) == len(streamed.layers) - 1 >= 2
        slot_ranges = [(s.data_ptr(), s.data_ptr() + s.numel()) for s in streamer._slots]
        ran_from_slot = []
        for layer in streamer.streamed:  # registered after the streamer's hooks: sees the swapped weights
            layer.register_forward_pre_hook(lambda m, a: ran_from_slot.append(all(
                any(lo <= p.data_ptr() < hi for lo, hi in slot_ranges) for p in m.parameters())))
        expected = text.encode_prompt(PROMPT, tokenizer, resident, tokenizer_2, clip)
        first = text.encode_prompt(PROMPT, tokenizer, streamed, tokenizer_2, clip)
        second = text.encode_prompt(PROMPT, tokenizer, streamed, tokenizer_2, clip)  # after the wrap-around
    finally:
        streamer.close()
    for got in (first, second):
        torch.testing.assert_close(got.llama, expected.llama, rtol=0, atol=0)
        assert torch.equal(got.llama_mask, expected.llama_mask)
    assert ran_from_slot and all(ran_from_slot)  # the streamed layers computed from their slot copies
    layer_bytes = sum(p.numel() * p.element_size() for layer in streamer.streamed for p in layer.parameters())
    assert streamer.bytes_streamed >= 2 * layer_bytes  # every streamed layer copied in for each forward


def test_manager_streams_the_text_encoder_when_placed_so_and_closes_the_streamer(tiny_models_dir, monkeypatch):
    loaded, stream = [], manager_mod.stream_model

    def spy(*args, **kwargs):
        streamer = stream(*args, **kwargs)
        loaded.append(streamer)
        return streamer

    monkeypatch.setattr(manager_mod, "stream_model", spy)
    plan = cpu_plan(tiny_models_dir)
    plain = cpu_manager(tiny_models_dir, plan, prompt_cache_dir=None)
    streamed = cpu_manager(tiny_models_dir, streamed_on_cpu(plan, 1, name="text_encoders"), prompt_cache_dir=None)
    (expected,), _ = text.encode_prompts([PROMPT], plain)
    assert not loaded
    (got,), encoded = text.encode_prompts([PROMPT], streamed)
    assert encoded and len(loaded) == 1
    torch.testing.assert_close(got.llama, expected.llama, rtol=0, atol=0)
    torch.testing.assert_close(got.clip_pooled, expected.clip_pooled, rtol=0, atol=0)
    streamer = loaded[0]
    assert streamer.bytes_streamed > 0
    # not kept: freed after its phase, and freeing closed the streamer (hooks removed, copier shut down)
    assert not streamed.is_loaded("text_encoders") and streamer._copier._shutdown
