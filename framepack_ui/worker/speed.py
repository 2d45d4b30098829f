"""How long a job will take, before it starts: from this machine's own measured speed, or the card's known figures.

Each finished job's timeline (timeline.py) gives its speed: seconds per model call per step (a step makes one call,
two with CFG) and per section decode (the median of the sections after the first), what the first section took
more (a compile, the VAE's load), the time before the first section (starting, planning, encoding the prompt and the
image, loading the video model) and after the last (writing). They are kept per machine, memory profile and storage
asked (`machine_key`) in `.cache/speed.json` in the outputs folder, the newest MAX_RECORDS of each.

The model: a step's time grows with the latent tokens a section samples (9 latent frames of (H/16) x (W/16) tokens;
the history's tokens grow with the same area), so with jobs measured at two or more sizes the time per call is a
line a + b * tokens fitted to them; with one size it is taken as proportional to the tokens (compute-bound, as on a
GPU at real sizes). A decode scales with the pixels the same way. The time before and after the sections and the
first section's extra are the median of the jobs measured (the first job of an app run also imports the libraries:
it weighs in).
TeaCache skips calls, so jobs measured with the same TeaCache setting are preferred. Pure, apart from the book's
file: the UI asks the worker, which asks here.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..sidecar import atomic_write_bytes
from ..spec import LATENT_WINDOW, JobSpec
from .timeline import SECTION_FIELDS

SPEED_FILE = ".cache/speed.json"  # in the outputs folder, out of the way of its settings files
MAX_RECORDS = 20  # per machine key: the newest jobs (a driver or library update changes the speed)
UNKNOWN = "unknown until the first job on this machine"


@dataclass(frozen=True)
class JobShape:
    """What a job's time depends on."""
    sections: int
    steps: int
    resolution: int  # the bucket's area is about resolution x resolution pixels, whatever the image's aspect
    cfg: float = 1.0
    teacache: float = 0.0  # its threshold; 0: off

    @classmethod
    def of(cls, spec: JobSpec) -> "JobShape":
        return cls(spec.sections, spec.steps, spec.resolution, spec.cfg,
                   spec.teacache_threshold if spec.teacache else 0.0)

    @property
    def tokens(self) -> float:
        """Latent tokens of a section's new frames: 9 frames of (H/8 / 2) x (W/8 / 2) after the 2x2 patches."""
        return LATENT_WINDOW * (self.resolution / 16) ** 2

    @property
    def pixels(self) -> float:
        return float(self.resolution) ** 2

    @property
    def calls_per_step(self) -> int:
        return 2 if self.cfg != 1 else 1  # real CFG runs the model on the negative prompt too


@dataclass(frozen=True)
class Measured:
    """One finished job's speed (from its timeline)."""
    tokens: float
    pixels: float
    teacache: float
    call_s: float  # seconds per model call in a step (the median later section's sampling / steps / calls)
    decode_s: float  # seconds per section decode (the median later section's)
    before_s: float  # from the job's start to its first section's sampling
    after_s: float  # from the last section's decode to the job's end (the last encode, closing the file)
    first_extra_s: float  # what the first section took more than a later one (warm-up, the VAE's load...)


def measure(timeline: dict, shape: JobShape) -> Measured | None:
    """The speed a finished job's timeline shows; None when it has no whole section."""
    rows = [s for s in timeline.get("sections") or []
            if all(isinstance(s.get(k), (int, float)) for k in SECTION_FIELDS)]
    ended = timeline.get("ended_s")
    if not rows or not isinstance(ended, (int, float)):
        return None
    calls = shape.steps * shape.calls_per_step
    later = rows[1:] or rows  # the first section also warms up (compiles, loads the VAE): its extra is apart
    call_s = statistics.median((s["sampling_end_s"] - s["sampling_start_s"]) / calls for s in later)
    decode_s = statistics.median(s["decode_end_s"] - s["decode_start_s"] for s in later)
    first = rows[0]
    first_s = first["sampling_end_s"] - first["sampling_start_s"] + first["decode_end_s"] - first["decode_start_s"]
    return Measured(shape.tokens, shape.pixels, shape.teacache, max(call_s, 0.0), max(decode_s, 0.0),
                    max(first["sampling_start_s"], 0.0), max(ended - rows[-1]["decode_end_s"], 0.0),
                    max(first_s - calls * call_s - decode_s, 0.0))


@dataclass(frozen=True)
class Estimate:
    """The expected time of a job, in parts, and where the figures come from (in words)."""
    total_s: float | None  # None: unknown
    source: str
    sampling_s: float | None = None
    decode_s: float | None = None
    other_s: float | None = None  # before the first section, after the last, the first section's warm-up; None:
    # not known for this source
    note: str = ""  # what the figure leaves out, or how its source differs from the job


@dataclass(frozen=True)
class KnownFigures:
    """A card's measured figures (docs/benchmarks.md), for the first job on such a card."""
    gpu: str  # found in the GPU's name
    profiles: tuple[str, ...]  # the memory profiles the figures hold for on that card
    step_s: float
    tokens: float  # of the benchmark's 640x608 bucket: 9 x 38 x 40
    section_s: float  # a whole later section: its 25 steps, its decode and what the encode adds
    source: str


