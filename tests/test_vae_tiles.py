"""A compiled VAE decoder decodes in spatial tiles of one size (engine/vae.py decode_in_even_tiles) and runs the
short last frame window eagerly (compute/compile.py): diffusers' own tiler feeds it thin edge tiles of several
shapes, and each new shape regime is a compile of minutes on a GPU."""
from __future__ import annotations

import math
import os

import pytest
import torch

from framepack_ui.engine import sections, vae as vae_ops
from framepack_ui.compute import compile as compiled
from framepack_ui.memory import loading

TILE_PX, STRIDE_PX = 48, 32  # the tiny VAE's tiles: 6 latents, overlapping by 2 (the app's: 8 of 32-56)
LATENT_H, LATENT_W = 12, 10  # 3 and 2 tiles: diffusers cuts the last ones short (4 and 2 latents)
JOB_LATENT_COUNTS = sorted({sections.decode_latent_count(s, c)
                           for s in range(4) for c in (None, sections.ALIGNED_CONTEXT)})
TILED_PSNR_SLACK_DB = 3.0  # against the untiled decode, even tiles may be this much further than diffusers'


@pytest.fixture
def tiled_vae(tiny_models_dir):
    vae = loading.load_vae(tiny_models_dir, torch.float32, torch.device("cpu"))
    set_tiles(vae, True)
    return vae


def set_tiles(vae, tiled: bool) -> None:
    if tiled:
        vae.enable_tiling(tile_sample_min_height=TILE_PX, tile_sample_min_width=TILE_PX,
                          tile_sample_stride_height=STRIDE_PX, tile_sample_stride_width=STRIDE_PX)
    else:
        vae.disable_tiling()


def _latents(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 16, frames, LATENT_H, LATENT_W, generator=torch.Generator().manual_seed(seed))


def _decoder_input_shapes(vae, latent_counts, even_tiles: bool | None = None) -> set[tuple[int, ...]]:
    shapes = set()
    forward = vae.decoder.forward

    def spy(z, *args, **kwargs):
        shapes.add(tuple(z.shape[2:]))
        return forward(z, *args, **kwargs)

    vae.decoder.forward = spy
    try:
        for count in latent_counts:
            vae_ops.decode(vae, _latents(count), even_tiles)
    finally:
        vae.decoder.forward = forward
    return shapes


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


@pytest.mark.parametrize("length", range(1, 40))
def test_windows_are_diffusers_and_tiles_are_equal_and_overlap(length):
    diffusers_windows = [0] if length <= 4 else list(range(0, length, 3))
    starts = vae_ops.window_starts(length, 5, 3)
    assert starts == [s for s in diffusers_windows if s == 0 or s < length - 1]  # less a one-latent window
    for largest, overlap in ((48, 8), (40, 8), (6, 2)):
        size, starts = vae_ops.balanced_tiles(length, largest, overlap)
        assert size <= largest and starts[0] == 0 and starts[-1] + size == length
        assert all(0 < b - a <= size - overlap for a, b in zip(starts, starts[1:]))
        diffusers_count = len(range(0, length, largest - overlap)) if length > largest else 1
        assert len(starts) <= diffusers_count


def test_a_job_feeds_the_decoder_spatial_tiles_of_one_size(tiled_vae):
    assert len({shape[1:] for shape in _decoder_input_shapes(tiled_vae, JOB_LATENT_COUNTS)}) == 4  # diffusers'
    shapes = _decoder_input_shapes(tiled_vae, JOB_LATENT_COUNTS, even_tiles=True)
    assert {shape[1:] for shape in shapes} == {(6, 6)}
    assert {shape[0] for shape in shapes} == {3, 4, 5}  # diffusers' frame windows (no 1-latent one: dropped)


def test_even_tiles_decode_as_diffusers_tiles_do(tiled_vae):
    for count in JOB_LATENT_COUNTS:  # without spatial tiles: diffusers' frame windows and blend, exactly
        set_tiles(tiled_vae, False)
        expected = vae_ops.decode(tiled_vae, _latents(count, seed=count), even_tiles=False)
        even = vae_ops.decode(tiled_vae, _latents(count, seed=count), even_tiles=True)
        assert torch.allclose(even, expected, atol=1e-5), count

    latents = _latents(sections.decode_latent_count(2, sections.ALIGNED_CONTEXT), seed=1)
    untiled = vae_ops.decode(tiled_vae, latents, even_tiles=True)
    set_tiles(tiled_vae, True)
    even = vae_ops.decode(tiled_vae, latents, even_tiles=True)
    reference = vae_ops.decode(tiled_vae, latents, even_tiles=False)
    assert even.shape == reference.shape
    # where both tilers decode the same tile (the top left corner), the same pixels
    only_first_tile = STRIDE_PX - (TILE_PX - STRIDE_PX)
    corner = (slice(None), slice(None), slice(0, only_first_tile), slice(0, only_first_tile))
    assert torch.allclose(even[corner], reference[corner], atol=1e-5)
    # elsewhere the tiles differ, and this random VAE's GroupNorm and attention see each tile whole: compare with
    # the untiled decode, as far from it as diffusers' tiles are (the real VAE's figures: docs/benchmarks.md)
    assert _psnr(even, untiled) >= _psnr(reference, untiled) - TILED_PSNR_SLACK_DB


