"""What a section reads and writes: the history of latents it is conditioned on, and which latents it decodes.

Each section predicts 9 new latent frames (36 video frames) conditioned on the start latent and the last 16 + 2 + 1
history frames at 4x, 2x and 1x compression. After sampling it decodes a tail of the history and cross-fades the
frames it shares with the previous section's decode (`section_frames`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import FRAMES_PER_SECTION, LATENT_WINDOW

HISTORY_SIZES = (16, 2, 1)  # history latent frames fed at 4x, 2x and 1x compression (oldest first)
DECODE_LATENTS = 2 * LATENT_WINDOW  # later sections decode 18 latents and cross-fade 33 of the 69 frames
OVERLAP_FRAMES = LATENT_WINDOW * 4 - 3  # 33
# The context decode (`decode_context` k): a later section decodes its 9 new latents after k older ones instead
# of the official 18. diffusers decodes frame tiles of 16 frames at a stride of 12 (3 latents) counted from the
# first latent it is given, each tile on its own: a k that is a multiple of 3 keeps the official tile grid, so
# the new latents' frames come out bit for bit as in the official decode (checked on the tiny VAE); other k move
# every tile boundary. k = 3 is the smallest such. The official loop cross-fades 33 frames of two decodes; the
# context decode fades only the frames it reproduces exactly (see section_overlap).
ALIGNED_CONTEXT = 3
# Section 1 decodes officially: section 0's decode starts one latent earlier (the start latent), so its tile grid
# is one latent off and only the full 18-latent decode reproduces the official fade between the two.
CONTEXT_FROM_SECTION = 2


@dataclass
class History:
    """The newest latent frames (1, 16, T, h, w), zero-padded at the start as the official demo does."""
    latents: torch.Tensor

    @classmethod
    def start(cls, start_latent: torch.Tensor) -> "History":
        zeros = torch.zeros_like(start_latent).repeat(1, 1, sum(HISTORY_SIZES), 1, 1)
        return cls(torch.cat([zeros, start_latent], dim=2))

    def conditioning(self, start_latent: torch.Tensor) -> dict:
        """The transformer's clean-latent inputs, with their frame indices in the official layout."""
        kept = self.latents[:, :, -sum(HISTORY_SIZES):]
        latents_4x, latents_2x, latents_1x = kept.split(HISTORY_SIZES, dim=2)
        # Frame positions: [start, 16 x 4x, 2 x 2x, 1 x 1x, 9 new] = 0 | 1..16 | 17..18 | 19 | 20..28
        indices = torch.arange(1 + sum(HISTORY_SIZES) + LATENT_WINDOW)
        start_idx, idx_4x, idx_2x, idx_1x, idx_new = indices.split([1, *HISTORY_SIZES, LATENT_WINDOW])
        # diffusers' FramePack RoPE takes 1-D index tensors (the official model took (1, N))
        return dict(
            indices_latents=idx_new,
            latents_clean=torch.cat([start_latent, latents_1x], dim=2),
            indices_latents_clean=torch.cat([start_idx, idx_1x]),
            latents_history_2x=latents_2x, indices_latents_history_2x=idx_2x,
            latents_history_4x=latents_4x, indices_latents_history_4x=idx_4x,
        )

    def append(self, new_latents: torch.Tensor) -> None:
        # Only the newest frames are ever read (19 for conditioning, 18 for decoding): keep memory flat.
        keep = max(sum(HISTORY_SIZES), DECODE_LATENTS)
        self.latents = torch.cat([self.latents, new_latents], dim=2)[:, :, -keep:]


def _context(section: int, decode_context: int | None, from_section: int) -> int | None:
    """The context this section decodes with; None: the official decode."""
    if decode_context is None or section < from_section or decode_context >= LATENT_WINDOW:
        return None
    return decode_context


def decode_latent_count(section: int, decode_context: int | None = None,
                        from_section: int = CONTEXT_FROM_SECTION) -> int:
    """Latents a section decodes: the first its 9 and the start latent; a later one the last 18 (official) or,
    with a context from `from_section` on, its 9 new ones after `decode_context` older ones."""
    if section == 0:
        return LATENT_WINDOW + 1
    context = _context(section, decode_context, from_section)
    return DECODE_LATENTS if context is None else LATENT_WINDOW + context


def section_overlap(section: int, decode_context: int | None = None, from_section: int = CONTEXT_FROM_SECTION) -> int:
    """Frames before a later section's last 36 that cross-fade into the video (official: 33, its whole old part).

    A context decode of k latents gives 1 frame for the first and 4 for each other; the first two latents' frames
    differ from the official decode (its own first frame; a tile not blended with the one before), so only the
    remaining 4k - 8 frames fade in, with the end of the official weights; the frame before them keeps weight 1.
    """
    context = _context(section, decode_context, from_section)
    return OVERLAP_FRAMES if context is None else max(1, 4 * context - 7)


def section_frames(pixels: torch.Tensor, section: int, decode_context: int | None = None,
                   from_section: int = CONTEXT_FROM_SECTION) -> tuple[torch.Tensor, int | None]:
    """A section's decoded frames as the writer takes them, and their cross-fade length (None for section 0)."""
    if section == 0:
        return pixels, None
    fade = section_overlap(section, decode_context, from_section)
    return pixels[:, -(FRAMES_PER_SECTION + fade):], fade


def check_decode_context(decode_context: int | None) -> int | None:
    if decode_context is not None and not 1 <= decode_context <= LATENT_WINDOW:
        raise ValueError(f"decode_context must be None or 1..{LATENT_WINDOW}, got {decode_context}")
    return decode_context
