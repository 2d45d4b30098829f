"""What a job asks for: one frozen dataclass, validated at the boundary (CLI, UI, worker)."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .errors import InputError

SEED_MAX = 2**32 - 1
FPS = 30
LATENT_WINDOW = 9  # new latent frames per section
FRAMES_PER_SECTION = LATENT_WINDOW * 4  # 36 new video frames per section (4x temporal compression)
SAMPLERS = ("unipc", "euler")
# What a job keeps of each section beside its video (engine/state.py): "all" its new latents for every section
# (resume, and branch from any section), "resume" only the newest three, which resume needs
SECTION_STATE = ("all", "resume")
CONTINUATIONS = ("resume", "branch", "extend")
MAX_BLEND_SECTIONS = 4
LORA_STRENGTH_MAX = 10.0  # |strength|: a LoRA may be applied in reverse too
LORA_SUFFIX = ".safetensors"  # the only LoRA files read (pickled .pt/.ckpt ones can run code)


def section_count(seconds: float) -> int:
    """Sections for a requested length, rounded as the official F1 demo does."""
    return max(round(seconds * FPS / FRAMES_PER_SECTION), 1)


def frame_count(sections: int) -> int:
    """Frames in the video after `sections` sections: the start frame plus 36 per section."""
    return 1 + FRAMES_PER_SECTION * sections


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA file for the video model and how strongly to apply it (1: as trained, 0: not at all)."""
    path: str
    strength: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "LoraChoice":
        """`FILE` or `FILE:STRENGTH` (the command line's --lora). A path that exists as given is a FILE even with a
        colon in it (C:\\loras\\x.safetensors); InputError names the file when the strength is not a number."""
        if Path(text).is_file() or ":" not in text:
            return cls(text)
        path, _, strength = text.rpartition(":")
        if not path or any(sep in strength for sep in "/\\"):  # a colon of the path itself (a drive): not a strength
            return cls(text)
        try:
            value = float(strength)
        except ValueError:
            raise InputError(f"LoRA {Path(path).name}: strength {strength!r} is not a number") from None
        return cls(path, value)

    def problem(self) -> str | None:
        """What is wrong with this choice before its file is read (None: nothing)."""
        name = Path(str(self.path)).name
        if isinstance(self.strength, bool) or not _finite(self.strength):
            return f"LoRA {name}: strength {self.strength!r} is not a number"
        if abs(self.strength) > LORA_STRENGTH_MAX:
            limit = f"{LORA_STRENGTH_MAX:g}"
            return f"LoRA {name}: strength must be -{limit} to {limit}, not {self.strength:g}"
        if not Path(str(self.path)).is_file():
            return f"LoRA file not found: {self.path}"
        if Path(str(self.path)).suffix.lower() != LORA_SUFFIX:
            return f"LoRA {name}: unknown format: not a {LORA_SUFFIX} file (pickled .pt / .ckpt files are not read)"
        return None