@pytest.mark.parametrize("whole", [False, True], ids=["regions", "whole"])
def test_a_compiled_vae_decoder_compiles_once_per_job(tiled_vae, count_graphs, whole):
    """The real compile path (compile.compile_vae_decoder, dynamic shapes): a job's decodes compile its graphs once,
    and a second job compiles nothing more."""
    assert compiled.compile_vae_decoder(tiled_vae, whole=whole) and compiled.decodes_in_even_tiles(tiled_vae)
    for count in JOB_LATENT_COUNTS:
        vae_ops.decode(tiled_vae, _latents(count))
    assert compiled.decoder_compiled(tiled_vae)  # nothing fell back to eager
    first_job = len(count_graphs)
    for count in JOB_LATENT_COUNTS:
        vae_ops.decode(tiled_vae, _latents(count, seed=1))
    assert len(count_graphs) == first_job
    assert first_job == 1 if whole else first_job >= 2


def test_a_regionally_compiled_decoder_compiles_its_resnet_blocks_and_upsamplers_not_the_rest(tiled_vae,
                                                                                             count_graphs):
    """Region by region (the default: the first decode compiles in a fraction of the whole decoder's time,
    docs/benchmarks.md "First-job compile costs"), the graphs hold the resnet blocks' and upsamplers' work and
    never the input convolution, the attention or the output head, which run as they are; the same instances of
    a class share their graphs, so there are fewer graphs than regions; the output is the eager one's."""
    graphs = count_graphs
    latents = _latents(5)
    expected = vae_ops.decode(tiled_vae, latents, even_tiles=True)
    compiled.compile_vae_decoder(tiled_vae)
    decoded = vae_ops.decode(tiled_vae, latents)
    regions = compiled.decoder_regions(tiled_vae.decoder)
    region_kinds = {type(r).__name__ for r in regions}
    assert region_kinds == {"HunyuanVideoResnetBlockCausal3D", "HunyuanVideoUpsampleCausal3D"}
    assert 2 <= len(graphs) < len(regions)
    operators = {str(node.target) for g in graphs for node in g.graph.nodes if node.op == "call_function"}
    assert any("group_norm" in op for op in operators) and any("interpolate" in op for op in operators)
    assert not any("attention" in op for op in operators)
    assert torch.allclose(decoded, expected, atol=1e-5)
    compiled.uncompile_vae_decoder(tiled_vae)
    assert all(compiled._hook(r, compiled.DECODER_REGION_HOOK) is None for r in regions)  # gone with the decoder's


def test_the_last_short_frame_window_runs_every_region_eagerly(tiled_vae, count_graphs):
    """A window under VAE_COMPILED_MIN_LATENTS is another shape regime (minutes of compiling on a GPU): neither
    the decoder nor any of its regions compiles for it, and it does not make the decoder ready for the plan."""
    compiled.compile_vae_decoder(tiled_vae)
    vae_ops.decode(tiled_vae, _latents(compiled.VAE_COMPILED_MIN_LATENTS - 1))
    assert count_graphs == [] and compiled.decoder_compile_state("cpu", None) == compiled.COLD
    vae_ops.decode(tiled_vae, _latents(compiled.VAE_COMPILED_MIN_LATENTS))
    assert count_graphs and compiled.decoder_compile_state("cpu", None) == compiled.READY


def test_a_region_lets_out_of_memory_through_and_a_failed_decode_leaves_nothing_compiling(tiled_vae, monkeypatch):
    """A region's out-of-memory error is the plan's to handle (the job fails with its advice), not a compiler
    failure: it propagates and the decoder stays compiled; after it, the next decode that should not compile (a
    short window) runs every region eagerly. Switching to the whole graph takes the regions' hooks off."""
    compiles = []

    def out_of_memory_compile(fn, **kwargs):
        def compiled_fn(*args, **kw):
            compiles.append(fn)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return compiled_fn

    monkeypatch.setattr(torch, "compile", out_of_memory_compile)
    compiled.compile_vae_decoder(tiled_vae)
    with pytest.raises(torch.OutOfMemoryError):
        vae_ops.decode(tiled_vae, _latents(compiled.VAE_COMPILED_MIN_LATENTS))
    assert len(compiles) == 1 and compiled.decoder_compiled(tiled_vae)
    vae_ops.decode(tiled_vae, _latents(compiled.VAE_COMPILED_MIN_LATENTS - 1))  # would raise if a region compiled
    assert len(compiles) == 1
    regions = compiled.decoder_regions(tiled_vae.decoder)
    assert compiled.compile_vae_decoder(tiled_vae, whole=True)
    assert all(compiled._hook(r, compiled.DECODER_REGION_HOOK) is None for r in regions)
    assert compiled._hook(tiled_vae.decoder, compiled.DECODER_HOOK).whole


