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
