"""Read-only weight storage: safetensors shards mapped with `mmap.ACCESS_READ`, tensors made with `torch.frombuffer`.

Why not safetensors' own loader: it maps each file private and writable (copy-on-write). Such a mapping is
charged to the commit limit in full (Linux VmData under `prlimit --data`, Windows commit), so a 26 GB
transformer needs 26 GB of commit before a single page is read: os error 1455 on a 32 GB Windows machine.
A read-only shared mapping is file-backed: its pages are not charged, count as RssFile (not RssAnon), and the
OS can drop them under pressure and read them again from the file, with no pagefile involved.
(pitfalls.md, "Memory measurement": load_file of a 1.5 GB file fails at once under `prlimit --data=1e9`;
the same bytes mapped read-only run with VmData 232 MB.)

The header is parsed here (8-byte little-endian length, then JSON) so that every problem of a file becomes a
ModelFilesError naming that file: truncated data, a bad header, an unknown dtype, a missing shard, a tensor of
the wrong shape or a key the model does not have.

The pages are read-only: writing into a mapped weight (an in-place op, `param.data.copy_`) would kill the process
with SIGSEGV. Nothing here writes weights in place; dtype changes go through `UpcastOnForward`, which makes new
tensors.
"""
from __future__ import annotations

import json
import logging
import math
import mmap
import struct
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry
from diffusers.hooks.layerwise_casting import LayerwiseCastingHook

from ..errors import ModelFilesError

log = logging.getLogger(__name__)

HEADER_LENGTH_BYTES = 8  # little-endian u64, then that many bytes of JSON
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger length means a corrupt file
HOOK_NAME = "layerwise_casting"  # diffusers' ModelMixin.dtype reports the compute dtype of a hook of this name

# safetensors dtype strings -> torch dtypes (bytes per element follow from the torch dtype)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it."""
    name: str
    dtype: str  # safetensors spelling: "BF16", "F16", "F32", "F8_E4M3"...
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def _bad(path: Path, what: str) -> ModelFilesError:
    return ModelFilesError(f"{path} {what} (the file is corrupt or incomplete: delete it and download again)")


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict]:
    """Parse and check a safetensors header without reading the data: (entries by name, metadata).

    Checks: the header fits the file, is a JSON object, every dtype is known, every byte range matches
    its shape and dtype, and the data the header describes is all there (a truncated download fails here).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(HEADER_LENGTH_BYTES)
            if len(head) < HEADER_LENGTH_BYTES:
                raise _bad(path, f"is {size} bytes long, too short for a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES or HEADER_LENGTH_BYTES + length > size:
                raise _bad(path, f"has a header length of {length} bytes in a file of {size} bytes")
            raw = fh.read(length)
    except OSError as exc:
        raise ModelFilesError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(path, f"has an unreadable header ({' '.join(str(exc).split())[:80]})") from exc

    data_start = HEADER_LENGTH_BYTES + length
    metadata = header.pop("__metadata__", None) or {}
    entries: dict[str, TensorEntry] = {}
    data_end = data_start
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as exc:
            raise _bad(path, f"has a malformed entry for '{name}'") from exc
        if dtype not in DTYPES:
            raise _bad(path, f"stores '{name}' as {dtype}, a dtype this app cannot read")
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if begin < 0 or end - begin != expected:
            raise _bad(path, f"describes '{name}' ({dtype} {list(shape)}) with {end - begin} bytes, not {expected}")
        entries[name] = TensorEntry(name, dtype, shape, data_start + begin, data_start + end)
        data_end = max(data_end, data_start + end)
    if data_end > size:
        raise _bad(path, f"is truncated: its header describes {data_end} bytes but the file has {size}")
    return entries, metadata


class MappedFile:
    """One safetensors file mapped read-only. Its tensors keep the map alive; the map needs no closing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.entries, self.metadata = read_header(self.path)
        with open(self.path, "rb") as fh:  # mmap keeps its own descriptor: the file can be closed at once
            try:
                self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise ModelFilesError(f"cannot map {self.path}: {exc}") from exc

    def tensor(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        dtype = DTYPES[e.dtype]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=dtype)
        with _read_only_buffers():
            flat = torch.frombuffer(self._map, dtype=dtype, count=e.nbytes // dtype.itemsize, offset=e.begin)
        return flat.view(e.shape)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: self.tensor(name) for name in self.entries}


@contextmanager
def _read_only_buffers():
    # torch warns that a tensor over a non-writable buffer must not be written. That is the point of the map:
    # weights are only ever read (see the module docstring), so the warning is expected and silenced here only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        yield


def indexed_files(folder: Path, index_name: str | None) -> dict[str, Path]:
    """key -> shard, as the index names them ({} without an index)."""
    try:
        weight_map = json.loads((Path(folder) / index_name).read_text(encoding="utf-8"))["weight_map"]
        return {k: Path(folder) / v for k, v in weight_map.items()}
    except (TypeError, OSError, UnicodeDecodeError, ValueError, KeyError, AttributeError):
        return {}


