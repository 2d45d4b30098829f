"""Optional fp8 storage of the transformer: e4m3fn weights with one float32 scale per output channel.

Why: the F1 transformer is 25.7 GB in bf16. The Linear weights of its 60 blocks (~97 % of the bytes) stored as
fp8 halve that to about 13 GB, which halves the page cache a CPU run reads, the bytes streamed to the GPU per
step, and the VRAM of the resident blocks. Compute stays in the plan's compute dtype (bf16 on the GPU, float32
on the CPU): each quantized Linear dequantizes its weight just before it runs (compute/fp8_linear.py `Fp8Linear`),
so the fp8 bytes stay read-only-mapped (storage.py) and are never written.

Format: `<linear>.weight` as F8_E4M3 [out, in] and `<linear>.weight_scale` as F32 [out], with
weight ~= fp8.float() * scale[:, None], scale = max|row| / 448 (e4m3fn's largest finite value). Only 2-D weights
of the blocks (`transformer_blocks.N.*`, `single_transformer_blocks.N.*`) with at least MIN_QUANT_NUMEL elements
are quantized; biases, norms, embedders, the token refiner, the output projection and small tensors keep the
source dtype (bf16): they are 3 % of the bytes and the layers most sensitive to rounding.

Cache: converted once, shard by shard, from the bf16 shards into `<transformer folder>/fp8/`, one fp8 shard per
source shard plus an index and `fp8-manifest.json`. Each shard is written to a temporary name, fsynced, verified
(header parse, exact size, sha256 of the file re-read against the sha256 of the bytes written) and only then
renamed; the manifest is written last (also temp + rename) and is what makes the cache valid. A failed
conversion (a full disk, a read error) removes everything it wrote, so nothing half-written looks valid.
Each load checks the manifest against the source shards (size, mtime), and each cache shard's size, header and
a sampled checksum (SAMPLE_BLOCKS blocks of SAMPLE_BYTES spread over the file; the whole file when it is smaller):
a mismatch is logged and the cache rebuilt. Corruption between the sampled blocks of a large file is not seen
by that cheap check: `check_cache(folder, full=True)` hashes everything.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers.hooks import HookRegistry

from ..compute import precision
from ..compute.fp8_linear import FP8_DTYPE, FP8_MAX, SCALE_PARAM, Fp8Linear, is_fp8_linear, row_scales
from ..errors import ModelFilesError
from .storage import DTYPES, HOOK_NAME, MappedFile, UpcastOnForward, load_mapped, read_header, shard_files

log = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale"  # "<linear>.weight" -> "<linear>.weight_scale"
QUANT_KEY = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.\d+\..+\.weight$")
MIN_QUANT_NUMEL = 1024  # smaller weights stay bf16: no saving worth a scale vector
FORMAT_VERSION = 1
CACHE_DIRNAME = "fp8"
MANIFEST_NAME = "fp8-manifest.json"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"
SOURCE_INDEX = "diffusion_pytorch_model.safetensors.index.json"
SOURCE_SINGLE = "diffusion_pytorch_model.safetensors"
CHUNK_BYTES = 16 * 1024 * 1024  # one write call: bounds the transient copy of a converted tensor
SAMPLE_BLOCKS = 16
SAMPLE_BYTES = 1024 * 1024
HASH_READ_BYTES = 8 * 1024 * 1024
TMP_MARK = ".tmp-"
FREE_DISK_MARGIN_BYTES = 256 * 1024 * 1024


def quantizable(name: str, shape: tuple[int, ...], dtype: str) -> bool:
    return (len(shape) == 2 and shape[0] * shape[1] >= MIN_QUANT_NUMEL and bool(QUANT_KEY.match(name))
            and dtype in ("BF16", "F16", "F32"))


def apply_fp8_compute(model: torch.nn.Module, compute_dtype: torch.dtype) -> tuple[int, int]:
    """Make each fp8 Linear an `Fp8Linear` (dequantize per call) and hook each other module with weights of another
    dtype (upcast per call), but an output projection already in fp32 (compute/precision.py): cast to bf16 per call,
    its fp32 input met bf16 weights ("mat1 and mat2 must have the same dtype"). Returns (fp8 Linears, upcast
    modules)."""
    fp8 = upcast = 0
    for module in model.modules():
        if is_fp8_linear(module):
            module.__class__ = Fp8Linear
            module.compute_dtype = compute_dtype
            fp8 += 1
            continue
        if precision.computes_in_fp32(module):
            continue
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if any(p.dtype != compute_dtype for p in own):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(UpcastOnForward(compute_dtype),
                                                                             HOOK_NAME)
            upcast += 1
    return fp8, upcast


def add_scale_params(model: torch.nn.Module, keys) -> int:
    """Give each Linear the files quantized a `weight_scale` parameter (on meta, before load_state_dict) and
    turn its weight into fp8 (meta), so the strict shape/key check and `assign=True` take the cache's tensors.
    Parameters, not buffers: streaming.py streams a block's parameters, so the scales travel with the block."""
    count = 0
    for key in keys:
        if not key.endswith("." + SCALE_PARAM):
            continue
        name = key[: -len("." + SCALE_PARAM)]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, torch.nn.Linear):
            raise ModelFilesError(f"the fp8 cache has '{key}', but '{name}' is not a Linear of this model")
        module.register_parameter(SCALE_PARAM, torch.nn.Parameter(
            torch.empty(module.out_features, dtype=torch.float32, device="meta"), requires_grad=False))
        module.weight = torch.nn.Parameter(torch.empty_like(module.weight, dtype=FP8_DTYPE, device="meta"),
                                           requires_grad=False)
        count += 1
    return count


