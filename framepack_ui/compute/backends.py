"""The kernel choices the plan can make, and whether this machine can run them. No torch here: the plan is pure.

The kernels themselves live beside this module (compile.py, attention.py, fp8_linear.py).
"""
from __future__ import annotations

import importlib.util

SAGE = "sage1"
CUDNN_FP8 = "cudnn_fp8"
# The 8-bit kernels the app adapts into diffusers' attention dispatcher (attention.py)
ADAPTED = (SAGE, CUDNN_FP8)
# diffusers' attention dispatcher names that need nothing beyond torch, then the adapted 8-bit kernels
ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient", *ADAPTED)

# what each adapter imports, and the pip package that provides it
PACKAGES = {SAGE: "sageattention (and Triton)", CUDNN_FP8: "nvidia-cudnn-frontend"}
PIP_NAMES = {SAGE: "sageattention", CUDNN_FP8: "nvidia-cudnn-frontend"}
_MODULES = {SAGE: ("sageattention", "triton"), CUDNN_FP8: ("cudnn",)}
# sage1: Triton's int8 tensor-core path (Ampere on); cudnn_fp8: cuDNN's fp8 attention exists from Hopper on
MIN_CAPABILITY = {SAGE: (8, 0), CUDNN_FP8: (9, 0)}
FP8_MATMUL_CAPABILITY = (8, 9)  # e4m3 tensor cores (torch._scaled_mm): Ada (8.9), Hopper (9.0) and later


def package_available(backend: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in _MODULES[backend])


def unusable_because(backend: str, on_gpu: bool, capability: tuple[int, int]) -> str | None:
    """Why the adapter `backend` cannot run on this machine (None: it can, or `backend` is not an adapter)."""
    if backend not in ADAPTED:
        return None
    if not on_gpu:
        return "needs the transformer on a CUDA GPU"
    if tuple(capability) < MIN_CAPABILITY[backend]:
        major, minor = MIN_CAPABILITY[backend]
        return f"needs a GPU of compute capability {major}.{minor} or later"
    if not package_available(backend):
        return f"needs the {PACKAGES[backend]} package: pip install {PIP_NAMES[backend]}"
    return None


# Triton generates code for Volta (7.0) and later; inductor refuses older GPUs (GPUTooOldForTriton)
TRITON_MIN_CAPABILITY = (7, 0)


def compile_supported(device: str, capability: tuple[int, int]) -> bool:
    """torch.compile's GPU code generator is Triton: CUDA only, a GPU it supports, and the package installed
    (on Windows a separate one, triton-windows, which install.py adds)."""
    return (str(device).startswith("cuda") and tuple(capability) >= TRITON_MIN_CAPABILITY
            and importlib.util.find_spec("triton") is not None)


# The attention backends diffusers' Ulysses split runs through (its dispatcher's supports_context_parallel); the
# 8-bit adapters here are not among them
SPLIT_ATTENTION_BACKENDS = ("native", "_native_cudnn", "_native_flash")


def split_heads_problem(heads: int, world_size: int) -> str | None:
    """Why a sequence split over `world_size` GPUs cannot give each GPU whole heads of a `heads`-head transformer
    (context_parallel.py), or None."""
    if world_size < 2:
        return f"a sequence split needs at least 2 GPUs, got {world_size}"
    if heads % world_size:
        divisors = ", ".join(str(n) for n in range(2, heads + 1) if heads % n == 0)
        return f"the video model's {heads} attention heads do not divide among {world_size} GPUs (use {divisors})"
    return None
