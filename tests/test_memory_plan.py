"""The memory plan (pure: machine + weights -> placements and per-phase predictions) and the probe's readers."""
from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from framepack_ui.errors import MemoryPlanError
from framepack_ui.memory.manager import ModelManager
from framepack_ui.memory.plan import (PIN_HEADROOM_BYTES, RAM_RESERVE_BYTES, PlanOverrides, host_share, make_plan,
                                      real_weights)
from framepack_ui.memory.plan.budgets import budgets_for, page_cache_room, spills_from_page_cache
from framepack_ui.memory.plan.explain import gb_text
from framepack_ui.memory import probe as probe_module
from framepack_ui.memory.probe import (MEMORYSTATUSEX, Machine, linux_memory_from, parse_meminfo, probe_machine,
                                       weights_bytes, weights_on_disk, windows_memory_from)
from framepack_ui.units import GB, GiB
from conftest import cpu_manager, cpu_plan, streamed_on_cpu

REAL = real_weights()
OFFICIAL_DEMO_RAM_BYTES = 43 * GB  # text encoder + transformer held together in RAM by the official demo


def supposed(ram_gb, vram_gb):
    return make_plan(Machine.supposed(ram_gb, vram_gb), REAL)


def where(plan) -> dict[str, str]:
    return {name: c.where for name, c in plan.components.items()}


# --- the machine table (real model sizes, resolution 640) ----------------------------------------------------------

def test_plan_80gb_gpu_keeps_everything_resident():
    plan = supposed(128, 80)
    assert where(plan) == {"text_encoders": "gpu", "image_encoder": "gpu", "vae": "gpu", "transformer": "gpu"}
    assert plan.components["transformer"].storage == "map"  # copied from the read-only map: no RAM copy on the way
    assert not plan.components["vae"].vae_tiling  # 21.8 GB untiled decode fits beside the 25.7 GB transformer
    assert plan.peak_vram_bytes <= plan.vram_budget_bytes
    assert plan.peak_ram_bytes < 4 * GB


def test_plan_24gb_desktop_streams_part_of_the_transformer():
    plan = make_plan(Machine.supposed(64, 24), REAL, PlanOverrides(pin_streamed=False))
    t = plan.components["transformer"]
    assert plan.components["text_encoders"].where == "gpu"  # 15 GB fits alone in its phase
    assert t.where == "gpu-streamed" and t.storage == "map" and not t.pinned_sources
    assert 30 <= t.resident_blocks < t.total_blocks == 60  # most blocks stay resident
    assert plan.components["vae"].vae_tiling  # 21.8 GB untiled would not fit beside the resident blocks
    assert plan.peak_vram_bytes <= plan.vram_budget_bytes
    assert plan.peak_ram_bytes < 4 * GB


def test_plan_pins_the_streamed_blocks_only_where_ram_is_plentiful():
    """Page-locked sources skip a host copy per step (the 8 GB bf16 profile was bound by it on the H100), but
    pinned memory cannot be paged: chosen only where PIN_HEADROOM_BYTES stays free beside the largest phase."""
    roomy, laptop = supposed(64, 8), make_plan(Machine.supposed(32, 8), REAL, PlanOverrides(fp8=False))
    streamed = sum(REAL["transformer"].block_bytes[roomy.components["transformer"].resident_blocks:])
    t = roomy.components["transformer"]
    assert t.where == "gpu-streamed" and t.pinned_sources
    # charged: page-locked, never paged; the resident blocks too, which are parked for the decode and come back
    # asynchronously from their own page-locked copies
    assert t.park_for_decode and t.ram_bytes == t.commit_bytes == sum(REAL["transformer"].block_bytes)
    assert streamed > 15 * GB
    assert t.page_cache_bytes < streamed  # nothing re-read from the map each step
    assert roomy.peak_ram_bytes + PIN_HEADROOM_BYTES <= roomy.ram_budget_bytes
    assert any("page-locked" in n for n in roomy.notes) and "page-locked RAM" in roomy.explain()
    assert not laptop.components["transformer"].pinned_sources  # 21.5 GB pinned of 32 would starve the system
    assert laptop.peak_ram_bytes < 8 * GB
    refused = make_plan(Machine.supposed(64, 8), REAL, PlanOverrides(pin_streamed=False))
    assert not refused.components["transformer"].pinned_sources and refused.peak_ram_bytes < 8 * GB
    forced = make_plan(Machine.supposed(32, 8), REAL, PlanOverrides(pin_streamed=True, fp8=False))
    assert forced.components["transformer"].pinned_sources
    assert not supposed(128, 80).components["transformer"].pinned_sources  # resident: nothing streamed
    cuda_placement = roomy.components["transformer"]
    assert cuda_placement.pinned_sources and not laptop.components["transformer"].pinned_sources


def test_plan_8gb_laptop_32gb_ram_maps_and_streams():
    """bf16's 24.9 GB streamed per step would not stay in the page cache beside the job's own 4.1 GB and the 4 GB
    kept for the system, so the automatic plan stores fp8; bf16 when asked is mapped and streamed too."""
    assert supposed(32, 8).components["transformer"].storage == "fp8"
    plan = make_plan(Machine.supposed(32, 8), REAL, PlanOverrides(fp8=False))
    t, te = plan.components["transformer"], plan.components["text_encoders"]
    assert t.where == "gpu-streamed" and t.storage == "map" and t.resident_blocks < 10
    # 15 GB: its layers streamed from the map to the GPU once per prompt, not copied to RAM
    assert te.where == "gpu-streamed" and te.storage == "map"
    assert plan.components["vae"].vae_tiling
    assert plan.peak_vram_bytes <= plan.vram_budget_bytes <= 8 * GB
    # the goal: far under 32 GB minus what the OS needs, where the official demo needs ~43 GB
    assert plan.peak_ram_bytes < 32 * GB - RAM_RESERVE_BYTES
    assert plan.peak_ram_bytes < 8 * GB
    assert plan.peak_commit_bytes < 8 * GB  # the map is not charged: no os error 1455 from loading
    assert any("disk every step" in n for n in plan.notes)  # what the automatic plan avoids with fp8:
    assert not any("disk every step" in n for n in supposed(32, 8).notes)  # its blocks stay in the page cache


def test_plan_8gb_16gb_fits_but_warns_about_rereading_from_disk():
    plan = supposed(16, 8)
    assert plan.components["transformer"].where == "gpu-streamed"
    assert plan.peak_ram_bytes < 16 * GB - RAM_RESERVE_BYTES
    assert any("disk every step" in n for n in plan.notes)


def test_plan_peak_is_the_largest_phase_not_the_sum():
    for plan in (supposed(32, 8), supposed(64, 24), supposed(128, 80), supposed(32, 0)):
        assert plan.peak_ram_bytes == max(p.ram_bytes for p in plan.phases)
        assert plan.peak_vram_bytes == max(p.vram_bytes for p in plan.phases)
        assert [p.phase for p in plan.phases] == ["text", "image", "sampling", "decode"]
    gpu = supposed(128, 80)
    # the 15 GB text encoder is gone before the transformer comes: both never share VRAM
    assert gpu.phase("sampling").vram_bytes < REAL["text_encoder"].file_bytes + REAL["transformer"].file_bytes
    assert gpu.phase("text").vram_bytes < 16 * GB


