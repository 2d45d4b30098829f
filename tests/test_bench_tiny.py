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


def test_bench_lora_tiny_times_every_profile_without_and_with_a_lora(tmp_path):
    """bench_lora --tiny: each profile's row without a LoRA and with one per rank, the LoRA put on every targeted
    Linear through the manager's set_loras and counted by each row's plan."""
    out = tmp_path / "lora.json"
    _run(["-m", "bench.bench_lora", "--tiny", "--timed-steps", "1", "--ranks", "4", "--out", str(out)])
    R = json.loads(out.read_text())
    assert R["command"].startswith("python -m bench.bench_lora")
    assert set(R["rows"]) == {f"{p}, {r}" for p in ("gpu", "8gb", "8gb-fp8") for r in ("no LoRA", "rank 4")}
    for name, row in R["rows"].items():
        assert "error" not in row, (name, row)
        with_lora = name.endswith("rank 4")
        assert row["lora_layers"] == (R["lora_target_layers"] if with_lora else 0) and R["lora_target_layers"] > 0
        assert (row["planned_lora_GB"] > 0) == with_lora and ("vs_no_lora" in row) == with_lora
    assert R["rows"]["8gb-fp8, rank 4"]["where"] == "gpu-streamed" and R["quantized_linears"] > 0
