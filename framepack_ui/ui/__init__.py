"""The Gradio web app: layout (components), wiring (events), present (event -> UI updates, pure).

Imports only spec, events, errors, worker and telemetry from the package: never torch or the engine.
"""
from .layout import CSS
from .wiring import build_ui

__all__ = ["CSS", "build_ui"]
