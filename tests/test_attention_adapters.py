"""The 8-bit attention adapters (compute/attention.py) on the CPU: their kernels are CUDA-only, so each test stands
in for the vendor kernel at its boundary (sageattention's `sageattn`, the cuDNN graph run) and checks everything
the app does around it: routing every attention call of the real tiny transformer through diffusers' dispatcher,
the key smoothing, the e4m3 scales and the dequantized output. Speed and the kernels' own error are measured on
the GPU (bench/bench_attention.py, docs/benchmarks.md)."""
from __future__ import annotations

import importlib.machinery
import sys
import types
from dataclasses import replace

import pytest
import torch

from framepack_ui.errors import MemoryPlanError
from framepack_ui.compute import attention, backends
from framepack_ui.memory import loading
from framepack_ui.memory.plan import PlanOverrides, make_plan, real_weights
from framepack_ui.memory.probe import Machine
from framepack_ui.weights.tiny import make_tiny_models
from model_inputs import transformer_inputs

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_transformer(tiny_models_dir):
    return loading.load_transformer(tiny_models_dir, torch.float32, CPU)


@pytest.fixture(scope="module")
def wide_head_transformer(tmp_path_factory):
    """Heads of 32 (the tiny default's 8 is below what cuDNN's fp8 kernel takes)."""
    models = tmp_path_factory.mktemp("wideheads")
    make_tiny_models(models, transformer_mb=16, seed=0)
    model = loading.load_transformer(models, torch.float32, CPU)
    assert attention.cudnn_fp8_head_dim_ok(model.config.attention_head_dim)
    return model


def _sdpa_nhd(q, k, v, scale=None, attn_mask=None):
    return torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=attn_mask, scale=scale).transpose(1, 2)


def _forward(model):
    with torch.no_grad():
        return model(**transformer_inputs(model))[0]


def _native_and_with(model, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's output with torch's attention, then with `backend` (set back to native after)."""
    want = _forward(model)
    try:
        attention.set_attention(model, backend)
        return want, _forward(model)
    finally:
        attention.set_attention(model, "native")


def test_e4m3_scales_are_powers_of_two_and_keep_the_tensor():
    x = torch.randn(1, 300, 4, 16, generator=torch.Generator().manual_seed(0)) * 7
    x8, descale = attention.to_e4m3(x)
    assert x8.dtype == torch.float8_e4m3fn and descale.shape == (1, 1, 1, 1)
    assert torch.log2(descale).item() == round(torch.log2(descale).item())  # exact power of two
    assert x8.float().abs().max() <= attention.E4M3_MAX
    # the range is used, not wasted: a power-of-two scale puts the largest value in [224, 448) before rounding
    assert x8.float().abs().max() >= attention.E4M3_MAX / 2
    assert ((x8.float() * descale - x).norm() / x.norm()).item() < 0.04  # e4m3: 3 mantissa bits


def test_sage1_routes_every_attention_call_through_sageattention(tiny_transformer, monkeypatch):
    calls = []

    def sageattn(q, k, v, tensor_layout, is_causal, sm_scale, smooth_k):
        assert tensor_layout == "NHD" and not is_causal and not smooth_k
        calls.append(k.mean(dim=1).abs().max().item())
        return _sdpa_nhd(q, k, v, sm_scale)

    stand_in = types.ModuleType("sageattention")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("sageattention", None)
    stand_in.sageattn = sageattn
    monkeypatch.setitem(sys.modules, "sageattention", stand_in)
    monkeypatch.setattr(backends, "package_available", lambda backend: True)  # Triton is CUDA-only
    model = tiny_transformer
    want, got = _native_and_with(model, attention.SAGE)
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert len(calls) == blocks  # every block's attention, none left on torch's SDPA
    assert max(calls) < 1e-5  # the keys reach the kernel smoothed (mean over the tokens taken out)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # smoothing does not change softmax
    _forward(model)
    assert len(calls) == blocks  # back on "native": the stand-in is no longer called


def test_cudnn_fp8_quantizes_around_the_kernel_and_gives_the_attention_back(wide_head_transformer, monkeypatch):
    """The kernel stand-in does what cuDNN's fp8 graph does (descale Q, K, V; attend; write O times scale_o in
    e4m3) but keeps P exact: what is left is the adapter's own quantizing, which must stay within e4m3's error."""
    seen = []

    def run(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale):
        q, k, v = (x.float() * d for x, d in ((q8, descale_q), (k8, descale_k), (v8, descale_v)))
        seen.append((k.mean(dim=1).abs().max().item(), attn_scale, q8.dtype))
        o = _sdpa_nhd(q, k, v, attn_scale) * scale_o
        assert o.abs().max() <= attention.E4M3_MAX  # O's scale never overflows e4m3
        return o.to(torch.float8_e4m3fn)

    monkeypatch.setattr(attention._cudnn_graphs, "run", run)
    monkeypatch.setattr(backends, "package_available", lambda backend: True)
    model = wide_head_transformer
    want, got = _native_and_with(model, attention.CUDNN_FP8)
    head_dim = model.config.attention_head_dim
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert len(seen) == blocks and all(dtype == torch.float8_e4m3fn for _, _, dtype in seen)
    assert all(scale == pytest.approx(head_dim ** -0.5) for _, scale, _ in seen)
    assert max(mean for mean, _, _ in seen) < 0.05  # smoothed before quantizing (up to e4m3's rounding)
    error = ((got - want).norm() / want.norm()).item()
    assert 0 < error < 0.05, error


def test_calls_the_kernels_do_not_take_go_to_torch_sdpa(monkeypatch):
    """Batches of unequal prompts carry a mask, which neither kernel takes, and cuDNN's fp8 kernel takes no head
    dim of 8: the adapters hand those to torch."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("the kernel was called")

    monkeypatch.setattr(attention._cudnn_graphs, "run", no_kernel)
    monkeypatch.setattr(attention, "_sage_kernel", no_kernel)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 12, 2, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    mask[1, ..., 9:] = False
    masked, unmasked = (_sdpa_nhd(q, k, v, attn_mask=m) for m in (mask, None))
    torch.testing.assert_close(attention.sage_attention(q, k, v, attn_mask=mask), masked)
    torch.testing.assert_close(attention.cudnn_fp8_attention(q, k, v, attn_mask=mask), masked)
    torch.testing.assert_close(attention.cudnn_fp8_attention(q, k, v), unmasked)