def test_plan_without_gpu_computes_from_the_map():
    plan = supposed(32, 0)
    assert plan.device == "cpu"
    assert where(plan)["transformer"] == "mmap" and where(plan)["text_encoders"] == "mmap"
    assert plan.peak_ram_bytes < OFFICIAL_DEMO_RAM_BYTES / 3


def test_plan_that_cannot_fit_names_the_shortfall_and_a_fix():
    with pytest.raises(MemoryPlanError) as info:
        supposed(6, 0)  # 2 GB usable after the reserve; the CPU decode alone needs more
    message = info.value.message
    assert "\n" not in message and "GB short" in message and "RAM" in message
    with pytest.raises(MemoryPlanError, match="GB short.*VRAM|VRAM.*GB short"):
        supposed(32, 2)  # 1 GB of VRAM budget cannot hold even the embedders and one block
    tight_commit = Machine(ram_total_bytes=32 * GB, ram_available_bytes=30 * GB, commit_limit_bytes=34 * GB,
                           commit_available_bytes=int(1.5 * GB), commit_enforced=True, vram_total_bytes=8 * GB,
                           vram_free_bytes=8 * GB, os_name="windows")
    with pytest.raises(MemoryPlanError, match="pagefile"):
        make_plan(tight_commit, REAL)


def test_short_commit_with_a_system_managed_pagefile_plans_a_prewarm_instead_of_refusing():
    """os error 1455 case: commit is short, but Windows manages the pagefile and the disk has room, so the plan
    goes ahead and says the pagefile will be grown first (the manager pre-warms before loading)."""
    tight = dict(ram_total_bytes=32 * GB, ram_available_bytes=30 * GB, commit_limit_bytes=34 * GB,
                 commit_available_bytes=int(1.5 * GB), commit_enforced=True, vram_total_bytes=8 * GB,
                 vram_free_bytes=8 * GB, os_name="windows")
    plan = make_plan(Machine(**tight, pagefile_growable=True, disk_free_bytes=100 * GB), REAL)
    assert any("pagefile will be grown" in note for note in plan.notes)
    with pytest.raises(MemoryPlanError, match="pagefile"):  # growable, but the disk is full
        make_plan(Machine(**tight, pagefile_growable=True, disk_free_bytes=1 * GB), REAL)


def test_plan_overrides():
    assert where(make_plan(Machine.supposed(32, 8), REAL, PlanOverrides("mmap")))["transformer"] == "mmap"
    assert make_plan(Machine.supposed(32, 8), REAL, PlanOverrides("mmap")).device == "cpu"
    forced = make_plan(Machine.supposed(128, 80), REAL, PlanOverrides("streamed", resident_blocks=10))
    assert forced.components["transformer"].resident_blocks == 10
    with pytest.raises(MemoryPlanError, match="streamed"):
        make_plan(Machine.supposed(32, 8), REAL, PlanOverrides("gpu"))  # 26 GB resident on an 8 GB card
    with pytest.raises(MemoryPlanError, match="CUDA"):
        make_plan(Machine.supposed(32, 0), REAL, PlanOverrides("streamed"))
    copy = make_plan(Machine.supposed(128, 0), REAL, PlanOverrides("cpu"))
    assert copy.components["transformer"].where == "cpu" and copy.components["transformer"].storage == "ram"
    assert copy.peak_ram_bytes > 2 * REAL["transformer"].file_bytes  # float32 RAM copy: why it is not the default
    # a lower resolution shrinks the activations (the tiled decode's tiles keep their size), which leaves room
    # for more resident blocks (the decode no longer shares it: they are parked)
    low, high = make_plan(Machine.supposed(64, 24), REAL, PlanOverrides(resolution=320)), supposed(64, 24)
    assert low.phase("sampling").activation_vram_bytes < high.phase("sampling").activation_vram_bytes
    assert low.components["transformer"].resident_blocks > high.components["transformer"].resident_blocks


def test_plan_explain_shows_every_model_phase_and_peak():
    text = supposed(32, 8).explain()
    for word in ("text_encoders", "image_encoder", "vae", "transformer", "gpu-streamed", "map",
                 "sampling", "decode", "peak", "32 GB RAM, 8 GB VRAM", "parked while the VAE decodes"):
        assert word in text
    assert supposed(32, 8).summary().startswith("text_encoders gpu-streamed 11/32")
    assert "text_encoders mmap" in supposed(32, 0).explain()


def test_manager_applies_the_plan(tiny_models_dir):
    plan = make_plan(Machine.supposed(32, 0), weights_on_disk(tiny_models_dir), PlanOverrides(resolution=64))
    c = plan.components
    assert c["transformer"].storage == "map" and c["text_encoders"].storage == "map"
    assert c["vae"].storage == "ram" and c["vae"].keep and not c["image_encoder"].keep
    manager = ModelManager(tiny_models_dir, plan)
    assert manager.plan is plan and all(manager.device_of(name).type == "cpu" for name in c)
    on_8gb = make_plan(Machine.supposed(32, 8), REAL, PlanOverrides(fp8=False)).components
    streamed = on_8gb["transformer"]
    assert streamed.device == "cuda" and streamed.storage == "map" and streamed.resident_blocks == 3
    assert streamed.park_for_decode and on_8gb["text_encoders"].resident_blocks == 11
    with pytest.raises(MemoryPlanError, match="stream"):  # refused before anything loads, not half-way
        ModelManager(tiny_models_dir, plan.with_component("vae", where="gpu-streamed", resident_blocks=1))
    with pytest.raises(MemoryPlanError, match="stream"):  # streamed layers come from the map, never a RAM copy
        ModelManager(tiny_models_dir, plan.with_component("text_encoders", where="gpu-streamed", storage="ram",
                                                          resident_blocks=1))


def test_manager_streams_the_transformer_when_the_plan_says_so(tiny_models_dir, tmp_path):
    """A gpu-streamed placement, run with device "cpu": the streamer's copies are CPU copies, the output the
    same as all-resident (exactly), the blocks really copied each forward, and freeing closes the streamer."""
    from framepack_ui.engine import f1
    from framepack_ui.events import Finished
    from framepack_ui.spec import JobSpec

    plan = cpu_plan(tiny_models_dir)
    resident = cpu_manager(tiny_models_dir, plan)
    streamed = cpu_manager(tiny_models_dir, streamed_on_cpu(plan, 1))
    pinned = cpu_manager(tiny_models_dir, streamed_on_cpu(plan, 1, pinned_sources=True))
    image = tmp_path / "start.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(image)
    frames = {}
    for name, manager in (("resident", resident), ("streamed", streamed), ("pinned", pinned)):
        sink = []
        spec = JobSpec(image=str(image), prompt="a grey square", resolution=64, steps=2, seconds=1.2)
        assert isinstance(f1.run(spec, tmp_path / f"{name}.mp4", manager, lambda e: None, frame_sink=sink.append),
                          Finished)
        frames[name] = np.concatenate(sink)
    assert np.array_equal(frames["resident"], frames["streamed"])
    assert np.array_equal(frames["resident"], frames["pinned"])
    with pinned.use("transformer"):
        assert pinned.streamer("transformer").pinned_sources
    with streamed.use("transformer"):
        streamer = streamed.streamer("transformer")
        assert len(streamer.streamed) == 1 and streamer.bytes_streamed > 0 and not streamer.pinned_sources
    streamed.free()
    assert not streamed.is_loaded("transformer") and streamer._copier._shutdown


