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


def test_bench_app_times_two_jobs_through_the_worker(tiny_models_dir, tmp_path):
    """bench/bench_app.py on the tiny set, on the CPU: two jobs through the real Worker, each with the plan's choice,
    its milestones in order, its phases timed and measured, its disk reads; a child process holding RAM."""
    out = tmp_path / "app.json"
    _run(["-m", "bench.bench_app", "--models", str(tiny_models_dir), "--jobs", "2", "--seconds", "2.4",
          "--resolution", "64", "--steps", "3", "--hold-ram-gb", "0.05", "--drop-page-cache",
          "--compile-cache", str(tmp_path / "compile-cache"), "--trace-allocator", "--pin-workers", "2",
          "--pin-register", "before", "--out", str(out)])
    R = json.loads(out.read_text())
    assert R["command"].startswith("python -m bench.bench_app")
    assert (R["pin_workers"], R["pin_register"]) == (2, "before")  # the way of pinning it ran with, as asked
    assert len(R["jobs"]) == 2
    # the worker's estimate as each job started: none before the first job, the first job's speed for the second
    assert R["jobs"][0]["estimated_s"] is None and R["jobs"][1]["estimated_s"] > 0
    assert R["jobs"][1]["estimate_source"].startswith("measured on this machine")
    for job in R["jobs"]:
        assert job["result"] == "Finished" and job["sections"] == 2 and job["frames"] == 73
        # the plan's choice, from the job's own settings file
        assert job["plan_profile"] == "auto" and job["transformer_storage"] in ("bfloat16", "fp8")
        assert "transformer" in job["plan"] and isinstance(job["plan_notes"], list)
        assert 0 < job["first_preview_s"] <= job["first_section_s"] <= job["finished_s"]
        names = [s["name"] for s in job["segments"]]
        assert names[:3] == ["queued", "starting", "plan"]
        assert names.count("sampling") == names.count("decode") == 2 and names[-1] == "writing"
        # the segments tile the job: nothing between submit and Finished is left out
        assert sum(s["seconds"] for s in job["segments"]) == pytest.approx(job["finished_s"], rel=1e-6)
        for key in ("probe_plan_s", "text_s", "image_s", "sampling_s", "decoding_s", "writing_s", "loading_s"):
            assert job[key] >= 0, key
        assert job["sampling_s"] > 0 and job["decoding_s"] > 0 and job["probe_plan_s"] > 0
        assert all(s["peak_rss_GiB"] > 0 and s["disk_read_GB"] >= 0 for s in job["segments"])
        assert job["disk_read_GB"] >= 0 and job["disk_read_MB_per_step_after_first"] >= 0
        assert "cgroup_disk_read_GB" in job and job["by_phase"]["sampling"]["count"] == 2
        # where the anonymous memory is at each phase's end: malloc's figures, and smaps' mappings adding up to RssAnon
        for s in job["segments"]:
            assert s["end_malloc_in_use_GiB"] > 0 and s["end_malloc_kept_free_GiB"] >= 0
            by_mapping = sum(s[f"end_anon_{kind}_GiB"] for kind in ("heap", "large_maps", "small_maps", "file_private"))
            assert by_mapping == pytest.approx(s["end_rss_anon_GiB"], rel=0.05)
    first, second = R["jobs"]
    # the first job loads every model and encodes its new prompt; the second finds the prompt in the cache
    assert {load["name"] for load in first["loads"]} == {"text_encoders", "image_encoder", "vae", "transformer"}
    assert first["loading_s"] > 0 and first["prompt_encoded"] and not second["prompt_encoded"]
    # the RAM holder: a separate process in the bench's cgroup, holding what it was asked for
    held = R["hold_ram"]
    assert held["pid"] != R.get("pid") and held["same_cgroup_as_bench"]
    assert held["requested_bytes"] == int(0.05 * 2**30) <= held["rss_anon_bytes"]
    assert R["page_cache_dropped_GB"] > 0
    assert R["compile_cache"]["dir"] == str(tmp_path / "compile-cache")


def test_bench_app_extends_each_jobs_video_with_the_next(tiny_models_dir, tmp_path):
    """--extend-from 3: jobs 1 and 2 are plain (a warm plain job to set the extension beside), job 3 continues job
    2's video, so its file holds job 2's 73 frames and 72 new ones, measured phase by phase
    like any job (docs/gpu-runbook.md row 13 runs it at full size)."""
    out = tmp_path / "app.json"
    _run(["-m", "bench.bench_app", "--models", str(tiny_models_dir), "--jobs", "3", "--seconds", "2.4",
          "--resolution", "64", "--steps", "3", "--extend-from", "3", "--outputs", str(tmp_path / "videos"),
          "--out", str(out)])
    first, second, third = json.loads(out.read_text())["jobs"]
    assert first["extends"] is None and second["extends"] is None and second["frames"] == 73
    assert third["extends"] == str(tmp_path / "videos" / "job2.mp4")
    assert third["result"] == "Finished" and third["frames"] == 73 + 72 and third["sections"] == 2
    assert third["by_phase"]["sampling"]["count"] == 2 and third["peak_rss_GiB"] > 0


