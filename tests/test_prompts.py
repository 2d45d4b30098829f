"""Prompts over time (issue 17): the `[time: prompt]` syntax, where each change lands, the refusals, and the engine
giving each section its own prompt, encoded once per distinct prompt before the transformer loads.

The engine tests run on `text_sensitive_models` (conftest.py): with the plain tiny transformer two prompts give
latents a few millionths apart, so a section conditioned on the wrong prompt would pass unseen.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cpu_manager
from framepack_ui.cli import main as cli_main
from framepack_ui.engine import f1, text
from framepack_ui.engine.video import read_metadata
from framepack_ui.errors import InputError
from framepack_ui.events import Finished, Phase, Step
from framepack_ui.prompts import (SectionPrompt, format_timed, landing_section, parse_timed, schedule,
                                  section_prompts)
from framepack_ui.sidecar import sidecar_path
from framepack_ui.spec import JobSpec
from job_settings import FAST_2_STEPS

A, B = "a cat walks on the grass", "the city lights flicker at night"


# --- the syntax and where changes land (pure) ---------------------------------------------------------------------

def test_each_change_lands_at_the_nearest_section_boundary():
    changes = schedule("[0s: a woman waves] [2.3s: she smiles] [3.0: she jumps]", sections=4)
    assert [(c.at_s, c.section, c.prompt) for c in changes] == [
        (0.0, 0, "a woman waves"), (2.3, 2, "she smiles"), (3.0, 3, "she jumps")]
    assert [round(c.lands_s, 6) for c in changes] == [0.0, 2.4, 3.6]
    assert landing_section(0.59) == 0 and landing_section(0.6) == 1  # a tie goes to the later boundary
    assert [s.prompt for s in section_prompts(changes, 4)] == ["a woman waves", "a woman waves", "she smiles",
                                                               "she jumps"]


def test_a_plain_prompt_is_one_prompt_for_every_section_as_written():
    for plain in ("  The girl dances  ", "[cinematic] a girl dances", "[style: anime] a girl dances", ""):
        assert parse_timed(plain) == [(0.0, plain)]  # brackets without a time are part of the prompt
        assert section_prompts(schedule(plain, 3), 3) == [SectionPrompt(plain)] * 3


BAD_PROMPTS = [  # (prompt for a 2-section video (2.4 s), the start of the one line that refuses it)
    ("[0s: a] [2,4s: b]", "prompt time '2,4s' is not a time in seconds"),
    ("[0s: a] [soon: b]", "prompt time 'soon' is not a time in seconds"),
    ("[0s: a] and then [1.2s: b]", "text outside the [time: prompt] groups: 'and then'"),
    ("[0s: a] [1.2s b]", "prompt group [1.2s b] has no time"),
    ("[1.2s: b] [0s: a]", "prompt times out of order: 0s comes after 1.2s"),
    ("[0s: a] [1.2s: b] [1.2s: c]", "prompt time 1.2s is given twice"),
    ("[0s: a] [1s: b] [1.4s: c]", "1s and 1.4s both land at 1.2 s (section 2)"),
    ("[0s: a] [3s: b]", "3s is past the video's end"),
    ("[0s: a] [2.3s: b]", "2.3s is past the video's end: it lands at 2.4 s (section 3)"),  # rounds to the end
    ("[0s: a] [1.2s:   ]", "the prompt from 1.2s is empty"),
    ("[1.2s: b]", "nothing prompts the video's start"),
]


@pytest.mark.parametrize("prompt,message", BAD_PROMPTS, ids=[m.split(":")[0][:30] for _, m in BAD_PROMPTS])
def test_each_bad_timed_prompt_is_refused_in_one_line(start_image, prompt, message):
    spec = JobSpec(image=start_image, prompt=prompt, seconds=2.4)
    with pytest.raises(InputError) as info:
        spec.validate()
    assert info.value.message.startswith(message), info.value.message
    assert "\n" not in info.value.message


def test_blending_ramps_from_the_previous_prompt_over_the_sections_after_a_change():
    changes = schedule("[0s: a] [1.2s: b] [4.8s: c]", sections=6)
    assert section_prompts(changes, 6, blend_sections=0) == [SectionPrompt(p) for p in "abbbcc"]
    assert section_prompts(changes, 6, blend_sections=1) == [
        SectionPrompt("a"), SectionPrompt("b", "a", 0.5), SectionPrompt("b"), SectionPrompt("b"),
        SectionPrompt("c", "b", 0.5), SectionPrompt("c")]
    ramp = section_prompts(changes, 6, blend_sections=3)  # cut short by the next change: it starts from b
    assert [(s.blend_from, s.weight) for s in ramp] == [(None, 1), ("a", 0.25), ("a", 0.5), ("a", 0.75), ("b", 0.25),
                                                        ("b", 0.5)]


def test_rows_and_text_round_trip():
    rows = [(0, "a woman waves"), ("2.4 s", "she  smiles"), ("3.6", "she jumps")]
    text_form = format_timed(rows)
    assert text_form == "[0s: a woman waves] [2.4s: she smiles] [3.6s: she jumps]"
    assert parse_timed(text_form) == [(0.0, "a woman waves"), (2.4, "she smiles"), (3.6, "she jumps")]
    assert format_timed([("0", "just one prompt")]) == "just one prompt"


def test_mixing_two_prompts_of_different_lengths_pads_the_shorter_and_keeps_every_token():
    short = text.PromptEmbeds(torch.ones(1, 2, 4), torch.ones(1, 2, dtype=torch.long), torch.zeros(1, 3))
    long = text.PromptEmbeds(torch.full((1, 5, 4), 3.0), torch.ones(1, 5, dtype=torch.long), torch.ones(1, 3))
    mixed = text.mix_embeds(short, long, 0.25)
    assert mixed.llama.shape == (1, 5, 4) and mixed.llama_mask.tolist() == [[1] * 5]
    assert torch.allclose(mixed.llama[:, :2], torch.full((1, 2, 4), 0.75 * 1 + 0.25 * 3))  # shared positions
    assert torch.allclose(mixed.llama[:, 2:], torch.full((1, 3, 4), 0.25 * 3))  # the longer's own, at its share
    assert torch.allclose(mixed.clip_pooled, torch.full((1, 3), 0.25))


# --- the engine ---------------------------------------------------------------------------------------------------

class RecordingLender:
    """The manager as the engine borrows it, every loan written down in order."""

    def __init__(self, manager):
        self.manager, self.used = manager, []

    def use(self, name):
        self.used.append(name)
        return self.manager.use(name)

    def __getattr__(self, name):
        return getattr(self.manager, name)


@pytest.fixture
def encoded(monkeypatch) -> list[str]:
    """The prompts the text encoders actually encode, in order."""
    calls = []
    encode = text.encode_prompt

    def spy(prompt, *args, **kwargs):
        calls.append(prompt)
        return encode(prompt, *args, **kwargs)

    monkeypatch.setattr(text, "encode_prompt", spy)
    return calls


@pytest.fixture
def conditioned(monkeypatch) -> list[dict]:
    """The positive inputs each section's denoiser is given, in section order."""
    seen = []

    class Recording(f1.Denoiser):
        def __init__(self, transformer, positive, *args, **kwargs):
            seen.append({k: v.detach().cpu().clone() for k, v in positive.items() if torch.is_tensor(v)})
            super().__init__(transformer, positive, *args, **kwargs)

    monkeypatch.setattr(f1, "Denoiser", Recording)
    return seen


