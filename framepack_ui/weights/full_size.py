"""Every model the app loads, at its real config and storage dtype, with random weights, in the real layout.

`make-tiny-models DIR --full-size` writes them (about 43 GB) so that a GPU machine without the real downloads
runs the whole app path at full size: the same files, shard names, shard sizes, indexes, configs and dtypes as
the real repositories (/work/shared/reference/real-layout.md), so the app's probe, plan, loaders, fp8 conversion
and page cache meet the real sizes. Random weights cost the same compute as real ones.

The tiny writer (tiny.py) does the work: shapes from a model built on the `meta` device, values drawn tensor by
tensor, one shard in memory at a time, written with safetensors. With `device="cuda"` the values are drawn on the
GPU (the disk is then what limits the speed). The tokenizers are the tiny trained ones: every id they give is far
inside the real vocabularies (128320 and 49408), and the text encoders never look at a token's meaning.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import InputError, ModelFilesError
from ..units import GB
from .layout import COMPONENTS
from .tiny import (_clip_builder, _llama_builder, _meta_shapes, _siglip_builder, _transformer_builder,
                   _vae_builder, _weight_files, _write_clip_tokenizer, _write_json, _write_llama_tokenizer,
                   _write_repo_roots, _write_weights, clip_text_config, llama_config, preprocessor_config,
                   siglip_config, transformer_config, vae_config)

log = logging.getLogger(__name__)

# The real size values (real-layout.md; the same as bench/common.py's REAL_* configs). The other keys of each
# config come from tiny.py's functions, which already hold the real key sets and fixed values.
LLAMA_VOCAB = 128320  # > the real tokenizer's 128259 ids
LLAMA_BOS_ID, LLAMA_EOS_ID = 128000, 128001
CLIP_VOCAB = 49408
SIGLIP_IMAGE_SIZE = 384  # patch 14: 27 x 27 = 729 image tokens
# save_pretrained's max_shard_size for each sharded repository: gives the real shard sizes (tiny._split_by_max_bytes)
TEXT_ENCODER_SHARD_BYTES = 5 * GB  # diffusers' conversion script: max_shard_size="5GB"
TRANSFORMER_SHARD_BYTES = 10 * GB  # 9.97 / 9.99 / 5.79 GB on huggingface.co: diffusers' default "10GB"
SHRINKS = (1, 2, 4, 8)  # the test seam's allowed factors: every width stays a whole number of heads


@dataclass(frozen=True)
class FullSizeComponent:
    """One folder's worth: its config file, its weights (None for tokenizers and the image processor)."""
    name: str  # layout.COMPONENTS key
    config: dict | None = None  # written as config.json (preprocessor_config.json for the feature extractor)
    builder: Callable | None = None  # tiny.py builder of the real class, for meta shapes
    dtype: str = ""  # storage dtype, torch attribute name
    files: dict = field(default_factory=dict)  # tiny._weight_files' arguments (prefix, shards, index)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return _meta_shapes(self.builder(self.config)) if self.builder else {}

    def weight_bytes(self) -> int:
        import torch

        itemsize = torch.empty((), dtype=getattr(torch, self.dtype)).element_size() if self.dtype else 0
        return sum(math.prod(s) for s in self.shapes().values()) * itemsize


