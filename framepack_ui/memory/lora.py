"""LoRA files for the F1 transformer: read, converted to the transformer's own layer names, and checked against its
layers before anything loads. Applying them at run time is framepack_ui.compute.lora's; which ones a job uses,
and their strengths, the job's (spec.LoraChoice).

Formats, told apart by their keys:
- kohya / musubi-tuner: `lora_unet_<layer>.lora_down.weight`, `.lora_up.weight` and `.alpha` (scale alpha / rank;
  alpha / sqrt(rank) where the file's `use_rslora_flag` is set). musubi-tuner's FramePack LoRAs name the layers as
  this transformer does (`lora_unet_transformer_blocks_0_attn_to_q`, `lora_unet_single_transformer_blocks_0_proj_mlp`);
  HunyuanVideo LoRAs name those of the original HunyuanVideo code (`lora_unet_double_blocks_0_img_attn_qkv`,
  `lora_unet_single_blocks_0_linear1`). Text-encoder keys (`lora_te_...`, `lora_te1_...`) are ignored with a notice.
- diffusers / PEFT: `<layer>.lora_A.weight` and `.lora_B.weight` under `transformer.` (diffusers), `base_model.model.`
  (PEFT), `diffusion_model.` (ComfyUI, diffusion-pipe) or no prefix; the scale from `.alpha` keys, else from the
  `lora_adapter_metadata` diffusers writes into the file (lora_alpha / r, alpha_pattern), else 1. `text_encoder.`
  keys are ignored with a notice.

Original HunyuanVideo layer names go through diffusers' own converter (`_convert_hunyuan_video_lora_to_diffusers`,
one layer at a time so each converted layer keeps its file's scale), except two layers it gets wrong for a LoRA,
which are converted here: `single_blocks.N.linear1` (diffusers splits it at the 13B model's width 3072, hard-coded;
split here at the model's own width, so the tiny test models go through the same code) and
`final_layer.adaLN_modulation.1` (diffusers swaps the shift and scale halves of lora_A too, whose rows are the rank,
not the outputs: only lora_B's rows are swapped here).

Everything is read from a read-only map (storage.MappedFile): nothing is copied until the manager puts the tensors on
the compute device. Any problem is an InputError of one line naming the file.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..compute.lora import LoraPart
from ..errors import InputError, ModelFilesError
from ..weights.layout import COMPONENTS
from .plan import LoraCost
from .storage import MappedFile, read_header, shard_files

KOHYA_UNET = "lora_unet_"
KOHYA_TEXT_ENCODER = re.compile(r"^lora_te\d*_")
KOHYA_SUFFIXES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
KOHYA_FLAGS = ("use_rslora_flag", "use_dora_flag")  # musubi-tuner's network-level flags
PEFT_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight$")  # .lora_A[.adapter].weight
PEFT_ALPHA = re.compile(r"^(?P<layer>.+)\.alpha$")
PEFT_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
PEFT_TEXT_ENCODER = ("text_encoder.", "text_encoder_2.")  # diffusers' prefixes of the text encoders' LoRAs
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY: the LoraConfig as JSON
# keys of LoRA variants this app does not apply (DoRA magnitudes, LoKr and LoHa factors, LoRA biases)
UNSUPPORTED = (("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), ("dora_layer", "DoRA"),
               ("lokr_", "LoKr (LyCORIS)"), ("hada_", "LoHa (LyCORIS)"), (".lora_A.bias", "LoRA biases"),
               (".lora_B.bias", "LoRA biases"))
# The original HunyuanVideo code's layer names (`double_blocks.N.img_attn_qkv`...): kohya spells them with "_" for
# ".", and some of them have "_" of their own, so they are matched whole.
ORIGINAL_KOHYA = (
    (re.compile(r"^double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj|mlp_fc1|mlp_fc2|mod_linear)$"),
     lambda m: f"double_blocks.{m[1]}.{m[2]}_{m[3].replace('mlp_', 'mlp.').replace('mod_', 'mod.')}"),
    (re.compile(r"^single_blocks_(\d+)_(linear1|linear2|modulation_linear)$"),
     lambda m: f"single_blocks.{m[1]}.{m[2].replace('modulation_', 'modulation.')}"),
    (re.compile(r"^final_layer_(linear|adaLN_modulation_1)$"),
     lambda m: f"final_layer.{m[1].replace('adaLN_modulation_1', 'adaLN_modulation.1')}"),
)
ORIGINAL_PREFIXES = ("double_blocks.", "single_blocks.", "final_layer.", "txt_in.", "time_in.", "vector_in.",
                     "guidance_in.", "img_in.")
FORMATS = {"kohya": "kohya / musubi-tuner", "peft": "diffusers / PEFT"}


@dataclass(frozen=True)
class LoraLayer:
    """One layer's update in a file: `scale * up @ down` (scale: the file's alpha / rank)."""
    down: torch.Tensor  # (r, in), as stored (read-only map)
    up: torch.Tensor  # (out, r)
    scale: float


@dataclass(frozen=True)
class LoraFile:
    path: Path
    format: str  # FORMATS' words
    layers: dict[str, LoraLayer]  # by the transformer's module name
    identity: tuple  # (path, size, mtime): the same file unchanged
    notices: tuple[str, ...] = ()  # e.g. text-encoder weights ignored

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True)
class LoraSet:
    """The LoRAs of a job, each with its strength."""
    entries: tuple[tuple[LoraFile, float], ...] = ()

    def parts(self) -> dict[str, list[LoraPart]]:
        """What compute.lora.apply_loras takes: each layer's updates, strength x scale as the factor (strength 0
        left out: then the layer is exactly as without the LoRA)."""
        out: dict[str, list[LoraPart]] = {}
        for lora, strength in self.entries:
            if strength == 0:
                continue
            for name, layer in lora.layers.items():
                out.setdefault(name, []).append(LoraPart(layer.down, layer.up, strength * layer.scale))
        return out

    def cost(self, linears: dict[str, tuple[int, int]]) -> LoraCost | None:
        """What the plan counts for these LoRAs on the transformer (None when nothing applies)."""
        parts = self.parts()
        if not parts:
            return None
        params = sum(sum(p.down.shape[0] for p in ps) * (linears[n][0] + linears[n][1]) for n, ps in parts.items())
        return LoraCost(params, max(linears[n][0] * linears[n][1] for n in parts), len(parts),
                        max(linears[n][0] for n in parts))

    @property
    def key(self) -> tuple:
        """Equal keys apply the same updates: files unchanged, same strengths."""
        return tuple((lora.identity, strength) for lora, strength in self.entries)

    @property
    def notices(self) -> list[str]:
        return [n for lora, _ in self.entries for n in lora.notices]

    def describe(self) -> str:
        """'a.safetensors x0.8 (kohya / musubi-tuner, 120 layers), b.safetensors x1 (...)'."""
        return ", ".join(f"{lora.name} x{strength:g} ({lora.format}, {len(lora.layers)} layers)"
                         for lora, strength in self.entries)


# --- the transformer's layers ---------------------------------------------------------------------------------------

def transformer_linears(models_dir: Path) -> dict[str, tuple[int, int]]:
    """Every 2-D weight of the transformer as its shard headers list it: module name -> (out, in). Read from the bf16
    shards (the fp8 cache has the same names), headers only."""
    folder = COMPONENTS["transformer"].folder(models_dir)
    lacking = COMPONENTS["transformer"].missing_files(models_dir)
    if lacking:
        raise ModelFilesError(f"transformer is missing files in {folder}: {', '.join(p.name for p in lacking)}")
    linears = {}
    for path in shard_files(folder, "diffusion_pytorch_model.safetensors.index.json",
                            "diffusion_pytorch_model.safetensors"):
        entries, _ = read_header(path)
        for key, e in entries.items():
            if key.endswith(".weight") and len(e.shape) == 2:
                linears[key[: -len(".weight")]] = (e.shape[0], e.shape[1])
    return linears


# --- reading a job's LoRAs ------------------------------------------------------------------------------------------

def read_lora_set(choices: Sequence, models_dir: Path) -> tuple[LoraSet, dict[str, tuple[int, int]]]:
    """The job's LoRAs (spec.LoraChoice: path, strength), each read and checked against the transformer in
    `models_dir`; and the transformer's layers (for LoraSet.cost). InputError names the first bad file."""
    if not choices:
        return LoraSet(), {}
    linears = transformer_linears(models_dir)
    return LoraSet(tuple((read_lora(Path(c.path), linears), float(c.strength)) for c in choices)), linears