def test_a_small_decode_compiles_the_graphs_every_later_decode_of_the_process_uses(tiny_models_dir, tiled_vae,
                                                                                   count_graphs):
    """What the worker runs while idle (compile_on_a_small_decode, a decode of zeros far smaller than a job's):
    its graphs serve every decode of a job, tiled or not, at every frame count a job decodes, also by the VAE
    loaded again for a later job, without compiling again; and from then on the plan finds the decoder ready."""
    assert compiled.decoder_compile_state("cpu", tiny_models_dir) == compiled.COLD
    assert not compiled.compile_on_a_small_decode(tiled_vae)  # nothing to compile: the decoder is not set up for it
    compiled.compile_vae_decoder(tiled_vae)
    assert compiled.compile_on_a_small_decode(tiled_vae)
    small = len(count_graphs)
    assert small >= 2 and compiled.decoder_compile_state("cpu", tiny_models_dir) == compiled.READY
    reloaded = loading.load_vae(tiny_models_dir, torch.float32, torch.device("cpu"))
    compiled.compile_vae_decoder(reloaded)
    for vae in (tiled_vae, reloaded):
        for tiled in (True, False):
            set_tiles(vae, tiled)
            for count in JOB_LATENT_COUNTS:
                vae_ops.decode(vae, _latents(count))
    assert len(count_graphs) == small and compiled.decoder_compiled(reloaded)


def test_a_compiled_decoder_is_remembered_beside_the_compile_cache_for_the_next_start(tiny_models_dir, tiled_vae,
                                                                                      count_graphs, monkeypatch,
                                                                                      tmp_path):
    """A process that compiled the decoder leaves a marker in inductor's cache folder: a later start (this process's
    outcomes forgotten) reads the decoder as CACHED there, seconds to compile instead of minutes, and COLD where
    that cache is another (or was emptied). Without a folder set, the cache is the one the models folder's
    manager would set (keep_caches_in)."""
    compiled.compile_vae_decoder(tiled_vae)
    compiled.compile_on_a_small_decode(tiled_vae)
    compiled._decoder_outcome.clear()
    assert compiled.decoder_compile_state("cpu", tiny_models_dir) == compiled.CACHED
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "another"))
    assert compiled.decoder_compile_state("cpu", tiny_models_dir) == compiled.COLD
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert compiled.inductor_cache_dir(tiny_models_dir) == tiny_models_dir / compiled.CACHE_SUBDIR / "inductor"
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ  # read, not set


def test_a_compiler_failure_marks_the_decoder_failed_and_out_of_memory_in_a_small_decode_propagates(
        tiny_models_dir, tiled_vae, monkeypatch, tmp_path):
    """The plan decodes eagerly where the compiler failed in this process (a compiled plan's tiles would not fit
    the eager decoder); an out-of-memory error in the idle compile is the worker's to report, and leaves the
    decoder to compile later."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # no marker from an earlier test
    original = tiled_vae.decoder.conv_in.forward

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    compiled.compile_vae_decoder(tiled_vae)
    monkeypatch.setattr(tiled_vae.decoder.conv_in, "forward", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        compiled.compile_on_a_small_decode(tiled_vae)
    assert compiled.decoder_compile_state("cpu", tiny_models_dir) == compiled.COLD
    monkeypatch.setattr(tiled_vae.decoder.conv_in, "forward", original)

    def broken_compiler(fn, **kwargs):
        def compiled_fn(*args, **kw):
            raise RuntimeError("triton: no compiler for this GPU (injected)")
        return compiled_fn

    monkeypatch.setattr(torch, "compile", broken_compiler)
    assert not compiled.compile_on_a_small_decode(tiled_vae)  # decoded eagerly after the failure
    assert compiled.decoder_compile_state("cpu", tiny_models_dir) == compiled.FAILED


def test_the_decoders_state_is_one_key_per_gpu_however_the_device_is_named(monkeypatch, tmp_path):
    """The decode records its device as torch names it (cuda:1), the probe asks for "cuda:{index}" and the manager
    for its `gpu` ("cuda", the current device): all three are one key. The marker is per GPU model. (CUDA's
    current device and names injected.)"""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"GPU model {torch.device(device).index}")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    compiled._decoder_ready(compiled._device_key(torch.device("cuda", 1)))
    assert compiled.decoder_compile_state("cuda", None) == compiled.decoder_compile_state("cuda:1", None) == "ready"
    assert compiled.decoder_compile_state("cuda:0", tmp_path) == compiled.COLD  # another model of GPU
    compiled._decoder_outcome.clear()  # a later start
    assert compiled.decoder_compile_state("cuda", tmp_path) == compiled.CACHED