def test_plan_8gb_parks_the_resident_blocks_while_the_vae_decodes_and_keeps_3_resident():
    """The tiled decode (4.4 GB) no longer shares VRAM with the resident blocks: they are parked while the VAE
    decodes, so sampling alone bounds them (3 resident on an 8 GB card, where sharing left 0). bf16 storage:
    with 16 GB the automatic plan would store the transformer as fp8 (tested below)."""
    for ram_gb in (16, 32):
        plan = make_plan(Machine.supposed(ram_gb, 8), REAL, PlanOverrides(fp8=False))
        t, vae = plan.components["transformer"], plan.components["vae"]
        decode, sampling = plan.phase("decode"), plan.phase("sampling")
        assert t.where == "gpu-streamed" and t.resident_blocks == 3 and t.park_for_decode
        assert decode.vram_bytes == vae.vram_bytes + t.parked_vram_bytes + decode.activation_vram_bytes
        assert t.parked_vram_bytes < t.vram_bytes
        # the decode would not fit beside the resident blocks: parking is what makes room
        assert vae.vram_bytes + t.vram_bytes + decode.activation_vram_bytes > plan.vram_budget_bytes
        assert max(decode.vram_bytes, sampling.vram_bytes) <= plan.peak_vram_bytes <= plan.vram_budget_bytes
        # the parked blocks are read again from the map once per section: counted in the page cache
        assert t.page_cache_bytes == sum(REAL["transformer"].block_bytes)
    assert supposed(64, 24).components["transformer"].resident_blocks == 40  # 32 when the decode shared the room
    assert not supposed(128, 80).components["transformer"].park_for_decode  # all resident beside the decode


def test_plan_8gb_streams_the_text_encoder_layers_to_the_gpu():
    """On an 8 GB card the 15 GB Llama computes on the GPU, its decoder layers streamed from the map (11 of 32
    resident), instead of on the CPU; the text phase stays within the VRAM, RAM and commit budgets."""
    for ram_gb in (16, 32):
        plan = supposed(ram_gb, 8)
        te, text_phase = plan.components["text_encoders"], plan.phase("text")
        assert te.where == "gpu-streamed" and te.storage == "map" and te.device == "cuda"
        assert te.resident_blocks == 11 and te.total_blocks == 32
        assert text_phase.vram_bytes <= plan.vram_budget_bytes <= 8 * GB
        assert text_phase.ram_bytes <= plan.ram_budget_bytes and text_phase.ram_bytes < 4 * GB
        assert text_phase.commit_bytes < 4 * GB  # the two pinned layer buffers, not the 15 GB
    assert supposed(64, 24).components["text_encoders"].where == "gpu"  # fits whole: not streamed
    assert supposed(32, 0).components["text_encoders"].where == "mmap"  # no GPU: the CPU from the map


def test_plan_speed_options_follow_the_machine():
    """torch.compile where Triton generates GPU code; fp8 matmuls with fp8 weights on compute capability 8.9+;
    the attention backend only when asked for; overrides win; explain() says which."""
    triton_ada = replace(Machine.supposed(32, 8), compile_supported=True, cuda_capability=(8, 9))
    t = make_plan(triton_ada, REAL, PlanOverrides(fp8=False)).components["transformer"]
    assert t.compile and t.attention is None and not t.fp8_matmul  # bf16 weights: no fp8 matmul
    assert make_plan(triton_ada, REAL, PlanOverrides(fp8=True)).components["transformer"].fp8_matmul
    ampere = replace(triton_ada, cuda_capability=(8, 6))
    assert not make_plan(ampere, REAL, PlanOverrides(fp8=True)).components["transformer"].fp8_matmul
    no_triton = replace(triton_ada, compile_supported=False)
    assert not make_plan(no_triton, REAL).components["transformer"].compile
    # compile off without being asked: the plan says why in one line; asked for (--no-compile) or on: no line
    eager_notes = [n for n in make_plan(no_triton, REAL).notes if "not compiled" in n]
    assert len(eager_notes) == 1 and "needs Triton" in eager_notes[0] and "triton-windows" in eager_notes[0]
    assert not any("not compiled" in n for n in make_plan(triton_ada, REAL).notes)
    assert not any("not compiled" in n for n in make_plan(no_triton, REAL, PlanOverrides(compile=False)).notes)
    assert not any("not compiled" in n for n in make_plan(Machine.supposed(32, 0), REAL).notes)  # no GPU to compile for
    cpu = make_plan(replace(Machine.supposed(32, 0), compile_supported=True), REAL).components["transformer"]
    assert not cpu.compile and not cpu.fp8_matmul
    forced = make_plan(triton_ada, REAL, PlanOverrides(compile=False, attention="native", fp8=True,
                                                       fp8_matmul=False)).components["transformer"]
    assert not forced.compile and forced.attention == "native" and not forced.fp8_matmul
    text = make_plan(triton_ada, REAL, PlanOverrides(attention="_native_cudnn", fp8=True)).explain()
    assert "compiled" in text and "attention _native_cudnn" in text and "fp8 matmul" in text
    with pytest.raises(MemoryPlanError, match="attention"):
        make_plan(triton_ada, REAL, PlanOverrides(attention="flash-attn-3"))
    with pytest.raises(MemoryPlanError, match="fp8"):
        make_plan(triton_ada, REAL, PlanOverrides(fp8_matmul=True))  # needs fp8 weights


def test_plan_compiles_the_vae_decoder_where_its_smaller_footprint_buys_a_faster_decode():
    """The compiled decoder peaks about a third lower but decodes the same tiles hardly faster, and compiling it
    costs about a minute once per app run (bench/bench_decode.py --compiled-pass): the plan compiles it where the
    room it frees buys a decode at least a quarter faster (8 GB: 352 px tiles instead of 256, at 640 px the same
    44x42-latent tiles as 384 px; 48 GB: untiled instead of 384 px tiles) or is the only plan that fits (6 GB), and
    not on an 80 GB card (untiled either way); never without Triton, with --no-compile or without CUDA."""
    triton = replace(Machine.supposed(32, 8), compile_supported=True, cuda_capability=(8, 9))
    compiled = make_plan(triton, REAL)
    eager = make_plan(replace(triton, compile_supported=False), REAL)
    vae = compiled.components["vae"]
    assert vae.compile and compiled.components["transformer"].compile
    assert vae.vae_tiling and vae.vae_tile_px == 352 and eager.components["vae"].vae_tile_px == 256
    assert not eager.components["vae"].compile
    assert compiled.phase("decode").vram_bytes <= compiled.vram_budget_bytes
    assert "compiled decoder" in compiled.explain() and "compiled decoder" not in eager.explain()
    assert not make_plan(triton, REAL, PlanOverrides(compile=False)).components["vae"].compile
    assert not make_plan(replace(Machine.supposed(32, 0), compile_supported=True), REAL).components["vae"].compile
    assert compiled.components["vae"].compile
    assert any("VAE decoder compiled" in n and "352 px tiles instead of in 256 px" in n for n in compiled.notes)
    big = make_plan(replace(Machine.supposed(128, 80), compile_supported=True), REAL).components["vae"]
    assert not big.compile and not big.vae_tiling
    roomy = make_plan(replace(Machine.supposed(64, 48), compile_supported=True), REAL).components["vae"]
    assert not roomy.compile and roomy.vae_tiling  # untiled compiled (2.19 s) is not 25 % faster than 384 px (2.86)
    assert not supposed(64, 48).components["vae"].compile and supposed(64, 48).components["vae"].vae_tiling
    small = replace(Machine.supposed(32, 6), compile_supported=True)
    assert make_plan(small, REAL).components["vae"].compile
    with pytest.raises(MemoryPlanError, match="decode phase"):
        make_plan(replace(small, compile_supported=False), REAL)