def read_lora(path: Path, linears: dict[str, tuple[int, int]]) -> LoraFile:
    """One LoRA file, its layers named as the transformer names them and checked against `linears` (module -> (out,
    in)). Raises InputError ("LoRA NAME: what is wrong") for anything it cannot apply."""
    path = Path(path)

    def bad(problem: str) -> InputError:
        return InputError(f"LoRA {path.name}: {problem}")

    if not path.is_file():
        raise bad("file not found")
    if path.suffix.lower() != ".safetensors":
        raise bad("unknown format: not a .safetensors file (pickled .pt / .ckpt files are not read)")
    try:
        mapped = MappedFile(path)
    except ModelFilesError as exc:
        message = exc.message  # storage.py's start with the path: the line names the file once
        if message.startswith(str(path)):
            message = "the file " + message[len(str(path)):].strip()
        raise bad(message) from None
    try:
        kind, raw, notices = _parse_keys(mapped, linears)
        layers = _resolve(kind, raw, linears)
    except _Problem as exc:
        raise bad(str(exc)) from None
    if not layers:
        raise bad("holds no weights for the video model (only text-encoder ones)" if notices
                  else "holds no LoRA weights")
    for name, layer in layers.items():
        for tensor in (layer.down, layer.up):
            if not torch.isfinite(tensor).all():
                raise bad(f"'{name}' holds NaN or infinite values (a damaged file?)")
    st = path.stat()
    identity = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    notices = tuple(f"LoRA {path.name}: {n}" for n in notices)
    return LoraFile(path, FORMATS[kind], layers, identity, notices)


