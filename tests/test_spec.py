"""JobSpec's validation at the boundary: every field's limits accepted, one step past them refused with the field's
one-line message (a mutation check found the limits unguarded: issue 26)."""
from __future__ import annotations

import math

import pytest

from framepack_ui.errors import InputError
from framepack_ui.spec import SEED_MAX, JobSpec, section_count


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "start.png"
    path.write_bytes(b"not read by validate")
    return str(path)


# field: (values at its limits, accepted; values just past them, refused; the start of the message)
LIMITS = {
    "seed": ([-1, 0, SEED_MAX], [-2, SEED_MAX + 1], "seed must be"),
    "seconds": ([0.001, 120], [0, -1, 120.001, math.inf, math.nan, "5"], "seconds must be"),
    "steps": ([1, 100], [0, 101], "steps must be"),
    "gs": ([0, 32], [-0.001, 32.001, math.nan], "gs (distilled guidance) must be"),
    "cfg": ([1, 32], [0.999, 32.001, math.inf], "cfg must be"),
    "rs": ([0, 1], [-0.001, 1.001, math.nan], "rs (CFG rescale) must be"),
    "resolution": ([64, 1280], [63, 1281], "resolution must be"),
    "sampler": (["unipc", "euler"], ["dpm", ""], "sampler must be one of unipc, euler"),
    "teacache_threshold": ([0, 1], [-0.001, 1.001, math.nan], "teacache threshold must be"),
    "crf": ([1, 51], [0, 52], "crf must be"),
    "fast_decode": ([True, False], [1, "yes"], "fast_decode must be"),
    "prompt": (["", "a cat"], [None, 3], "prompt must be text"),
}


@pytest.mark.parametrize("field", sorted(LIMITS))
def test_each_field_is_accepted_at_its_limits_and_refused_past_them(image, field):
    accepted, refused, message = LIMITS[field]
    for value in accepted:
        spec = JobSpec(image=image, **{"prompt": "p", field: value})
        assert spec.validate() is spec, (field, value)
    for value in refused:
        with pytest.raises(InputError) as info:
            JobSpec(image=image, **{"prompt": "p", field: value}).validate()
        assert info.value.message.startswith(message), (field, value, info.value.message)
        assert "\n" not in info.value.message


def test_a_missing_image_is_refused_after_the_settings_with_its_path(tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(InputError, match="image not found: .*nowhere.png"):
        JobSpec(image=str(missing), prompt="p").validate()
    with pytest.raises(InputError, match="steps must be"):  # the settings first: the user fixes them in one go
        JobSpec(image=str(missing), prompt="p", steps=0).validate()
    with pytest.raises(InputError, match="image not found"):  # a folder is not an image
        JobSpec(image=str(tmp_path), prompt="p").validate()


@pytest.mark.parametrize("seconds,sections", [(0.1, 1), (1.2, 1), (1.79, 1), (1.81, 2), (5, 4), (120, 100)])
def test_seconds_round_to_whole_sections_of_1_2_s_and_at_least_one(seconds, sections):
    assert section_count(seconds) == sections
    assert JobSpec(image="x.png", prompt="p", seconds=seconds).sections == sections


def test_settings_record_every_field_and_a_fixed_seed_stays(image):
    spec = JobSpec(image=image, prompt="p", seed=5, steps=7)
    settings = spec.settings()
    assert settings == {field: getattr(spec, field) for field in JobSpec.__dataclass_fields__}
    assert spec.with_seed() is spec
    drawn = JobSpec(image=image, prompt="p", seed=-1).with_seed()
    assert 0 <= drawn.seed <= SEED_MAX and drawn.validate() is drawn