def test_the_plan_says_in_one_line_why_an_8bit_attention_cannot_run(monkeypatch):
    hopper = replace(Machine.supposed(64, 80), compile_supported=True, cuda_capability=(9, 0))
    ada = replace(hopper, cuda_capability=(8, 9))
    cpu_only = Machine.supposed(64, 0)
    monkeypatch.setattr(backends, "package_available", lambda backend: False)
    with pytest.raises(MemoryPlanError, match="pip install nvidia-cudnn-frontend"):
        make_plan(hopper, real_weights(), PlanOverrides(attention=attention.CUDNN_FP8))
    monkeypatch.setattr(backends, "package_available", lambda backend: True)
    with pytest.raises(MemoryPlanError, match="compute capability 9.0"):
        make_plan(ada, real_weights(), PlanOverrides(attention=attention.CUDNN_FP8))
    with pytest.raises(MemoryPlanError, match="CUDA GPU"):
        make_plan(cpu_only, real_weights(), PlanOverrides(attention=attention.SAGE))
    plan = make_plan(hopper, real_weights(), PlanOverrides(attention=attention.CUDNN_FP8, fp8=True))
    assert plan.components["transformer"].attention == attention.CUDNN_FP8
    assert "attention cudnn_fp8" in plan.explain()
    assert make_plan(ada, real_weights(), PlanOverrides(attention=attention.SAGE)).components[
        "transformer"].attention == attention.SAGE


def test_compile_needs_cuda_a_gpu_that_triton_supports_and_triton_installed(monkeypatch):
    """A GTX 10 series card (6.1) with triton-windows installed stays uncompiled: inductor refuses GPUs below 7.0."""
    found = {"triton": True}
    monkeypatch.setattr(backends.importlib.util, "find_spec", lambda name: object() if found.get(name) else None)
    assert backends.compile_supported("cuda:0", (8, 9)) and backends.compile_supported("cuda", (7, 0))
    assert not backends.compile_supported("cuda:0", (6, 1))
    assert not backends.compile_supported("cpu", (8, 9))
    found["triton"] = False  # Windows without triton-windows
    assert not backends.compile_supported("cuda:0", (8, 9))
