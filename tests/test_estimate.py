"""The job's timeline (worker/timeline.py) and the estimate before Generate (worker/speed.py): recorded by the worker
around the real engine on the tiny models, kept in the settings file, learnt from for the next job."""
from __future__ import annotations

import json
from functools import partial
from types import SimpleNamespace

import pytest

from framepack_ui.engine import f1
from framepack_ui.events import Finished, Phase, Step
from framepack_ui.sidecar import sidecar_path
from framepack_ui.worker.events import Estimated
from framepack_ui.worker.speed import (UNKNOWN, JobShape, Measured, add_to_book, estimate, machine_key, measure,
                                       read_book)
from framepack_ui.worker.timeline import SERIES, TimelineRecorder
from worker_jobs import all_events, spec

KEY = machine_key("cpu", "auto", "auto")


def timeline(sections: list[tuple[float, float]], before_s: float, after_s: float, first_extra_s: float = 0.0):
    """A timeline whose sections sample for `s` and decode for `d` seconds each ((s, d) per section)."""
    rows, t = [], before_s
    for i, (sampling_s, decode_s) in enumerate(sections):
        extra = first_extra_s if i == 0 else 0.0
        rows.append({"sampling_start_s": t, "sampling_end_s": t + sampling_s + extra,
                     "decode_start_s": t + sampling_s + extra, "decode_end_s": t + sampling_s + extra + decode_s})
        t = rows[-1]["decode_end_s"]
    return {"sections": rows, "ended_s": t + after_s}


def test_a_measured_job_predicts_another_length_steps_and_cfg_from_its_parts():
    shape = JobShape(sections=3, steps=10, resolution=64)
    # 0.5 s a step, 2 s a decode; the first section 4 s slower (warm-up); 6 s before, 1 s after
    measured = measure(timeline([(5.0, 2.0)] * 3, 6.0, 1.0, first_extra_s=4.0), shape)
    assert measured.call_s == pytest.approx(0.5) and measured.decode_s == pytest.approx(2.0)
    assert (measured.before_s, measured.after_s, measured.first_extra_s) == pytest.approx((6.0, 1.0, 4.0))
    book = {KEY: [measured.__dict__]}
    other = JobShape(sections=5, steps=20, resolution=64, cfg=3.0)  # CFG: two model calls per step
    guess = estimate(book, KEY, other)
    assert guess.sampling_s == pytest.approx(5 * 20 * 2 * 0.5)
    assert guess.decode_s == pytest.approx(5 * 2.0)
    assert guess.total_s == pytest.approx(100 + 10 + 6 + 1 + 4)
    assert guess.source.startswith("measured on this machine (1 job, profile auto)")


def test_the_step_time_scales_with_the_tokens_one_size_proportionally_two_sizes_on_a_line():
    small = Measured(tokens=JobShape(1, 1, 320).tokens, pixels=320 ** 2, teacache=0, call_s=0.3, decode_s=1,
                     before_s=0, after_s=0, first_extra_s=0)
    book = {KEY: [small.__dict__]}
    assert estimate(book, KEY, JobShape(1, 1, 640)).sampling_s == pytest.approx(0.3 * 4)  # 4x the area
    big = Measured(tokens=JobShape(1, 1, 640).tokens, pixels=640 ** 2, teacache=0, call_s=0.9, decode_s=3,
                   before_s=0, after_s=0, first_extra_s=0)
    book = {KEY: [small.__dict__, big.__dict__]}  # 0.3 s at t, 0.9 s at 4t: 0.1 + 0.2 t / t_320
    assert estimate(book, KEY, JobShape(1, 1, 480)).sampling_s == pytest.approx(0.1 + 0.2 * (480 / 320) ** 2)