def _broken_compile(calls: list, message: str):
    """A torch.compile whose compiled function records each call in `calls` and fails with `message` (the fault
    injected at the compiler boundary)."""
    def broken_compile(fn, **kwargs):
        def compiled(*args, **kw):
            calls.append(1)
            raise RuntimeError(message)
        return compiled
    return broken_compile


def test_a_compiled_vae_decoder_that_fails_to_compile_decodes_eagerly(tiny_models_dir, monkeypatch, caplog):
    """Fault injected at the compiler boundary (a compiler missing or broken on the user's machine): the decode
    still succeeds, equal to the eager one, with one warning, and later decodes skip the compiler."""
    from framepack_ui.engine import vae as vae_ops
    from framepack_ui.compute import compile as compiled
    from framepack_ui.memory import loading

    calls = []
    broken_compile = _broken_compile(calls, "InductorError: no working C compiler")
    vae = loading.load_vae(tiny_models_dir, torch.float32, torch.device("cpu"))
    latents = torch.randn(1, 16, 5, 4, 4, generator=torch.Generator().manual_seed(0))  # a full frame window
    # in even tiles, as a compiled decoder decodes, so that only the compiler differs
    expected = vae_ops.decode(vae, latents, even_tiles=True)
    monkeypatch.setattr(torch, "compile", broken_compile)
    assert compiled.compile_vae_decoder(vae) and compiled.decoder_compiled(vae)
    with caplog.at_level("WARNING"):
        first = vae_ops.decode(vae, latents)
        second = vae_ops.decode(vae, latents)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert calls == [1] and not compiled.decoder_compiled(vae)  # tried once, then eager for good
    assert sum("compiled VAE decoder failed" in r.message for r in caplog.records) == 1


def test_compiled_blocks_whose_compiler_fails_run_eagerly_after_one_try(tiny_models_dir, monkeypatch, caplog):
    """Fault injected at the compiler boundary (a GPU Triton does not support, a broken toolchain on Windows): the
    forward still succeeds, equal to the eager one, with one warning; the other blocks do not try again, and the
    transformer no longer counts as compiled (no "compiling" notice)."""
    from framepack_ui.compute import compile as compiled
    from framepack_ui.memory import loading
    from test_memory_storage import _transformer_inputs

    tries = []
    broken_compile = _broken_compile(tries, "BackendCompilerFailed: GPUTooOldForTriton (injected)")
    transformer = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        expected = transformer(**_transformer_inputs())[0]
        monkeypatch.setattr(torch, "compile", broken_compile)
        assert compiled.compile_blocks(transformer) and compiled.blocks_compiled(transformer)
        with caplog.at_level("WARNING"):
            first = transformer(**_transformer_inputs())[0]
            second = transformer(**_transformer_inputs())[0]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert tries == [1] and not compiled.blocks_compiled(transformer)
    assert sum("compiling the transformer's blocks failed" in r.message for r in caplog.records) == 1


def _job_frames(manager, image, out) -> np.ndarray:
    from framepack_ui.engine import f1
    from framepack_ui.events import Finished
    from framepack_ui.spec import JobSpec

    sink = []
    spec = JobSpec(image=str(image), prompt="a grey square", resolution=64, steps=2, seconds=2.4)
    assert isinstance(f1.run(spec, out, manager, lambda e: None, frame_sink=sink.append), Finished)
    return np.concatenate(sink)


def test_manager_parks_the_streamed_transformer_while_the_vae_is_used(tiny_models_dir, tmp_path):
    """park_for_decode: each section's decode runs with the resident blocks parked (their parameters on their
    mapped sources), restored after; the video is identical to one made without parking."""
    plan = cpu_plan(tiny_models_dir)
    image = tmp_path / "start.png"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(image)
    managers = {park: cpu_manager(tiny_models_dir, streamed_on_cpu(plan, 1, park_for_decode=park),
                                  prompt_cache_dir=None)
                for park in (False, True)}
    frames = {park: _job_frames(m, image, tmp_path / f"park-{park}.mp4") for park, m in managers.items()}
    assert np.array_equal(frames[False], frames[True])
    assert managers[True].park_count == 2 and managers[False].park_count == 0  # one decode per section
    manager = managers[True]
    with manager.use("transformer"):
        streamer = manager.streamer("transformer")
        on_sources = lambda: [p.data_ptr() == s.data_ptr() for p, s in streamer._resident_sources]  # noqa: E731
        assert not any(on_sources())
        with manager.use("vae"):
            assert streamer.parked and all(on_sources())
        assert not streamer.parked and not any(on_sources())
    manager.free("transformer")
    parked_so_far = manager.park_count
    with manager.use("vae"):  # no transformer loaded: nothing to park
        pass
    assert manager.park_count == parked_so_far


def test_manager_applies_the_speed_options_after_loading_the_transformer(tiny_models_dir, monkeypatch):
    """compile=True compiles each block's forward (lazily: nothing runs here), attention and fp8 matmul are set;
    with the defaults nothing is."""
    from framepack_ui.compute import compile as compiled
    from framepack_ui.memory import manager as manager_module

    switched = []
    monkeypatch.setattr(manager_module, "set_fp8_matmul", lambda model, enabled: switched.append(enabled) or 0)
    plan = cpu_plan(tiny_models_dir)
    plain = cpu_manager(tiny_models_dir, plan, prompt_cache_dir=None)
    with plain.use("transformer") as transformer:
        assert not compiled.blocks_compiled(transformer) and not switched
        assert all("forward" not in vars(b) for b in transformer.transformer_blocks)
    fast = cpu_manager(tiny_models_dir, plan.with_component("transformer", compile=True, attention="native",
                                                            fp8_matmul=True), prompt_cache_dir=None)
    with fast.use("transformer") as transformer:
        assert compiled.blocks_compiled(transformer) and switched == [True]
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        assert all("forward" in vars(b) for b in blocks)  # the compiled hook wraps each block's forward
    with plain.use("vae") as vae:
        assert not compiled.decoder_compiled(vae) and "forward" not in vars(vae.decoder)
    compiled_vae = cpu_manager(tiny_models_dir, plan.with_component("vae", compile=True), prompt_cache_dir=None)
    with compiled_vae.use("vae") as vae:  # lazily: it compiles at the first decode
        assert compiled.decoder_compiled(vae) and "forward" in vars(vae.decoder)


