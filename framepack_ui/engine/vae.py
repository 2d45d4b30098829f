"""VAE encode/decode and the cheap latent-to-RGB preview."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..compute.compile import decodes_in_even_tiles

# Linear 16 -> 3 map from latents to approximate RGB (ComfyUI's factors, used by the official demo): lets the
# UI show every step of a section at 1/8 scale without running the VAE.
LATENT_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445), (0.0696, 0.0795, 0.0518), (0.0135, -0.0945, -0.0282), (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224), (-0.0804, -0.0254, -0.0639), (-0.0991, 0.0271, -0.0669), (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894), (-0.0799, -0.0208, -0.0375), (0.1166, 0.1627, 0.0962), (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355), (-0.0270, 0.0401, -0.0821), (-0.0616, -0.0997, -0.0727), (0.0249, -0.0469, -0.1703),
)
LATENT_RGB_BIAS = (0.0259, -0.0192, -0.3506)


@torch.no_grad()
def encode(vae, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(1, 3, 1, H, W) in [-1, 1] -> scaled latent (1, 16, 1, H/8, W/8), float32 on the CPU.

    Samples the latent distribution as the official demo does, but from a seeded generator, so a seed
    reproduces the same start latent.
    """
    dist = vae.encode(image.to(vae.device, vae.dtype)).latent_dist
    noise = torch.randn(dist.mean.shape, generator=generator, dtype=torch.float32)
    latent = dist.mean.float().cpu() + dist.std.float().cpu() * noise
    return latent * vae.config.scaling_factor


@torch.no_grad()
def decode(vae, latents: torch.Tensor, even_tiles: bool | None = None) -> torch.Tensor:
    """Scaled latents (1, 16, T, h, w) -> pixels (3, 1 + 4 (T - 1), 8h, 8w), float32 in about [-1, 1], CPU.

    diffusers' own tiling, unless the decoder is set up for compiling (compute/compile.py): then spatial tiles
    of one size (decode_in_even_tiles). `even_tiles` forces one way or the other."""
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    if decodes_in_even_tiles(vae) if even_tiles is None else even_tiles:
        return decode_in_even_tiles(vae, latents)[0].float().cpu()
    return vae.decode(latents).sample[0].float().cpu()


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """diffusers' frame windows over `length` latents (a window of `window` every `stride`, the last ones cut
    short; none at all up to window - 1), less a last window of one latent: its only frame would be dropped."""
    if length < window:
        return [0]
    return [start for start in range(0, length, stride) if start == 0 or start < length - 1]