def test_a_timed_prompt_gives_each_section_its_prompt_encoded_once_before_the_transformer(
        text_sensitive_models, start_image, tmp_path, encoded, conditioned):
    manager = cpu_manager(text_sensitive_models, prompt_cache_dir=tmp_path / "prompts")
    lender = RecordingLender(manager)
    spec = JobSpec(image=start_image, prompt=f"[0s: {A}] [1.3s: {B}] [2.4s: {A}]", seed=3,
                   **{**FAST_2_STEPS, "seconds": 3.6})
    events = []
    end = f1.run(spec, tmp_path / "timed.mp4", lender, events.append)
    assert isinstance(end, Finished), end

    assert encoded == [A, B]  # once per distinct prompt
    assert lender.used.count("text_encoders") == 1
    assert lender.used.index("text_encoders") < lender.used.index("transformer")
    assert "section 2, asked 1.3s" in next(e.detail for e in events if isinstance(e, Phase) and e.name == "prompts")

    # each section was conditioned on its own prompt's embeddings, exactly
    (emb_a, emb_b), loaded = text.encode_prompts([A, B], manager)
    assert not loaded  # from the prompt cache
    pooled = [c["pooled_projections"] for c in conditioned]
    assert len(pooled) == 3
    assert torch.equal(pooled[0], emb_a.clip_pooled) and torch.equal(pooled[2], emb_a.clip_pooled)
    assert torch.equal(pooled[1], emb_b.clip_pooled)
    assert torch.equal(conditioned[1]["encoder_hidden_states"], emb_b.llama)

    # recorded in the settings file and in the MP4's metadata
    expected = [{"prompt": A}, {"prompt": B}, {"prompt": A}]
    settings = json.loads(sidecar_path(end.path).read_text())
    assert settings["section_prompts"] == expected
    assert [(c["at_s"], c["starts_s"], c["prompt"]) for c in settings["prompt_changes"]] == [
        (0.0, 0.0, A), (1.3, 1.2, B), (2.4, 2.4, A)]
    assert json.loads(read_metadata(end.path)["framepack_settings"])["section_prompts"] == expected

    # a second job with the same prompts: all from the prompt cache, the text encoders not loaded again
    again = f1.run(spec, tmp_path / "again.mp4", RecordingLender(manager), lambda e: None)
    assert isinstance(again, Finished) and encoded == [A, B] and manager.load_count["text_encoders"] == 1


