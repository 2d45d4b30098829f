"""8-bit attention kernels the app adapts into diffusers' attention dispatcher (`set_attention` picks one).

- `sage1`: SageAttention 1 (PyPI's `sageattention` 1.0.x, Triton only): Q and K multiplied in int8 per block, P
  and V in fp16. diffusers' own sage backends want sageattention >= 2.1.1, which PyPI does not carry (CUDA builds
  only). Measured on an H200 (docs/benchmarks.md, "Opt-in 8-bit attention"): 430 TFLOP/s against cuDNN's 604 in
  bf16, so slower there; it is kept for cards without Hopper's attention kernels (its int8 and fp16-accumulate
  paths are what it was built for, an Ada laptop's 4060 among them: unmeasured here).
- `cudnn_fp8`: cuDNN's fp8 flash attention (Hopper and later) through the `cudnn` Python frontend
  (nvidia-cudnn-frontend): Q, K, V, P and O in e4m3 with per-tensor scales. torch exposes only cuDNN's bf16
  attention, and the step is attention-bound (52 % of a compiled step's GPU time on the H200).

Both go through diffusers' dispatcher under one of its own backend names (it accepts no others): sage1 under the
name of the kernel it is, `_sage_qk_int8_pv_fp16_triton`; cudnn_fp8 under `_native_xla`, a name no CUDA machine
uses. Registering replaces diffusers' function for that name in this process.
"""
from __future__ import annotations

import threading

import torch

from . import backends
from .backends import ATTENTION_BACKENDS, CUDNN_FP8, PACKAGES, SAGE

E4M3_MAX = 448.0
# P (the softmax numerator, in [0, 1] inside a flash kernel) goes to e4m3 scaled by this: 1.0 maps to 256, inside
# e4m3's range with headroom, and P down to 2^-17 stays above e4m3's smallest subnormal.
SOFTMAX_FP8_SCALE = 256.0


def _torch_sdpa(query, key, value, attn_mask, scale):
    """torch's SDPA over [batch, tokens, heads, dim]: for masked calls (batches of unequal prompts), which
    neither kernel takes; and head dims cuDNN's fp8 kernel does not take."""
    out = torch.nn.functional.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2),
                                                           value.transpose(1, 2), attn_mask=attn_mask, scale=scale)
    return out.transpose(1, 2)


# ---- SageAttention 1 ------------------------------------------------------------------------------------------

@torch.library.custom_op("framepack_ui::sage_attention", mutates_args=())
def _sage_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
    # a custom op: torch.compile of a block treats the Triton call as one opaque kernel instead of tracing its
    # Python (asserts, an in-place key update) into graph breaks
    from sageattention import sageattn

    return sageattn(query, key, value, tensor_layout="NHD", is_causal=False, sm_scale=scale, smooth_k=False)


@_sage_kernel.register_fake
def _(query, key, value, scale):
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


def sage_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """SageAttention 1 over [batch, tokens, heads, dim], the layout diffusers' processors use.

    The keys' mean over the tokens is taken out first (SageAttention's key smoothing: softmax does not change,
    and int8 keeps the per-token detail instead of a shared offset); done here rather than by sageattention,
    which subtracts it from the caller's tensor in place."""
    if attn_mask is not None:
        return _torch_sdpa(query, key, value, attn_mask, scale)
    key = key - key.mean(dim=1, keepdim=True)
    return _sage_kernel(query.contiguous(), key.contiguous(), value.contiguous(), scale)


# ---- cuDNN fp8 ------------------------------------------------------------------------------------------------

def to_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x in e4m3 with one power-of-two scale for the whole tensor (cuDNN's advice: scaling by a power of two
    is exact), and the descale that gives x back: x ~= x8.float() * descale. No host sync: the scale stays on
    the device."""
    amax = x.detach().abs().amax().float().clamp_min(1e-12)
    multiplier = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
    x8 = (x.float() * multiplier).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, multiplier.reciprocal().reshape(1, 1, 1, 1)


class _CudnnFp8Graphs:
    """Built cuDNN graphs, one per (device, shape, scale); each with its workspace and scratch. cuDNN's plan
    build takes a moment, so it is done once per shape, under a lock (the worker and a benchmark may share
    it)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._graphs: dict = {}
        self._handles: dict = {}

    def run(self, q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale: float) -> torch.Tensor:
        import cudnn

        key = (q8.device, tuple(q8.shape), tuple(k8.shape), attn_scale)
        with self._lock:
            entry = self._graphs.get(key) or self._build(key, q8, k8, v8, attn_scale)
        graph, t, workspace, constants = entry
        out = torch.empty_like(q8)
        handle = self._handles[q8.device]
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        graph.execute({t["q"]: q8, t["k"]: k8, t["v"]: v8, t["descale_q"]: descale_q, t["descale_k"]: descale_k,
                       t["descale_v"]: descale_v, t["descale_s"]: constants["descale_s"],
                       t["scale_s"]: constants["scale_s"], t["scale_o"]: scale_o, t["o"]: out,
                       t["amax_s"]: constants["amax_s"], t["amax_o"]: constants["amax_o"]}, workspace, handle=handle)
        return out

    def _build(self, key, q8, k8, v8, attn_scale):
        import cudnn

        device = q8.device
        if device not in self._handles:
            with torch.cuda.device(device):
                self._handles[device] = cudnn.create_handle()
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self._handles[device])

        def bhsd(x):  # cuDNN's dims are [batch, heads, tokens, dim]; ours are [batch, tokens, heads, dim]
            b, s, h, d = x.shape
            return dict(dim=[b, h, s, d], stride=[x.stride(0), x.stride(2), x.stride(1), x.stride(3)])

        t = {name: graph.tensor(name=name, data_type=e4m3, **bhsd(x)) for name, x in (("q", q8), ("k", k8),
                                                                                      ("v", v8))}
        scalar = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[name] = graph.tensor(name=name, **scalar)
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"],
                                              descale_k=t["descale_k"], descale_v=t["descale_v"],
                                              descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
                                              is_inference=True, attn_scale=attn_scale, use_causal_mask=False,
                                              name="framepack_sdpa_fp8")
        o.set_output(True).set_data_type(e4m3).set_dim(bhsd(q8)["dim"]).set_stride(bhsd(q8)["stride"])
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_data_type(fp32).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1])
        t.update(o=o, amax_s=amax_s, amax_o=amax_o)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        workspace = torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=device)

        def scalar_tensor(value):
            return torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)

        constants = {"scale_s": scalar_tensor(SOFTMAX_FP8_SCALE), "descale_s": scalar_tensor(1 / SOFTMAX_FP8_SCALE),
                     "amax_s": scalar_tensor(0.0), "amax_o": scalar_tensor(0.0)}
        self._graphs[key] = graph, t, workspace, constants
        return self._graphs[key]