def balanced_tiles(length: int, largest: int, overlap: int) -> tuple[int, list[int]]:
    """(size, starts) of the fewest equal tiles no larger than `largest` that cover `length`, each overlapping the
    next by at least `overlap`: as few tiles as diffusers' grid, no thin edge tile."""
    if length <= largest:
        return length, [0]
    count = math.ceil((length - overlap) / (largest - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    return size, [round(i * (length - size) / (count - 1)) for i in range(count)]


def _ramp(n: int, like: torch.Tensor) -> torch.Tensor:
    """diffusers' blend weights of the newer tile over its first n rows: 0, 1/n, ..., (n - 1)/n."""
    return torch.arange(n, device=like.device, dtype=like.dtype) / n


@torch.no_grad()
def decode_in_even_tiles(vae, z: torch.Tensor) -> torch.Tensor:
    """Unscaled latents (1, 16, T, h, w) on the VAE's device -> pixels (1, 3, 1 + 4 (T - 1), 8h, 8w) there.

    Why: a compiled decoder is specialised to the shapes it sees. diffusers' tiler cuts thin edge tiles (at 640x608 with
    384 px tiles: 48 or 40 by 48 or 36 latents), and an 8 GB job spent minutes compiling (docs/benchmarks.md, "Even
    spatial tiles for the compiled decoder"). Here the spatial tiles are equal, as many as diffusers', overlapping at
    least as much and blended with its ramp; the frame windows are exactly diffusers' (moving a window changes every
    frame of it: its GroupNorm sees the whole window), so the last, shorter window is a second shape: the compiled
    decoder runs it eagerly (compute/compile.py).
    """
    s_ratio, t_ratio = vae.spatial_compression_ratio, vae.temporal_compression_ratio
    z = vae.post_quant_conv(z)  # a 1x1x1 convolution: the same on the whole as per tile
    _, _, frames_in, height, width = z.shape
    if vae.use_tiling:
        overlap = (vae.tile_sample_min_height - vae.tile_sample_stride_height) // s_ratio
        tile_h, rows = balanced_tiles(height, vae.tile_sample_min_height // s_ratio, overlap)
        tile_w, cols = balanced_tiles(width, vae.tile_sample_min_width // s_ratio, overlap)
    else:
        (tile_h, rows), (tile_w, cols) = (height, [0]), (width, [0])
    blend_px = vae.tile_sample_min_height - vae.tile_sample_stride_height
    window = vae.tile_sample_min_num_frames // t_ratio + 1
    blend_frames = vae.tile_sample_min_num_frames - vae.tile_sample_stride_num_frames

    out = None
    for t0 in window_starts(frames_in, window, vae.tile_sample_stride_num_frames // t_ratio):
        chunk = None
        for y0 in rows:
            for x0 in cols:
                # a copy, not a view: dynamo guards a view's base, whose size changes with the latent count
                tile = vae.decoder(z[:, :, t0:t0 + window, y0:y0 + tile_h, x0:x0 + tile_w].clone())
                if chunk is None:
                    chunk = tile.new_zeros(*tile.shape[:3], height * s_ratio, width * s_ratio)
                weight = torch.ones_like(tile[0, 0, 0])
                if y0:
                    weight[:blend_px] *= _ramp(blend_px, weight)[:, None]
                if x0:
                    weight[:, :blend_px] *= _ramp(blend_px, weight)[None, :]
                y, x = y0 * s_ratio, x0 * s_ratio
                chunk[..., y:y + tile.shape[-2], x:x + tile.shape[-1]].lerp_(tile, weight)
                del tile
        if out is None:
            out = chunk.new_zeros(*chunk.shape[:2], 1 + t_ratio * (frames_in - 1), *chunk.shape[3:])
            out[:, :, :chunk.shape[2]] = chunk
            continue
        chunk = chunk[:, :, 1:]  # a later window's first frame is decoded as a video's first: dropped, as diffusers
        start = 1 + t_ratio * t0
        blend = min(blend_frames, chunk.shape[2])  # diffusers' blend_t: over fewer frames if the window has fewer
        weight = torch.ones(chunk.shape[2], 1, 1, device=chunk.device, dtype=chunk.dtype)
        weight[:blend, 0, 0] = _ramp(blend, weight)
        out[:, :, start:start + chunk.shape[2]].lerp_(chunk, weight)
    return out


class PendingPreview:
    """Denoised latents (1, 16, T, h, w) -> uint8 (h, T*w, 3), the section's frames side by side, computed where
    the latents are, its copy to the host started without waiting for the GPU.

    Why: copying each step's latents to the host made every step wait for the GPU to drain and then left it idle while
    the host worked (docs/benchmarks.md, "Sampler on the device and previews without a sync"). `wait()` returns the
    strip once the GPU got there."""

    _rgb_maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __init__(self, latents: torch.Tensor):
        weight, bias = self._rgb_map(latents.device)
        rgb = torch.nn.functional.conv3d(latents.float(), weight, bias).clamp(0, 1)
        strip = (rgb[0].permute(2, 1, 3, 0).flatten(1, 2) * 255).round().to(torch.uint8)  # (h, T*w, 3)
        self._event = None
        if strip.is_cuda:
            self._strip = torch.empty(strip.shape, dtype=torch.uint8, pin_memory=True)
            self._strip.copy_(strip, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._strip = strip

    @classmethod
    def _rgb_map(cls, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The 16 -> 3 map on `device`, made once: copying it there each step would wait for the GPU each step."""
        if device not in cls._rgb_maps:
            weight = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32).T[:, :, None, None, None]  # (3, 16, 1, 1, 1)
            cls._rgb_maps[device] = (weight.to(device), torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32).to(device))
        return cls._rgb_maps[device]

    def wait(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()
            # a copy, so the page-locked buffer goes back to torch's cache for the next step: one held by the UI
            # would make each step allocate page-locked memory anew (cudaHostAlloc can wait for the GPU)
            return self._strip.numpy().copy()
        return self._strip.numpy()
