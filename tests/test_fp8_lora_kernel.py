"""The one-kernel left operand of an fp8 product with a LoRA inside it (compute/fp8_lora_kernel.py), run by Triton's
interpreter (the `interpreted_kernel` fixture, tests/conftest.py): the bytes torch's own three passes make
(fp8_linear.quantize_rows of `[x, x @ down.T, 0...]`), every token's scale, and the product that uses it.

On the GPU the same kernel runs compiled; bench/bench_lora_layer.py counts its bytes against torch's there.
"""
from __future__ import annotations

import pytest
import torch

from conftest import record_calls, run_fp8_matmul_lora
from framepack_ui.compute import fp8_linear
from framepack_ui.compute import lora as lora_compute
from framepack_ui.compute.fp8_linear import FP8_DTYPE, quantize, quantize_rows

CPU = torch.device("cpu")


def torch_operand(x: torch.Tensor, down: torch.Tensor, inner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[x, h, 0...] quantized per token by torch, h accumulated in float32 as the kernel does."""
    h = x.float() @ down.float().t()
    joined = torch.cat([x.float(), h, torch.zeros(x.shape[0], inner - x.shape[1] - down.shape[0])], dim=1)
    return quantize_rows(joined)


@pytest.mark.parametrize("tokens, width, rank, inner, dtype", [
    (200, 64, 6, 128, torch.float32),  # the test_lora shapes: rank 6 padded to 64 columns
    (70, 256, 40, 384, torch.bfloat16),  # rank 40: a 64-wide block of h, 32 tokens a program
    (33, 130, 3, 384, torch.float32),  # width not a multiple of the 128-column loads; 251 zero columns, four loops
    (5, 32, 16, 48, torch.bfloat16),  # fewer tokens than one program's block
], ids=["f32", "bf16-rank40", "ragged-width", "few-tokens"])
def test_the_kernel_makes_the_operand_torch_makes_byte_for_byte(interpreted_kernel, tokens, width, rank, inner,
                                                                   dtype):
    """Where x sets every token's scale (h small), the scales and every byte of x's columns equal torch's; h's
    columns equal torch's at its float32 h (the two sum in different orders, yet none differed here); the padding
    is zero. An all-zero token gets scale 1, as torch gives it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, width, generator=g).to(dtype)
    x[3] = 0
    down = (torch.randn(rank, width, generator=g) * 0.2 / width ** 0.5).to(dtype)
    got, got_scale = interpreted_kernel.quantize_joined(x, down, inner)
    want, want_scale = torch_operand(x, down, inner)
    assert got.dtype == FP8_DTYPE and got.shape == (tokens, inner) and got_scale.shape == (tokens, 1)
    assert torch.equal(got_scale, want_scale)
    assert torch.equal(got[:, :width].view(torch.uint8), want[:, :width].view(torch.uint8))
    assert torch.equal(got[:, width:width + rank].view(torch.uint8), want[:, width:width + rank].view(torch.uint8))
    assert not got[:, width + rank:].float().any()


def test_a_token_whose_h_outgrows_its_x_takes_its_scale_from_h(interpreted_kernel):
    """A LoRA larger than the layer: h, not x, sets those tokens' scales (x then quantizes coarser rather than h
    saturating), exactly as torch quantizes the joined row."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 64, generator=g)
    down = torch.randn(8, 64, generator=g)  # |h| ~ 8 |x|
    got, got_scale = interpreted_kernel.quantize_joined(x, down, 128)
    want, want_scale = torch_operand(x, down, 128)
    h_max = (x @ down.t()).abs().amax(dim=1, keepdim=True)
    assert (h_max > x.abs().amax(dim=1, keepdim=True)).all()
    torch.testing.assert_close(got_scale, h_max / 448, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_scale, want_scale, rtol=1e-6, atol=0)
    off = (got.float() - want.float()).abs()
    assert off.max() <= 32 and (off > 0).float().mean() < 0.01  # a tie rounded the other way, at most


def test_no_column_is_left_as_the_allocator_gave_it(interpreted_kernel, monkeypatch):
    """The operand is allocated uninitialised: every column, the padding included, is written (poisoned with fp8's
    NaN here, which the product would carry into every output)."""
    real_empty = torch.empty

    def poisoned(*shape, dtype=None, **kwargs):
        made = real_empty(*shape, dtype=dtype, **kwargs)
        (made.view(torch.uint8) if dtype == FP8_DTYPE else made).fill_(0x7F if dtype == FP8_DTYPE else float("nan"))
        return made

    monkeypatch.setattr(torch, "empty", poisoned)
    x = torch.randn(40, 64)
    got, scale = interpreted_kernel.quantize_joined(x, torch.randn(3, 64) * 0.01, 256)
    assert torch.isfinite(got.float()).all() and torch.isfinite(scale).all()


@pytest.mark.parametrize("weight_rows, tokens", [(48, 200), (128, 70)])
def test_the_product_with_the_kernels_operand_equals_torchs(interpreted_kernel, monkeypatch, weight_rows, tokens):
    """fp8_linear_low_rank takes the kernel's operand when it can, and its output is what torch's operand gives,
    to the last bit where the two operands' bytes agree."""
    made = []
    real = interpreted_kernel.quantize_joined
    monkeypatch.setattr(interpreted_kernel, "quantize_joined", lambda *a: made.append(a[2]) or real(*a))
    g = torch.Generator().manual_seed(2)
    q, scale = quantize(torch.randn(weight_rows, 64, generator=g) * 0.02)
    x = torch.randn(tokens, 64, generator=g)
    down, up = torch.randn(6, 64, generator=g) * 0.01, torch.randn(weight_rows, 6, generator=g)
    got = fp8_linear.fp8_linear_low_rank(x, q, scale, None, down, up)
    assert made == [128]  # 64 + 6, padded to INNER_MULTIPLE
    monkeypatch.setattr(fp8_linear, "FUSED_LEFT_OPERAND", False)
    without = fp8_linear.fp8_linear_low_rank(x, q, scale, None, down, up)
    assert len(made) == 1
    assert torch.equal(got, without)