# --- the cache ---------------------------------------------------------------------------------------------------

def cache_dir(folder: Path) -> Path:
    return Path(folder) / CACHE_DIRNAME


def _write_chunk(fh, data) -> None:
    """Every byte of the cache goes through here (tests inject a full disk at this boundary)."""
    fh.write(data)


def _sample_digest(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            for chunk in iter(lambda: fh.read(HASH_READ_BYTES), b""):
                h.update(chunk)
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):  # the first and last block included: header and tail
                fh.seek(i * step)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_READ_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def _source_files(folder: Path) -> list[Path]:
    return shard_files(folder, SOURCE_INDEX, SOURCE_SINGLE)


def _source_record(path: Path) -> dict:
    st = path.stat()
    return {"name": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _layout(src_entries: dict) -> tuple[list[tuple[str, str, tuple[int, ...], str | None]], dict]:
    """Output tensors (name, dtype, shape, source key of a scale or None) in file order, and the header dict.
    Ordered by descending item size so every tensor starts aligned to its own item size (frombuffer needs it)."""
    out = []
    for name, e in src_entries.items():
        if quantizable(name, e.shape, e.dtype):
            out.append((name, "F8_E4M3", e.shape, None))
            out.append((name + SCALE_SUFFIX, "F32", (e.shape[0],), name))
        else:
            out.append((name, e.dtype, e.shape, None))
    out.sort(key=lambda t: (-DTYPES[t[1]].itemsize, t[0]))
    header, offset = {}, 0
    for name, dtype, shape, _ in out:
        size = DTYPES[dtype].itemsize
        for d in shape:
            size *= d
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return out, header


def _tensor_bytes(t: torch.Tensor):
    """A tensor's raw bytes as a buffer (no copy for a contiguous tensor)."""
    t = t.contiguous()
    if t.numel() == 0:
        return b""
    return t.view(-1).view(torch.uint8).numpy()


def _write_shard(src: Path, dest: Path, written: list[Path], wrote=lambda nbytes: None) -> dict:
    """Convert one source shard into `dest` (temp name, fsync, verify, rename). Returns its manifest record.
    `wrote(nbytes)` is called after each chunk written."""
    mapped = MappedFile(src)
    out, header = _layout(mapped.entries)
    header["__metadata__"] = {"format": "pt", "framepack_fp8": str(FORMAT_VERSION), "source": src.name,
                              "scale": "float32 per output channel, weight = fp8 * scale[:, None]"}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    data_bytes = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    expected_size = 8 + len(raw) + data_bytes
    tmp = dest.with_name(f"{dest.name}{TMP_MARK}{os.getpid()}")
    written.append(tmp)
    digest = hashlib.sha256()
    scales: dict[str, torch.Tensor] = {}
    try:
        with open(tmp, "wb") as fh:
            def put(data):
                digest.update(data)
                _write_chunk(fh, data)
                wrote(len(data))

            put(struct.pack("<Q", len(raw)))
            put(raw)
            for name, dtype, shape, scale_of in out:
                if scale_of is not None:  # F32 scales come first in the file: computed from the source rows
                    scales[scale_of] = row_scales(mapped.tensor(scale_of))
                    t = scales[scale_of]
                elif dtype == "F8_E4M3":
                    src_t = mapped.tensor(name)  # [out, in] bf16, read-only map
                    rows = max(1, CHUNK_BYTES // max(1, shape[1] * 4))  # float32 transient per chunk of rows
                    for r0 in range(0, shape[0], rows):
                        w = src_t[r0:r0 + rows].to(torch.float32)
                        q = (w / scales[name][r0:r0 + rows, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
                        put(_tensor_bytes(q))
                    continue
                else:
                    t = mapped.tensor(name)
                data = _tensor_bytes(t)
                for i in range(0, len(data), CHUNK_BYTES):
                    put(data[i:i + CHUNK_BYTES])
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise _write_error(tmp, exc, dest.parent) from exc
    # verify before the rename: header, size, and the bytes on disk are the bytes written
    size = tmp.stat().st_size
    if size != expected_size:
        raise ModelFilesError(f"{tmp} is {size} bytes after writing, not {expected_size}: the fp8 cache was not kept")
    entries, _ = read_header(tmp)
    if set(entries) != {name for name, *_ in out}:
        raise ModelFilesError(f"{tmp} does not read back with the tensors written: the fp8 cache was not kept")
    sha = digest.hexdigest()
    if _file_digest(tmp) != sha:
        raise ModelFilesError(f"{tmp} reads back different bytes than were written (disk error?): "
                              f"the fp8 cache was not kept")
    os.replace(tmp, dest)
    written.append(dest)
    _fsync_dir(dest.parent)
    return {"name": dest.name, "size": size, "sha256": sha, "sample_sha256": _sample_digest(dest, size),
            "source": src.name, "tensors": [name for name, *_ in out]}


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # Windows cannot open a directory; its renames are durable enough for a cache
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, exc: OSError, folder: Path) -> ModelFilesError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        return ModelFilesError(f"the disk is full: could not write the fp8 cache file {path} "
                               f"({free / 1e9:.1f} GB free); nothing was kept: free some space or store the transformer as bf16 (--no-fp8, or bf16 on the page)")
    return ModelFilesError(f"could not write the fp8 cache file {path}: {exc.strerror or exc}; nothing was kept")


def _expected_cache_bytes(sources: list[Path]) -> int:
    total = 0
    for src in sources:
        entries, _ = read_header(src)
        for name, e in entries.items():
            if quantizable(name, e.shape, e.dtype):
                total += e.shape[0] * e.shape[1] + 4 * e.shape[0]
            else:
                total += e.nbytes
    return total


def _clear(target: Path) -> None:
    """Remove what a conversion writes (only those names: the folder is ours, but be exact)."""
    if not target.is_dir():
        return
    for p in target.iterdir():
        if p.is_file() and (p.suffix == ".safetensors" or TMP_MARK in p.name
                            or p.name in (MANIFEST_NAME, INDEX_NAME)):
            p.unlink()


def convert(folder: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert the bf16 shards of the transformer in `folder` into its fp8 cache; returns the cache folder.
    Any failure leaves no cache (and no temporary file) behind and raises ModelFilesError naming the file.
    `progress(written_bytes, total_bytes)` is called after each chunk; an exception it raises (Cancelled: the
    user stopped) ends the conversion the same way, with nothing kept."""
    folder = Path(folder)
    sources = _source_files(folder)
    target = cache_dir(folder)
    started = time.monotonic()
    try:
        target.mkdir(exist_ok=True)
    except OSError as exc:
        raise ModelFilesError(f"cannot create the fp8 cache folder {target}: {exc.strerror or exc}") from exc
    _clear(target)
    need = _expected_cache_bytes(sources)
    free = shutil.disk_usage(target).free
    if free < need + FREE_DISK_MARGIN_BYTES:
        raise ModelFilesError(f"the fp8 cache needs {need / 1e9:.1f} GB of free disk in {target} and "
                              f"{free / 1e9:.1f} GB is free: free some space or store the transformer as bf16 (--no-fp8, or bf16 on the page)")
    written: list[Path] = []
    done = [0]

    def wrote(nbytes: int) -> None:
        done[0] += nbytes
        if progress is not None:
            progress(min(done[0], need), need)

    try:
        shards = []
        for i, src in enumerate(sources):
            name = SINGLE_NAME if len(sources) == 1 else src.name
            log.info("fp8 cache: converting %s (%d/%d)", src.name, i + 1, len(sources))
            shards.append(_write_shard(src, target / name, written, wrote))
        weight_map = {t: s["name"] for s in shards for t in s["tensors"]}
        for s in shards:
            del s["tensors"]
        _write_json_atomic(target / INDEX_NAME, {"metadata": {"total_size": need}, "weight_map": weight_map},
                           written)
        manifest = {"format": FORMAT_VERSION, "sources": [_source_record(p) for p in sources], "shards": shards,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        _write_json_atomic(target / MANIFEST_NAME, manifest, written)  # last: this makes the cache valid
    except BaseException:
        for p in written:  # a failed or interrupted conversion keeps nothing that could look like a cache
            try:
                p.unlink()
            except OSError:
                pass
        try:
            target.rmdir()  # only when empty: a later load then starts as if no cache had been tried
        except OSError:
            pass
        raise
    log.info("fp8 cache: %d shards, %.2f GB written to %s in %.1f s", len(sources),
             sum(s["size"] for s in shards) / 1e9, target, time.monotonic() - started)
    return target


def _write_json_atomic(path: Path, data: dict, written: list[Path]) -> None:
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    written.append(tmp)
    try:
        with open(tmp, "wb") as fh:
            _write_chunk(fh, json.dumps(data, indent=1).encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
        json.loads(tmp.read_text(encoding="utf-8"))
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(tmp, exc, path.parent) from exc
    written.append(path)
    _fsync_dir(path.parent)


def check_cache(folder: Path, full: bool = False) -> str | None:
    """None if the fp8 cache of `folder` is complete and matches the current bf16 shards; else why not (one line,
    naming the file). `full`: hash every byte of every shard instead of the sampled blocks."""
    folder = Path(folder)
    target = cache_dir(folder)
    manifest_path = target / MANIFEST_NAME
    if not manifest_path.is_file():
        return f"{target} holds no complete fp8 cache" if target.is_dir() else "absent"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        shards, sources = manifest["shards"], manifest["sources"]
        if manifest.get("format") != FORMAT_VERSION:
            return f"{manifest_path} is of another format version"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({type(exc).__name__})"
    try:
        current = [_source_record(p) for p in _source_files(folder)]
    except (OSError, ModelFilesError) as exc:
        raise ModelFilesError(f"the fp8 cache cannot be checked: {exc}") from exc
    if current != sources:
        return f"the bf16 shards in {folder} changed since {manifest_path} was written"
    try:
        for s in shards:
            path = target / s["name"]
            if not path.is_file():
                return f"{path} is missing"
            size = path.stat().st_size
            if size != s["size"]:
                return f"{path} is {size} bytes, not {s['size']}"
            read_header(path)
            digest = _file_digest(path) if full else _sample_digest(path, size)
            if digest != (s["sha256"] if full else s["sample_sha256"]):
                return f"{path} does not match its checksum"
    except (ModelFilesError, OSError, KeyError, TypeError) as exc:
        return f"{' '.join(str(exc).split())[:200]}"
    return None


def cache_recorded(folder: Path) -> bool:
    """A cheap look (no hashing): the fp8 cache's manifest is there and names the current bf16 shards and shards of
    the recorded sizes. The plan uses it to know whether choosing fp8 means converting first; a load still
    verifies the cache (ensure_cache)."""
    target = cache_dir(folder)
    try:
        manifest = json.loads((target / MANIFEST_NAME).read_text(encoding="utf-8"))
        return (manifest.get("format") == FORMAT_VERSION
                and manifest["sources"] == [_source_record(p) for p in _source_files(Path(folder))]
                and all((target / s["name"]).stat().st_size == s["size"] for s in manifest["shards"]))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, ModelFilesError):
        return False


def ensure_cache(folder: Path, progress: Callable[[int, int], None] | None = None) -> Path:
    """The fp8 cache folder of the transformer in `folder`, converted now if absent, stale or corrupt
    (`progress`: see convert)."""
    problem = check_cache(folder)
    if problem is None:
        return cache_dir(folder)
    if problem != "absent":
        log.warning("fp8 cache: %s; converting again", problem)
    else:
        log.info("fp8 cache: none in %s yet; converting the bf16 shards once (about half their size)", folder)
    target = convert(folder, progress)
    problem = check_cache(folder)
    if problem is not None:  # just written and verified: only a failing disk gets here
        raise ModelFilesError(f"the fp8 cache was written but does not check: {problem}")
    return target


# --- loading -----------------------------------------------------------------------------------------------------

def load_fp8_transformer(folder: Path, compute_dtype: torch.dtype | None):
    """diffusers' FramePack transformer with its block Linears mapped read-only from the fp8 cache (converted on
    first use), each computing in `compute_dtype` (None: the files' bf16)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel as Model

    folder = Path(folder)
    target = ensure_cache(folder)
    keys = json.loads((target / INDEX_NAME).read_text(encoding="utf-8"))["weight_map"]

    def build():
        model = Model.from_config(Model.load_config(folder))
        add_scale_params(model, keys)
        return model

    model = load_mapped(build, target, None, INDEX_NAME, SINGLE_NAME)
    fp8, upcast = apply_fp8_compute(model, compute_dtype or torch.bfloat16)
    log.info("fp8 transformer from %s: %d Linears dequantized per call, %d modules upcast, compute %s",
             target, fp8, upcast, compute_dtype or torch.bfloat16)
    return model


def to_device(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move to `device`: fp8 weights and their scales as they are (dequantized per call), other floating tensors
    converted to `dtype`. (`Module.to(dtype)` would cast the fp8 weights without their scales.)"""
    for module in model.modules():
        fp8 = is_fp8_linear(module)
        for name, p in module._parameters.items():
            if p is None:
                continue
            keep = fp8 and name in ("weight", SCALE_PARAM)
            p.data = p.data.to(device) if keep or not p.is_floating_point() else p.data.to(device, dtype)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device, dtype) if b.is_floating_point() else b.to(device)
    return model


def load_fp8_transformer_on(folder: Path, dtype: torch.dtype, device: torch.device):
    """loading.py's entry: computed on the CPU from the map, or copied to the GPU (fp8 stays fp8 in VRAM)."""
    model = load_fp8_transformer(folder, dtype)
    device = torch.device(device)
    if device.type != "cpu":
        to_device(model, device, dtype)
    return model