def shard_files(folder: Path, index_name: str | None, single_name: str | None) -> list[Path]:
    """The weight files of a component: the shards its index names (all must exist), or its single file."""
    folder = Path(folder)
    if index_name and (folder / index_name).is_file():
        index_path = folder / index_name
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _bad(index_path, "is not a valid shard index") from exc
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelFilesError(f"{folder / missing[0]} is missing ({len(missing)} of {len(names)} shards named "
                                  f"in {index_name}): download it again")
        return [folder / n for n in names]
    if single_name and (folder / single_name).is_file():
        return [folder / single_name]
    raise ModelFilesError(f"no weights in {folder} (expected {index_name or single_name})")


def map_files(files: list[Path]) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """Map every file: (tensor by key, file by key). A key found in two files is an error."""
    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for path in files:
        mapped = MappedFile(path)
        for name in mapped.entries:
            if name in origin:
                raise ModelFilesError(f"{path} repeats '{name}', already in {origin[name].name}: mixed-up shards")
            tensors[name] = mapped.tensor(name)
            origin[name] = path
    return tensors, origin


def align_prefix(model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, Path]):
    """Drop a key prefix the files have and the model does not (CLIP's files say `text_model.`, which
    transformers 5's CLIPTextModel strips when it loads them)."""
    expected = model.state_dict()
    probe = next((k for k in expected if k not in tensors), None)
    if probe is None:
        return tensors, origin
    prefix = next((k[: -len(probe)] for k in tensors if k.endswith("." + probe)), None)
    if not prefix:
        return tensors, origin
    strip = lambda k: k[len(prefix):] if k.startswith(prefix) else k  # noqa: E731
    return {strip(k): v for k, v in tensors.items()}, {strip(k): v for k, v in origin.items()}


def check_against(model: torch.nn.Module, tensors: dict[str, torch.Tensor], origin: dict[str, Path],
                  folder: Path, indexed: dict[str, Path] | None = None) -> None:
    """Raise ModelFilesError (one line, naming a file) unless the files hold exactly the model's weights.
    `indexed`: where the shard index says each key is, to name the file a missing key should be in."""
    expected = model.state_dict()  # on the meta device: names and shapes only
    missing = [k for k in expected if k not in tensors]
    if missing:
        where = (indexed or {}).get(missing[0], folder)
        raise ModelFilesError(f"{where} lacks {len(missing)} weights the model needs (first: '{missing[0]}'): "
                              f"incomplete download or a different model")
    unexpected = [k for k in tensors if k not in expected]
    if unexpected:
        k = unexpected[0]
        raise ModelFilesError(f"{origin[k]} has {len(unexpected)} weights this model does not use (first: '{k}'): "
                              f"not the checkpoint config.json describes")
    for key, want in expected.items():
        got = tensors[key]
        if tuple(got.shape) != tuple(want.shape):
            raise ModelFilesError(f"{origin[key]} holds '{key}' with shape {list(got.shape)} but config.json needs "
                                  f"{list(want.shape)}: weights and config disagree")
        if want.is_floating_point() and not got.is_floating_point():
            raise ModelFilesError(f"{origin[key]} stores '{key}' as {got.dtype}, not as floating-point weights")


class UpcastOnForward(LayerwiseCastingHook):
    """Computes a module in `compute_dtype` from weights stored in another dtype, without touching the storage.

    For the call, each of the module's own weights is replaced by a converted copy; afterwards the stored
    (mapped) tensor is put back and the copy dropped. Only one module's copy exists at a time (the largest
    Linear of the 13B model: 47 M params = 189 MB in float32). Embeddings convert the rows they return instead.

    Why not diffusers' `apply_layerwise_casting` (measured here, diffusers 0.42.1, CPU): with its default skip
    patterns the FramePack forward fails with "mixed dtype (CPU): expect parameter to have scalar type of Float"
    (diffusers' RMSNorm is not in its supported layers and keeps bf16 weights); and its post_forward does
    `module.to(storage_dtype)`, which replaces each mapped weight by an anonymous copy, so after one forward the
    whole model is in anonymous memory (checked: the weight's data_ptr changes). Subclassing it keeps
    `ModelMixin.dtype` reporting the compute dtype, which is what the engine feeds the model.

    Why compute in float32 at all on the CPU (measured on this 2-core machine, 1.48 GB bf16 transformer,
    ~770 tokens): a forward took 82-95 s in bf16 against 31-34 s in float32 with this hook (RssAnon +90-160 MB
    transient), and float32 matches the all-float32 reference exactly.
    """

    def __init__(self, compute_dtype: torch.dtype):
        super().__init__(storage_dtype=None, compute_dtype=compute_dtype, non_blocking=False)

    def initialize_hook(self, module):
        return module  # the storage stays as mapped

    def deinitalize_hook(self, module):
        # diffusers' hook refuses to be removed (it cast the storage, and casting back would lose precision); this
        # one never changed the storage, so it can be taken off and put back (compute/lora.py does, to swap a class)
        return module

    def new_forward(self, module, *args, **kwargs):
        if isinstance(module, torch.nn.Embedding):
            # a lookup reads only its rows: convert those, not the table (Llama's is 1.05 GB in fp16); same numbers
            return self.fn_ref.original_forward(*args, **kwargs).to(self.compute_dtype)
        stored = {}
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != self.compute_dtype:
                stored[name] = param
                module._parameters[name] = torch.nn.Parameter(param.to(self.compute_dtype), requires_grad=False)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            module._parameters.update(stored)  # the mapped tensors again, also when the forward raised

    def pre_forward(self, module, *args, **kwargs):  # unused: new_forward does the work
        return args, kwargs

    def post_forward(self, module, output):
        return output