def full_size_components(_shrink: int = 1) -> dict[str, FullSizeComponent]:
    """The real configs of every component the app loads. `_shrink` (a test seam, never for a benchmark): widths
    divided by it (head counts kept where the width is heads x head size), layer counts and vocabularies too, so a
    test writes and loads the same code path in megabytes; shards are then split in equal parts (the real byte
    limits would give other counts)."""
    if _shrink not in SHRINKS:
        raise ValueError(f"shrink must be one of {SHRINKS}")
    s = _shrink

    def layers(real: int, least: int = 1) -> int:
        return max(least, real // s)

    # a shrunk vocabulary ends with the special ids, as the real one does (LlamaModel itself never reads them)
    bos, eos = (LLAMA_BOS_ID, LLAMA_EOS_ID) if s == 1 else (LLAMA_VOCAB // s - 2, LLAMA_VOCAB // s - 1)
    llama = {**llama_config(LLAMA_VOCAB // s, bos, eos), "hidden_size": 4096 // s,
             "head_dim": 128 // s, "intermediate_size": 14336 // s, "num_attention_heads": 32,
             "num_key_value_heads": 8, "num_hidden_layers": layers(32, 3)}  # FramePack reads hidden_states[-3]
    clip = {**clip_text_config(CLIP_VOCAB // s), "hidden_size": 768 // s, "intermediate_size": 3072 // s,
            "num_attention_heads": 12, "num_hidden_layers": layers(12, 2), "projection_dim": 768 // s}
    siglip = {**siglip_config(), "hidden_size": 1152 // s, "image_size": SIGLIP_IMAGE_SIZE,
              "intermediate_size": 4304 // s, "num_attention_heads": 16, "num_hidden_layers": layers(27),
              "patch_size": 14}
    processor = preprocessor_config()
    processor["size"] = {"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE}
    vae = {**vae_config(), "block_out_channels": [128 // s, 256 // s, 512 // s, 512 // s], "layers_per_block": 2,
           "norm_num_groups": 32 // s}
    transformer = transformer_config({
        "num_attention_heads": 24 // s, "attention_head_dim": 128, "rope_axes_dim": [16, 56, 56],
        "num_layers": layers(20), "num_single_layers": layers(40), "num_refiner_layers": layers(2)})
    # the transformer's inputs are the encoders' outputs
    transformer.update(text_embed_dim=llama["hidden_size"], pooled_projection_dim=clip["hidden_size"],
                       image_proj_dim=siglip["hidden_size"])

    def sharded(stem: str, count: int, index: str, real_max_bytes: int) -> dict:
        return {"shard_stem": stem, "shard_count": count, "index_name": index,
                "max_shard_bytes": real_max_bytes if s == 1 else None}

    components = [
        FullSizeComponent("text_encoder", llama, _llama_builder, "float16",
                          sharded("model", 4, "model.safetensors.index.json", TEXT_ENCODER_SHARD_BYTES)),
        FullSizeComponent("text_encoder_2", clip, _clip_builder, "float16",
                          {"prefix": "text_model.", "single_name": "model.safetensors"}),
        FullSizeComponent("tokenizer"),
        FullSizeComponent("tokenizer_2"),
        FullSizeComponent("vae", vae, _vae_builder, "float32", {"single_name": "diffusion_pytorch_model.safetensors"}),
        FullSizeComponent("feature_extractor", processor),
        FullSizeComponent("image_encoder", siglip, _siglip_builder, "bfloat16",
                          {"prefix": "vision_model.", "single_name": "model.safetensors"}),
        FullSizeComponent("transformer", transformer, _transformer_builder, "bfloat16",
                          sharded("diffusion_pytorch_model", 3, "diffusion_pytorch_model.safetensors.index.json",
                                  TRANSFORMER_SHARD_BYTES)),
    ]
    return {c.name: c for c in components}


def parse_only(text: str | None) -> tuple[str, ...]:
    """`--only transformer,vae` -> the names, checked against the layout (InputError naming the bad one)."""
    if not text:
        return tuple(COMPONENTS)
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown or not names:
        raise InputError(f"--only takes component names from {', '.join(COMPONENTS)}; "
                         f"not {', '.join(unknown) or text!r}")
    return names


@dataclass(frozen=True)
class WritePlan:
    models_dir: Path
    components: dict[str, FullSizeComponent]  # the ones to write, in order
    weight_bytes: dict[str, int]  # tensor bytes of each (0 for tokenizers and the processor)
    free_bytes: int  # free on the disk, plus what the files about to be replaced take
    shrink: int = 1  # full_size_components' test seam

    @property
    def total_bytes(self) -> int:
        return sum(self.weight_bytes.values())

    def line(self) -> str:
        """What will be written, in one line (printed before anything is)."""
        parts = ", ".join(f"{n} {b / GB:.2f} GB" if b else n for n, b in self.weight_bytes.items())
        return (f"full-size models: writing {self.total_bytes / GB:.1f} GB to {self.models_dir} ({parts}); "
                f"{self.free_bytes / GB:.1f} GB free there")

    def check_room(self) -> None:
        """ModelFilesError (one line) when the disk has not the room."""
        if self.total_bytes > self.free_bytes:
            raise ModelFilesError(f"not enough disk for the full-size models in {self.models_dir}: writing "
                                  f"{self.total_bytes / GB:.1f} GB, {self.free_bytes / GB:.1f} GB free (write fewer "
                                  f"with --only, e.g. --only transformer)")


def plan_writes(models_dir: Path, only: tuple[str, ...] | None = None, _shrink: int = 1) -> WritePlan:
    """What `make_full_size_models` would write, and the room there for it (`WritePlan.check_room`)."""
    models_dir = Path(models_dir)
    every = full_size_components(_shrink)
    chosen = {n: every[n] for n in every if n in (only or tuple(every))}
    weight_bytes = {n: c.weight_bytes() for n, c in chosen.items()}
    return WritePlan(models_dir, chosen, weight_bytes, _free_bytes(models_dir) + _replaced_bytes(models_dir, chosen),
                     _shrink)


def _free_bytes(models_dir: Path) -> int:
    folder = models_dir.absolute()
    while not folder.exists() and folder != folder.parent:  # the models folder may not exist yet
        folder = folder.parent
    return shutil.disk_usage(folder).free


def _replaced_bytes(models_dir: Path, components: dict[str, FullSizeComponent]) -> int:
    """Bytes of the weight files already there that writing replaces (their room comes back)."""
    total = 0
    for name in components:
        folder = COMPONENTS[name].folder(models_dir)
        total += sum(p.stat().st_size for p in folder.glob("*.safetensors")) if folder.is_dir() else 0
    return total


def make_full_size_models(plan: WritePlan, device: str | None = None, seed: int = 0,
                          on_file: Callable[[Path, int, float], None] | None = None) -> dict:
    """Write what `plan` says (after `plan.check_room()`); returns a summary: per component its bytes, seconds and
    GB/s, and the total. `device`: where the random values are drawn ("cuda": fast; default the CPU).
    `on_file(path, bytes, seconds)` after each weight file."""
    import torch

    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA GPU is available here")
    plan.check_room()
    models_dir = plan.models_dir
    _write_repo_roots(models_dir)
    summary: dict = {"models_dir": str(models_dir), "seed": seed, "device": device or "cpu", "components": {}}
    started = time.perf_counter()
    every = full_size_components(plan.shrink)
    order = list(every)  # seeds by position in the whole set: --only changes no file's bytes
    for name, component in plan.components.items():
        folder = COMPONENTS[name].folder(models_dir)
        t = time.perf_counter()
        dtype = getattr(torch, component.dtype) if component.dtype else None
        written = _write_component(component, every, folder, dtype, seed * 1000 + order.index(name), device, on_file)
        seconds = time.perf_counter() - t
        summary["components"][name] = {"folder": str(folder), "bytes": written, "seconds": seconds,
                                       "GB_per_s": written / GB / seconds if written and seconds else None}
        log.info("full-size %s: %.2f GB in %.1f s", name, written / GB, seconds)
    summary["seconds"] = time.perf_counter() - started
    summary["bytes"] = sum(c["bytes"] for c in summary["components"].values())
    summary["GB_per_s"] = summary["bytes"] / GB / summary["seconds"] if summary["seconds"] else None
    return summary


def _write_component(component: FullSizeComponent, every: dict[str, FullSizeComponent], folder: Path, dtype,
                     seed: int, device, on_file) -> int:
    name = component.name
    if name in ("tokenizer", "tokenizer_2"):
        encoder = {"tokenizer": "text_encoder", "tokenizer_2": "text_encoder_2"}[name]
        written = (_write_llama_tokenizer if name == "tokenizer" else _write_clip_tokenizer)(folder)
        vocab = every[encoder].config["vocab_size"]
        if written["length"] > vocab:  # the tiny tokenizers' ids must index the embedding tables
            raise ValueError(f"{name} has {written['length']} ids, {encoder} only {vocab} embeddings")
        return 0
    if name == "feature_extractor":
        _write_json(folder / "preprocessor_config.json", component.config)
        return 0
    _write_json(folder / "config.json", component.config)
    return _write_weights(folder, component.shapes(), dtype, seed, device=device, on_file=on_file,
                          **component.files)


def weight_files(component: FullSizeComponent) -> list[tuple[str, int]]:
    """(file name, tensor bytes) of each weight file `component` is written as, from meta shapes (nothing written)."""
    import torch

    if not component.builder:
        return []
    itemsize = torch.empty((), dtype=getattr(torch, component.dtype)).element_size()
    shapes = component.shapes()
    prefix = component.files.get("prefix", "")
    return [(name, sum(math.prod(shapes[n.removeprefix(prefix)]) for n in names) * itemsize)
            for name, names in _weight_files(shapes, itemsize, **component.files)]
