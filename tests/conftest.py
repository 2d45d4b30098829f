"""Fixtures shared by the test files."""
from __future__ import annotations

from pathlib import Path

import pytest

from framepack_ui.weights.tiny import make_tiny_models


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A complete tiny random model set in the real Hugging Face layout, made once per session (seed 0).

    Shared by every test: treat it as read-only, and copy it before changing anything.
    """
    models_dir = tmp_path_factory.mktemp("models")
    make_tiny_models(models_dir, seed=0)
    return models_dir


def cpu_plan(models_dir: Path):
    """The memory plan of a CPU machine with RAM to spare: every model computed in float32 on the CPU, the big
    ones from their read-only file maps."""
    from framepack_ui.memory.plan import PlanOverrides, make_plan
    from framepack_ui.memory.probe import Machine, weights_on_disk

    return make_plan(Machine.supposed(64, 0), weights_on_disk(models_dir), PlanOverrides(resolution=64))


def cpu_manager(models_dir: Path, plan=None, **kwargs):
    """A ModelManager applying `plan` (default: cpu_plan) with the CPU standing in for the GPU."""
    from framepack_ui.memory.manager import ModelManager

    return ModelManager(models_dir, plan if plan is not None else cpu_plan(models_dir), gpu="cpu", **kwargs)


def streamed_on_cpu(plan, resident_blocks: int, name: str = "transformer", **changes):
    """`plan` with `name` streamed block by block (run on the CPU standing in for the GPU, in float32)."""
    changes = {"storage": "map", "compute_dtype": "float32", **changes}
    return plan.with_component(name, where="gpu-streamed", resident_blocks=resident_blocks, **changes)
