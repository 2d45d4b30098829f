"""The transformer's output projection in fp32, as the official demo runs inference.

The official FramePack transformer sets `high_quality_fp32_output_for_inference`: `norm_out` stays in the compute
dtype, then `proj_out` gets fp32 weights and an fp32 input, so the velocity the sampler integrates is not rounded
to bf16 at every step (rounded, a tiny model's latents moved about 0.13 % per section, compounding over
sections). diffusers' FramePack transformer has no such switch: a named, removable hook on `proj_out` does it.
The projection is 3072 -> 64 (0.2 M parameters), so its fp32 copy costs nothing worth planning for; the step time
it costs is in docs/benchmarks.md, "fp32 output projection".
"""
from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

FP32_OUTPUT_HOOK = "framepack_fp32_output"


class Fp32Input(ModelHook):
    """Casts the floating-point inputs of the hooked layer to fp32 (its weights are fp32 already)."""

    def pre_forward(self, module, *args, **kwargs):
        return tuple(_fp32(a) for a in args), {k: _fp32(v) for k, v in kwargs.items()}


def _fp32(value):
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _registry(module: torch.nn.Module):
    return getattr(module, "_diffusers_hook", None)  # diffusers' own registry attribute


def output_in_fp32(transformer: torch.nn.Module) -> bool:
    registry = _registry(transformer.proj_out)
    return registry is not None and registry.get_hook(FP32_OUTPUT_HOOK) is not None


def compute_output_in_fp32(transformer: torch.nn.Module) -> None:
    """`proj_out` in fp32 on whatever device it is on (idempotent). The model's output is then fp32."""
    proj_out = transformer.proj_out
    proj_out.to(torch.float32)
    if not output_in_fp32(transformer):
        HookRegistry.check_if_exists_or_initialize(proj_out).register_hook(Fp32Input(), FP32_OUTPUT_HOOK)


def compute_output_in(transformer: torch.nn.Module, dtype: torch.dtype) -> None:
    """Undo `compute_output_in_fp32`: `proj_out` back to `dtype` without the hook (benchmarks compare the two)."""
    if output_in_fp32(transformer):
        transformer.proj_out._diffusers_hook.remove_hook(FP32_OUTPUT_HOOK, recurse=False)
    transformer.proj_out.to(dtype)