def test_the_compilers_caches_are_kept_under_the_models_folder_unless_the_user_set_them(tiny_models_dir,
                                                                                          monkeypatch, tmp_path):
    """Inductor's default is the temp folder, which cleanups empty: a compiled plan's load points both compilers'
    caches at models/.cache/compile (before the lazy compile runs); a folder set in the environment stays, unless it
    is inductor's default, which importing torch._dynamo writes there."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from framepack_ui.compute import compile as compiled

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)  # (conftest gives the environment back after the test)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as the app's imports leave it
    plan = cpu_plan(tiny_models_dir)
    with cpu_manager(tiny_models_dir, plan, prompt_cache_dir=None).use("transformer"):
        assert "TRITON_CACHE_DIR" not in os.environ  # nothing compiles: nothing set
    with cpu_manager(tiny_models_dir, plan.with_component("transformer", compile=True),
                     prompt_cache_dir=None).use("transformer"):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tiny_models_dir.absolute() / ".cache/compile/inductor")
        assert os.environ["TRITON_CACHE_DIR"] == str(tiny_models_dir.absolute() / ".cache/compile/triton")
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        assert cache_dir() == os.environ["TORCHINDUCTOR_CACHE_DIR"]  # where inductor itself now writes
    other = tmp_path / "other-models"  # another folder later in the same process: the caches follow it
    compiled.keep_caches_in(other / compiled.CACHE_SUBDIR)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(other.absolute() / ".cache/compile/inductor")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice
    with cpu_manager(tiny_models_dir, plan.with_component("vae", compile=True), prompt_cache_dir=None).use("vae"):
        assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tiny_models_dir.absolute() / ".cache/compile/inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "my-inductor"))  # the user's, not torch's default
    compiled.keep_caches_in(other / compiled.CACHE_SUBDIR)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "my-inductor")


# --- probe --------------------------------------------------------------------------------------------------------

# --- a host shared by several workers (worker/pool.py) --------------------------------------------------------------

HOST_64GB_COMMIT = replace(Machine.supposed(64, 0, os_name="linux"), commit_limit_bytes=72 * GB,
                           commit_available_bytes=60 * GB, commit_enforced=True)


def test_the_workers_shares_of_the_host_sum_to_no_more_than_the_machine():
    """RAM and commit budgets of N shares together stay within the host's own; each share keeps its GPU's VRAM."""
    machines = [HOST_64GB_COMMIT, Machine.supposed(32, 8), replace(Machine.supposed(128, 24, os_name="linux"),
                                                             ram_available_bytes=90 * GB)]
    for machine in machines:
        whole = budgets_for(machine, cuda=True)
        for workers in (2, 3, 4):
            shares = [budgets_for(host_share(machine, workers), cuda=True) for _ in range(workers)]
            assert sum(s.ram for s in shares) <= whole.ram
            assert sum(s.ram for s in shares) >= whole.ram - workers  # divided, not given away (floor rounding)
            if whole.commit is not None:
                assert sum(s.commit for s in shares) <= whole.commit
            assert all(s.vram == whole.vram for s in shares)


def test_two_workers_plans_together_fit_the_host():
    """The real models on a 64 GB host with two 24 GB GPUs: each worker's plan fits its share, and the two plans'
    peak RAM and commit together fit what the host can give one plan."""
    gpu = replace(HOST_64GB_COMMIT, vram_total_bytes=24 * GB, vram_free_bytes=24 * GB, gpu_name="supposed GPU")
    whole = budgets_for(gpu, cuda=True)
    plans = [make_plan(host_share(gpu, 2), real_weights(), PlanOverrides()) for _ in range(2)]
    assert sum(p.peak_ram_bytes for p in plans) <= whole.ram
    assert sum(p.peak_commit_bytes for p in plans) <= whole.commit
    alone = make_plan(gpu, real_weights(), PlanOverrides())
    assert plans[0].ram_budget_bytes < alone.ram_budget_bytes  # the share is what the plan was held to


def test_a_share_divides_the_host_given_and_keeps_its_own_gpu():
    gpu = Machine.supposed(16, 24)  # read on one lane: its GPU; the host's figures come from the start's reading
    share = host_share(gpu, 2, host=HOST_64GB_COMMIT)
    assert share.vram_free_bytes == gpu.vram_free_bytes and share.gpu_name == gpu.gpu_name
    assert share.ram_available_bytes == HOST_64GB_COMMIT.ram_available_bytes // 2
    assert share.commit_limit_bytes == HOST_64GB_COMMIT.commit_limit_bytes // 2
    assert host_share(gpu, 1, host=HOST_64GB_COMMIT).ram_total_bytes == HOST_64GB_COMMIT.ram_total_bytes
    with pytest.raises(ValueError):
        host_share(gpu, 0)


def test_memorystatusex_matches_the_windows_layout():
    # sysinfoapi.h: two DWORDs then seven DWORDLONGs = 64 bytes; GlobalMemoryStatusEx fails if dwLength is wrong
    assert ctypes.sizeof(MEMORYSTATUSEX) == 64
    assert MEMORYSTATUSEX.ullTotalPhys.offset == 8 and MEMORYSTATUSEX.ullTotalPageFile.offset == 24
    assert MEMORYSTATUSEX.ullAvailExtendedVirtual.offset == 56
    status = MEMORYSTATUSEX(dwLength=64, ullTotalPhys=32 * GB, ullAvailPhys=20 * GB, ullTotalPageFile=40 * GB,
                            ullAvailPageFile=25 * GB)
    fields = windows_memory_from(status)
    assert fields["commit_limit_bytes"] == 40 * GB and fields["commit_available_bytes"] == 25 * GB
    assert fields["swap_total_bytes"] == 8 * GB and fields["commit_enforced"]


def test_parse_meminfo_and_probe_this_machine(tmp_path):
    info = parse_meminfo("MemTotal:       24000000 kB\nCommitLimit:    12000000 kB\nCommitted_AS:     600000 kB\n"
                         "HugePages_Total:       0\n")
    assert info == {"MemTotal": 24_576_000_000, "CommitLimit": 12_288_000_000, "Committed_AS": 614_400_000,
                    "HugePages_Total": 0}
    machine = probe_machine(tmp_path, cuda=False)
    assert 0 < machine.ram_available_bytes <= machine.ram_total_bytes
    assert machine.disk_free_bytes and machine.disk_free_bytes > 0
    if machine.os_name == "linux":
        assert machine.commit_limit_bytes and machine.commit_available_bytes is not None
        overcommit = open("/proc/sys/vm/overcommit_memory").read().strip()
        assert machine.commit_enforced == (overcommit == "2")


def test_weights_on_disk_reads_the_headers(tiny_models_dir):
    weights = weights_on_disk(tiny_models_dir)
    assert set(weights) == {"text_encoder", "text_encoder_2", "image_encoder", "vae", "transformer"}
    t = weights["transformer"]
    assert t.dtype == "BF16" and t.storage_itemsize == 2 and t.file_bytes == 2 * t.params
    assert len(t.block_bytes) == 2 and t.hidden_size == 16  # tiny: 1 dual + 1 single block, 2 heads x 8
    assert len(weights["text_encoder"].block_bytes) == 3  # the tiny Llama's decoder layers (streamable)
    assert not weights["text_encoder_2"].block_bytes  # CLIP is never streamed
    assert weights["vae"].dtype == "F32" and weights["image_encoder"].tokens == 16
    assert weights_bytes(tiny_models_dir)["transformer"] == t.file_bytes
    assert weights_on_disk(tiny_models_dir.parent / "nothing-here") == {}


def test_plan_decodes_in_the_largest_vae_tiles_that_fit_beside_the_transformer():
    """Larger spatial tiles decode a section faster (4.39 s at 256 px, 2.87 s at 384 px, H100/H200): the plan
    takes the largest that fits in what the decode phase leaves beside the transformer, never costing it a
    resident block; the manager's VAE is loaded with that tile."""
    laptop, desktop, card32 = supposed(32, 8), supposed(64, 24), supposed(64, 32)
    simulated = make_plan(Machine.supposed(64, 8.59), REAL)  # the benchmark's "8 GB card": 8 GiB left free
    tiles = {name: p.components["vae"].vae_tile_px for name, p in
             (("laptop", laptop), ("desktop", desktop), ("card32", card32), ("simulated", simulated))}
    assert tiles == {"laptop": 256, "desktop": 384, "card32": 256, "simulated": 320}
    assert all(p.components["vae"].vae_tiling for p in (laptop, desktop, card32, simulated))
    assert "384 px tiles" in desktop.explain()
    assert card32.components["transformer"].where == "gpu"  # resident: a larger tile would have cost that
    for plan in (laptop, desktop, card32, simulated):
        assert plan.peak_vram_bytes <= plan.vram_budget_bytes
    assert simulated.components["transformer"].park_for_decode  # the tile grows into the parked blocks' room
    assert simulated.phase("decode").vram_bytes > laptop.phase("decode").vram_bytes
    assert desktop.components["vae"].vae_tile_px == 384


