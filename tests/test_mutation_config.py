"""The mutation check's configuration (setup.cfg, tools/mutation.py) stays true to the code: every core module of
issue 26 has a section, every file it mutates exists, every test it selects exists. Running mutmut itself is for
developers (docs/mutation.md), not for the suite."""
from __future__ import annotations

import configparser
import glob
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mutation():
    spec = importlib.util.spec_from_file_location("mutation_tool", REPO / "tools" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_core_module_has_its_files_and_existing_tests(mutation):
    shared, modules = mutation.read_config(REPO / "setup.cfg")
    assert set(modules) == {"spec", "sidecar", "sampling", "teacache", "prompt_cache", "plan", "streaming", "fp8",
                            "worker", "worker_paths"}
    for name, module in modules.items():
        for pattern in module["mutate"]:
            assert glob.glob(str(REPO / pattern)), (name, pattern)
        selected = [t for t in module["tests"] if t.startswith("tests/")]
        assert selected, name
        for test in selected:
            path, _, function = test.partition("::")
            assert (REPO / path).is_file(), (name, test)
            if function:
                assert re.search(rf"^def {re.escape(function)}\(", (REPO / path).read_text(), re.M), (name, test)


def test_each_modules_mutmut_config_keeps_one_line_options_on_one_line(mutation):
    """mutmut reads a value on several lines as a list and checks process_isolation as one word."""
    shared, modules = mutation.read_config(REPO / "setup.cfg")
    text = mutation.workspace_config(shared, modules["plan"])
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(text)
    options = parser["mutmut"]
    assert options["process_isolation"] == "forkserver" and options["source_paths"] == "framepack_ui"
    assert options["only_mutate"].split() == ["framepack_ui/memory/plan/*"]
    assert options["pytest_add_cli_args_test_selection"].splitlines()[1:] == modules["plan"]["tests"]
