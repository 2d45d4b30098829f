"""bench/bench_cache.py on tiny configs on the CPU (`--tiny`): every method and threshold through the real engine
against the uncached reference. A smoke test of the script, not a figure."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_cache_tiny_compares_each_method_with_the_uncached_run(tmp_path):
    out = tmp_path / "cache.json"
    result = subprocess.run([sys.executable, "-m", "bench.bench_cache", "--tiny", "--seconds", "1.2", "--steps", "4",
                             "--teacache", "0.15", "--magcache", "0.5:3", "--retention", "0", "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    R = json.loads(out.read_text())
    rows = {row["job"]: row for row in R["rows"]}
    assert list(rows) == ["uncached (calibrating)", "teacache 0.15", "magcache published 0.5 K3",
                          "magcache calibrated 0.5 K3"]
    reference = rows["uncached (calibrating)"]
    assert reference["computed_per_section"] == "4/4" and math.isinf(reference["psnr_db"])
    assert reference["mean_abs_diff"] == 0 and reference["speedup"] == 1
    # published ratios at 4 steps (1, 1.05469, 0.98047, 0.78516): steps 1 and 2 skip, the last computes (guard)
    assert rows["magcache published 0.5 K3"]["computed_per_section"] == "2/4"
    for row in rows.values():
        assert row["sampling_s_per_frame"] > 0
    assert "proxy" in R["note"] and "| job | computed_per_section |" in result.stdout
