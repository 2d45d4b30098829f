"""VAE encode/decode and the cheap latent-to-RGB preview."""
from __future__ import annotations

import numpy as np
import torch

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
def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (1, 16, T, h, w) -> pixels (3, 1 + 4 (T - 1), 8h, 8w), float32 in about [-1, 1], CPU."""
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return vae.decode(latents).sample[0].float().cpu()


def preview_strip(latents: torch.Tensor) -> np.ndarray:
    """Denoised latents (1, 16, T, h, w) -> uint8 (h, T*w, 3): the section's frames side by side."""
    weight = torch.tensor(LATENT_RGB_FACTORS, dtype=torch.float32).T[:, :, None, None, None]  # (3, 16, 1, 1, 1)
    bias = torch.tensor(LATENT_RGB_BIAS, dtype=torch.float32)
    rgb = torch.nn.functional.conv3d(latents.float().cpu(), weight, bias).clamp(0, 1)  # (1, 3, T, h, w)
    strip = rgb[0].permute(2, 1, 3, 0).flatten(1, 2)  # (h, T*w, 3)
    return (strip * 255).round().to(torch.uint8).numpy()
