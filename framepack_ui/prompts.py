"""Prompts over time: `[0s: a woman waves] [2.4s: she smiles]` -> which prompt each section is conditioned on.

Pure and standard library only (the page, the command line and the engine all read it). A section is 36 frames
(1.2 s): each change lands at the section boundary nearest its time (a tie goes to the later one), and the UI says
where. A text without a `[time: prompt]` group is one prompt for the whole video, as before.

Blending (`blend_sections` B, 0 = off): the B sections from where a change lands are conditioned on a linear mix of
the previous span's prompt and the new one, the new one's share rising (j + 1) / (B + 1) in the j-th of them (B = 1:
the landing section is a half-and-half mix); after them the new prompt alone. A ramp cut short by the next change
ends there, and the next ramp starts from the prompt of the span it follows. How two embeddings mix is the
engine's (engine/text.py mix_embeds).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import InputError
from .spec import FPS, FRAMES_PER_SECTION

SECTION_S = FRAMES_PER_SECTION / FPS  # 1.2 s: prompt changes land on these boundaries

_GROUP = re.compile(r"\[([^\[\]]*)\]")
# A text is timed when some bracket opens with something that starts like a number and has a colon: a plain
# prompt may still hold "[cinematic]" or "[style: anime]"
_TIMED = re.compile(r"\[\s*[\d.][^\[\]:]*:")
_TIME = re.compile(r"^(\d+(?:\.\d*)?|\.\d+)\s*s?$")


@dataclass(frozen=True)
class PromptChange:
    """One `[time: prompt]`: the time written and the section it lands at (0-based)."""
    at_s: float
    section: int
    prompt: str

    @property
    def lands_s(self) -> float:
        return self.section * SECTION_S


@dataclass(frozen=True)
class SectionPrompt:
    """What one section is conditioned on: `prompt`, or a mix with `weight` of `prompt` and 1 - weight of
    `blend_from` (only while blending)."""
    prompt: str
    blend_from: str | None = None
    weight: float = 1.0

    def record(self) -> dict:
        if self.blend_from is None:
            return {"prompt": self.prompt}
        return {"prompt": self.prompt, "blend_from": self.blend_from, "weight": round(self.weight, 6)}


def is_timed(text: str) -> bool:
    return bool(_TIMED.search(text or ""))


def parse_timed(text: str) -> list[tuple[float, str]]:
    """The (seconds, prompt) pairs of a timed text, in the order written; InputError (one line) for a malformed
    time, text outside the groups or an empty prompt. A plain text is one pair at 0 s."""
    text = text or ""
    if not is_timed(text):
        return [(0.0, text)]  # as written: the prompt cache and the embeddings of a plain prompt stay as before
    pairs, end = [], 0
    for match in _GROUP.finditer(text):
        _outside(text[end:match.start()])
        end = match.end()
        label, colon, prompt = match.group(1).partition(":")
        if not colon:
            raise InputError(f"prompt group [{_short(match.group(1))}] has no time: write [2.4s: the prompt]")
        seconds = _seconds(label)
        prompt = " ".join(prompt.split())
        if not prompt:
            raise InputError(f"the prompt from {_time(seconds)} is empty: write what happens from then on")
        pairs.append((seconds, prompt))
    _outside(text[end:])
    return pairs


def schedule(text: str, sections: int) -> list[PromptChange]:
    """Where each prompt of `text` starts in a video of `sections` sections; InputError (one line) for times out
    of order, two landing on the same boundary, a start with no prompt, or a time past the video's end."""
    pairs = parse_timed(text)
    changes: list[PromptChange] = []
    for seconds, prompt in pairs:
        section = landing_section(seconds)
        if changes and seconds == changes[-1].at_s:
            raise InputError(f"prompt time {_time(seconds)} is given twice")
        if changes and seconds < changes[-1].at_s:
            raise InputError(f"prompt times out of order: {_time(seconds)} comes after {_time(changes[-1].at_s)}")
        if changes and section == changes[-1].section:
            raise InputError(f"{_time(changes[-1].at_s)} and {_time(seconds)} both land at {_lands(section)}: "
                             f"prompts change at section boundaries, every {SECTION_S:g} s")
        if section >= sections:
            length = f"{sections} section{'s' if sections != 1 else ''} ({sections * SECTION_S:.1f} s)"
            raise InputError(f"{_time(seconds)} is past the video's end: it lands at {_lands(section)}, and the "
                             f"video is {length}")
        changes.append(PromptChange(seconds, section, prompt))
    if changes[0].section != 0:
        raise InputError(f"nothing prompts the video's start: the first prompt lands at {_lands(changes[0].section)}; "
                         f"begin with [0s: ...]")
    return changes


