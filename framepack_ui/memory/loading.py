"""Load each component from its folder in the real Hugging Face layout, with the real library classes.

Every loader turns a broken or missing file into a ModelFilesError naming the folder, so the user sees one
line ("... is truncated or corrupt: re-download it") instead of a safetensors traceback.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import ModelFilesError
from .exhaustion import out_of_host_memory
from .storage import load_mapped_pretrained as mapped_pretrained
from .storage import load_mapped_transformer as mapped_transformer
from ..weights.layout import COMPONENTS

log = logging.getLogger(__name__)


@contextmanager
def _explain_failures(name: str, folder: Path):
    try:
        yield
    except ModelFilesError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, json.JSONDecodeError) as exc:
        if out_of_host_memory(exc):
            raise  # not the files' fault: the manager says what the load needed (exhaustion.py)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFilesError(
            f"could not load {name} from {folder}: {first_line[:300]} (the files may be incomplete or corrupt: "
            f"delete them and download again)"
        ) from exc


def _folder(models_dir: Path, name: str) -> Path:
    folder = COMPONENTS[name].folder(models_dir)
    lacking = COMPONENTS[name].missing_files(models_dir)
    if lacking:
        names = ", ".join(p.name for p in lacking)
        raise ModelFilesError(f"{name} is missing files in {folder}: {names}")
    return folder


def _mapped(load, dtype: torch.dtype, device: torch.device):
    """A read-only-mapped model, computed on the CPU in `dtype` (upcast per module) or copied to the GPU.

    On the GPU the map is only the source of one copy into VRAM: no RAM copy and no commit charge on the way.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return load(dtype)
    return load(None).to(device=device, dtype=dtype)


def load_text_encoder(models_dir: Path, dtype: torch.dtype, device: torch.device, storage: str = "ram"):
    from transformers import LlamaModel

    folder = _folder(models_dir, "text_encoder")
    if storage == "map":
        return _mapped(lambda d: mapped_pretrained(LlamaModel, folder, d), dtype, device)
    with _explain_failures("text_encoder", folder):
        model = LlamaModel.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_text_encoder_2(models_dir: Path, dtype: torch.dtype, device: torch.device, storage: str = "ram"):
    from transformers import CLIPTextModel

    folder = _folder(models_dir, "text_encoder_2")
    if storage == "map":
        return _mapped(lambda d: mapped_pretrained(CLIPTextModel, folder, d, None, "model.safetensors"), dtype, device)
    with _explain_failures("text_encoder_2", folder):
        model = CLIPTextModel.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval().requires_grad_(False)


def load_tokenizers(models_dir: Path):
    from ..weights.tokenizers import load_clip_tokenizer, load_llama_tokenizer

    return (load_llama_tokenizer(_folder(models_dir, "tokenizer")),
            load_clip_tokenizer(_folder(models_dir, "tokenizer_2")))


def load_image_encoder(models_dir: Path, dtype: torch.dtype, device: torch.device):
    from transformers import SiglipVisionModel

    try:  # the PIL processor is what transformers falls back to without torchvision (which we don't install)
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    processor_folder = _folder(models_dir, "feature_extractor")
    folder = _folder(models_dir, "image_encoder")
    with _explain_failures("feature_extractor", processor_folder):
        processor = SiglipImageProcessor.from_pretrained(processor_folder)
    with _explain_failures("image_encoder", folder):
        model = SiglipVisionModel.from_pretrained(folder, dtype=dtype)
    return processor, model.to(device).eval().requires_grad_(False)


def load_vae(models_dir: Path, dtype: torch.dtype, device: torch.device, tiling: bool = False,
             tile_px: int = 256):
    from diffusers import AutoencoderKLHunyuanVideo

    from .plan import VAE_TILE_OVERLAP_PX

    folder = _folder(models_dir, "vae")
    with _explain_failures("vae", folder):
        model = AutoencoderKLHunyuanVideo.from_pretrained(folder, torch_dtype=dtype)
    if tiling:  # the plan asks for it when an untiled decode would not fit (21.8 GB at 640 px), in the largest
        # tiles that fit (frame tiles stay diffusers' 16/12: the context decode relies on that grid)
        stride = tile_px - VAE_TILE_OVERLAP_PX
        model.enable_tiling(tile_sample_min_height=tile_px, tile_sample_min_width=tile_px,
                            tile_sample_stride_height=stride, tile_sample_stride_width=stride)
    return model.to(device).eval().requires_grad_(False)


def load_transformer(models_dir: Path, dtype: torch.dtype, device: torch.device, storage: str = "ram"):
    """storage "map": every weight read-only-mapped from the files (see storage.py); "ram": diffusers' loader;
    "fp8": the block Linears mapped from the fp8 cache (fp8.py, converted once from the bf16 shards)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    folder = _folder(models_dir, "transformer")
    if storage == "fp8":
        from .fp8 import load_fp8_transformer_on

        model = load_fp8_transformer_on(folder, dtype, device)
    elif storage == "map":
        model = _mapped(lambda d: mapped_transformer(folder, d), dtype, device)
    else:
        with _explain_failures("transformer", folder):
            model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(folder, torch_dtype=dtype)
    if model.image_projection is None or model.clean_x_embedder is None:
        # The forward calls both unconditionally; a config without them cannot run F1.
        raise ModelFilesError(f"{folder}/config.json lacks has_image_proj / has_clean_x_embedder: not a FramePack model")
    if storage == "fp8":
        return model.eval().requires_grad_(False)  # fp8.to_device placed it (fp8 kept, the rest in dtype)
    return model.to(device).eval().requires_grad_(False)


def import_model_classes() -> None:
    """Import every model class the loaders use now (transformers imports them lazily, on first use): the web app
    does it before it serves, so the first job does not hold the interpreter lock for an import while pages wait."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel  # noqa: F401
    from transformers import CLIPTextModel, LlamaModel, SiglipVisionModel  # noqa: F401
