"""Shared test inputs: one forward's worth of F1 transformer inputs for a tiny model (8x8 latents)."""
from __future__ import annotations

import torch

from framepack_ui.engine import sections


def transformer_inputs(transformer, seed: int = 0) -> dict:
    """Random noisy latents, text/pooled/image embeddings and a mid-video history, in the F1 layout."""
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(1, 16, 1, 8, 8, generator=g)
    history = sections.History.start(start)
    history.append(torch.randn(1, 16, 9, 8, 8, generator=g))
    return dict(hidden_states=torch.randn(1, 16, 9, 8, 8, generator=g), timestep=torch.tensor([700.0]),
                encoder_hidden_states=torch.randn(1, 6, cfg.text_embed_dim, generator=g),
                encoder_attention_mask=torch.ones(1, 6, dtype=torch.long),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                image_embeds=torch.randn(1, 4, cfg.image_proj_dim, generator=g),
                guidance=torch.tensor([10000.0]), return_dict=False, **history.conditioning(start))