class _Problem(Exception):
    """What is wrong with a file, in words (read_lora prefixes the file's name)."""


@dataclass
class _RawLayer:
    """A layer as the file names it, before conversion."""
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None
    scale: float = 1.0  # alpha / rank, once the layer is complete (_set_scale)
    keys: list[str] = field(default_factory=list)


def _parse_keys(mapped: MappedFile, linears) -> tuple[str, dict[str, _RawLayer], list[str]]:
    """(format, raw layers by the file's layer name, notices)."""
    keys = list(mapped.entries)
    if not keys:
        raise _Problem("holds no tensors")
    for key in keys:
        for mark, what in UNSUPPORTED:
            if mark in key:
                raise _Problem(f"is a {what} file ('{key}'); this app applies plain LoRAs only")
    flags = {k: _scalar(mapped, k) for k in KOHYA_FLAGS if k in mapped.entries}
    if flags.get("use_dora_flag"):
        raise _Problem("is a DoRA file (use_dora_flag); this app applies plain LoRAs only")
    keys = [k for k in keys if k not in KOHYA_FLAGS]
    kohya = [k for k in keys if k.startswith(KOHYA_UNET) or KOHYA_TEXT_ENCODER.match(k)]
    if kohya and len(kohya) == len(keys):
        return "kohya", *_kohya_layers(mapped, keys, bool(flags.get("use_rslora_flag")))
    if not kohya and any(PEFT_KEY.match(k) for k in keys):
        return "peft", *_peft_layers(mapped, keys)
    strange = next(k for k in keys if not (k.startswith(KOHYA_UNET) or KOHYA_TEXT_ENCODER.match(k)))
    if kohya:
        raise _Problem(f"mixes kohya keys with '{strange}': unknown format")
    raise _Problem(f"unknown format: '{keys[0]}' is neither a kohya / musubi-tuner (lora_unet_...) nor a diffusers / "
                   f"PEFT (...lora_A.weight) LoRA key")


def _scalar(mapped: MappedFile, key: str) -> float:
    t = mapped.tensor(key)
    if t.numel() != 1:
        raise _Problem(f"'{key}' should hold one number and holds {t.numel()}")
    return float(t.float().item())


