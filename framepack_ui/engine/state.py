"""Saved section state: what continuing a video from one of its sections needs, written beside it as the job goes.

`clip.mp4` gets `clip.state/` (sidecar.state_path):

    inputs.safetensors        the start latent (1, 16, 1, h, w), SigLIP's features (1, 729, 1152) and the embeddings
                              of every prompt the sections use (prompt_0_*, prompt_1_*... in state.json's "prompts"
                              order; and the negative prompt's, with real CFG): a resume loads no encoder
    section_0001.safetensors  per section: its 9 new latents (1, 16, 9, h, w) in float32, exactly as sampled, and
                              the section-noise generator's state after it (5 KB)
    state.json                the settings, the model files' fingerprint, the size, the prompts over time ("prompts":
                              the distinct texts; "section_prompts": per section of the output an index into them,
                              and while blending the index blended from and the weight), and per section the frames
                              the video holds for good once it is written (SectionSaved's frames_on_disk); written
                              last: a section counts once listed

Every file is written to a temporary name and moved into place (os.replace), so a job killed at any moment leaves
the state of its last finished section. Sizes at 640 px (640x608, latents 80x76): a section 3.5 MB
(16 x 9 x 80 x 76 x 4 bytes), the inputs 3.8 MB plus 16 KB per prompt token (SigLIP 3.4 MB, the start latent
0.4 MB); a 60 s video (50 sections) about 180 MB. `JobSpec.section_state = "resume"` keeps only the newest
RESUME_SECTIONS sections' latents (10.5 MB at 640 px), enough to resume, not to branch from an earlier section.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from ..errors import InputError
from ..prompts import SectionPrompt, distinct_prompts
from ..sidecar import atomic_write_bytes, state_path
from ..spec import LATENT_WINDOW
from .sections import HISTORY_SIZES
from .text import PromptEmbeds

log = logging.getLogger(__name__)

STATE_FORMAT = 2  # 2: prompts over time (one embedding per distinct prompt), frames_on_disk per section
MANIFEST = "state.json"
INPUTS = "inputs.safetensors"
# The newest sections a resume reads: the 19 history latents (sections.HISTORY_SIZES) span 3 sections of 9
RESUME_SECTIONS = -(-sum(HISTORY_SIZES) // LATENT_WINDOW)


def section_file(section: int) -> str:
    """The file of a section (0-based) as the user counts it: section_0001.safetensors is the first."""
    return f"section_{section + 1:04d}.safetensors"


def plan_record(plan: list[SectionPrompt]) -> dict:
    """state.json's record of each section's prompt: the distinct texts once, then per section their indexes."""
    texts = distinct_prompts(plan)
    index = {prompt: i for i, prompt in enumerate(texts)}
    return {"prompts": texts,
            "section_prompts": [{"prompt": index[p.prompt], "blend_from": None if p.blend_from is None else
                                 index[p.blend_from], "weight": p.weight} for p in plan]}


def prompt_tensors(plan: list[SectionPrompt], prompts: dict[str, PromptEmbeds],
                   negative: PromptEmbeds | None) -> dict[str, torch.Tensor]:
    """inputs.safetensors' prompt embeddings: prompt_{i}_* for the i-th of plan_record's texts, negative_*."""
    tensors = {}
    named = [(f"prompt_{i}", prompts[prompt]) for i, prompt in enumerate(distinct_prompts(plan))]
    for name, embeds in named + ([("negative", negative)] if negative is not None else []):
        tensors.update({f"{name}_llama": embeds.llama, f"{name}_llama_mask": embeds.llama_mask,
                        f"{name}_clip_pooled": embeds.clip_pooled})
    return tensors


def _embeds(tensors: dict[str, torch.Tensor], name: str) -> PromptEmbeds:
    return PromptEmbeds(tensors[f"{name}_llama"], tensors[f"{name}_llama_mask"], tensors[f"{name}_clip_pooled"])


def tensors_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors_bytes({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


class SectionStore:
    """Writes a job's state folder as its sections are made.

    `section_sampled` (the job's thread) writes a section's latents and generator state as soon as it is sampled;
    `section_saved` (the encoder thread, once the section's frames are in the video) lists it in state.json. Only
    then does it count, with the frames the video holds then for sure (`frames_on_disk`: the MP4 muxer keeps the
    newest packet in memory), which is what a resume copies.
    """

    def __init__(self, video: Path, keep: str, header: dict, writing: str | None = None,
                 plan: list[SectionPrompt] = ()):
        """`video`: the output; `writing`: the file its frames go to now, if another (a resume's, until it is
        moved into place): state.json names it from the first section this job adds. `plan`: each section's
        prompt (prompts.SectionPrompt), every section of the output."""
        self.folder = state_path(video)
        self.keep = keep
        self.writing = writing or video.name
        self.manifest = {"format": STATE_FORMAT, "video": video.name, **header, **plan_record(list(plan)),
                         "sections": []}
        self._lock = threading.Lock()

    def begin(self, inputs: dict[str, torch.Tensor] | None, kept: list[dict] | None = None,
              kept_from: Path | None = None) -> None:
        """Start (or, for a resume, take up) the folder. `inputs`: the encoders' outputs to write (None: the folder
        has them already). `kept`: state.json entries of the sections before the first one this job makes, whose
        files are in `kept_from` (another output's state folder, for a branch or an extension) or here already."""
        if inputs is not None and self.folder.is_dir():  # an older output's state under this name: not this one's
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if inputs is not None:
            atomic_write_bytes(self.folder / INPUTS, tensors_bytes(inputs))
        entries = []
        for entry in kept or []:
            if entry["file"] and kept_from is not None and kept_from != self.folder:
                _link_or_copy(kept_from / entry["file"], self.folder / entry["file"])
            entries.append(dict(entry))
        with self._lock:
            self.manifest["sections"] = entries
            self._drop_old()
            self._commit()

    def section_sampled(self, section: int, latents: torch.Tensor, generator_state: torch.Tensor) -> None:
        """The section's new latents (1, 16, 9, h, w), float32 on the CPU as the loop keeps them: written as they
        are (no copy beyond safetensors' bytes)."""
        atomic_write_bytes(self.folder / section_file(section),
                           tensors_bytes({"latents": latents, "generator": generator_state}))

    def section_saved(self, section: int, frames_on_disk: int) -> None:
        with self._lock:
            sections = self.manifest["sections"]
            if section != len(sections):
                raise RuntimeError(f"section {section + 1} saved after {len(sections)}")
            sections.append({"file": section_file(section), "frames_on_disk": int(frames_on_disk)})
            self.manifest["video"] = self.writing
            dropped = self._drop_old()
            self._commit()
        for name in dropped:  # after state.json no longer names them
            (self.folder / name).unlink(missing_ok=True)

    def set_video(self, name: str) -> None:
        """The file that holds the frames (a resume writes a new file beside the old one, then moves it)."""
        with self._lock:
            self.manifest["video"] = name
            self._commit()

    def _drop_old(self) -> list[str]:
        if self.keep != "resume":
            return []
        dropped = []
        for entry in self.manifest["sections"][:-RESUME_SECTIONS]:
            if entry["file"]:
                dropped.append(entry["file"])
                entry["file"] = None
        return dropped

    def _commit(self) -> None:
        text = json.dumps(self.manifest, indent=1, sort_keys=True) + "\n"
        atomic_write_bytes(self.folder / MANIFEST, text.encode("utf-8"))


def _link_or_copy(source: Path, dest: Path) -> None:
    """A kept section's file in the new output's folder: a hard link (no bytes copied) where the disk allows."""
    dest.unlink(missing_ok=True)
    try:
        os.link(source, dest)
    except OSError:
        tmp = dest.with_name(f".{dest.name}.tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, dest)


@dataclass
class SavedState:
    """A video's state folder, read and checked (load_state)."""
    video: Path  # the output the folder belongs to
    folder: Path
    manifest: dict

    @property
    def sections_done(self) -> int:
        return len(self.manifest["sections"])

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def size(self) -> tuple[int, int]:
        return self.manifest["width"], self.manifest["height"]

    def entry(self, section: int) -> dict:
        return self.manifest["sections"][section]

    def frames_file(self) -> Path:
        """The video that holds the frames state.json counts: the one it names, or the output itself (a resume
        killed after moving its new file into place and before saying so)."""
        named = self.folder.parent / self.manifest.get("video", self.video.name)
        return named if named.is_file() else self.video

    def kept_sections(self, first: int, last: int) -> None:
        """InputError unless the latents of sections first..last-1 (0-based) were kept."""
        for section in range(max(first, 0), last):
            if not self.entry(section)["file"]:
                raise InputError(f"section {section + 1} of {self.video.name} was not kept (its section state "
                                 f"kept only the newest {RESUME_SECTIONS} sections, enough to resume)")

    def inputs(self) -> dict[str, torch.Tensor]:
        return _read(self.folder / INPUTS, self.video)

    def section_plan(self) -> list[SectionPrompt]:
        """What each section of the video was (or, not made yet, is planned to be) conditioned on."""
        texts = self.manifest["prompts"]
        return [SectionPrompt(texts[p["prompt"]], None if p["blend_from"] is None else texts[p["blend_from"]],
                              float(p["weight"])) for p in self.manifest["section_prompts"]]

    def prompt_embeds(self, inputs: dict[str, torch.Tensor]) -> dict[str, PromptEmbeds]:
        """Every saved prompt's embeddings by its text, from `inputs` (self.inputs())."""
        return {prompt: _embeds(inputs, f"prompt_{i}") for i, prompt in enumerate(self.manifest["prompts"])}

    def negative_embeds(self, inputs: dict[str, torch.Tensor]) -> PromptEmbeds | None:
        return _embeds(inputs, "negative") if "negative_llama" in inputs else None

    def section(self, section: int) -> dict[str, torch.Tensor]:
        return _read(self.folder / self.entry(section)["file"], self.video)


def load_state(video: str | os.PathLike[str]) -> SavedState:
    """The saved state of `video`, its files checked whole; InputError (one line) where it is missing, truncated
    or unreadable."""
    video = Path(video)
    folder = state_path(video)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise InputError(f"{video.name} has no saved section state ({folder.name}/{MANIFEST} is missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        sections = manifest["sections"]
        if manifest.get("format") != STATE_FORMAT or not isinstance(sections, list):
            raise ValueError("unknown format")
        int(manifest["width"]), int(manifest["height"]), dict(manifest["settings"])
        texts, plan = manifest["prompts"], manifest["section_prompts"]
        if not isinstance(texts, list) or not isinstance(plan, list) or not all(
                0 <= p["prompt"] < len(texts) and (p["blend_from"] is None or 0 <= p["blend_from"] < len(texts))
                for p in plan):
            raise ValueError("bad prompts")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"the saved state of {video.name} is unreadable ({MANIFEST}: {exc.__class__.__name__})") \
            from exc
    saved = SavedState(video, folder, manifest)
    _check_whole(folder / INPUTS, video)
    for entry in sections:
        if entry.get("file"):
            _check_whole(folder / entry["file"], video)
    return saved


def _check_whole(path: Path, video: Path) -> None:
    """The file is there and every tensor its header names lies within it (a truncated file fails here)."""
    if not path.is_file():
        raise InputError(f"the saved state of {video.name} is incomplete: {path.name} is missing")
    try:
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_size))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        whole = path.stat().st_size >= 8 + header_size + end
    except (OSError, ValueError, KeyError, TypeError):
        whole = False
    if not whole:
        raise InputError(f"the saved state of {video.name} is damaged: {path.name} is truncated or unreadable")


def _read(path: Path, video: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as exc:
        raise InputError(f"the saved state of {video.name} is damaged: {path.name} is unreadable") from exc


def check_models(saved: SavedState, model_files: dict | None) -> None:
    """InputError where the state was made with other transformer or VAE files than `model_files`
    (weights.layout.model_fingerprint) names; None on either side (a test's lender) skips the check."""
    made_with = saved.manifest.get("model_files")
    if made_with is None or model_files is None or made_with == model_files:
        return
    changed = sorted(k for k in set(made_with) | set(model_files) if made_with.get(k) != model_files.get(k))
    raise InputError(f"{saved.video.name} was made with other model files ({', '.join(changed[:2])}): its sections "
                     f"cannot be continued with these")
