"""Which step cache a job runs with (off, TeaCache, MagCache), and MagCache's calibrations on disk.

A calibration (`cache_calibrate`) is one full uncached run that records the magnitude ratios of the user's own model
and settings; it is stored under `models/.cache/magcache/`, keyed by what changes the ratios: the model files, the
step count, the resolution bucket, fp8 storage and the LoRA set. A later MagCache job with the same key uses it;
without one, the ratios published for F1 (magcache_f1_ratios.json). A calibration file that cannot be read, or that
was made for other settings than its name says, stops the job before anything loads, in one line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..sidecar import atomic_write_bytes
from ..spec import JobSpec
from .magcache import MagCache, apply_magcache, published_ratios, remove_magcache
from .teacache import apply_teacache, remove_teacache

log = logging.getLogger(__name__)

CALIBRATION_FOLDER = Path(".cache") / "magcache"  # under the models folder
CALIBRATION_VERSION = 1
PUBLISHED = "published F1 ratios (MagCache4FramePack)"


@dataclass(frozen=True)
class MagRatios:
    """The ratios a MagCache job uses and where they come from (recorded with the job's settings)."""
    ratios: tuple[float, ...]
    source: str  # PUBLISHED, or the calibration file's path


def calibration_key(spec: JobSpec, height: int, width: int, record: dict | None) -> dict:
    """What the ratios depend on beyond the method: the model files (weights.layout.model_fingerprint, from the
    worker's record), the steps, the resolution bucket, fp8 storage and the LoRA set (file, size, strength)."""
    record = record or {}
    memory = record.get("memory") if isinstance(record.get("memory"), dict) else {}
    loras = []
    for choice in spec.loras:
        path = Path(str(choice.path))
        try:
            size = path.stat().st_size
        except OSError:
            size = None
        loras.append([path.name, size, float(choice.strength)])
    model_files = {name: value for name, value in (record.get("model_files") or {}).items()
                   if name.startswith("transformer/")}  # the VAE does not change the ratios
    return {"model_files": model_files, "steps": spec.steps, "height": height, "width": width,
            "fp8": memory.get("transformer_storage") == "fp8", "loras": loras}


def calibration_path(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(folder) / f"f1-{key['steps']}steps-{key['width']}x{key['height']}-{digest}.json"


def load_calibration(folder: Path | None, key: dict) -> MagRatios | None:
    """The stored calibration for `key`, or None where there is none; InputError (one line) for a file that
    cannot be read or was made for other settings."""
    if folder is None:
        return None
    path = calibration_path(folder, key)
    if not path.is_file():
        return None
    remedy = "delete it, or run the job again with cache calibration to remake it"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ratios = tuple(float(r) for r in data["ratios"])
        made_for = data["key"]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise InputError(f"MagCache calibration {path} cannot be read ({exc.__class__.__name__}): {remedy}") from None
    if made_for != key:
        differ = sorted(name for name in set(key) | set(made_for or {}) if (made_for or {}).get(name) != key.get(name))
        raise InputError(f"MagCache calibration {path} was made for other settings ({', '.join(differ)}): {remedy}")
    if len(ratios) != key["steps"] or not all(0 < r < 100 for r in ratios):
        raise InputError(f"MagCache calibration {path} holds no valid ratio per step: {remedy}")
    return MagRatios(ratios, str(path))


def save_calibration(folder: Path, key: dict, ratios: tuple[float, ...]) -> Path:
    path = calibration_path(folder, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": CALIBRATION_VERSION, "what": "MagCache magnitude ratios measured by cache calibration",
            "key": key, "ratios": [round(r, 6) for r in ratios]}
    atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
    return path


def mag_ratios(spec: JobSpec, height: int, width: int, record: dict | None,
               folder: Path | None) -> MagRatios | None:
    """The ratios a job's MagCache uses: none for another method or a calibration run, this key's calibration
    where one is stored, else the published ones. Checked before anything loads (InputError)."""
    if spec.cache_method != "magcache":
        return None
    if spec.cache_calibrate:
        if folder is None:
            raise InputError("cache calibration needs a models folder to keep the ratios in")
        return None
    stored = load_calibration(folder, calibration_key(spec, height, width, record))
    return stored or MagRatios(published_ratios(), PUBLISHED)


def attach(transformer, spec: JobSpec, ratios: MagRatios | None):
    """The job's step cache hooked onto the transformer's blocks (None for `off`)."""
    method = spec.cache_method
    if method == "teacache":
        return apply_teacache(transformer, spec.teacache_threshold)
    if method == "magcache":
        cache = MagCache(ratios.ratios if ratios else published_ratios(), spec.magcache_threshold,
                         spec.magcache_max_skip_steps, spec.magcache_retention_ratio, calibrate=spec.cache_calibrate)
        return apply_magcache(transformer, cache)
    return None


def detach(transformer, cache) -> None:
    if isinstance(cache, MagCache):
        remove_magcache(transformer)
    elif cache is not None:
        remove_teacache(transformer)


def record_of(spec: JobSpec, ratios: MagRatios | None) -> dict:
    """What the settings file says about the step cache beyond the spec's own fields."""
    if spec.cache_method != "magcache":
        return {"cache_method": spec.cache_method}
    source = "calibrating (no steps skipped)" if spec.cache_calibrate else ratios.source if ratios else PUBLISHED
    return {"cache_method": "magcache", "magcache_ratios": source}


def default_calibration_folder(models_dir: str | os.PathLike) -> Path:
    return Path(models_dir) / CALIBRATION_FOLDER