def _kohya_layers(mapped: MappedFile, keys: list[str], rslora: bool) -> tuple[dict[str, _RawLayer], list[str]]:
    layers: dict[str, _RawLayer] = {}
    text_encoder = 0
    for key in keys:
        if KOHYA_TEXT_ENCODER.match(key):
            text_encoder += 1
            continue
        name, _, suffix = key[len(KOHYA_UNET):].partition(".")
        role = KOHYA_SUFFIXES.get(suffix)
        if role is None:
            raise _Problem(f"has a key this app cannot read: '{key}'")
        layer = layers.setdefault(name, _RawLayer())
        layer.keys.append(key)
        if role == "alpha":
            layer.alpha = _scalar(mapped, key)
        else:
            setattr(layer, role, mapped.tensor(key))
    for layer in layers.values():
        _set_scale(layer, rslora)
    return layers, _text_encoder_notice(text_encoder)


def _peft_layers(mapped: MappedFile, keys: list[str]) -> tuple[dict[str, _RawLayer], list[str]]:
    config = _adapter_config(mapped.metadata)
    layers: dict[str, _RawLayer] = {}
    text_encoder = 0
    for key in keys:
        if key.startswith(PEFT_TEXT_ENCODER):
            text_encoder += 1
            continue
        m, alpha = PEFT_KEY.match(key), PEFT_ALPHA.match(key)
        if m is None and alpha is None:
            raise _Problem(f"has a key this app cannot read: '{key}'")
        name = _strip_prefix((m or alpha)["layer"])
        layer = layers.setdefault(name, _RawLayer())
        layer.keys.append(key)
        if alpha is not None:
            layer.alpha = _scalar(mapped, key)
        else:
            setattr(layer, "down" if m["ab"] == "A" else "up", mapped.tensor(key))
    for name, layer in layers.items():
        if layer.alpha is None:
            layer.alpha = _config_alpha(config, name)
        _set_scale(layer, bool(config.get("use_rslora")))
    return layers, _text_encoder_notice(text_encoder)


def _strip_prefix(name: str) -> str:
    for prefix in PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _adapter_config(metadata: dict) -> dict:
    """The transformer's LoraConfig that diffusers saved in the file's metadata ({} if none), its keys without the
    `transformer.` prefix diffusers gives them."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except ValueError:
        raise _Problem(f"has unreadable {METADATA_KEY}") from None
    if not isinstance(config, dict):
        return {}
    prefixed = {k[len("transformer."):]: v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or config


def _config_alpha(config: dict, name: str) -> float | None:
    """The alpha a PEFT config gives layer `name`: its alpha_pattern's (a layer name or a regex of one, matched
    against the name's end as PEFT does), else lora_alpha; None without a config."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?({pattern})", name):
            return float(alpha)
    alpha = config.get("lora_alpha")
    return float(alpha) if alpha is not None else None


def _set_scale(layer: _RawLayer, rslora: bool) -> None:
    """scale = alpha / rank (alpha / sqrt(rank) with rsLoRA); no alpha: 1, as kohya and diffusers read it."""
    if layer.down is None or layer.up is None:
        have = ", ".join(f"'{k}'" for k in layer.keys)
        raise _Problem(f"has {have} without its {'up (B)' if layer.up is None else 'down (A)'} weight: incomplete")
    rank = layer.down.shape[0] if layer.down.ndim == 2 else 0
    if layer.down.ndim != 2 or layer.up.ndim != 2 or layer.up.shape[1] != rank or rank == 0:
        raise _Problem(f"'{layer.keys[0]}' and its pair have shapes {list(layer.down.shape)} and "
                       f"{list(layer.up.shape)}, not (rank, in) and (out, rank)")
    if not (layer.down.is_floating_point() and layer.up.is_floating_point()):
        raise _Problem(f"'{layer.keys[0]}' is not floating-point")
    alpha = layer.alpha if layer.alpha not in (None, 0) else None
    if alpha is not None and not math.isfinite(alpha):
        raise _Problem(f"'{layer.keys[0]}' has an alpha of {alpha}")
    layer.scale = 1.0 if alpha is None else alpha / (math.sqrt(rank) if rslora else rank)


def _text_encoder_notice(count: int) -> list[str]:
    return [f"{count} text-encoder tensors ignored (LoRAs apply to the video model only)"] if count else []