def test_vae_loads_with_the_planned_tile(tiny_models_dir):
    from framepack_ui.memory import loading

    vae = loading.load_vae(tiny_models_dir, torch.float32, torch.device("cpu"), tiling=True, tile_px=352)
    assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_min_width) == (352, 352)
    assert (vae.tile_sample_stride_height, vae.tile_sample_stride_width) == (288, 288)  # 64 px of overlap
    assert vae.tile_sample_min_num_frames == 16 and vae.tile_sample_stride_num_frames == 12  # the context grid
    assert not loading.load_vae(tiny_models_dir, torch.float32, torch.device("cpu")).use_tiling


def test_the_probe_reads_this_processs_compiled_decoder_on_the_gpu_it_plans_for(monkeypatch, tmp_path):
    """The plan's `decoder_compile` comes from what this process compiled on that very GPU (compute/compile.py);
    where torch.compile cannot work, it stays as a planned machine supposes. CUDA is injected (none here)."""
    from framepack_ui.compute import compile as compiled

    def gpu(index, compile_supported=True):
        return dict(vram_free_bytes=8 * GB, vram_total_bytes=8 * GB, gpu_name=f"GPU {index}", cuda_capability=(8, 9),
                    compile_supported=compile_supported)

    monkeypatch.setattr(probe_module, "_cuda", gpu)
    monkeypatch.setitem(compiled._decoder_outcome, "cuda:0", compiled.READY)
    monkeypatch.setitem(compiled._decoder_outcome, "cuda:1", compiled.FAILED)
    assert probe_machine(tmp_path, cuda=True, cuda_index=0).decoder_compile == "ready"
    assert probe_machine(tmp_path, cuda=True, cuda_index=1).decoder_compile == "failed"
    monkeypatch.setattr(probe_module, "_cuda", lambda index: gpu(index, compile_supported=False))
    assert probe_machine(tmp_path, cuda=True, cuda_index=0).decoder_compile == Machine.decoder_compile == "cold"


def test_allocator_defaults_to_growable_segments_on_linux_and_keeps_the_users_choice(monkeypatch, tmp_path):
    import os
    import sys

    from framepack_ui.memory import allocator

    monkeypatch.setenv(allocator.ALLOC_CONF, "")  # recorded, so the test leaves the environment as it found it
    monkeypatch.delenv(allocator.ALLOC_CONF)
    probe_machine(tmp_path, cuda=True)  # where the app and the CLI first touch CUDA
    assert os.environ.get(allocator.ALLOC_CONF) == ("expandable_segments:True" if sys.platform == "linux" else None)

    linux, windows, chosen = {}, {}, {allocator.ALLOC_CONF: "max_split_size_mb:128"}
    allocator.configure(linux, "linux")
    allocator.configure(windows, "win32")
    allocator.configure(chosen, "linux")
    assert linux == {allocator.ALLOC_CONF: "expandable_segments:True"}
    assert windows == {} and chosen == {allocator.ALLOC_CONF: "max_split_size_mb:128"}


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc_trim: Linux only (elsewhere a no-op, below)")
def test_memory_freed_inside_the_c_heap_goes_back_to_the_system():
    """Blocks below malloc's mmap threshold, freed under one still in use: glibc keeps their pages until trimmed."""
    from framepack_ui.memory import allocator
    from framepack_ui.memory.probe import read_process_memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 96 * 1024, 2048  # 192 MiB from the heap
    blocks = [libc.malloc(size) for _ in range(count)]
    for block in blocks:
        ctypes.memset(block, 1, size)  # resident
    keep = libc.malloc(size)  # above them: the heap cannot shrink from its top
    try:
        for block in blocks:
            libc.free(block)
        kept = read_process_memory("self")["RssAnon"]
        assert allocator.return_freed_heap()
        given_back = kept - read_process_memory("self")["RssAnon"]
    finally:
        libc.free(keep)
    assert given_back > 128 * 2**20, f"only {given_back / 2**20:.0f} MiB went back"
    assert not allocator.return_freed_heap("win32")  # no glibc there: nothing called


def test_the_manager_hands_freed_heap_memory_back_after_each_load_and_each_free(tiny_models_dir, monkeypatch):
    from framepack_ui.memory import allocator

    calls = []
    monkeypatch.setattr(allocator, "return_freed_heap", lambda: calls.append("trim") or True)
    manager = ModelManager(tiny_models_dir, make_plan(Machine.supposed(32, 0), weights_on_disk(tiny_models_dir),
                                                      PlanOverrides(resolution=64)))
    with manager.use("vae"):
        assert calls == ["trim"]  # the load's transient copies
    manager.free()
    assert calls == ["trim", "trim"]


# --- the transformer's storage on a laptop: fp8 where bf16 would spill from the page cache --------------------------

LAPTOP_TOTAL_BYTES = 32 * GiB


def laptop(available_gb: float, **changes) -> Machine:
    """A 32 GB machine with an 8 GB card, `available_gb` of its RAM free (the rest held by the system and programs)."""
    return replace(Machine.supposed(32, 8), **{"ram_total_bytes": LAPTOP_TOTAL_BYTES,
                                               "ram_available_bytes": int(available_gb * GB), **changes})


@pytest.mark.parametrize("available_gb,storage", [(19, "fp8"), (24, "fp8"), (30, "map")])
def test_32gb_laptop_plan_takes_fp8_where_bf16_would_spill_from_the_page_cache(available_gb, storage):
    plan = make_plan(laptop(available_gb), REAL)
    t = plan.components["transformer"]
    assert t.where == "gpu-streamed" and t.storage == storage and not spills_from_page_cache(plan)
    bf16 = make_plan(laptop(available_gb), REAL, PlanOverrides(fp8=False))
    notes = " ".join(plan.notes)
    if storage == "fp8":  # bf16's 24.9 GB streamed per step would be read from disk again every step
        assert spills_from_page_cache(bf16) and "read from disk every step" in " ".join(bf16.notes)
        assert "transformer stored as fp8 (chosen automatically)" in notes and "stay cached" in notes
        assert t.page_cache_bytes <= page_cache_room(plan) < bf16.components["transformer"].page_cache_bytes
    else:
        assert plan == bf16 and "fp8" not in notes