BENCH_TOKENS = LATENT_WINDOW * (608 / 16) * (640 / 16)
BENCH_STEPS = 25
KNOWN_FIGURES = (
    KnownFigures("H200", ("auto", "gpu"), 0.871, BENCH_TOKENS, 24.27,
                 'docs/benchmarks.md, "Current figures per machine profile", row 1 (H200, everything on the GPU)'),
    KnownFigures("H200", ("streamed",), 0.878, BENCH_TOKENS, 24.50,
                 'docs/benchmarks.md, "Current figures per machine profile", row 4 (H200 limited to 8 GB)'),
)


def machine_key(device: str, profile: str, storage: str) -> str:
    """`device`: the GPU's name, or "cpu"; `storage`: what the job asked for the video model (auto, bf16, fp8)."""
    return f"{device}|{profile}|{storage}"


def estimate(book: dict, key: str, shape: JobShape) -> Estimate:
    """The expected time of a job of `shape` under `key` (machine_key): from the jobs measured under that key, else
    under another profile or storage of the same machine (the newest, and the source says what differs), else the
    card's known figures, else unknown."""
    device, profile, storage = key.split("|", 2)
    records = _records(book, key)
    source = f"measured on this machine ({len(records)} job{'s' if len(records) != 1 else ''}, profile {profile})"
    if not records:
        others = [k for k in book if k.startswith(f"{device}|")]
        if others:
            records = _records(book, others[-1])
            _, other_profile, other_storage = others[-1].split("|", 2)
            differs = ([f"profile {other_profile}, not {profile}"] if other_profile != profile else []) + \
                      ([f"{other_storage} storage asked, not {storage}"] if other_storage != storage else [])
            source = "measured on this machine with " + " and ".join(differs)
    if records:
        return _from_records(records, shape, source)
    return _from_known_figures(device, profile, shape)


def _from_records(records: list[Measured], shape: JobShape, source: str) -> Estimate:
    same = [r for r in records if abs(r.teacache - shape.teacache) < 1e-6]
    note = ""
    if not same:
        note = (f"measured with TeaCache {'off' if not records[-1].teacache else 'on'}: "
                f"{'less' if shape.teacache else 'more'} time expected")
    used = same or records
    call_s = _line([(r.tokens, r.call_s) for r in used], shape.tokens)
    decode_s = _line([(r.pixels, r.decode_s) for r in used], shape.pixels)
    sampling = shape.sections * shape.steps * shape.calls_per_step * call_s
    decoding = shape.sections * decode_s
    other = statistics.median(r.before_s + r.after_s + r.first_extra_s for r in used)
    return Estimate(sampling + decoding + other, source, sampling, decoding, other, note)


def _from_known_figures(device: str, profile: str, shape: JobShape) -> Estimate:
    figures = next((f for f in KNOWN_FIGURES if f.gpu in device and profile in f.profiles), None)
    if figures is None:
        return Estimate(None, UNKNOWN)
    scale = shape.tokens / figures.tokens
    call_s = figures.step_s * scale
    decode_s = (figures.section_s - BENCH_STEPS * figures.step_s) * scale
    sampling = shape.sections * shape.steps * shape.calls_per_step * call_s
    decoding = shape.sections * decode_s
    note = "plus loading the models and, on the first job, compiling (about 24 s)"
    if shape.teacache:
        note += "; measured with TeaCache off: less time expected"
    return Estimate(sampling + decoding, f"{figures.source}", sampling, decoding, None, note)


def _line(points: list[tuple[float, float]], x: float) -> float:
    """y at x on the line through `points` (least squares, a + b x with a, b >= 0); through the origin when the
    points have one x only."""
    xs = {p[0] for p in points}
    if len(xs) < 2:
        return statistics.mean(y / px for px, y in points) * x if x else 0.0
    mean_x = statistics.mean(p[0] for p in points)
    mean_y = statistics.mean(p[1] for p in points)
    b = (sum((px - mean_x) * (py - mean_y) for px, py in points)
         / sum((px - mean_x) ** 2 for px, _ in points))
    a = mean_y - b * mean_x
    if b < 0:  # slower at fewer tokens: noise; the mean is the best guess
        return mean_y
    if a < 0:  # a line through the origin then
        return sum(px * py for px, py in points) / sum(px * px for px, _ in points) * x
    return a + b * x


def _records(book: dict, key: str) -> list[Measured]:
    names = {f.name for f in fields(Measured)}
    out = []
    for entry in book.get(key) or []:
        try:
            out.append(Measured(**{name: float(entry[name]) for name in names}))
        except (KeyError, TypeError, ValueError):
            continue  # a record from another version of the app
    return out


def read_book(path: Path) -> dict:
    """{machine key: [Measured as dict...]}; {} when the file is missing or unreadable."""
    try:
        book = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return book if isinstance(book, dict) else {}


def add_to_book(path: Path, key: str, measured: Measured) -> dict:
    """Keep one more job's speed (the newest MAX_RECORDS per key) and return the book."""
    book = read_book(path)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    kept = book.pop(key, None)  # re-inserted last: the newest key is the one another profile falls back to
    book[key] = [*(kept if isinstance(kept, list) else []), asdict(measured)][-MAX_RECORDS:]
    atomic_write_bytes(Path(path), (json.dumps(book, indent=1) + "\n").encode("utf-8"))
    return book
