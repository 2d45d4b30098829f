"""The transformer's output projection in fp32, as the official demo runs inference.

The official FramePack transformer sets `high_quality_fp32_output_for_inference`: `norm_out` stays in the compute
dtype, then `proj_out` gets fp32 weights and an fp32 input, so the velocity the sampler integrates is not rounded
to bf16 at every step (rounded, a tiny model's latents moved about 0.13 % per section, compounding over
sections). diffusers' FramePack transformer has no such switch: a removable pre-hook on `proj_out` does it.
The projection is 3072 -> 64 (0.2 M parameters), so its fp32 copy costs nothing worth planning for; the step time
it costs is in docs/benchmarks.md, "fp32 output projection".
"""
from __future__ import annotations

import weakref

import torch

# proj_out -> the handle of its fp32-input pre-hook. A torch forward pre-hook rather than a diffusers hook: diffusers
# wraps the instance's `forward`, which a later class swap of the layer (a LoRA's, compute/lora.py) would bypass.
_FP32_INPUT_HOOKS: "weakref.WeakKeyDictionary[torch.nn.Module, torch.utils.hooks.RemovableHandle]" = \
    weakref.WeakKeyDictionary()


def _fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _inputs_to_fp32(module, args, kwargs):
    return tuple(_fp32(a) for a in args), {k: _fp32(v) for k, v in kwargs.items()}


def output_in_fp32(transformer: torch.nn.Module) -> bool:
    return computes_in_fp32(transformer.proj_out)


def computes_in_fp32(module: torch.nn.Module) -> bool:
    """Whether `module` is an output projection put in fp32 here (whoever casts weights per call leaves it be)."""
    return module in _FP32_INPUT_HOOKS


def compute_output_in_fp32(transformer: torch.nn.Module) -> None:
    """`proj_out` in fp32 on whatever device it is on (idempotent). The model's output is then fp32."""
    proj_out = transformer.proj_out
    proj_out.to(torch.float32)
    if proj_out not in _FP32_INPUT_HOOKS:
        _FP32_INPUT_HOOKS[proj_out] = proj_out.register_forward_pre_hook(_inputs_to_fp32, with_kwargs=True)


def compute_output_in(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo `compute_output_in_fp32`: `proj_out` back to `dtype` without the hook (benchmarks compare the two)."""
    handle = _FP32_INPUT_HOOKS.pop(transformer.proj_out, None)
    if handle is not None:
        handle.remove()
    transformer.proj_out.to(dtype)