def test_the_page_cache_room_is_what_the_larger_of_sampling_and_decode_leaves():
    """The streamed blocks are read while the transformer samples and while the VAE decodes (the parked ones come
    back from the map), so the page cache keeps what the larger of those two phases leaves; the text and image
    phases come before the transformer loads. On the GPU the two hold the same anonymous RAM (their activations are
    in VRAM, and both hold a later section's decoded frames), so the table's 32 GB laptop with 30 GB free is given
    3 GB more in one phase at a time: a sampling buffer or a decode on the CPU would do that. Its 24.9 GB of bf16
    blocks fit the 25.9 GB of room, not what is left then."""
    plan = make_plan(laptop(30), REAL, PlanOverrides(fp8=False))
    streamed = plan.components["transformer"].page_cache_bytes
    assert page_cache_room(plan) - 3 * GB < streamed < page_cache_room(plan) and not spills_from_page_cache(plan)
    larger = max(plan.phase("sampling").ram_bytes, plan.phase("decode").ram_bytes)

    def heavier(phase: str):
        return replace(plan, phases=tuple(replace(p, ram_bytes=p.ram_bytes + 3 * GB) if p.phase == phase else p
                                          for p in plan.phases))

    for phase in ("sampling", "decode"):
        grown = plan.phase(phase).ram_bytes + 3 * GB - larger  # what the phase grows beyond the larger one
        assert 0 < grown <= 3 * GB and page_cache_room(heavier(phase)) == page_cache_room(plan) - grown, phase
        assert spills_from_page_cache(heavier(phase)), phase
    for phase in ("text", "image"):
        assert page_cache_room(heavier(phase)) == page_cache_room(plan), phase


def test_a_tight_machine_takes_fp8_too_and_says_what_would_keep_it_cached():
    plan = make_plan(laptop(12), REAL)
    assert plan.components["transformer"].storage == "fp8" and spills_from_page_cache(plan)
    assert "read less" in plan.notes[0] and "more free RAM or a lower --resolution" in plan.notes[0]


def test_fp8_is_taken_only_with_disk_for_its_one_time_conversion():
    short_disk = laptop(19, disk_free_bytes=5 * GB)
    plan = make_plan(short_disk, REAL)
    assert plan.components["transformer"].storage == "map"  # bf16 then, with the reason in one line
    assert any("needs 14.2G of free disk" in n and "5.00G is free" in n for n in plan.notes), plan.notes
    with pytest.raises(MemoryPlanError, match="--fp8: converting the transformer to fp8 once needs .* free disk"):
        make_plan(short_disk, REAL, PlanOverrides(fp8=True))
    cached = {**REAL, "transformer": replace(REAL["transformer"], fp8_cached=True)}
    assert make_plan(short_disk, cached).components["transformer"].storage == "fp8"  # nothing to convert


def test_the_laptop_plan_reads_what_the_os_says_is_available():
    """The plan follows the RAM the OS reports as available (Linux MemAvailable, Windows ullAvailPhys), read
    from injected values: the same 32 GB machine plans fp8 when busy and bf16 when free."""
    def linux(available_gb):
        meminfo = (f"MemTotal: {LAPTOP_TOTAL_BYTES // 1024} kB\nMemFree: 1000000 kB\n"
                   f"MemAvailable: {int(available_gb * GB) // 1024} kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n"
                   f"CommitLimit: {LAPTOP_TOTAL_BYTES // 1024} kB\nCommitted_AS: 4000000 kB\n")
        return linux_memory_from(meminfo, overcommit=0)

    def windows(available_gb):
        status = MEMORYSTATUSEX()
        status.ullTotalPhys, status.ullAvailPhys = LAPTOP_TOTAL_BYTES, int(available_gb * GB)
        status.ullTotalPageFile, status.ullAvailPageFile = LAPTOP_TOTAL_BYTES + 16 * GiB, 40 * GB
        return windows_memory_from(status)

    for read in (linux, windows):
        storages = {gb: make_plan(replace(Machine.supposed(32, 8), **read(gb)), REAL).components["transformer"].storage
                    for gb in (19, 30)}
        assert storages == {19: "fp8", 30: "map"}, read.__name__


def test_a_memory_cgroup_caps_what_the_plan_sees(tmp_path):
    """In a container or a `memory.max` cgroup, /proc/meminfo shows the whole host: the probe reads the group's limit
    and its anonymous memory (v2 and v1), and the plan of a 32 GB group with 13 GB held by another program stores
    the transformer as fp8, where the host's own figures would keep bf16."""
    host = (f"MemTotal: {128 * GiB // 1024} kB\nMemAvailable: {120 * GiB // 1024} kB\nSwapTotal: 0 kB\n"
            f"SwapFree: 0 kB\nCommitLimit: {128 * GiB // 1024} kB\nCommitted_AS: 4000000 kB\n")
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v2 / "job").mkdir(parents=True)
    (v2 / "job" / "memory.max").write_text(f"{32 * GiB}\n")
    (v2 / "job" / "memory.stat").write_text(f"anon {13 * GiB}\nfile {2 * GiB}\n")
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.limit_in_bytes").write_text(f"{32 * GiB}\n")
    (v1 / "memory" / "job" / "memory.stat").write_text(f"cache {2 * GiB}\ntotal_rss {13 * GiB}\n")
    (tmp_path / "v2.cgroup").write_text("0::/job\n")
    (tmp_path / "v1.cgroup").write_text("4:memory:/job\n1:cpu:/\n")
    for root, own in ((v2, tmp_path / "v2.cgroup"), (v1, tmp_path / "v1.cgroup")):
        cgroup = probe_module._cgroup_memory(root, own)
        assert cgroup == (32 * GiB, 13 * GiB)
        fields = linux_memory_from(host, overcommit=0, cgroup=cgroup)
        assert fields["ram_total_bytes"] == 32 * GiB and fields["ram_available_bytes"] == 19 * GiB
        plan = make_plan(replace(Machine.supposed(32, 8), **fields), REAL)
        assert plan.components["transformer"].storage == "fp8"
    (v2 / "job" / "memory.max").write_text("max\n")  # no limit: the host's figures
    assert probe_module._cgroup_memory(v2, tmp_path / "v2.cgroup") is None
    host_plan = make_plan(replace(Machine.supposed(128, 8), **linux_memory_from(host, overcommit=0)), REAL)
    assert host_plan.components["transformer"].storage == "map"