_cudnn_graphs = _CudnnFp8Graphs()


@torch.library.custom_op("framepack_ui::cudnn_fp8_attention", mutates_args=())
def _cudnn_fp8_kernel(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, descale_q: torch.Tensor,
                      descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor,
                      attn_scale: float) -> torch.Tensor:
    return _cudnn_graphs.run(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale)


@_cudnn_fp8_kernel.register_fake
def _(q8, k8, v8, descale_q, descale_k, descale_v, scale_o, attn_scale):
    return torch.empty_like(q8)


def cudnn_fp8_head_dim_ok(head_dim: int) -> bool:
    """cuDNN's fp8 attention takes head dims that are multiples of 16 up to 256 (F1's is 128); others (the tests'
    tiny models) go to torch's SDPA, as masked calls do."""
    return head_dim % 16 == 0 and head_dim <= 256


def cudnn_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attn_mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """cuDNN fp8 attention over [batch, tokens, heads, dim] in the inputs' dtype.

    The keys' mean over the tokens is taken out first, as SageAttention does (softmax does not change): one scale
    for the whole tensor otherwise spends e4m3's 3 mantissa bits on the offset the keys share, which measured
    12 % output error on keys with such an offset (bench_attention.py). Hopper's kernel writes O in e4m3 too. O is
    a convex combination of V's rows, so |O| <= max|V|: O's scale is V's, halved for the rounding of P and V on
    the way (never an overflow, and e4m3's 2^15 of range keeps the small outputs)."""
    if attn_mask is not None or not cudnn_fp8_head_dim_ok(query.shape[-1]):
        return _torch_sdpa(query, key, value, attn_mask, scale)
    operands = cudnn_fp8_operands(query, key, value, scale)
    o8 = _cudnn_fp8_kernel(*operands)
    scale_o = operands[6]
    return (o8.float() / scale_o).to(query.dtype)


def cudnn_fp8_operands(query, key, value, scale: float | None) -> tuple:
    """The fp8 kernel's arguments for one call (see cudnn_fp8_attention): e4m3 Q, smoothed K and V, their
    descales, O's scale and the softmax scale."""
    q8, descale_q = to_e4m3(query)
    k8, descale_k = to_e4m3(key - key.mean(dim=1, keepdim=True))
    v8, descale_v = to_e4m3(value)
    attn_scale = scale if scale is not None else query.shape[-1] ** -0.5
    return q8, k8, v8, descale_q, descale_k, descale_v, 0.5 / descale_v, attn_scale


ADAPTERS = {SAGE: (sage_attention, "_sage_qk_int8_pv_fp16_triton"), CUDNN_FP8: (cudnn_fp8_attention, "_native_xla")}


def use(transformer, backend: str) -> None:
    """Route every attention processor of the transformer to the adapter `backend` (one of ADAPTERS)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    fn, dispatcher_name = ADAPTERS[backend]
    name = AttentionBackendName(dispatcher_name)
    _AttentionBackendRegistry.register(name)(fn)
    for module in transformer.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_attention_backend"):
            processor._attention_backend = name


def set_attention(transformer, backend: str | None) -> None:
    """Use one of ATTENTION_BACKENDS for every attention call (None: diffusers' default, torch's SDPA choice)."""
    if backend is None:
        return
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend in ADAPTERS:
        if not backends.package_available(backend):  # the plan says so first (memory/plan)
            raise ValueError(f"attention {backend} needs the {PACKAGES[backend]} package")
        use(transformer, backend)
        return
    transformer.set_attention_backend(backend)
