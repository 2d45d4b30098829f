"""One job over several GPUs, its transformer's sequence split (compute/context_parallel.py, worker/split.py),
checked on CPUs: processes over gloo on the loopback give what one process gives.

Tolerance: float32 throughout; the split changes only the order of the attention's sums (the keys arrive in rank
order) and of the gathers, so outputs agree to rounding: 1e-5 of the output's largest magnitude for one forward
(measured: 1.1e-6; attention kept to each rank's own tokens: 1.4).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import split_ranks

FORWARD_TOLERANCE = 1e-5  # of max |one-process output|


@pytest.fixture(scope="module")
def one_process_forward(tiny_models_dir):
    transformer = split_ranks.load_sensitive_transformer(tiny_models_dir)
    with torch.no_grad():
        return transformer(**split_ranks.uneven_inputs(transformer))[0]


def test_two_processes_give_the_one_process_forward(tiny_models_dir, one_process_forward, tmp_path):
    """The FramePack plan through diffusers' Ulysses attention: 2 gloo processes, odd token counts (uneven shares),
    each rank's gathered output equals the one-process forward; and the check can fail: attention kept to each
    rank's own tokens (no exchange) is far off."""
    mp.spawn(split_ranks.forward_rank, args=(2, str(tmp_path / "rendezvous"), str(tiny_models_dir), str(tmp_path)),
             nprocs=2, join=True)
    reference = one_process_forward
    scale = reference.abs().max().item()
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt")
        assert saved["processors"] > 0  # every block's attention went through the split
        assert saved["split"].shape == reference.shape
        assert (saved["split"] - reference).abs().max().item() <= FORWARD_TOLERANCE * scale
        assert (saved["local_only"] - reference).abs().max().item() > 100 * FORWARD_TOLERANCE * scale


JOB_TOLERANCE = 1e-5  # of max |one-process latents|, after 2 sections of 4 steps


@pytest.fixture(scope="module")
def attention_models(tiny_models_dir, tmp_path_factory) -> Path:
    """The tiny models with the transformer's attention made to matter (split_ranks.ATTENTION_SCALES): the tiny
    transformer's own outputs barely depend on which tokens attention sees."""
    import shutil

    from conftest import scale_transformer_weights

    dest = tmp_path_factory.mktemp("attention") / "models"
    shutil.copytree(tiny_models_dir, dest)
    scale_transformer_weights(dest, split_ranks.ATTENTION_SCALES)
    return dest


def _job_spec(image):
    from framepack_ui.spec import JobSpec

    # TeaCache on, at a threshold that skips the middle steps: every rank must skip the same calls
    return JobSpec(image=image, prompt="a red square moves", resolution=64, steps=4, seconds=2.4, seed=5,
                   teacache=True, teacache_threshold=1.0)


def _section_latents(video: Path, section: int) -> dict:
    from framepack_ui.engine.state import load_state

    return load_state(video).section(section)


def test_a_split_job_samples_the_one_process_sections(attention_models, start_image_64x64, tmp_path):
    """Two sections through the real engine (run_split_job: rank 0 runs f1.run with the split transformer, rank 1
    follows its calls), TeaCache skipping steps, against one process; every process started keeps NVLink
    multicast off and its sockets on the loopback."""
    import functools

    from conftest import cpu_manager, cpu_plan
    from framepack_ui.engine import f1
    from framepack_ui.events import Finished, Step
    from framepack_ui.worker.split import LOOPBACK_ENV, SPLIT_ENV, run_split_job

    spec = _job_spec(start_image_64x64)
    manager = cpu_manager(attention_models)
    try:
        alone = f1.run(spec, tmp_path / "alone.mp4", manager, lambda event: None)
    finally:
        manager.free()
    assert isinstance(alone, Finished)
    events = []
    split = run_split_job(spec, tmp_path / "split.mp4", cpu_plan(attention_models), [0, 1], attention_models,
                          events.append, device_type="cpu", collective_timeout_s=120,
                          rank_hooks={r: functools.partial(split_ranks.record_environment, str(tmp_path))
                                      for r in (0, 1)})
    assert isinstance(split, Finished), split
    assert events[-1] is split and sum(isinstance(e, Step) for e in events) == 2 * spec.steps
    for section in range(2):
        reference, got = _section_latents(tmp_path / "alone.mp4", section), _section_latents(tmp_path / "split.mp4",
                                                                                            section)
        for name, tensor in reference.items():
            if tensor.is_floating_point():
                scale = tensor.abs().max().item()
                assert (got[name] - tensor).abs().max().item() <= JOB_TOLERANCE * scale, (section, name)
    for rank in (0, 1):
        recorded = dict(line.split("=", 1) for line in (tmp_path / f"env-{rank}.txt").read_text().splitlines())
        assert recorded == {**SPLIT_ENV, **LOOPBACK_ENV}