def test_a_cached_fp8_transformer_is_kept_until_bf16_fits_with_room_to_spare():
    """Free RAM that wavers around the line would otherwise switch the storage (and reload the model) from one
    job to the next: with the fp8 cache on disk, bf16 is taken back only with 2 GB of page cache to spare."""
    cached = {**REAL, "transformer": replace(REAL["transformer"], fp8_cached=True)}
    just_fits = laptop(29.5, ram_total_bytes=34 * GiB)  # bf16's streamed blocks fit the page cache, barely
    assert make_plan(just_fits, REAL).components["transformer"].storage == "map"
    assert make_plan(just_fits, cached).components["transformer"].storage == "fp8"
    roomy = laptop(31, ram_total_bytes=34 * GiB)
    assert make_plan(roomy, cached).components["transformer"].storage == "map"


# --- what check() says and where its limits are (found unguarded by the mutation check, docs/mutation.md) ----------

def test_each_refusal_names_what_is_needed_what_there_is_and_the_difference():
    with pytest.raises(MemoryPlanError) as ram:
        supposed(6, 0)
    needs, can = (float(g) for g in re.findall(r"(\d+\.\d+)G", ram.value.message)[:2])
    short = float(re.search(r"(\d+\.\d) GB short", ram.value.message).group(1))
    assert "total minus 4 GB for the system" in ram.value.message
    assert 0 < short == pytest.approx(needs - can, abs=0.06), ram.value.message
    with pytest.raises(MemoryPlanError) as vram:
        supposed(32, 2)
    needs, free = (float(g[:-1]) / (1000 if g.endswith("M") else 1) for g in
                   re.findall(r"(\d+(?:\.\d+)?[GM])", vram.value.message)[:2])
    short = float(re.search(r"(\d+\.\d) GB short", vram.value.message).group(1))
    assert 0 < short == pytest.approx(needs - free, abs=0.06), vram.value.message
    tight = Machine(ram_total_bytes=32 * GB, ram_available_bytes=30 * GB, commit_limit_bytes=34 * GB,
                    commit_available_bytes=int(1.5 * GB), commit_enforced=True, vram_total_bytes=8 * GB,
                    vram_free_bytes=8 * GB, os_name="windows")
    with pytest.raises(MemoryPlanError) as commit:
        make_plan(tight, REAL)
    needs, available = (float(g[:-1]) / (1000 if g.endswith("M") else 1) for g in
                        re.findall(r"(\d+(?:\.\d+)?[GM])", commit.value.message)[:2])
    short = float(re.search(r"(\d+\.\d) GB short", commit.value.message).group(1))
    assert 0 < short == pytest.approx(needs - available, abs=0.06), commit.value.message
    grow_gb = int(re.search(r"by at least (\d+) GB", commit.value.message).group(1))
    assert short <= grow_gb < short + 1.05  # the shortfall rounded up to whole GB
    grown = make_plan(replace(tight, pagefile_growable=True, disk_free_bytes=100 * GB), REAL)
    short_gb = (grown.peak_commit_bytes - grown.commit_budget_bytes) / GB
    assert any(n.startswith(f"commit is {short_gb:.1f} GB short") for n in grown.notes), grown.notes
    with pytest.raises(MemoryPlanError, match=r"resident in VRAM needs (\d+\.\d) GB more VRAM") as gpu:
        make_plan(Machine.supposed(32, 8), REAL, PlanOverrides("gpu"))
    assert 10 < float(re.search(r"needs (\d+\.\d) GB", gpu.value.message).group(1)) < 30


def test_a_phase_exactly_at_its_budget_fits():
    """Budgets are what may be used: a phase that uses exactly that much fits (and a byte more does not)."""
    from framepack_ui.memory.plan.budgets import check

    plan = make_plan(laptop(30), REAL, PlanOverrides(fp8=False))
    weights = real_weights()

    def with_sampling(**changes):
        return replace(plan, phases=tuple(replace(p, **changes) if p.phase == "sampling" else p for p in plan.phases))

    check(with_sampling(ram_bytes=plan.ram_budget_bytes), weights)
    check(with_sampling(vram_bytes=plan.vram_budget_bytes), weights)
    with pytest.raises(MemoryPlanError):
        check(with_sampling(ram_bytes=plan.ram_budget_bytes + 1), weights)
    with pytest.raises(MemoryPlanError):
        check(with_sampling(vram_bytes=plan.vram_budget_bytes + 1), weights)
    enforced = replace(plan, commit_budget_bytes=plan.peak_commit_bytes)
    check(enforced, weights)
    with pytest.raises(MemoryPlanError):
        check(replace(enforced, commit_budget_bytes=plan.peak_commit_bytes - 1), weights)
    # the pagefile is grown only where the disk keeps RAM_RESERVE_BYTES beside the growth
    short = replace(enforced, commit_budget_bytes=plan.peak_commit_bytes - GB)
    growable = replace(plan.machine, pagefile_growable=True, disk_free_bytes=GB + RAM_RESERVE_BYTES + 1)
    assert any("pagefile will be grown" in n for n in check(replace(short, machine=growable), weights).notes)
    with pytest.raises(MemoryPlanError, match="pagefile"):
        check(replace(short, machine=replace(growable, disk_free_bytes=GB + RAM_RESERVE_BYTES)), weights)
    # the streamed blocks that exactly fill the page cache's room stay cached
    exact = plan.with_component("transformer", page_cache_bytes=page_cache_room(plan))
    assert not spills_from_page_cache(exact) and spills_from_page_cache(
        plan.with_component("transformer", page_cache_bytes=page_cache_room(plan) + 1))


def test_the_budgets_leave_the_reserves_and_no_vram_to_a_plan_without_the_gpu():
    from framepack_ui.memory.plan.budgets import COMMIT_MARGIN_BYTES, VRAM_MARGIN_BYTES, budgets_for

    enforced = replace(Machine.supposed(32, 8), commit_enforced=True, commit_available_bytes=20 * GB)
    budgets = budgets_for(enforced, cuda=True)
    assert budgets.ram == 28 * GB and budgets.vram == 8 * GB - VRAM_MARGIN_BYTES
    assert budgets.commit == 20 * GB - COMMIT_MARGIN_BYTES
    assert budgets_for(enforced, cuda=False).vram == 0  # a GPU the plan does not use lends it nothing
    assert budgets_for(replace(enforced, commit_enforced=False), cuda=True).commit is None  # Linux overcommit


def test_the_notes_say_which_sizes_are_expected_what_is_streamed_and_what_is_pinned():
    laptop_plan = make_plan(Machine.supposed(32, 8), REAL, PlanOverrides(fp8=False))
    roomy, big = supposed(64, 8), supposed(128, 80)
    expected = "expected sizes (not on disk): image_encoder, text_encoder, text_encoder_2, transformer, vae"
    assert expected in laptop_plan.notes
    streamed = ("gpu-streamed: blocks beyond the resident ones are copied from the read-only map each step "
                "through two pinned block buffers")
    assert streamed + " (the only pinned memory)" in laptop_plan.notes
    assert roomy.components["transformer"].pinned_sources and streamed in roomy.notes  # the text encoders'
    assert any(n.startswith("pinned: ") and "8 GB of RAM stays free" in n for n in roomy.notes)
    assert not any(n.startswith("gpu-streamed") or n.startswith("pinned") for n in big.notes)
    spilling = make_plan(laptop(19), REAL, PlanOverrides(fp8=False))
    t = spilling.components["transformer"]
    assert (f"the page cache can keep about {gb_text(page_cache_room(spilling))} of the {gb_text(t.page_cache_bytes)}"
            f" streamed each step") in " ".join(spilling.notes)
