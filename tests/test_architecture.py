"""The rooms of the package and which way imports may go between them (docs/DESIGN.md):

    ui -> worker -> {engine, memory};   engine and memory -> compute, weights;   leaves: spec, errors, events,
    sidecar, units, prompts, telemetry.

Every import is read from the source (also those inside functions, which are how the heavy libraries are kept
out of the light modules), so a back-edge fails here even when nothing runs it yet.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "framepack_ui"
LEAVES = ("spec", "errors", "events", "sidecar", "units", "prompts")

# room -> the rooms (and outside packages) it must never import
FORBIDDEN = {
    "ui": ("engine", "memory", "compute", "weights", "cli", "torch", "diffusers", "transformers"),
    "worker": ("ui", "cli", "gradio"),
    "engine": ("memory", "worker", "ui", "cli", "gradio"),
    "memory": ("engine", "worker", "ui", "cli", "gradio"),
    "compute": ("engine", "memory", "worker", "ui", "cli", "weights", "gradio"),
    "weights": ("engine", "memory", "compute", "worker", "ui", "cli", "gradio"),
    "telemetry": ("engine", "memory", "compute", "worker", "ui", "cli", "weights", "torch", "gradio"),
    **{leaf: ("engine", "memory", "compute", "worker", "ui", "cli", "weights", "telemetry", "torch", "gradio")
       for leaf in LEAVES},
}


def _room(module: str) -> str | None:
    """framepack_ui.engine.f1 -> "engine"; framepack_ui.spec -> "spec"; outside packages -> their top name."""
    parts = module.split(".")
    if parts[0] != "framepack_ui":
        return parts[0]
    return parts[1] if len(parts) > 1 else None


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module `path` imports, anywhere in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # `from . import engine` names a module too
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_imports_against_the_flow(path):
    room = _room(_module_name(path))
    forbidden = FORBIDDEN.get(room, ())
    bad = sorted(m for m in imports_of(path) if _room(m) in forbidden)
    assert not bad, f"{path.relative_to(REPO)} ({room}) imports {bad}"


def test_app_imports_only_the_worker_and_the_ui_of_the_package():
    rooms = {_room(m) for m in imports_of(REPO / "app.py") if m.startswith("framepack_ui")}
    assert rooms <= {"ui", "worker", "errors", "spec", "cli", "telemetry", None}, rooms
    assert not {"torch", "diffusers", "transformers"} & {m.split(".")[0] for m in imports_of(REPO / "app.py")}


def test_the_rule_catches_a_back_edge(tmp_path, monkeypatch):
    """The reader itself: a relative import from the engine into memory is seen as one."""
    fake = PACKAGE / "engine" / "f1.py"
    source = "from ..memory import manager\n\ndef f():\n    from ..memory.plan import make_plan\n"
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    found = imports_of(fake)
    assert "framepack_ui.memory" in found and "framepack_ui.memory.plan" in found
    assert _room("framepack_ui.memory.plan") in FORBIDDEN["engine"]


def test_engine_and_memory_meet_only_through_the_lending_protocol():
    """The manager satisfies the engine's ModelLender protocol without importing it (checked structurally)."""
    import inspect

    from framepack_ui.engine.lending import ModelLender
    from framepack_ui.memory.manager import ModelManager

    for name, member in inspect.getmembers(ModelLender, inspect.isfunction):
        if name.startswith("_"):
            continue
        ours = getattr(ModelManager, name, None)
        assert callable(ours), f"ModelManager lacks {name}"
        wanted = list(inspect.signature(member).parameters)
        assert list(inspect.signature(ours).parameters)[: len(wanted)] == wanted, name
