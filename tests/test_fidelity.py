"""Fidelity to the official F1 demo where it is exact: the noise a seed gives, and the fp32 output projection.

The section loop's fidelity is held by the parity test against diffusers' pipeline (test_parity_diffusers.py).
"""
from __future__ import annotations

import pytest
import torch

from conftest import cpu_manager, cpu_plan, streamed_on_cpu
from framepack_ui.engine import f1
from framepack_ui.events import Finished
from framepack_ui.spec import LATENT_WINDOW, JobSpec
from model_inputs import transformer_inputs


def test_each_sections_noise_is_the_official_workers_draw_for_the_seed(tiny_models_dir, start_image, tmp_path,
                                                                        monkeypatch):
    """The official worker seeds `torch.Generator("cpu").manual_seed(seed)` and draws only the sections' noise from
    it, in order, in the shape (1, 16, 9, h/8, w/8): the start latent's sample must not draw from it first."""
    seen = []
    real_sampler = f1.sample_unipc

    def recording_sampler(denoiser, noise, sigmas, callback=None):
        seen.append(noise.detach().cpu().clone())
        return real_sampler(denoiser, noise, sigmas, callback=callback)

    monkeypatch.setattr(f1, "sample_unipc", recording_sampler)
    seed = 4242
    spec = JobSpec(image=start_image, prompt="noise", seconds=2.4, seed=seed, steps=2, resolution=64)
    end = f1.run(spec, tmp_path / "out.mp4", cpu_manager(tiny_models_dir), lambda e: None)
    assert isinstance(end, Finished)
    assert len(seen) == 2
    official = torch.Generator("cpu").manual_seed(seed)
    _, _, _, h, w = seen[0].shape
    for noise in seen:
        assert noise.shape == (1, 16, LATENT_WINDOW, h, w) and noise.dtype == torch.float32
        assert torch.equal(noise, torch.randn((1, 16, LATENT_WINDOW, h, w), generator=official, dtype=torch.float32))


def test_the_start_latent_sample_has_its_own_generator_derived_from_the_seed():
    """Deterministic for a seed, and not the sections' stream: its first draw differs from theirs."""
    a = torch.randn(64, generator=f1.start_latent_generator(7))
    assert torch.equal(a, torch.randn(64, generator=f1.start_latent_generator(7)))
    assert not torch.equal(a, torch.randn(64, generator=f1.section_noise_generator(7)))
    assert not torch.equal(a, torch.randn(64, generator=f1.start_latent_generator(8)))


def _bf16_plan(models, name: str):
    """The profiles a job can run the transformer in, computing in bf16 on the CPU standing in for the GPU."""
    plan = cpu_plan(models)
    if name == "resident":
        return plan.with_component("transformer", where="gpu", storage="ram", compute_dtype="bfloat16")
    if name == "mmap":
        return plan.with_component("transformer", storage="map", compute_dtype="bfloat16")
    return streamed_on_cpu(plan, 1, compute_dtype="bfloat16", storage="fp8" if name == "streamed-fp8" else "map")


@pytest.mark.parametrize("profile", ["resident", "mmap", "streamed", "streamed-fp8"])
def test_the_output_projection_computes_in_fp32_in_every_profile(models_copy, profile):
    """As the official `high_quality_fp32_output_for_inference`: norm_out in the compute dtype, then proj_out with
    fp32 weights on an fp32 input, so the velocity is not rounded to bf16. The model's output equals that
    computation from norm_out's bf16 output, and differs from the all-bf16 projection."""
    manager = cpu_manager(models_copy, _bf16_plan(models_copy, profile))
    try:
        with manager.use("transformer") as transformer, torch.no_grad():
            assert transformer.dtype == torch.bfloat16
            assert transformer.proj_out.weight.dtype == torch.float32
            seen = {}
            hooks = [transformer.norm_out.register_forward_hook(lambda m, a, out: seen.setdefault("normed", out)),
                     transformer.proj_out.register_forward_hook(lambda m, a, out: seen.setdefault("projected", out))]
            try:
                inputs = {k: (v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v)
                          for k, v in transformer_inputs(transformer).items()}
                output = transformer(**inputs)[0]
            finally:
                for hook in hooks:
                    hook.remove()
            normed, projected, projection = seen["normed"], seen["projected"], transformer.proj_out
            assert normed.dtype == torch.bfloat16 and output.dtype == torch.float32
            fp32 = torch.nn.functional.linear(normed.float(), projection.weight, projection.bias)
            bf16 = torch.nn.functional.linear(normed, projection.weight.bfloat16(), projection.bias.bfloat16())
            assert torch.equal(projected, fp32) and not torch.equal(projected, bf16.float())
            # the model's output is those values, only rearranged into frames
            assert torch.equal(output.flatten().sort().values, projected.flatten().sort().values)
    finally:
        manager.free()


def test_a_lora_on_the_output_projection_keeps_it_in_fp32(tiny_models_dir):
    """A LoRA swaps the layer's class (compute/lora.py): the fp32 input cast must survive it, and the LoRA's update
    must count (a wrapper of the instance's forward would bypass the swapped class)."""
    from framepack_ui.compute import lora as lora_compute, precision
    from framepack_ui.memory import loading

    transformer = loading.load_transformer(tiny_models_dir, torch.bfloat16, torch.device("cpu"), "ram")
    precision.compute_output_in_fp32(transformer)
    projection = transformer.proj_out
    g = torch.Generator().manual_seed(0)
    down = torch.randn(2, projection.in_features, generator=g)
    up = torch.randn(projection.out_features, 2, generator=g)
    x = torch.randn(5, projection.in_features, generator=g).bfloat16()
    with torch.no_grad():
        plain = projection(x)
        lora_compute.apply_loras(transformer, {"proj_out": [lora_compute.LoraPart(down, up, 0.5)]}, "cpu",
                                 torch.bfloat16)
        with_lora = projection(x)
    merged = projection.weight + 0.5 * up @ down
    expected = torch.nn.functional.linear(x.float(), merged, projection.bias)
    assert plain.dtype == with_lora.dtype == torch.float32
    # the update itself is computed in the LoRA's bf16: within 2 % of its own size of the exact merge
    update = (expected - plain).abs().max()
    assert update > 1.0 and (with_lora - expected).abs().max() < 0.02 * update
