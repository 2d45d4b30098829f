"""The whole-job benchmark's own code path on the CPU (bench/bench_run.py --tiny): tiny configs lent by the app's
ModelManager under the app's memory plan, run as the docs say to run it (`python -m bench.NAME` from the repo root)
and as a file (`python bench/NAME.py`). A smoke test of the script, not a figure."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("card", [[], ["--vram-gb", "8"]], ids=["plan-of-this-machine", "supposed-8-GiB-card"])
def test_bench_run_tiny_finishes_a_job_through_the_manager(tmp_path, card):
    out = tmp_path / "run.json"
    _run(["-m", "bench.bench_run", "--tiny", "--seconds", "2.4", "--steps", "2", *card, "--out", str(out)])
    R = json.loads(out.read_text())
    assert R["result"] == "Finished"
    assert R["sections"] == 2 and R["frames"] == 73
    assert len(R["per_section"]) == 1 and "steady_s_per_frame" in R
    assert R["command"].startswith("python -m bench.bench_run")
    uses = R["vae_uses"]
    assert len(uses) == 3 and uses[0]["loaded"]  # the start latent's encode (loads it), then two decodes
    if card:  # the supposed card's plan streams the transformer and parks its resident blocks for each decode
        assert R["plan_components"]["transformer"]["where"] == "gpu-streamed"
        assert R["plan_components"]["transformer"]["park_for_decode"]
        assert R["park_count"] == 2
        assert R["GB_streamed"] > 0


def test_bench_script_runs_as_a_file():
    """`python bench/NAME.py` finds the repo's packages (bench/_repo.py) without `-m`."""
    assert "--vram-gb" in _run(["bench/bench_run.py", "--help"]).stdout


def test_bench_output_precision_tiny_times_both_projections_in_both_placements(tmp_path):
    out = tmp_path / "precision.json"
    _run(["-m", "bench.bench_output_precision", "--tiny", "--timed-steps", "2", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"all on the GPU", "8 GB card"}
    for row in rows.values():
        assert row["s_per_step_fp32_output"] > 0 and row["s_per_step_bf16_output"] > 0
        assert row["x0_rel_diff_bf16_vs_fp32"] == 0  # on the CPU the model computes in fp32: both forms are one
