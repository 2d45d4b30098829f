"""TeaCache for diffusers' FramePack transformer, as diffusers hooks (removable, no class swapping).

Each step, the relative L1 change of block 0's modulated input is rescaled by a fixed polynomial and
accumulated; while the sum stays under the threshold, the 60 blocks are skipped and the residual they added at
the last computed step is reused. The first and last steps of a section always run. diffusers ships
FirstBlockCache / MagCache / TaylorSeer but not TeaCache, whose threshold users know from the official demo.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..compute.compile import transformer_blocks

# Polynomial from the official FramePack TeaCache (fitted for HunyuanVideo), highest power first.
RESCALE_POLY = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)
TEACACHE_HOOK = "framepack_ui_teacache"


@dataclass
class _BranchState:
    accumulated: float = 0.0
    previous_modulated: torch.Tensor | None = None
    residual: torch.Tensor | None = None


@dataclass
class TeaCache:
    """Shared state of the hooks. The denoiser calls `begin(step, steps, branch)` before each model call;
    `branch` keeps the positive and negative (real CFG) calls from sharing one history."""
    threshold: float
    computed_calls: int = 0
    skipped_calls: int = 0
    _branches: dict[str, _BranchState] = field(default_factory=dict)
    _step: int = 0
    _steps: int = 1
    _branch: str = "positive"
    skipping: bool = False
    _block_input: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the previous section's history (each section starts at sigma 1 again)."""
        self._branches.clear()

    def begin(self, step: int, steps: int, branch: str = "positive") -> None:
        self._step, self._steps, self._branch = step, steps, branch

    def decide(self, modulated: torch.Tensor) -> bool:
        """True to skip the blocks this call."""
        state = self._branches.setdefault(self._branch, _BranchState())
        always_run = self.threshold <= 0 or self._step in (0, self._steps - 1) or state.residual is None
        skip = False
        if not always_run:
            prev = state.previous_modulated
            change = ((modulated - prev).abs().mean() / prev.abs().mean()).item()
            state.accumulated += _poly(change)
            skip = state.accumulated < self.threshold
        if not skip:
            state.accumulated = 0.0
        state.previous_modulated = modulated
        self.skipping = skip
        if skip:
            self.skipped_calls += 1
        else:
            self.computed_calls += 1
        return skip

    @property
    def residual(self) -> torch.Tensor:
        return self._branches[self._branch].residual

    def store_residual(self, output: torch.Tensor) -> None:
        self._branches[self._branch].residual = output - self._block_input
        self._block_input = None


def _poly(x: float) -> float:
    result = 0.0
    for coefficient in RESCALE_POLY:
        result = result * x + coefficient
    return result


class _FirstBlockHook(ModelHook):
    def __init__(self, cache: TeaCache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, hidden_states, encoder_hidden_states, temb, *args, **kwargs):
        modulated = module.norm1(hidden_states, emb=temb)[0]
        if self.cache.decide(modulated):
            return hidden_states + self.cache.residual, encoder_hidden_states
        self.cache._block_input = hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, temb, *args, **kwargs)


class _PassThroughHook(ModelHook):
    """Later blocks: skipped while the first block reused the residual; the last one records the residual."""

    def __init__(self, cache: TeaCache, last: bool):
        super().__init__()
        self.cache, self.last = cache, last

    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        if self.cache.skipping:
            return hidden_states, encoder_hidden_states
        hidden_states, encoder_hidden_states = self.fn_ref.original_forward(
            hidden_states, encoder_hidden_states, *args, **kwargs)
        if self.last:
            self.cache.store_residual(hidden_states)
        return hidden_states, encoder_hidden_states


def apply_teacache(transformer, threshold: float) -> TeaCache:
    cache = TeaCache(threshold)
    blocks = transformer_blocks(transformer)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(_FirstBlockHook(cache), TEACACHE_HOOK)
    for i, block in enumerate(blocks[1:], start=1):
        hook = _PassThroughHook(cache, last=i == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, TEACACHE_HOOK)
    return cache


def remove_teacache(transformer) -> None:
    for block in transformer_blocks(transformer):
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None:
            registry.remove_hook(TEACACHE_HOOK, recurse=False)