def _run_sections(manager, out, prompt, **settings):
    """Run a 2-section job at 64 px; (each section's preview strips, every frame as it went to the encoder)."""
    previews: dict[int, list] = {0: [], 1: []}
    frames = []

    def emit(event):
        if isinstance(event, Step):
            previews[event.section].append(event.preview)

    settings = {**FAST_2_STEPS, "seed": 7, "seconds": 2.4, **settings}
    spec = JobSpec(image=settings.pop("image"), prompt=prompt, **settings)
    end = f1.run(spec, out, manager, emit, frame_sink=frames.append)
    assert isinstance(end, Finished), end
    return previews, np.concatenate(frames).astype(np.int16)


def test_a_prompt_change_at_1_2s_keeps_the_first_section_and_changes_the_next(text_sensitive_models, start_image,
                                                                              tmp_path):
    manager = cpu_manager(text_sensitive_models, prompt_cache_dir=None)
    one_previews, one = _run_sections(manager, tmp_path / "one.mp4", A, image=start_image)
    two_previews, two = _run_sections(manager, tmp_path / "two.mp4", f"[0s: {A}] [1.2s: {B}]", image=start_image)
    # section 0: the same prompt, so the same latents at every step (the same noise: prompts draw none)
    assert all(np.array_equal(a, b) for a, b in zip(one_previews[0], two_previews[0]))
    # and the same frames up to where section 1's decode cross-fades into them (37 - 33)
    assert np.array_equal(one[:4], two[:4])
    # section 1 follows the new prompt: its latents and its 36 frames differ by far more than rounding
    assert np.abs(one_previews[1][-1].astype(int) - two_previews[1][-1].astype(int)).mean() > 5
    assert np.abs(one[-36:] - two[-36:]).mean() > 1


def test_blending_conditions_the_landing_section_on_the_mix_and_records_it(text_sensitive_models, start_image,
                                                                           tmp_path, conditioned):
    manager = cpu_manager(text_sensitive_models, prompt_cache_dir=tmp_path / "prompts")
    spec = JobSpec(image=start_image, prompt=f"[0s: {A}] [1.2s: {B}]", prompt_blend_sections=1,
                   **{**FAST_2_STEPS, "seconds": 3.6})
    end = f1.run(spec, tmp_path / "blend.mp4", manager, lambda e: None)
    assert isinstance(end, Finished), end
    (emb_a, emb_b), _ = text.encode_prompts([A, B], manager)
    pooled = [c["pooled_projections"] for c in conditioned]
    assert torch.equal(pooled[0], emb_a.clip_pooled) and torch.equal(pooled[2], emb_b.clip_pooled)
    assert torch.allclose(pooled[1], 0.5 * emb_a.clip_pooled + 0.5 * emb_b.clip_pooled)
    tokens = max(emb_a.llama.shape[1], emb_b.llama.shape[1])
    assert conditioned[1]["encoder_hidden_states"].shape[1] == tokens
    assert torch.equal(conditioned[1]["encoder_hidden_states"], text.mix_embeds(emb_a, emb_b, 0.5).llama)
    settings = json.loads(sidecar_path(end.path).read_text())
    assert settings["prompt_blend_sections"] == 1
    assert settings["section_prompts"][1] == {"prompt": B, "blend_from": A, "weight": 0.5}


def test_the_text_sensitive_model_follows_the_prompt_where_the_plain_one_does_not(tiny_models_dir,
                                                                                 text_sensitive_models, start_image,
                                                                                 tmp_path):
    """The fixture itself: a different prompt moves the plain tiny model's section by less than a level of the
    8-bit preview, and the text-sensitive one's by many."""
    def preview_change(models):
        manager = cpu_manager(models, prompt_cache_dir=None)
        a, _ = _run_sections(manager, tmp_path / "a.mp4", A, image=start_image, seconds=1.2)
        b, _ = _run_sections(manager, tmp_path / "b.mp4", B, image=start_image, seconds=1.2)
        return np.abs(a[0][-1].astype(int) - b[0][-1].astype(int)).mean()

    assert preview_change(tiny_models_dir) < 0.5
    assert preview_change(text_sensitive_models) > 5


