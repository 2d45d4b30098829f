"""MagCache (engine/magcache.py) and the step-cache choice (engine/step_cache.py): the skip rule against
hand-computed decisions, its hooks on the tiny transformer, and through the engine: `off` and threshold 0 exactly
as no cache, a calibration that a later job loads, and a bad or mismatched calibration file refused in one line
before anything loads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack_ui.compute.compile import transformer_blocks
from framepack_ui.engine import f1, step_cache
from framepack_ui.engine.magcache import (MAGCACHE_HOOK, MagCache, apply_magcache, published_ratios,
                                          ratios_for_steps, remove_magcache)
from framepack_ui.engine.video import read_metadata
from framepack_ui.errors import InputError
from framepack_ui.events import CacheReport, Failed, Finished, Phase
from framepack_ui.memory import loading
from framepack_ui.sidecar import METADATA_KEY, sidecar_path
from framepack_ui.spec import JobSpec
from conftest import cpu_manager
from job_settings import FAST
from model_inputs import transformer_inputs


def _pattern(cache: MagCache, steps: int, branch: str = "positive") -> str:
    """The decisions of one section of `steps` calls; a computed call stores a residual as the hooks would."""
    pattern = ""
    for step in range(steps):
        cache.begin(step, steps, branch)
        skipped = cache.decide()
        pattern += "S" if skipped else "C"
        if not skipped:
            cache._branches[branch].residual = torch.zeros(1)
    return pattern


# --- the rule ------------------------------------------------------------------------------------------------------

def test_published_ratios_are_the_f1_demos_25_with_their_source():
    data = json.loads(Path(step_cache.__file__).with_name("magcache_f1_ratios.json").read_text())
    assert "Zehong-Ma/MagCache" in data["source"] and "magcache_demo_gradio_f1.py" in data["source"]
    ratios = published_ratios()
    assert len(ratios) == 25 and ratios[0] == 1.0 and ratios[1] == 1.25781 and ratios[-1] == 0.78516
    d = JobSpec(image="", prompt="")
    assert (d.magcache_threshold, d.magcache_max_skip_steps, d.magcache_retention_ratio) == (
        data["defaults"]["threshold"], data["defaults"]["max_skip_steps"], data["defaults"]["retention_ratio"])
    assert d.cache_method == "teacache" and d.teacache_threshold == 0.15  # TeaCache 0.15 stays the default


def test_magcache_skips_by_the_f1_demos_rule_on_the_published_ratios():
    """25 steps, threshold 0.10, K 3, retention 0.2 (the demo's defaults). Steps 0-4 are retained (int(0.2 * 25)).
    Then, by hand, with r the published ratios: 5: ratio 1.02344, error 0.0234 S; 6: x1.00781 = 1.03143, error
    0.0549 S; 7: x1.02344 = 1.05561, error 0.1105 > 0.10 C (reset); 8: 1.05469, 0.0547 S; 9: x0.99609 = 1.05057,
    0.1053 C; 10: 1.03906, 0.0391 S; 11: 1.04718, 0.0862 S; 12: 1.06353, 0.1498 C; 13: 1.00781, 0.0078 S;
    14: 1.03143, 0.0392 S; 15: 1.04754, 0.0868 S; 16: fourth in a row > K C; 17: 1.05469, 0.0547 S;
    18: 1.03409, 0.0888 S; 19: 1.00178, 0.0906 S; 20: fourth > K C; 21: 0.97266, 0.0273 S; 22: 0.91187, 0.1155 C;
    23: 0.96484, 0.0352 S; 24: 0.78516, 0.2148 C. 12 of 25 computed."""
    cache = MagCache(published_ratios(), threshold=0.10, max_skip_steps=3, retention_ratio=0.2)
    cache.reset()
    assert _pattern(cache, 25) == "CCCCCSSCSCSSCSSSCSSSCSCSC"
    assert (cache.computed_calls, cache.skipped_calls) == (12, 13)


def test_a_step_whose_own_ratio_is_off_by_more_than_006_is_computed():
    """Threshold 0.15, K 3 (a faster setting): step 21 skips (error 0.0273); step 22's accumulated error 0.1155 is
    within 0.15 and it is the second in a row, but its own ratio 0.9375 is 0.0625 from 1: the demo computes it
    (diffusers' hook, without that guard, would skip it)."""
    cache = MagCache(published_ratios(), threshold=0.15, max_skip_steps=3, retention_ratio=0.2)
    cache.reset()
    pattern = _pattern(cache, 25)
    assert pattern[20:] == "CSCSC"
    assert pattern == "CCCCCSSSCSSSCSSSCSSSCSCSC"


def test_at_most_k_steps_are_skipped_in_a_row_and_the_retained_steps_always_run():
    """Ratios of exactly 1 (no error ever): with K 2 and retention 0.2 of 10 steps (2 retained), steps 2-3 skip,
    4 is the third in a row and computes, and so on; K 0 never skips."""
    flat = (1.0,) * 10
    assert _pattern(MagCache(flat, threshold=0.1, max_skip_steps=2, retention_ratio=0.2), 10) == "CCSSCSSCSS"
    assert _pattern(MagCache(flat, threshold=0.1, max_skip_steps=0, retention_ratio=0.2), 10) == "C" * 10
    assert _pattern(MagCache(flat, threshold=0.1, max_skip_steps=9, retention_ratio=0.5), 10) == "CCCCCSSSSS"
    # 0.25 of 10 steps: the demo truncates to 2 retained steps (diffusers' hook rounds to 3)
    assert _pattern(MagCache(flat, threshold=0.1, max_skip_steps=9, retention_ratio=0.25), 10) == "CCSSSSSSSS"


def test_threshold_zero_and_calibration_never_skip_even_with_no_error():
    flat = (1.0,) * 8
    assert _pattern(MagCache(flat, threshold=0.0, max_skip_steps=9, retention_ratio=0.0), 8) == "C" * 8
    assert _pattern(MagCache(flat, threshold=1.0, max_skip_steps=9, retention_ratio=0.0, calibrate=True), 8) == "C" * 8


def test_each_cfg_branch_keeps_its_own_accumulated_error_and_a_section_starts_afresh():
    cache = MagCache((1.0,) * 6, threshold=0.1, max_skip_steps=2, retention_ratio=0.0)
    pattern = ""
    for step in range(6):
        for branch in ("positive", "negative"):
            cache.begin(step, 6, branch)
            skipped = cache.decide()
            pattern += "S" if skipped else "C"
            if not skipped:
                cache._branches[branch].residual = torch.zeros(1)
    assert pattern == "CCSSSSCCSSSS"  # each branch: C S S C S S
    cache.reset()  # next section: no residual, the first step computes
    assert _pattern(cache, 2) == "CS"


def test_ratios_are_interpolated_to_the_step_count_by_nearest_neighbour():
    """12 steps from 25 ratios: index i takes round(i * 24 / 11): 0, 2, 4, 7, 9, 11, 13, 15, 17, 20, 22, 24."""
    r = published_ratios()
    assert ratios_for_steps(r, 12) == tuple(r[i] for i in (0, 2, 4, 7, 9, 11, 13, 15, 17, 20, 22, 24))
    assert ratios_for_steps(r, 25) == r


# --- the hooks on the tiny transformer ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transformer(tiny_models_dir):
    return loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"))


def _forward(transformer, inputs) -> torch.Tensor:
    with torch.no_grad():
        return transformer(**inputs)[0]


def test_threshold_zero_is_bit_identical_and_removing_leaves_no_hook(transformer):
    inputs = transformer_inputs(transformer)
    plain = _forward(transformer, inputs)
    cache = apply_magcache(transformer, MagCache((1.0,) * 3, threshold=0.0, retention_ratio=0.0))
    try:
        cache.reset()
        for step in range(3):
            cache.begin(step, 3)
            assert torch.equal(_forward(transformer, inputs), plain), step
    finally:
        remove_magcache(transformer)
    assert (cache.computed_calls, cache.skipped_calls) == (3, 0)
    assert all(block._diffusers_hook.get_hook(MAGCACHE_HOOK) is None for block in transformer_blocks(transformer))
    assert torch.equal(_forward(transformer, inputs), plain)


def test_a_skipped_call_adds_the_residual_of_the_last_computed_one(transformer):
    """Unchanging inputs: a skipped call's input plus the stored residual is the computed output again."""
    inputs = transformer_inputs(transformer)
    plain = _forward(transformer, inputs)
    cache = apply_magcache(transformer, MagCache((1.0,) * 4, threshold=1.0, max_skip_steps=9, retention_ratio=0.0))
    pattern = ""
    try:
        cache.reset()
        for step in range(4):
            cache.begin(step, 4)
            out = _forward(transformer, inputs)
            pattern += "S" if cache.skipping else "C"
            assert torch.allclose(out, plain, rtol=0, atol=1e-5), step
    finally:
        remove_magcache(transformer)
    assert pattern == "CSSS"


def test_calibration_records_the_mean_ratio_of_the_residuals_token_norms(transformer):
    """Two steps with other latents: the ratio is mean over tokens of |residual 2| / |residual 1|, the residual
    being what the blocks add to their input (captured here with plain forward hooks)."""
    blocks = transformer_blocks(transformer)
    captured = []
    handles = [blocks[0].register_forward_pre_hook(lambda m, args, kwargs: captured.append(("in", args[0])),
                                                   with_kwargs=True),
               blocks[-1].register_forward_hook(lambda m, args, out: captured.append(("out", out[0])))]
    steps = [transformer_inputs(transformer, seed=0), transformer_inputs(transformer, seed=1)]
    try:
        for inputs in steps:
            _forward(transformer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    residuals = [captured[i + 1][1] - captured[i][1] for i in (0, 2)]
    expected = (residuals[1].norm(dim=-1) / residuals[0].norm(dim=-1)).mean().item()
    assert abs(expected - 1.0) > 1e-3  # other latents: a ratio that tells a wrong formula apart

    cache = apply_magcache(transformer, MagCache((1.0,) * 2, calibrate=True))
    try:
        cache.reset()
        for step, inputs in enumerate(steps):
            cache.begin(step, 2)
            _forward(transformer, inputs)
    finally:
        remove_magcache(transformer)
    assert cache.calibration[0][0] == 1.0
    assert cache.calibration[0][1] == pytest.approx(expected, rel=1e-5)
    assert cache.calibrated_ratios(2) == pytest.approx((1.0, expected), rel=1e-5)
    assert cache.calibrated_ratios(3) is None  # no section calibrated in full at 3 steps


# --- through the engine ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def manager(tiny_models_dir):
    return cpu_manager(tiny_models_dir)


def _job(manager, out, start_image, calibration_dir=None, **settings):
    spec = JobSpec(image=start_image, prompt="a red square moves", **{**FAST, "steps": 6, **settings})
    events = []
    f1.run(spec, out, manager, events.append, calibration_dir=calibration_dir)
    return events


def _frames(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_off_and_magcache_threshold_zero_are_bit_identical_to_no_cache(manager, start_image, tmp_path):
    """`cache off` wins over the teacache flag; MagCache at threshold 0 computes every call; both write exactly the
    frames of a job without a step cache (teacache False, as older settings say it)."""
    runs = {"none": dict(teacache=False), "off": dict(cache="off", teacache=True),
            "mag0": dict(cache="magcache", magcache_threshold=0.0, magcache_retention_ratio=0.0),
            "mag": dict(cache="magcache", magcache_threshold=1.0, magcache_max_skip_steps=9,
                        magcache_retention_ratio=0.0)}
    reports = {}
    for name, settings in runs.items():
        events = _job(manager, tmp_path / f"{name}.mp4", start_image, **settings)
        assert isinstance(events[-1], Finished), events[-1]
        reports[name] = [e for e in events if isinstance(e, CacheReport)]
    none = _frames(tmp_path / "none.mp4")
    assert np.array_equal(_frames(tmp_path / "off.mp4"), none)
    assert np.array_equal(_frames(tmp_path / "mag0.mp4"), none)
    assert not np.array_equal(_frames(tmp_path / "mag.mp4"), none)  # it does skip, and that shows
    assert reports["none"] == [] and reports["off"] == []
    assert [(r.method, r.computed, r.calls) for r in reports["mag0"]] == [("magcache", 6, 6)]
    # the published ratios at 6 steps end in 0.785, off by more than 0.06: the last step computes too
    assert [(r.method, r.computed, r.calls) for r in reports["mag"]] == [("magcache", 2, 6)]


def test_a_calibration_is_stored_and_a_later_magcache_job_uses_it(manager, start_image, tmp_path):
    """The calibration run computes every call and stores one ratio per step under the calibration folder; the next
    MagCache job with the same key loads it (recorded in its settings file and MP4 metadata), and its decisions
    follow the stored ratios: ratios of 2 (an error of 1 a step) compute every call where the published ones at
    threshold 1 skip."""
    folder = tmp_path / "calibrations"
    events = _job(manager, tmp_path / "cal.mp4", start_image, folder, cache="magcache", cache_calibrate=True)
    assert isinstance(events[-1], Finished), events[-1]
    assert [(r.computed, r.calls) for r in events if isinstance(r, CacheReport)] == [(6, 6)]
    [stored] = folder.glob("*.json")
    data = json.loads(stored.read_text())
    assert len(data["ratios"]) == 6 and data["ratios"][0] == 1.0 and data["key"]["steps"] == 6
    assert json.loads(sidecar_path(tmp_path / "cal.mp4").read_text())["magcache_ratios"].startswith("calibrating")

    fast = dict(cache="magcache", magcache_threshold=1.0, magcache_max_skip_steps=9, magcache_retention_ratio=0.0)
    data["ratios"] = [1.0] + [2.0] * 5
    stored.write_text(json.dumps(data))
    events = _job(manager, tmp_path / "uses.mp4", start_image, folder, **fast)
    assert isinstance(events[-1], Finished), events[-1]
    assert [(r.computed, r.calls) for r in events if isinstance(r, CacheReport)] == [(6, 6)]
    settings = json.loads(sidecar_path(tmp_path / "uses.mp4").read_text())
    assert settings["magcache_ratios"] == str(stored) and settings["cache"] == "magcache"
    assert json.loads(read_metadata(tmp_path / "uses.mp4")[METADATA_KEY])["magcache_ratios"] == str(stored)

    events = _job(manager, tmp_path / "other_steps.mp4", start_image, folder, **{**fast, "steps": 5})
    # no calibration for 5 steps: the published ratios, whose last (0.785) computes
    assert [(r.computed, r.calls) for r in events if isinstance(r, CacheReport)] == [(2, 5)]
    assert json.loads(sidecar_path(tmp_path / "other_steps.mp4").read_text())["magcache_ratios"] == step_cache.PUBLISHED


@pytest.mark.parametrize("damage", ["not json", "other settings", "too few ratios"])
def test_a_bad_or_mismatched_calibration_file_stops_the_job_in_one_line_before_anything_loads(
        manager, start_image, tmp_path, damage):
    folder = tmp_path / "calibrations"
    spec = JobSpec(image=start_image, prompt="p", cache="magcache", **{**FAST, "steps": 6})
    key = step_cache.calibration_key(spec, 48, 64, {})
    path = step_cache.save_calibration(folder, key, (1.0,) * 6)
    assert step_cache.load_calibration(folder, key).ratios == (1.0,) * 6
    data = json.loads(path.read_text())
    if damage == "not json":
        path.write_text("{ratios: [1, 2")
    elif damage == "other settings":
        path.write_text(json.dumps({**data, "key": {**key, "steps": 7}}))
    else:
        path.write_text(json.dumps({**data, "ratios": [1.0, 1.0]}))
    with pytest.raises(InputError) as raised:
        step_cache.load_calibration(folder, key)
    assert "\n" not in raised.value.message and str(path) in raised.value.message

    events = []
    f1.run(spec, tmp_path / "out.mp4", manager, events.append, calibration_dir=folder)
    assert isinstance(events[-1], Failed) and events[-1].reason == "input" and str(path) in events[-1].message
    assert not any(isinstance(e, Phase) for e in events)  # nothing encoded, nothing loaded
    assert not (tmp_path / "out.mp4").exists() and not sidecar_path(tmp_path / "out.mp4").exists()


def test_the_calibration_key_names_what_changes_the_ratios(start_image, tmp_path):
    spec = JobSpec(image=start_image, prompt="p", cache="magcache")
    record = {"model_files": {"transformer/a.safetensors": "1:ab", "vae/v.safetensors": "2:cd"},
              "memory": {"transformer_storage": "fp8"}}
    key = step_cache.calibration_key(spec, 640, 608, record)
    assert key == {"model_files": {"transformer/a.safetensors": "1:ab"}, "steps": 25, "height": 640, "width": 608,
                   "fp8": True, "loras": []}
    paths = {step_cache.calibration_path(tmp_path, k) for k in (
        key, {**key, "steps": 20}, {**key, "height": 512}, {**key, "fp8": False}, {**key, "model_files": {}},
        {**key, "loras": [["a.safetensors", 10, 1.0]]})}
    assert len(paths) == 6


def test_an_unknown_cache_or_calibration_without_magcache_is_refused_in_one_line(start_image):
    with pytest.raises(InputError, match="cache must be one of off, teacache, magcache"):
        JobSpec(image=start_image, prompt="p", cache="fastcache").validate()
    with pytest.raises(InputError, match="goes with cache magcache"):
        JobSpec(image=start_image, prompt="p", cache="teacache", cache_calibrate=True).validate()
    for bad in (dict(magcache_threshold=1.5), dict(magcache_max_skip_steps=-1), dict(magcache_max_skip_steps=1.5),
                dict(magcache_retention_ratio=2.0)):
        with pytest.raises(InputError, match="magcache"):
            JobSpec(image=start_image, prompt="p", cache="magcache", **bad).validate()


def test_older_settings_without_a_cache_method_keep_their_teacache_choice():
    """Settings files from before the cache choice have only `teacache`: the method follows it."""
    assert JobSpec(image="", prompt="", teacache=False).cache_method == "off"
    assert JobSpec(image="", prompt="", teacache=True).cache_method == "teacache"
    assert JobSpec(image="", prompt="", teacache=True, cache="magcache").cache_method == "magcache"


# --- the command line -----------------------------------------------------------------------------------------------

def _args(*extra: str):
    from framepack_ui.cli import _job_from_args, _parser

    args = _parser().parse_args(["generate", "--image", "x.png", "--prompt", "p", "--out", "o.mp4", *extra])
    return _job_from_args(args)[0]


def test_cli_cache_options_make_the_spec_and_the_old_teacache_flags_still_choose():
    spec = _args("--cache", "magcache", "--magcache-threshold", "0.15", "--magcache-max-skip-steps", "4",
                 "--magcache-retention-ratio", "0.25")
    assert (spec.cache_method, spec.magcache_threshold, spec.magcache_max_skip_steps,
            spec.magcache_retention_ratio) == ("magcache", 0.15, 4, 0.25)
    assert _args("--cache-calibrate").cache_method == "magcache" and _args("--cache-calibrate").cache_calibrate
    assert _args("--no-teacache").cache_method == "off"
    assert _args("--no-teacache", "--cache", "magcache").cache_method == "magcache"  # no contradiction
    assert _args("--teacache", "--teacache-threshold", "0.2").cache_method == "teacache"
    assert _args("--cache", "off").cache_method == "off" and not _args("--cache", "off").teacache
    assert not _args("--cache", "magcache").teacache  # the flag kept in step for older readers of the settings
    assert _args().cache_method == "teacache"


def test_cli_refuses_an_unknown_cache_or_contradicting_flags_with_exit_2(capsys):
    from framepack_ui.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["generate", "--image", "x.png", "--prompt", "p", "--out", "o.mp4", "--cache", "fastcache"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "invalid choice: 'fastcache'" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--image", "x.png", "--prompt", "p", "--out", "o.mp4", "--teacache", "--cache",
                 "magcache"]) == 2
    err = capsys.readouterr().err
    assert "--teacache contradicts --cache magcache" in err and len(err.strip().splitlines()) == 1


def test_cli_calibrates_then_uses_the_calibration_and_refuses_it_damaged(tiny_models_dir, start_image, tmp_path,
                                                                        capsys):
    import shutil

    from framepack_ui.cli import main

    models = tmp_path / "models"
    shutil.copytree(tiny_models_dir, models)
    base = ["generate", "--models", str(models), "--image", start_image, "--prompt", "a square", "--seconds", "1.2",
            "--resolution", "64", "--steps", "4", "--offline", "--no-prompt-cache", "--no-compile"]
    assert main(base + ["--cache-calibrate", "--out", str(tmp_path / "cal.mp4")]) == 0
    printed = capsys.readouterr().out
    [stored] = (models / ".cache" / "magcache").glob("*.json")
    assert "MagCache calibrated on 1 sections" in printed and str(stored) in printed
    assert "section 1/1: magcache computed 4 of 4 model calls" in printed

    assert main(base + ["--cache", "magcache", "--out", str(tmp_path / "uses.mp4")]) == 0
    assert json.loads(sidecar_path(tmp_path / "uses.mp4").read_text())["magcache_ratios"] == str(stored)
    capsys.readouterr()

    stored.write_text("not a calibration")
    assert main(base + ["--cache", "magcache", "--out", str(tmp_path / "bad.mp4")]) == 2
    err = capsys.readouterr().err
    assert f"MagCache calibration {stored} cannot be read" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad.mp4").exists()


# --- the web app's form (present.py; the browser test is test_ui_cache.py) ------------------------------------------

def test_the_form_restores_the_step_cache_from_new_and_older_settings():
    from framepack_ui.ui import present

    assert present.cache_form_values({"teacache": False}) == {"cache": "off"}  # before the choice existed
    assert present.cache_form_values({"teacache": True, "teacache_threshold": 0.2}) == {"cache": "teacache"}
    assert present.cache_form_values({"cache": "magcache", "teacache": True, "magcache_threshold": 0.15,
                                      "magcache_max_skip_steps": 4, "magcache_retention_ratio": 0.25}) == {
        "cache": "magcache", "magcache_threshold": 0.15, "magcache_max_skip_steps": 4, "magcache_retention_ratio": 0.25}
    assert present.cache_form_values({}) == {}  # nothing said: the form keeps its own
    form = present.restored_form({"prompt": "p", "teacache": False}, ("auto",))
    assert form["cache"] == "off"
    assert present.cache_text({"cache": "magcache", "magcache_threshold": 0.15, "magcache_max_skip_steps": 4,
                               "magcache_retention_ratio": 0.2}) == "magcache (threshold 0.15, K 4, retention 0.2)"
    assert present.cache_text({"teacache": True, "teacache_threshold": 0.15}) == "teacache (threshold 0.15)"


def test_the_forms_calibration_is_magcaches_and_the_teacache_flag_follows_the_choice(start_image):
    from framepack_ui.ui import present

    base = JobSpec(image=start_image, prompt="p")
    spec = present.with_cache(base, "teacache", 0.1, 3, 0.2, True)
    assert (spec.cache_method, spec.cache_calibrate, spec.teacache) == ("magcache", True, False)
    spec = present.with_cache(base, "off", 0.1, 3, 0.2, False)
    assert (spec.cache_method, spec.teacache) == ("off", False)
    with pytest.raises(InputError, match="whole number"):
        present.with_cache(base, "magcache", 0.1, 2.5, 0.2, False)
    view = present.fold([CacheReport(0, 2, "magcache", 12, 25), CacheReport(1, 2, "magcache", 13, 25)],
                        present.JobView(job_id="1", status="running"))
    assert "Model calls computed per section (magcache): 12/25, 13/25" in present.progress_text(view)


def test_magcache_on_a_transformer_streamed_block_by_block_gives_the_resident_runs_frames(tiny_models_dir,
                                                                                          start_image, tmp_path):
    """The hooks sit on the blocks as the streamer's do: a skipped call leaves the streamed blocks unused, and the
    frames and computed calls are the resident plan's."""
    from conftest import cpu_plan, streamed_on_cpu

    settings = dict(cache="magcache", magcache_threshold=1.0, magcache_max_skip_steps=2, magcache_retention_ratio=0.0)
    results = {}
    for name, plan in (("resident", cpu_plan(tiny_models_dir)),
                       ("streamed", streamed_on_cpu(cpu_plan(tiny_models_dir), 1))):
        manager = cpu_manager(tiny_models_dir, plan)
        try:
            events = _job(manager, tmp_path / f"{name}.mp4", start_image, **settings)
        finally:
            manager.free()
        assert isinstance(events[-1], Finished), events[-1]
        results[name] = [(r.computed, r.calls) for r in events if isinstance(r, CacheReport)]
    # published ratios at 6 steps (1, 1.02344, 1.03906, 1.02344, 0.96875, 0.78516), K 2: C S S C S C
    assert results["streamed"] == results["resident"] == [(3, 6)]
    assert np.array_equal(_frames(tmp_path / "streamed.mp4"), _frames(tmp_path / "resident.mp4"))
