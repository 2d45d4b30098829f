"""TeaCache's hooks on the tiny transformer, one forward at a time (fast; the engine's end-to-end check is in
test_engine.py, the skip rule on recorded inputs in test_blind_spots.py)."""
from __future__ import annotations

import pytest
import torch

from framepack_ui.compute.compile import transformer_blocks
from framepack_ui.engine.teacache import TEACACHE_HOOK, apply_teacache, remove_teacache
from framepack_ui.memory import loading
from model_inputs import transformer_inputs


@pytest.fixture(scope="module")
def transformer(tiny_models_dir):
    return loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"))


def _forward(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def test_threshold_zero_computes_every_call_exactly_and_removing_leaves_no_hook(transformer):
    inputs = transformer_inputs(transformer)
    plain = _forward(transformer, inputs)
    cache = apply_teacache(transformer, 0.0)
    try:
        for step in range(3):
            cache.begin(step, 3)
            assert torch.equal(_forward(transformer, inputs), plain), step
    finally:
        remove_teacache(transformer)
    assert (cache.computed_calls, cache.skipped_calls) == (3, 0)
    assert all(block._diffusers_hook.get_hook(TEACACHE_HOOK) is None for block in transformer_blocks(transformer))
    assert torch.equal(_forward(transformer, inputs), plain)


def test_a_skipped_call_reuses_what_the_blocks_added_at_its_branchs_last_computed_call(transformer):
    """Threshold 1 and unchanging inputs: each step adds RESCALE_POLY(0) = 0.096, so steps 1 and 2 skip the
    blocks and the last step computes. A skipped call adds the residual of its own branch's last computed call to
    its input: with the same input, the computed output again. The negative branch (real CFG) keeps its own
    history and residual."""
    positive = transformer_inputs(transformer, seed=0)
    negative = transformer_inputs(transformer, seed=1)  # (other latents: a residual of its own to tell apart)
    expected = {"positive": _forward(transformer, positive), "negative": _forward(transformer, negative)}
    assert not torch.allclose(expected["positive"], expected["negative"], atol=1e-3)
    cache = apply_teacache(transformer, 1.0)
    pattern = ""
    try:
        for step in range(4):
            for branch, inputs in (("positive", positive), ("negative", negative)):
                cache.begin(step, 4, branch)
                out = _forward(transformer, inputs)
                pattern += "S" if cache.skipping else "C"
                assert torch.allclose(out, expected[branch], rtol=0, atol=1e-5), (step, branch)
    finally:
        remove_teacache(transformer)
    assert pattern == "CCSSSSCC"
    assert (cache.computed_calls, cache.skipped_calls) == (4, 4)


def test_reset_forgets_the_previous_sections_history(transformer):
    inputs = transformer_inputs(transformer)
    cache = apply_teacache(transformer, 1.0)
    try:
        cache.begin(0, 4)
        _forward(transformer, inputs)
        cache.begin(1, 4)
        _forward(transformer, inputs)
        assert cache.skipping
        cache.reset()
        cache.begin(1, 4)  # no residual after a reset: computed, though the step is neither first nor last
        _forward(transformer, inputs)
        assert not cache.skipping
    finally:
        remove_teacache(transformer)
    assert (cache.computed_calls, cache.skipped_calls) == (2, 1)


def test_the_change_is_measured_on_the_first_blocks_modulated_input(transformer):
    """Other latents at the same timestep and prompt: the first block's modulated input (LayerNorm of the latents,
    scaled and shifted by the timestep embedding) changes, so the blocks are computed; the modulation's own
    parameters (from the timestep alone) would not have changed."""
    inputs = transformer_inputs(transformer, seed=0)
    other = {**inputs, "hidden_states": transformer_inputs(transformer, seed=1)["hidden_states"]}
    cache = apply_teacache(transformer, 1.0)
    try:
        for step, step_inputs in enumerate((inputs, other)):
            cache.begin(step, 4)
            _forward(transformer, step_inputs)
    finally:
        remove_teacache(transformer)
    assert (cache.computed_calls, cache.skipped_calls) == (2, 0)


def test_the_blocks_are_computed_once_the_sum_reaches_the_threshold_not_only_past_it():
    """The official rule: skip while the accumulated change is below the threshold. With the threshold equal to one
    step's contribution, the second step reaches it exactly and is computed."""
    from framepack_ui.engine.teacache import RESCALE_POLY, TeaCache, _poly

    assert _poly(0.0) == RESCALE_POLY[-1] and _poly(1.0) == pytest.approx(sum(RESCALE_POLY), abs=1e-9)
    assert _poly(2.0) == pytest.approx(sum(c * 2.0 ** (4 - i) for i, c in enumerate(RESCALE_POLY)), abs=1e-9)
    cache, pattern = TeaCache(_poly(0.0)), ""
    for step in range(4):
        cache.begin(step, 5)
        pattern += "S" if cache.decide(torch.ones(3)) else "C"  # unchanged: each step adds _poly(0)
        cache._branches["positive"].residual = torch.zeros(3)
    assert pattern == "CCCC"
    cache, pattern = TeaCache(_poly(0.0) * 1.5), ""
    for step in range(4):
        cache.begin(step, 5)
        pattern += "S" if cache.decide(torch.ones(3)) else "C"
        cache._branches["positive"].residual = torch.zeros(3)
    assert pattern == "CSCS"


def test_removing_teacache_from_a_transformer_that_never_had_it_does_nothing(tiny_models_dir):
    fresh = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"))  # no hook registry yet
    inputs = transformer_inputs(fresh)
    plain = _forward(fresh, inputs)
    remove_teacache(fresh)  # e.g. in a `finally` after apply_teacache failed part-way
    assert torch.equal(_forward(fresh, inputs), plain)