# --- the command line ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt,message", [BAD_PROMPTS[0], BAD_PROMPTS[4], BAD_PROMPTS[7], BAD_PROMPTS[9]],
                         ids=["malformed", "out-of-order", "past-the-end", "empty"])
def test_cli_refuses_a_bad_timed_prompt_with_one_line_and_exit_2(tiny_models_dir, start_image, tmp_path, capsys,
                                                                   prompt, message):
    out = tmp_path / "never.mp4"
    code = cli_main(["generate", "--models", str(tiny_models_dir), "--image", start_image, "--prompt", prompt,
                     "--seconds", "2.4", "--offline", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not out.exists() and not sidecar_path(out).exists()  # nothing started


def test_cli_timed_prompt_says_where_each_change_lands_and_records_it(tiny_models_dir, start_image, tmp_path,
                                                                      capsys):
    out = tmp_path / "timed.mp4"
    code = cli_main(["generate", "--models", str(tiny_models_dir), "--image", start_image, "--prompt",
                     "[0s: a red square] [1.3s: a blue square]", "--prompt-blend", "1", "--seconds", "2.4",
                     "--resolution", "64", "--steps", "2", "--offline", "--no-prompt-cache", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert ("[prompts] 0.0 s (section 1): a red square · 1.2 s (section 2, asked 1.3s): a blue square"
            in printed)
    settings = json.loads(sidecar_path(out).read_text())
    assert settings["prompt"] == "[0s: a red square] [1.3s: a blue square]"
    assert settings["section_prompts"] == [{"prompt": "a red square"},
                                           {"prompt": "a blue square", "blend_from": "a red square", "weight": 0.5}]


# --- settings from a file (the page's drop and "Use these settings" read them the same way) ------------------------

def test_settings_come_back_from_a_video_or_its_settings_file_with_the_start_image(tmp_path):
    from framepack_ui.engine.video import SectionVideoWriter
    from framepack_ui.sidecar import write_sidecar
    from framepack_ui.ui import present
    from framepack_ui.worker.restore import settings_from_file

    outputs, image = tmp_path / "outputs", tmp_path / "me.PNG"
    outputs.mkdir()
    image.write_bytes(b"an image")
    settings = {"prompt": f"[0s: {A}] [1.2s: {B}]", "seed": 9, "steps": 3, "prompt_blend_sections": 1,
                "memory": {"profile": "cpu", "storage_asked": "fp8"}}
    video = outputs / "clip.mp4"
    with SectionVideoWriter(video, 16, 16, metadata={"framepack_settings": json.dumps(
            {**settings, "input_image_file": "clip.input.png"})}) as writer:
        writer.add_section(torch.zeros(3, 5, 16, 16))
    write_sidecar(video, settings, image)  # the JSON and the image's copy, clip.input.png

    elsewhere = tmp_path / "downloads"  # the video alone: its image is found in the outputs folder
    elsewhere.mkdir()
    (elsewhere / "clip.mp4").write_bytes(video.read_bytes())
    for path in (elsewhere / "clip.mp4", outputs / "clip.json"):
        restored = settings_from_file(path, (outputs,))
        assert {k: restored.settings[k] for k in settings} == settings
        assert restored.image == str((outputs / "clip.input.png").resolve())
    form = present.restored_form(restored.settings, ("auto", "cpu"))
    assert form["prompt_rows"] == [["0", A], ["1.2", B]] and form["prompt_blend_sections"] == 1
    assert form["profile"] == "cpu" and form["storage"] == "fp8"
    assert "profile" not in present.restored_form(restored.settings, ("auto", "gpu"))  # not offered here

    # a settings file names the image by its plain name only: it cannot point the page at another file
    sneaky = elsewhere / "sneaky.json"
    sneaky.write_text(json.dumps({**settings, "input_image_file": "../me.PNG"}))
    assert settings_from_file(sneaky, (outputs,)).image is None


@pytest.mark.parametrize("name,content,message", [
    ("notes.json", b'{"hello": "world"}', "notes.json holds no FramePack settings"),
    ("broken.json", b"{not json", "broken.json is not a readable settings file"),
    ("broken.mp4", b"not a video", "broken.mp4 is not a readable video"),
    ("me.png", b"\x89PNG", "me.png is neither a video (.mp4) nor a settings file (.json)"),
])
def test_a_file_without_settings_is_refused_in_one_line(tmp_path, name, content, message):
    from framepack_ui.worker.restore import settings_from_file

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as info:
        settings_from_file(path)
    assert info.value.message.startswith(message) and "\n" not in info.value.message
