"""What a job asks for: one frozen dataclass, validated at the boundary (CLI, UI, worker)."""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
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


def section_count(seconds: float) -> int:
    """Sections for a requested length, rounded as the official F1 demo does."""
    return max(round(seconds * FPS / FRAMES_PER_SECTION), 1)


def frame_count(sections: int) -> int:
    """Frames in the video after `sections` sections: the start frame plus 36 per section."""
    return 1 + FRAMES_PER_SECTION * sections


@dataclass(frozen=True)
class JobSpec:
    image: str  # path of the start image
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
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        if (image_required or self.image) and not Path(self.image).is_file():
            raise InputError(f"image not found: {self.image}")
        return self

    def settings(self) -> dict:
        """The settings recorded beside the output (sidecar JSON and MP4 metadata)."""
        return asdict(self)


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


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