@dataclass(frozen=True)
class JobSpec:
    image: str  # path of the start image
    # one prompt, or prompts over time: "[0s: a woman waves] [2.4s: she smiles]" (prompts.py: each change lands at
    # the nearest section boundary)
    prompt: str
    negative: str = ""  # used only when cfg > 1
    seconds: float = 5.0  # requested length; rounded to whole sections of 36 frames (1.2 s)
    seed: int = 31337  # -1 picks one at random (recorded in the output's settings)
    steps: int = 25
    gs: float = 10.0  # distilled guidance, fed to the model as gs * 1000
    cfg: float = 1.0  # real classifier-free guidance; 1 = off (one model call per step)
    rs: float = 0.0  # CFG rescale, only with cfg > 1
    resolution: int = 640  # bucket scale: 640 is the official ~640x640-pixel area; 64-256 for tests and drafts
    sampler: str = "unipc"
    teacache: bool = True
    teacache_threshold: float = 0.15
    crf: int = 16  # x264 quality; 0 is lossless but browsers can't play it, so 1 is the minimum
    # Later sections decode their 9 new latents after 3 older ones (12, not the official 18): 0.64x the decode time, 56
    # dB PSNR against the official decode of the same latents (docs/benchmarks.md, "Context decode of 12 latents").
    # False: official.
    fast_decode: bool = True
    section_state: str = "all"  # SECTION_STATE: every section's latents (3.5 MB each at 640 px), or resume's 3
    # sections over which a prompt change blends from the previous prompt (prompts.py); 0: it switches at once
    prompt_blend_sections: int = 0
    loras: tuple[LoraChoice, ...] = ()  # applied to the video model (transformer), in this order

    @property
    def sections(self) -> int:
        return section_count(self.seconds)

    @property
    def frames(self) -> int:
        return frame_count(self.sections)

    def with_seed(self) -> "JobSpec":
        """This spec with -1 replaced by a concrete random seed, so the output can record it."""
        if self.seed == -1:
            return replace(self, seed=random.SystemRandom().randint(0, SEED_MAX))
        return self

    def validate(self, image_required: bool = True) -> "JobSpec":
        """Raise InputError naming the first bad field and its range; return self when all are fine.
        `image_required`: False for a job continued from saved sections or a video (Continuation), which has its
        start latent already; an image it names must still be there."""
        checks = [
            (isinstance(self.prompt, str), "prompt must be text"),
            (self.seed == -1 or 0 <= self.seed <= SEED_MAX, f"seed must be -1 (random) or 0 to {SEED_MAX}"),
            (_finite(self.seconds) and 0 < self.seconds <= 120, "seconds must be more than 0 and at most 120"),
            (1 <= self.steps <= 100, "steps must be 1 to 100"),
            (_finite(self.gs) and 0 <= self.gs <= 32, "gs (distilled guidance) must be 0 to 32"),
            (_finite(self.cfg) and 1 <= self.cfg <= 32, "cfg must be 1 (off) to 32"),
            (_finite(self.rs) and 0 <= self.rs <= 1, "rs (CFG rescale) must be 0 to 1"),
            (64 <= self.resolution <= 1280, "resolution must be 64 to 1280"),
            (self.sampler in SAMPLERS, f"sampler must be one of {', '.join(SAMPLERS)}"),
            (_finite(self.teacache_threshold) and 0 <= self.teacache_threshold <= 1,
             "teacache threshold must be 0 to 1"),
            (1 <= self.crf <= 51, "crf must be 1 to 51 (0, lossless, does not play in browsers)"),
            (isinstance(self.fast_decode, bool), "fast_decode must be true or false"),
            (self.section_state in SECTION_STATE, f"section_state must be one of {', '.join(SECTION_STATE)}"),
            (_whole(self.prompt_blend_sections) and 0 <= self.prompt_blend_sections <= MAX_BLEND_SECTIONS,
             f"prompt blend must be 0 (off) to {MAX_BLEND_SECTIONS} sections"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        self.prompt_schedule()  # times that parse, in order, within the video
        for choice in self.loras:
            if not isinstance(choice, LoraChoice):
                raise InputError("loras must be LoRA choices (a file and a strength)")
            problem = choice.problem()
            if problem:
                raise InputError(problem)
        if (image_required or self.image) and not Path(self.image).is_file():
            raise InputError(f"image not found: {self.image}")
        return self

    def prompt_schedule(self):
        """The prompt's changes (prompts.PromptChange list; one at 0 s for a plain prompt); InputError (one line)
        for a malformed or impossible timed prompt."""
        from .prompts import schedule  # prompts reads this module's constants

        return schedule(self.prompt, self.sections)

    def section_prompts(self):
        """What each section is conditioned on (prompts.SectionPrompt list)."""
        from .prompts import section_prompts

        return section_prompts(self.prompt_schedule(), self.sections, self.prompt_blend_sections)

    def settings(self) -> dict:
        """The settings recorded beside the output (sidecar JSON and MP4 metadata)."""
        return asdict(self)

    @classmethod
    def from_settings(cls, settings: dict, **overrides) -> "JobSpec":
        """The job recorded settings describe (a settings file, a queued job's record, a section state), not yet
        validated: their known fields, with the LoRA choices (recorded as {"path", "strength"} objects) made
        choices again. A malformed LoRA entry raises TypeError, as a wrong field would."""
        values = {f.name: settings[f.name] for f in fields(cls) if f.name in settings}
        if isinstance(values.get("loras"), (list, tuple)):
            values["loras"] = tuple(c if isinstance(c, LoraChoice) else LoraChoice(**c) for c in values["loras"])
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class Continuation:
    """A job that starts from what an earlier one made rather than from its image alone (engine/continuation.py).

    resume: `video` is an interrupted or stopped output; its saved sections are continued to its planned length,
    in the same file. branch: `video`'s sections before `from_section` (1-based) are kept and the rest made anew,
    as a new output. extend: `video` (a past output, or any video) is continued by the job's `seconds`, as a new
    output holding the whole video.
    """
    kind: str  # CONTINUATIONS
    video: str
    from_section: int | None = None  # branch only

    def validate(self) -> "Continuation":
        if self.kind not in CONTINUATIONS:
            raise InputError(f"continuation must be one of {', '.join(CONTINUATIONS)}")
        if not Path(self.video).is_file():
            raise InputError(f"video not found: {self.video}")
        if self.kind == "branch" and (not isinstance(self.from_section, int) or self.from_section < 1):
            raise InputError("the section to branch from must be 1 or more")
        return self


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
