"""MagCache for diffusers' FramePack transformer, as diffusers hooks on its blocks (removable, no class swapping).

MagCache (Ma et al., arXiv:2506.09045) skips the 60 blocks on a step when the residual they add is predictable from
the last computed one: the residual's magnitude changes from step to step by a ratio that depends on the model and
the schedule, not on the input, so it is measured once (calibration) and the accumulated error of reusing the old
residual, sum |1 - product of the ratios since|, is known before the step runs. A step is skipped while that error
stays within the threshold, at most K steps in a row, and never in the first `retention_ratio` of the steps.

Why not diffusers' own `hooks.mag_cache` (0.42.1), which this follows: (1) its rule lacks the F1 demo's guard that a
single step's ratio be within 1 +- 0.06, and it rounds the retention steps where the demo truncates them. With the
published ratios the two agree at the defaults for 25 steps, but at threshold 0.15 the library skips step 22 (ratio
0.9375), from 0.25 it skips the last step (ratio 0.785), and at 12 or 30 steps they differ at the default threshold
(tests/test_magcache.py); the published ratios and defaults were tuned with the demo's rule. (2) Its calibration
mode prints the ratios and clears them at the end of each section, so there is nothing to store for later jobs. (3)
It counts steps itself, one per call of the last block, in a context the FramePack transformer never opens
(`cache_context`); the denoiser here says which step and branch (real CFG) each call is, as it does for TeaCache.
What is taken from it: the interpolation of the ratios to another step count (`nearest_interp`). The hooks are
TeaCache's shape (teacache.py): the first block decides, the later ones pass through while skipping, the last
records the residual; so they sit on compiled, streamed, fp8 and LoRA-carrying blocks alike, as TeaCache's do.
diffusers' First-Block Cache (`hooks.first_block_cache`) is another rule (it runs the first block every step and
compares its output), with the same `cache_context` need; it is not offered: the choice is TeaCache or MagCache.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.mag_cache import nearest_interp

from ..compute.compile import transformer_blocks
from .teacache import _PassThroughHook

MAGCACHE_HOOK = "framepack_ui_magcache"
# The F1 demo's guard: a step whose own ratio is further than this from 1 is always computed
SINGLE_STEP_RATIO_LIMIT = 0.06
PUBLISHED_RATIOS_FILE = Path(__file__).with_name("magcache_f1_ratios.json")


def published_ratios() -> tuple[float, ...]:
    """The F1 magnitude ratios published by MagCache's authors, for 25 steps (the file says where from)."""
    return tuple(float(r) for r in json.loads(PUBLISHED_RATIOS_FILE.read_text(encoding="utf-8"))["ratios"])


def ratios_for_steps(ratios: tuple[float, ...], steps: int) -> tuple[float, ...]:
    """`ratios` (one per step of the run they were measured on) for a run of `steps` steps: nearest neighbour, as
    MagCache's own code and diffusers' do."""
    if len(ratios) == steps:
        return tuple(ratios)
    return tuple(float(r) for r in nearest_interp(torch.tensor(ratios, dtype=torch.float64), steps))


@dataclass
class _BranchState:
    accumulated_ratio: float = 1.0
    accumulated_err: float = 0.0
    accumulated_steps: int = 0
    residual: torch.Tensor | None = None


@dataclass
class MagCache:
    """Shared state of the hooks; the denoiser calls `reset()` at each section's start and `begin(step, steps,
    branch)` before each model call, as for TeaCache. With `calibrate`, nothing is skipped and each section's
    ratios (the positive branch's) are recorded in `calibration`."""
    ratios: tuple[float, ...]  # measured on a run of len(ratios) steps; ratios[0] is 1
    threshold: float = 0.10
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    calibrate: bool = False
    computed_calls: int = 0
    skipped_calls: int = 0
    calibration: list[list[float]] = field(default_factory=list)  # per section: one ratio per step
    skipping: bool = False
    _branches: dict[str, _BranchState] = field(default_factory=dict)
    _step: int = 0
    _steps: int = 1
    _branch: str = "positive"
    _scaled: dict[int, tuple[float, ...]] = field(default_factory=dict)
    _block_input: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the previous section (each section starts at sigma 1 again)."""
        self._branches.clear()
        if self.calibrate:
            self.calibration.append([])

    def begin(self, step: int, steps: int, branch: str = "positive") -> None:
        self._step, self._steps, self._branch = step, steps, branch

    def ratio_at(self, step: int, steps: int) -> float:
        if steps not in self._scaled:
            self._scaled[steps] = ratios_for_steps(self.ratios, steps)
        return self._scaled[steps][step]

    def decide(self) -> bool:
        """True to skip the blocks this call (the F1 demo's rule: magcache_framepack_forward)."""
        state = self._branches.setdefault(self._branch, _BranchState())
        skip = False
        retained = max(1, int(self.retention_ratio * self._steps))  # the demo's int(): truncated
        if (not self.calibrate and self.threshold > 0 and state.residual is not None
                and self._step >= retained):
            ratio = self.ratio_at(self._step, self._steps)
            state.accumulated_ratio *= ratio
            state.accumulated_err += abs(1.0 - state.accumulated_ratio)
            state.accumulated_steps += 1
            skip = (state.accumulated_err <= self.threshold and state.accumulated_steps <= self.max_skip_steps
                    and abs(1.0 - ratio) <= SINGLE_STEP_RATIO_LIMIT)
            if not skip:
                state.accumulated_ratio, state.accumulated_err, state.accumulated_steps = 1.0, 0.0, 0
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
        state = self._branches[self._branch]
        residual = output - self._block_input  # (1, tokens incl. the clean-latent history, C)
        if self.calibrate and self._branch == "positive":
            self._record_ratio(state.residual, residual)
        state.residual = residual
        self._block_input = None

    def _record_ratio(self, previous: torch.Tensor | None, current: torch.Tensor) -> None:
        """The demo's calibration (magcache_framepack_calibration): the mean over tokens of the ratio of the
        residuals' norms, this step's over the previous step's; 1 for a section's first step."""
        if not self.calibration:
            self.calibration.append([])
        if previous is None:
            self.calibration[-1].append(1.0)
            return
        ratio = current.float().norm(dim=-1) / previous.float().norm(dim=-1)
        self.calibration[-1].append(ratio.mean().item())

    def calibrated_ratios(self, steps: int) -> tuple[float, ...] | None:
        """The mean over the sections calibrated in full of each step's ratio; None without one."""
        complete = [section for section in self.calibration if len(section) == steps]
        if not complete:
            return None
        return tuple(sum(values) / len(values) for values in zip(*complete))


class _FirstBlockHook(ModelHook):
    def __init__(self, cache: MagCache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, hidden_states, encoder_hidden_states, *args, **kwargs):
        if self.cache.decide():
            return hidden_states + self.cache.residual, encoder_hidden_states
        self.cache._block_input = hidden_states
        return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, *args, **kwargs)


def apply_magcache(transformer, cache: MagCache) -> MagCache:
    blocks = transformer_blocks(transformer)
    HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(_FirstBlockHook(cache), MAGCACHE_HOOK)
    for i, block in enumerate(blocks[1:], start=1):
        hook = _PassThroughHook(cache, last=i == len(blocks) - 1)
        HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, MAGCACHE_HOOK)
    return cache


def remove_magcache(transformer) -> None:
    for block in transformer_blocks(transformer):
        registry = getattr(block, "_diffusers_hook", None)
        if registry is not None:
            registry.remove_hook(MAGCACHE_HOOK, recurse=False)