# --- names: the file's -> the transformer's -------------------------------------------------------------------------

def _resolve(kind: str, raw: dict[str, _RawLayer], linears: dict[str, tuple[int, int]]) -> dict[str, LoraLayer]:
    """The file's layers under the transformer's module names, converted where the file uses the original
    HunyuanVideo names, each checked against the transformer's layer."""
    kohya_names = {name.replace(".", "_"): name for name in linears}
    layers: dict[str, LoraLayer] = {}
    for name, layer in raw.items():
        if kind == "kohya":
            module = kohya_names.get(name) or _original_from_kohya(name)
        else:
            module = name if name in linears else (name if name.startswith(ORIGINAL_PREFIXES) else None)
        if module is None:
            raise _Problem(f"'{layer.keys[0]}' is not a layer of the F1 transformer (a LoRA for another model?)")
        converted = ([(module, layer.down, layer.up)] if module in linears
                     else _convert_original(module, layer.down, layer.up, linears))
        for target, down, up in converted:
            _check_layer(target, down, up, linears, layer.keys[0])
            if target in layers:
                raise _Problem(f"has two updates for '{target}' ('{layer.keys[0]}' among them)")
            layers[target] = LoraLayer(down, up, layer.scale)
    return layers


def _original_from_kohya(name: str) -> str | None:
    for pattern, dotted in ORIGINAL_KOHYA:
        m = pattern.match(name)
        if m:
            return dotted(m)
    return None


def _convert_original(module: str, down: torch.Tensor, up: torch.Tensor,
                      linears: dict[str, tuple[int, int]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """An original HunyuanVideo layer's update as the updates of the diffusers layers it became (see the module
    docstring for the two converted here)."""
    m = re.fullmatch(r"single_blocks\.(\d+)\.linear1", module)
    if m:  # q, k, v and the MLP's input, fused: one shared down, up split by rows at the model's own width
        block = f"single_transformer_blocks.{m[1]}"
        width = linears.get(f"{block}.attn.to_q", (0, 0))[0]
        if not width or up.shape[0] <= 3 * width:
            raise _Problem(f"'{module}' does not fit the F1 transformer's single blocks (a LoRA for another model?)")
        names = [f"{block}.attn.to_q", f"{block}.attn.to_k", f"{block}.attn.to_v", f"{block}.proj_mlp"]
        return list(zip(names, [down] * 4, torch.split(up, [width, width, width, up.shape[0] - 3 * width])))
    if module == "final_layer.adaLN_modulation.1":  # (shift, scale) rows there, (scale, shift) in diffusers
        shift, scale = up.chunk(2, dim=0)
        return [("norm_out.linear", down, torch.cat([scale, shift]))]
    from diffusers.loaders.lora_conversion_utils import _convert_hunyuan_video_lora_to_diffusers

    try:
        converted = _convert_hunyuan_video_lora_to_diffusers({f"{module}.lora_A.weight": down,
                                                              f"{module}.lora_B.weight": up})
    except (RuntimeError, ValueError, KeyError) as exc:
        raise _Problem(f"'{module}' cannot be converted: {' '.join(str(exc).split())[:120]}") from None
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in converted.items():
        target, ab = _strip_prefix(key).rsplit(".lora_", 1)
        grouped.setdefault(target, {})[ab] = tensor
    return [(target, t["A.weight"], t["B.weight"]) for target, t in grouped.items()]


def _check_layer(target: str, down: torch.Tensor, up: torch.Tensor, linears: dict[str, tuple[int, int]],
                 key: str) -> None:
    shape = linears.get(target)
    if shape is None:
        raise _Problem(f"'{key}' is not a layer of the F1 transformer (a LoRA for another model?)")
    if up.shape[1] != down.shape[0]:
        raise _Problem(f"'{key}' converts to '{target}' with ranks {down.shape[0]} and {up.shape[1]}: this app cannot "
                       f"convert it")
    if (up.shape[0], down.shape[1]) != shape:
        raise _Problem(f"'{key}' is {up.shape[0]}x{down.shape[1]}, but '{target}' of the F1 transformer is "
                       f"{shape[0]}x{shape[1]} (a LoRA for another model?)")
