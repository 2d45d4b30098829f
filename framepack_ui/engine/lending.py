"""What the engine needs from whoever lends it models: a small protocol, fulfilled by the memory manager
(memory/manager.py) and by anything a test or benchmark puts in its place.

The engine never loads, places or frees a model itself, and never looks inside the lender: it borrows a model for
a phase (`use`), asks where it computes (`compute_place`), looks prompts up in the lender's prompt cache, and asks
whether a first use is about to be slow (`first_use_notice`), to tell the user why.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

# The models the engine borrows, by name
TEXT_ENCODERS = "text_encoders"  # (llama tokenizer, clip tokenizer, llama model, clip text model)
IMAGE_ENCODER = "image_encoder"  # (SigLIP processor, SigLIP vision model)
VAE = "vae"
TRANSFORMER = "transformer"


# A prompt's embeddings as a prompt cache keeps them (float32, CPU: "llama" (1, L, D), "llama_mask" (1, L),
# "clip_pooled" (1, D_clip)) and the notices its encoding gave
PromptTensors = dict[str, torch.Tensor]


@runtime_checkable
class ModelLender(Protocol):
    def use(self, name: str) -> AbstractContextManager[Any]:
        """Lend the model `name` (one of the names above) for the `with` block: loaded on first use, freed or kept
        after it as the lender decides."""

    def compute_place(self, name: str) -> tuple[torch.device, torch.dtype]:
        """Where `name` computes (device, compute dtype), known before it is loaded: the prompt cache's key
        depends on it."""

    def cached_prompt(self, prompt: str, variant: str) -> tuple[PromptTensors, list[str]] | None:
        """The prompt's embeddings and notices from the lender's prompt cache, or None (also without a cache)."""

    def cache_prompt(self, prompt: str, variant: str, tensors: PromptTensors, notices: list[str]) -> None:
        """Keep the prompt's embeddings for later jobs (a lender without a cache does nothing)."""

    def first_use_notice(self, name: str, shape: tuple[int, ...]) -> str | None:
        """One line for the user when running `name` at `shape` will be slow because it compiles first (the
        lender knows how often: the transformer once per size, the VAE decoder once); None otherwise."""