def test_without_a_job_here_the_cards_figures_else_unknown_and_teacache_is_matched():
    shape = JobShape(sections=4, steps=25, resolution=640, teacache=0.0)
    h200 = estimate({}, machine_key("NVIDIA H200", "auto", "auto"), shape)
    # docs/benchmarks.md row 1: 0.871 s a step and 24.27 s a whole section at 640x608; 640 px is 5 % more area
    assert h200.total_s == pytest.approx(4 * 24.27 * 640 * 640 / (640 * 608))
    assert "docs/benchmarks.md" in h200.source and "row 1" in h200.source and "loading" in h200.note
    assert estimate({}, machine_key("NVIDIA H200", "streamed", "auto"), shape).source.endswith("limited to 8 GB)")
    laptop = estimate({}, machine_key("NVIDIA GeForce RTX 4060 Laptop GPU", "auto", "auto"), shape)
    assert laptop.total_s is None and laptop.source == UNKNOWN
    # another profile's jobs on this machine beat the card's figures, and say so
    off = Measured(JobShape(1, 1, 640).tokens, 640 ** 2, 0.0, 0.8, 2.0, 10, 1, 0)
    on = Measured(JobShape(1, 1, 640).tokens, 640 ** 2, 0.15, 0.4, 2.0, 10, 1, 0)
    book = {machine_key("NVIDIA H200", "gpu", "bf16"): [off.__dict__, on.__dict__]}
    guess = estimate(book, machine_key("NVIDIA H200", "auto", "auto"), JobShape(1, 10, 640, teacache=0.15))
    assert "with profile gpu" in guess.source and guess.sampling_s == pytest.approx(10 * 0.4)  # TeaCache's job
    assert guess.source.endswith("with profile gpu, not auto and bf16 storage asked, not auto")
    same_profile = estimate(book, machine_key("NVIDIA H200", "gpu", "fp8"), JobShape(1, 10, 640, teacache=0.15))
    assert same_profile.source == "measured on this machine with bf16 storage asked, not fp8"
    unmatched = estimate({KEY: [off.__dict__]}, KEY, JobShape(1, 10, 640, teacache=0.15))
    assert "TeaCache off" in unmatched.note