def apply_upcast(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Hook every module that owns floating weights of another dtype; returns how many were hooked."""
    hooked = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        if any(p.dtype != compute_dtype for p in own):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(UpcastOnForward(compute_dtype), HOOK_NAME)
            hooked += 1
    return hooked


def storage_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype holding most of the bytes (bf16 for the real transformer)."""
    counts = Counter()
    for t in tensors.values():
        counts[t.dtype] += t.numel() * t.element_size()
    return counts.most_common(1)[0][0] if counts else torch.float32


def load_mapped(build, folder: Path, compute_dtype: torch.dtype | None, index_name: str | None,
                single_name: str | None, materialize=None):
    """A model whose every weight is read-only-mapped from the component's safetensors files (nothing copied).

    `build()` runs under `torch.device("meta")`: no parameter is ever allocated. (accelerate's
    `init_empty_weights` allocates each parameter on the CPU before moving it to meta: untouched, but under
    `prlimit --data=1.2e9` building the 1.48 GB test transformer that way failed with ENOMEM, glibc keeping the
    freed blocks.) `materialize(model)` then gives real values to buffers the files do not hold (Llama's rotary
    frequencies, CLIP's position ids). The files are checked against the model, and
    `load_state_dict(assign=True, strict=True)` puts the mapped tensors in place. When `compute_dtype` differs
    from the files' dtype, each module computes on a transient converted copy (`UpcastOnForward`): the weights
    stay file-backed. `compute_dtype=None`: no hooks (the caller moves the model to the GPU, converting it there).
    """
    folder = Path(folder)
    try:
        with torch.device("meta"):
            model = build()
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelFilesError(f"{folder / 'config.json'} is not a usable config: "
                              f"{' '.join(str(exc).split())[:160]}") from exc
    tensors, origin = map_files(shard_files(folder, index_name, single_name))
    tensors, origin = align_prefix(model, tensors, origin)
    check_against(model, tensors, origin, folder, indexed_files(folder, index_name))
    model.load_state_dict(tensors, strict=True, assign=True)
    if materialize is not None:
        materialize(model)
    left_on_meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left_on_meta:  # a tensor neither in the files nor materialized: a bug here, not in the files
        raise RuntimeError(f"{len(left_on_meta)} tensors have no data after mapping (first: {left_on_meta[0]})")
    model.eval().requires_grad_(False)
    stored = storage_dtype(tensors)
    hooked = apply_upcast(model, compute_dtype) if compute_dtype not in (None, stored) else 0
    log.info("mapped %d tensors (%.2f GB, %s) read-only from %d files in %s; %d modules compute in %s",
             len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()) / 1e9, stored,
             len(set(origin.values())), folder, hooked, compute_dtype)
    return model


def _materialize_transformers_buffers(model) -> None:
    """Real values for the non-persistent buffers a transformers model computes in __init__ (meta after build).

    Rotary embeddings own no weights, so transformers' own `_init_weights` recomputes them safely; position
    ids are an arange. `_init_weights` is never called on a module with (read-only mapped) weights: it would
    write into them.
    """
    for module in model.modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        for name in meta:
            buffer = getattr(module, name)
            module._buffers[name] = torch.empty_like(buffer, device="cpu")
        if "RotaryEmbedding" in type(module).__name__ and not any(True for _ in module.parameters(recurse=False)):
            model._init_weights(module)
        elif meta == ["position_ids"]:
            shape = module._buffers["position_ids"].shape
            module._buffers["position_ids"] = torch.arange(shape[-1]).expand(shape)
        else:
            raise RuntimeError(f"do not know how to compute buffers {meta} of {type(module).__name__}")


def load_mapped_transformer(folder: Path, compute_dtype: torch.dtype | None):
    """diffusers' FramePack transformer, mapped (config.json + the sharded diffusion_pytorch_model files)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel as Model

    folder = Path(folder)

    def build():
        return Model.from_config(Model.load_config(folder))

    return load_mapped(build, folder, compute_dtype, "diffusion_pytorch_model.safetensors.index.json",
                       "diffusion_pytorch_model.safetensors")


def load_mapped_pretrained(model_class, folder: Path, compute_dtype: torch.dtype | None,
                           index_name: str | None = "model.safetensors.index.json",
                           single_name: str | None = "model.safetensors"):
    """A transformers model (LlamaModel, CLIPTextModel...) from its folder, mapped."""
    from transformers import AutoConfig

    folder = Path(folder)

    def build():
        return model_class._from_config(AutoConfig.from_pretrained(folder))

    return load_mapped(build, folder, compute_dtype, index_name, single_name, _materialize_transformers_buffers)