def test_with_the_kernel_a_narrowing_layer_takes_its_update_inside_the_product(interpreted_kernel, monkeypatch):
    """The kernel reads a wide x no more often than the product's own quantization does, so a narrowing Linear
    (the 12288- and 15360-wide inputs at full size) joins its update to the product too; without it, beside
    (test_lora.py)."""
    taken = record_calls(monkeypatch, lora_compute, ("fp8_linear_low_rank", "_add_beside"))
    x, base, got, part = run_fp8_matmul_lora(64, 48, 4, 0.005)
    assert taken == ["fp8_linear_low_rank"]
    update = x @ (part.factor * part.up @ part.down).t()
    assert ((got - base) - update).norm() / update.norm() < 0.1


@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the interpreter's numpy max
def test_a_nan_in_x_stays_nan_in_the_operand(interpreted_kernel):
    """A NaN activation must reach the output as torch's operand carries it, not become a saturated +-448."""
    x = torch.randn(20, 64)
    x[2, 5] = float("nan")
    got, _ = interpreted_kernel.quantize_joined(x, torch.randn(4, 64) * 0.01, 128)
    assert torch.isnan(got[2, 5].float()) and not torch.isnan(got[3].float()).any()


def test_a_rank_wider_than_the_kernels_widest_goes_torchs_way(interpreted_kernel):
    """The sum of a layer's LoRAs can pass MAX_RANK_BLOCK (128), whose tiles would not fit an Ada card's shared
    memory: torch makes that operand."""
    x = torch.zeros(8, 64)
    assert interpreted_kernel.available(x, 128) and not interpreted_kernel.available(x, 129)
    assert fp8_linear.fused_left_operand(x, 128) and not fp8_linear.fused_left_operand(x, 129)


def test_a_kernel_that_cannot_launch_leaves_torch_to_make_the_operand(interpreted_kernel, monkeypatch, caplog):
    """Triton present but unable to build the kernel for this GPU (injected at the launch): the operand comes from
    torch, the same bytes, with one warning, and every later call goes torch's way without trying again."""
    monkeypatch.setattr(interpreted_kernel, "_failed", [])
    launches = []

    class Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(grid)
                raise RuntimeError("out of resources: shared memory (injected)")
            return launch

    monkeypatch.setattr(interpreted_kernel, "_quantize_joined_kernel", Unbuildable())
    x, down = torch.randn(30, 64), torch.randn(5, 64) * 0.1
    with caplog.at_level("WARNING"):
        got, scale = interpreted_kernel.quantize_joined(x, down, 128)
    want, want_scale = interpreted_kernel.torch_operand(x, down, 128)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)) and torch.equal(scale, want_scale)
    assert len(launches) == 1 and "out of resources" in caplog.text
    assert not interpreted_kernel.available(x, 5) and not fp8_linear.fused_left_operand(x, 5)


ADA_SHARED_BYTES = 101376  # sm_89's shared memory a block may opt into (99 KB); Hopper allows 227 KB


@pytest.mark.parametrize("capability", [89, 90], ids=["ada", "hopper"])
def test_every_launch_the_kernel_makes_fits_an_ada_cards_shared_memory(capability):
    """The RTX 4060 laptop is an Ada card: each tile shape the kernel can launch (rank blocks 16 to MAX_RANK_BLOCK)
    is compiled ahead of time for it and for Hopper by Triton's own compiler and ptxas (no GPU needed), and must ask
    for no more shared memory than Ada has; Triton would refuse the launch at run time otherwise."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton

    from framepack_ui.compute import fp8_lora_kernel as kernel

    signature = {"x_ptr": "*bf16", "down_t_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32",
                 "tokens": "i32", "width": "i32", "inner": "i32", "BLOCK_M": "constexpr", "BLOCK_K": "constexpr",
                 "BLOCK_R": "constexpr", "FP8_LIMIT": "constexpr"}
    block_r, asked = 16, {}
    while block_r <= kernel.MAX_RANK_BLOCK:
        tokens, warps = kernel.launch_shape(block_r)
        source = ASTSource(kernel._quantize_joined_kernel, signature,
                           {"BLOCK_M": tokens, "BLOCK_K": kernel.BLOCK_K, "BLOCK_R": block_r, "FP8_LIMIT": 448.0})
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": warps})
        asked[block_r] = compiled.metadata.shared
        block_r *= 2
    assert list(asked) == [16, 32, 64, 128]
    assert all(0 < size <= ADA_SHARED_BYTES for size in asked.values()), asked


def test_without_triton_on_the_device_torch_makes_the_operand():
    """A CPU tensor outside the interpreter (and a GPU without Triton) goes the torch way."""
    from framepack_ui.compute import fp8_lora_kernel
    assert not fp8_lora_kernel.INTERPRETED
    assert not fp8_linear.fused_left_operand(torch.zeros(2, 2), 32)
