"""Put the repo root on sys.path, for scripts run as files (`python bench/NAME.py`).

Run as a file, a script gets its own folder (bench/) as sys.path[0], not the repo root, so `bench.common` and
`framepack_ui` would not import. Each script therefore starts with

    if not __package__:  # run as `python bench/NAME.py`
        import _repo  # noqa: F401

which finds this module beside it (bench/ is sys.path[0] then) and makes the repo root importable: the one place
the benchmarks touch sys.path. `python -m bench.NAME` from the repo root (the documented way) needs none of it:
`__package__` is "bench" and this module is never imported.
"""
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