def test_bench_app_refuses_a_card_size_without_cuda(tiny_models_dir):
    result = subprocess.run([sys.executable, "-m", "bench.bench_app", "--models", str(tiny_models_dir), "--vram-gb",
                             "8", "--device", "cpu"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == "bench_app: error: --vram-gb needs a CUDA GPU"


@pytest.mark.parametrize("flags, message", [
    (["--jobs", "2", "--extend-from", "3"], "--extend-from N needs 2 <= N <= --jobs (job 1 has no video before it)"),
    (["--jobs", "2", "--extend-from", "1"], "--extend-from N needs 2 <= N <= --jobs (job 1 has no video before it)"),
    (["--jobs", "2", "--extend", "--extend-from", "2"], "--extend is --extend-from 2: give one of them"),
    (["--pin-workers", "0"], "--pin-workers must be at least 1")])
def test_bench_app_refuses_flags_it_cannot_run_in_one_line(tiny_models_dir, flags, message):
    result = subprocess.run([sys.executable, "-m", "bench.bench_app", "--models", str(tiny_models_dir), *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip() == f"bench_app: error: {message}"


def test_in_cgroup_puts_the_command_in_a_new_group_with_its_memory_max(tmp_path):
    """bench/in_cgroup.sh on a stand-in cgroup folder (CGROUP_ROOT): it hands the memory controller down where the
    parent lacks it, makes a fresh group with the given memory.max, moves itself in and becomes the command (so the
    command's pid is the one in cgroup.procs)."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu memory pids\n")  # a plain file keeps one write
    (root / "cgroup.subtree_control").write_text("cpu\n")
    (root / "framepack-bench-1").mkdir()  # an earlier run's empty group: removed
    result = subprocess.run(["sh", "bench/in_cgroup.sh", "32G", "sh", "-c", "echo $$"], cwd=REPO, capture_output=True,
                            text=True, timeout=30, env={"CGROUP_ROOT": str(root), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    groups = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert len(groups) == 1 and groups[0] != "framepack-bench-1"
    group = root / groups[0]
    assert (group / "memory.max").read_text().strip() == "32G"
    assert (group / "cgroup.procs").read_text().strip() == result.stdout.strip()  # the command itself
    assert "memory" in (root / "cgroup.subtree_control").read_text()


def test_in_cgroup_refuses_without_cgroup_v2_in_one_line(tmp_path):
    result = subprocess.run(["sh", "bench/in_cgroup.sh", "32G", "true"], cwd=REPO, capture_output=True, text=True,
                            timeout=30, env={"CGROUP_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "not a cgroup v2 mount" in result.stderr


def test_bench_lora_tiny_times_every_profile_without_and_with_a_lora(tmp_path):
    """bench_lora --tiny: each profile's row without a LoRA and with one per rank, the LoRA put on every targeted
    Linear through the manager's set_loras and counted by each row's plan; the fp8 profile's LoRA row once for each
    maker of the fp8 product's left operand asked for (torch makes both on a CPU, and says so)."""
    out = tmp_path / "lora.json"
    _run(["-m", "bench.bench_lora", "--tiny", "--timed-steps", "1", "--ranks", "4", "--left-operand", "kernel,torch",
          "--out", str(out)])
    R = json.loads(out.read_text())
    assert R["command"].startswith("python -m bench.bench_lora") and R["left_operands"] == ["kernel", "torch"]
    fp8_rows = {f"8gb-fp8, rank 4, [x, h] by {left}" for left in ("kernel", "torch")}
    assert set(R["rows"]) == fp8_rows | {f"{p}, {r}" for p in ("gpu", "8gb", "8gb-fp8") for r in ("no LoRA", "rank 4")
                                         if (p, r) != ("8gb-fp8", "rank 4")}
    assert [R["rows"][name]["left_operand"] for name in sorted(fp8_rows)] == ["torch", "torch"]
    for name, row in R["rows"].items():
        assert "error" not in row, (name, row)
        with_lora = "rank 4" in name
        assert row["lora_layers"] == (R["lora_target_layers"] if with_lora else 0) and R["lora_target_layers"] > 0
        assert (row["planned_lora_GB"] > 0) == with_lora and ("vs_no_lora" in row) == with_lora
    assert R["rows"]["8gb-fp8, rank 4, [x, h] by kernel"]["where"] == "gpu-streamed" and R["quantized_linears"] > 0