def landing_section(seconds: float) -> int:
    """The section boundary nearest `seconds` (ties go to the later boundary)."""
    return math.floor(seconds / SECTION_S + 0.5 + 1e-9)


def section_prompts(changes: list[PromptChange], sections: int, blend_sections: int = 0) -> list[SectionPrompt]:
    """Each section's conditioning, in order (see the module's note on blending)."""
    out = []
    for section in range(sections):
        k = max(i for i, change in enumerate(changes) if change.section <= section)
        into = section - changes[k].section  # sections since this prompt's change landed
        if k > 0 and into < blend_sections:
            out.append(SectionPrompt(changes[k].prompt, changes[k - 1].prompt, (into + 1) / (blend_sections + 1)))
        else:
            out.append(SectionPrompt(changes[k].prompt))
    return out


def distinct_prompts(plan: list[SectionPrompt]) -> list[str]:
    """Every prompt the sections need, once each, in order of first use."""
    seen: dict[str, None] = {}
    for section in plan:
        if section.blend_from is not None:
            seen.setdefault(section.blend_from)
        seen.setdefault(section.prompt)
    return list(seen)


def format_timed(rows) -> str:
    """(seconds, prompt) rows as prompt text: one row at 0 s (or with no time) is the plain prompt, more are
    `[2.4s: prompt]` groups. A time is a number or text (`2.4`, `2.4s`); one that is not a number is written as it
    is, so that parsing the text names it."""
    rows = [(_time_text(seconds), " ".join(str(prompt or "").split())) for seconds, prompt in rows]
    if len(rows) == 1 and rows[0][0] in ("", "0s"):
        return rows[0][1]
    return " ".join(f"[{seconds}: {prompt}]" for seconds, prompt in rows)


def _time_text(seconds) -> str:
    """`2.4` or `"2.4 s"` -> `2.4s`; "" for no time; anything else as written."""
    if seconds is None:
        return ""
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
        return _time(seconds)
    text = str(seconds).strip()
    match = _TIME.match(text)
    return _time(float(match.group(1))) if match else text


def describe(changes: list[PromptChange]) -> str:
    """Where each prompt starts, in one line: `0.0 s (section 1): a woman waves · 2.4 s (section 3, asked
    2.3s): she smiles`."""
    parts = []
    for c in changes:
        asked = "" if math.isclose(c.at_s, c.lands_s, abs_tol=1e-9) else f", asked {_time(c.at_s)}"
        parts.append(f"{c.lands_s:.1f} s (section {c.section + 1}{asked}): {c.prompt}")
    return " · ".join(parts)


def schedule_record(changes: list[PromptChange], plan: list[SectionPrompt]) -> dict:
    """What the settings file and the MP4's metadata record beside the prompt text."""
    return {"prompt_changes": [{"at_s": c.at_s, "starts_s": round(c.lands_s, 6), "section_index": c.section,
                                "prompt": c.prompt} for c in changes],
            "section_prompts": [section.record() for section in plan]}


def _seconds(label: str) -> float:
    label = label.strip()
    match = _TIME.match(label)
    if not match:
        raise InputError(f"prompt time '{_short(label)}' is not a time in seconds: write it like 2.4s")
    return float(match.group(1))


def _outside(between: str) -> None:
    if between.strip():
        raise InputError(f"text outside the [time: prompt] groups: '{_short(between.strip())}'")


def _number(seconds) -> str:
    return f"{float(seconds):g}"


def _time(seconds: float) -> str:
    return f"{_number(seconds)}s"


def _lands(section: int) -> str:
    return f"{section * SECTION_S:.1f} s (section {section + 1})"


def _short(text: str, limit: int = 40) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
