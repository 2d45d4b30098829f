"""Where each model component lives under `models/`: the real Hugging Face folder layout.

One folder per repository (`models/<owner>/<repo>/`), keeping the repository's own subfolders, so the
same tree can be filled by a download, by hand from an existing Hugging Face cache, or by
`make-tiny-models`. Only the subfolders the app uses are listed: the HunyuanVideo repository also holds a
25 GB transformer that FramePack never reads.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelFilesError
from ..units import GB

DOWNLOAD_COMMAND = "python -m framepack_ui download"  # what the one-line messages tell the user to run
LORAS_DIR = "loras"  # models/loras/: the LoRA files the web app offers (any path works on the command line)

HUNYUAN_REPO = "hunyuanvideo-community/HunyuanVideo"
REDUX_REPO = "lllyasviel/flux_redux_bfl"
F1_REPO = "lllyasviel/FramePack_F1_I2V_HY_20250503"


@dataclass(frozen=True)
class Component:
    name: str  # our name for it, used in logs, plans and errors
    repo: str  # Hugging Face repository id
    subfolder: str  # "" = repository root
    files: tuple[str, ...]  # every file the loader reads, relative to the subfolder
    approx_bytes: int  # size on disk of the real weights, for plans and download space checks

    def folder(self, models_dir: Path) -> Path:
        root = Path(models_dir) / self.repo
        return root / self.subfolder if self.subfolder else root

    def missing_files(self, models_dir: Path) -> list[Path]:
        folder = self.folder(models_dir)
        return [folder / f for f in self.files if not (folder / f).is_file()]


def _shards(stem: str, count: int, ext: str = "safetensors") -> tuple[str, ...]:
    return tuple(f"{stem}-{i:05d}-of-{count:05d}.{ext}" for i in range(1, count + 1))



COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("text_encoder", HUNYUAN_REPO, "text_encoder",
                  ("config.json", "model.safetensors.index.json", *_shards("model", 4)), int(15.0 * GB)),
        Component("text_encoder_2", HUNYUAN_REPO, "text_encoder_2",
                  ("config.json", "model.safetensors"), int(0.246 * GB)),
        Component("tokenizer", HUNYUAN_REPO, "tokenizer",
                  ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"), int(0.017 * GB)),
        Component("tokenizer_2", HUNYUAN_REPO, "tokenizer_2",
                  ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"), int(0.002 * GB)),
        Component("vae", HUNYUAN_REPO, "vae",
                  ("config.json", "diffusion_pytorch_model.safetensors"), int(0.986 * GB)),
        Component("feature_extractor", REDUX_REPO, "feature_extractor",
                  ("preprocessor_config.json",), 400),
        Component("image_encoder", REDUX_REPO, "image_encoder",
                  ("config.json", "model.safetensors"), int(0.857 * GB)),
        Component("transformer", F1_REPO, "",
                  ("config.json", "diffusion_pytorch_model.safetensors.index.json",
                   *_shards("diffusion_pytorch_model", 3)), int(25.7 * GB)),
    )
}


def missing(models_dir: Path, names: tuple[str, ...] | None = None) -> dict[str, list[Path]]:
    """Components (by name) with the files they lack; empty when everything is in place."""
    result = {}
    for name in names or tuple(COMPONENTS):
        lacking = COMPONENTS[name].missing_files(models_dir)
        if lacking:
            result[name] = lacking
    return result


# Saved section state (engine/state.py) is continued only with the transformer and VAE it was made with: they
# are told apart by each weight file's size and a hash of its first and last MiB (the safetensors header and some
# weights; the whole 26 GB would take minutes to hash).
FINGERPRINT_COMPONENTS = ("transformer", "vae")
FINGERPRINT_SPAN_BYTES = 1 << 20


def model_fingerprint(models_dir: Path) -> dict[str, str]:
    """{"transformer/diffusion_pytorch_model-00001-of-00003.safetensors": "<size>:<sha256 of its ends>", ...};
    files that are missing are left out."""
    result = {}
    for name in FINGERPRINT_COMPONENTS:
        component = COMPONENTS[name]
        for file in component.files:
            path = component.folder(models_dir) / file
            try:
                stat = path.stat()
            except OSError:
                continue
            result[f"{name}/{file}"] = _file_fingerprint(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return result


@functools.lru_cache(maxsize=64)  # each file read once per process while it is unchanged
def _file_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(FINGERPRINT_SPAN_BYTES))
        f.seek(max(0, size - FINGERPRINT_SPAN_BYTES))
        digest.update(f.read(FINGERPRINT_SPAN_BYTES))
    return f"{size}:{digest.hexdigest()[:32]}"


def check_small_files(models_dir: Path, names: tuple[str, ...] | None = None) -> None:
    """Raise ModelFilesError naming the first JSON file (configs, shard indexes, tokenizers) of the components that
    is not a JSON object: cheap (the files are small), so a job checks them before any long work, beside the weights'
    safetensors headers (memory/storage.py read_header); a broken config would otherwise fail only when its model
    loads, after the models before it. Missing files are left to `missing`."""
    for name in names or tuple(COMPONENTS):
        folder = COMPONENTS[name].folder(models_dir)
        for file in COMPONENTS[name].files:
            path = folder / file
            if not file.endswith(".json") or not path.is_file():
                continue
            try:
                if not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                    raise ValueError("not a JSON object")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                why = " ".join(str(exc).split())[:80]
                raise ModelFilesError(f"{path} is not readable JSON ({why}): the file is corrupt or incomplete: "
                                      f"delete it and download again ({DOWNLOAD_COMMAND})") from exc