def test_the_book_keeps_the_newest_jobs_per_key_and_survives_a_broken_file(tmp_path):
    path = tmp_path / ".speed.json"
    path.write_text("{not json")
    assert read_book(path) == {}
    record = Measured(1.0, 1.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
    for _ in range(25):
        add_to_book(path, KEY, record)
    assert len(read_book(path)[KEY]) == 20


def test_the_timeline_keeps_a_long_job_in_a_capped_number_of_points():
    clock = [0.0]
    reading = SimpleNamespace(gpu_available=True, gpu_note="GPU X", gpu_util_pct=50.0, vram_used_bytes=2 * 10 ** 9,
                              ram_used_bytes=10 ** 9, disk_read_mb_s=3.0)
    recorder = TimelineRecorder(lambda previous: reading, interval_s=3600, max_points=10, clock=lambda: clock[0])
    recorder.start()
    for second in range(1, 101):  # 100 readings, as the thread would take them
        clock[0] = float(second)
        recorder._sample()
        recorder.event(Phase("sampling", f"section {second}")) if second % 10 == 0 else None
    record = recorder.stop()
    assert len(record["t_s"]) <= 11 and record["interval_s"] >= 8  # the whole job, every 8th-16th second
    assert record["t_s"][0] == 0 and record["t_s"][-1] == 100
    assert all(len(record[name]) == len(record["t_s"]) for name in SERIES)
    assert record["gpu"] == "GPU X" and record["gpu_util_pct"][0] == 50.0 and record["vram_used_gb"][0] == 2.0
    assert len(record["sections"]) == 10 and len(record["phases"]) == 1  # one mark per change of phase
    json.dumps(record)  # JSON-ready, for the settings file


class SimulatedCard:
    """A card whose work takes known times: the real engine runs (on the tiny models, on the CPU), and the job's
    timeline reads this clock, which moves only by what each finished piece of work would take on that card (a step,
    a decode, encoding the prompt...), the first step and the first decode paying a warm-up as a compile and a model
    load would. So the estimate is checked as a model, against the recorded timings of a real job, and not against
    the wall clock of a shared 2-core machine."""
    STEP_S, DECODE_S, FIRST_STEP_EXTRA_S, FIRST_DECODE_EXTRA_S = 0.1, 0.5, 2.0, 1.0
    PHASE_S = {"text": 1.5, "image": 0.5, "transformer": 0.5, "writing": 0.3}  # once a job, after the phase starts

    def __init__(self):
        self.now_s = 0.0

    def clock(self) -> float:
        return self.now_s

    def run_job(self, spec, out_path, manager, emit, cancel, **kwargs):
        seen = set()

        def timed_emit(event):
            if isinstance(event, Step):  # the step's work is done when it is reported
                self.now_s += self.STEP_S + (self.FIRST_STEP_EXTRA_S if "step" not in seen else 0.0)
                seen.add("step")
            emit(event)
            if isinstance(event, Phase) and event.detail.startswith("decoding section"):
                self.now_s += self.DECODE_S + (self.FIRST_DECODE_EXTRA_S if "decode" not in seen else 0.0)
                seen.add("decode")
            elif isinstance(event, Phase) and event.name in self.PHASE_S and event.name not in seen:
                self.now_s += self.PHASE_S[event.name]
                seen.add(event.name)
        return f1.run(spec, out_path, manager, timed_emit, cancel, **kwargs)


MODEL_TOLERANCE = 0.01  # the timeline keeps milliseconds; the model itself should be exact on such a card


def test_after_a_first_job_the_estimate_of_a_longer_job_with_more_steps_is_within_its_stated_error(
        make_worker, start_image_80x64, monkeypatch):
    from framepack_ui.worker import worker as worker_module

    card = SimulatedCard()
    monkeypatch.setattr(worker_module, "TimelineRecorder", partial(TimelineRecorder, clock=card.clock))
    worker = make_worker(card.run_job, prompt_cache_dir=None)
    first = all_events(worker, worker.submit(spec(start_image_80x64, "a red square", seconds=2.4, steps=4,
                                                  resolution=64, teacache=False)))
    assert isinstance(first[-1], Finished)
    said = next(e for e in first if isinstance(e, Estimated))
    assert said.total_s is None and said.source == UNKNOWN  # nothing measured yet: said so

    second_spec = spec(start_image_80x64, "a blue square", seconds=3.6, steps=12, resolution=64, teacache=False)
    guess = worker.estimate(JobShape.of(second_spec))
    assert guess.source.startswith("measured on this machine (1 job")
    second = all_events(worker, worker.submit(second_spec))
    assert isinstance(second[-1], Finished)
    assert next(e for e in second if isinstance(e, Estimated)).total_s == pytest.approx(guess.total_s)
    recorded = json.loads(sidecar_path(second[-1].path).read_text())["timeline"]
    sampled = sum(s["sampling_end_s"] - s["sampling_start_s"] for s in recorded["sections"])
    decoded = sum(s["decode_end_s"] - s["decode_start_s"] for s in recorded["sections"])
    # 3 sections of 12 steps at 0.1 s, 3 decodes at 0.5 s, the first step's and decode's warm-up (3 s), encoding
    # and loading (2.5 s) and writing (0.3 s): 10.9 s, of which job 1 (2 sections of 4 steps) measured each part
    assert recorded["ended_s"] == pytest.approx(10.9, abs=0.01)
    assert recorded["estimated_s"] == pytest.approx(guess.total_s, abs=0.05)  # kept beside what it took
    assert guess.sampling_s + guess.decode_s + guess.other_s == pytest.approx(guess.total_s)
    assert guess.sampling_s == pytest.approx(sampled - card.FIRST_STEP_EXTRA_S, rel=MODEL_TOLERANCE)
    assert guess.decode_s == pytest.approx(decoded - card.FIRST_DECODE_EXTRA_S, rel=MODEL_TOLERANCE)
    assert guess.total_s == pytest.approx(recorded["ended_s"], rel=MODEL_TOLERANCE)


def test_a_jobs_timeline_is_in_its_settings_file_with_its_phases_and_sections(make_worker, start_image_80x64):
    worker = make_worker()
    job = worker.submit(spec(start_image_80x64, seconds=2.4))
    events = all_events(worker, job)
    assert isinstance(events[-1], Finished)
    record = json.loads(sidecar_path(events[-1].path).read_text())["timeline"]
    assert record == worker.timeline(job)
    names = [name for _, name in record["phases"]]
    for phase in ("text", "image", "transformer", "sampling", "decode", "writing"):
        assert phase in names
    assert len(record["sections"]) == 2 and all("decode_end_s" in s for s in record["sections"])
    assert len(record["t_s"]) >= 2 and record["ram_used_gb"][0] > 0  # a reading at the start and at the end
    assert record["t_s"][-1] <= record["ended_s"] + 0.5


# --- what the page shows (ui/present.py, pure) ---------------------------------------------------------------------

def test_the_jobs_plot_draws_each_gauge_its_phases_and_its_section_starts():
    from framepack_ui.ui import present

    record = {"interval_s": 1.0, "gpu": "GPU X", "t_s": [0, 1, 2, 3, 4], "gpu_util_pct": [5, 90, None, 95, 10],
              "vram_used_gb": [1, 6, 7, 7, 2], "ram_used_gb": [3, 3, 3, 3, 3], "disk_read_mb_s": [None] * 5,
              "phases": [[0, "text"], [1, "sampling"], [2.5, "decode"], [3, "sampling"], [3.8, "writing"]],
              "sections": [{"sampling_start_s": 1}, {"sampling_start_s": 3}], "ended_s": 4.2, "estimated_s": 5.0}
    svg = present.job_plot_html(record)
    assert svg.count('data-series="gpu_util_pct"') == 2  # the missing reading splits its line in two
    assert 'data-series="vram_used_gb"' in svg and 'data-series="ram_used_gb"' in svg
    assert 'data-series="disk_read_mb_s"' not in svg  # no figure at all: no line, and not in the legend
    assert "VRAM (peak 7.0 GB)" in svg and "GPU (peak 95 %)" in svg and "disk" not in svg.split("fp-legend")[1]
    assert svg.count('class="fp-phase"') == 5 and svg.count('class="fp-section"') == 2
    assert "Sampling: 1.0-2.5 s" in svg and "GPU X" in svg and "4.2 s (estimated 5.0 s)" in svg
    assert present.job_plot_html(None) == "" and present.job_plot_html({"t_s": []}) == ""


def test_the_estimate_is_labelled_with_its_parts_and_source_and_the_job_shows_it_until_its_own_eta():
    from framepack_ui.ui import present
    from framepack_ui.worker.speed import Estimate

    guess = Estimate(200.0, "measured on this machine (2 jobs, profile auto)", 150.0, 20.0, 30.0)
    shown = present.estimate_text(guess)
    assert shown.startswith("**Estimate: about 3 min 20 s**") and "sampling 2 min 30 s" in shown
    assert "Source: measured on this machine (2 jobs, profile auto)." in shown
    assert "each, 13 min 20 s for the 4 jobs" in present.estimate_text(guess, 4)
    assert present.estimate_text(Estimate(None, UNKNOWN)) == f"**Estimate:** {UNKNOWN}."
    assert present.shape_from_inputs(2.4, 25, 640, 1, True, 0.15) == JobShape(2, 25, 640, 1.0, 0.15)
    assert present.shape_from_inputs(None, 25, 640, 1, True, 0.15) is None
    view = present.fold([Phase("starting"), Estimated(200.0, "x")], present.JobView(job_id="1"))
    assert "estimated 3 min 20 s in all" in present.progress_text(view)
    view = present.apply(view, Step(0, 2, 1, 25, 3.0, 90.0))
    assert "ETA 1 min 30 s" in present.progress_text(view) and "estimated" not in present.progress_text(view)


def test_a_batch_is_every_image_with_every_prompt_else_the_forms_own():
    from framepack_ui.errors import InputError
    from framepack_ui.ui import present

    assert present.batch_pairs(["a.png", "b.png"], "form.png", "one\n\n two \n", "form prompt") == [
        ("a.png", "one"), ("a.png", "two"), ("b.png", "one"), ("b.png", "two")]
    assert present.batch_pairs(None, "form.png", "one\ntwo", "p") == [("form.png", "one"), ("form.png", "two")]
    assert present.batch_pairs(["a.png"], None, "", "p") == [("a.png", "p")]
    with pytest.raises(InputError, match="upload a start image"):
        present.batch_pairs([], None, "one", "p")
