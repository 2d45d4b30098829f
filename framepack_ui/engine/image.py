"""Start-image handling: the official aspect buckets, cover-resize + centre crop, and SigLIP features."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

# The official F1 buckets at resolution 640, as (height, width), in the official order (ties keep the later one).
BUCKETS_640 = ((416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
               (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416))
SIDE_MULTIPLE = 16  # the VAE (8x) and the transformer's 2x2 patches need sides divisible by 16


def buckets(resolution: int = 640) -> list[tuple[int, int]]:
    """The 640 bucket set scaled by resolution/640, sides rounded to multiples of 16."""
    scale = resolution / 640
    return [(max(SIDE_MULTIPLE, round(h * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE),
             max(SIDE_MULTIPLE, round(w * scale / SIDE_MULTIPLE) * SIDE_MULTIPLE)) for h, w in BUCKETS_640]


def nearest_bucket(height: int, width: int, resolution: int = 640) -> tuple[int, int]:
    best, best_metric = None, float("inf")
    for bucket_h, bucket_w in buckets(resolution):
        metric = abs(height * bucket_w - width * bucket_h)
        if metric <= best_metric:  # `<=`: on a tie the later bucket wins, as in the official loop
            best, best_metric = (bucket_h, bucket_w), metric
    return best


def load_image(path: str) -> np.ndarray:
    """RGB uint8 (H, W, 3), EXIF rotation applied, transparency flattened onto white."""
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "P"):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            rgb = np.array(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InputError(f"cannot read the image {path}: {exc.__class__.__name__}") from exc
    if rgb.shape[0] < 16 or rgb.shape[1] < 16:
        raise InputError(f"the image {path} is too small ({rgb.shape[1]}x{rgb.shape[0]}); use at least 16x16")
    return rgb


def resize_and_center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Cover-resize with Lanczos, then crop the centre, as the official demo."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    pil = Image.fromarray(image)
    scale = max(width / pil.width, height / pil.height)
    resized = pil.resize((int(round(pil.width * scale)), int(round(pil.height * scale))), Image.LANCZOS)
    left, top = (resized.width - width) / 2, (resized.height - height) / 2
    return np.array(resized.crop((left, top, left + width, top + height)))


def to_model_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (1, 3, 1, H, W) in [-1, 1], the VAE's input layout."""
    return (torch.from_numpy(image).float() / 127.5 - 1).permute(2, 0, 1)[None, :, None]


@torch.no_grad()
def encode_siglip(image: np.ndarray, processor, image_encoder) -> torch.Tensor:
    """SigLIP last_hidden_state, (1, 729, 1152) for the real model."""
    pixels = processor.preprocess(images=image, return_tensors="pt").pixel_values
    pixels = pixels.to(image_encoder.device, image_encoder.dtype)
    return image_encoder(pixel_values=pixels).last_hidden_state.float().cpu()
