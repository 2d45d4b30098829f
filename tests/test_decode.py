"""The context decode (f1 `decode_context`): later sections decode their 9 new latents after a few older ones
instead of the official 18, and the stitched video must match the official one of the same latents."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

from framepack_ui.engine import f1, sections, vae as vae_ops
from framepack_ui.engine.video import soft_append
from framepack_ui.events import Finished
from conftest import cpu_manager
from framepack_ui.spec import JobSpec

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))

CONTEXT_PSNR_DB = 40.0  # bound for context 3 vs the official video, tiny random VAE (measured: 44-50 dB)


@pytest.fixture(scope="module")
def vae(tiny_models_dir):
    with cpu_manager(tiny_models_dir).use("vae") as model:
        yield model


def _latents(sections: int, seed: int = 0, side: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 1 + f1.LATENT_WINDOW * sections, side, side, generator=g)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1 / mse)


def _stitched(vae, latents: torch.Tensor, context) -> torch.Tensor:
    """The whole video as the engine writes it (soft_append is the writer's tested reference)."""
    video = None
    for section in range((latents.shape[2] - 1) // f1.LATENT_WINDOW):
        end = 1 + f1.LATENT_WINDOW * (section + 1)
        pixels = vae_ops.decode(vae, latents[:, :, end - sections.decode_latent_count(section, context):end])
        frames, fade = sections.section_frames(pixels, section, context)
        video = frames if video is None else soft_append(video, frames, fade, sections.OVERLAP_FRAMES)
    return video


def test_aligned_context_decodes_the_new_latents_bit_for_bit(vae):
    """k = 3 keeps diffusers' frame-tile grid: the appended frames and the faded ones equal the official decode's."""
    latents = _latents(3)
    official = vae_ops.decode(vae, latents[:, :, -sections.DECODE_LATENTS:])
    context = vae_ops.decode(vae, latents[:, :, -sections.decode_latent_count(2, sections.ALIGNED_CONTEXT):])
    frames, fade = sections.section_frames(context, 2, sections.ALIGNED_CONTEXT)
    assert context.shape[1] == 1 + 4 * (f1.LATENT_WINDOW + sections.ALIGNED_CONTEXT - 1) == 45
    assert fade == 5 and frames.shape[1] == 36 + fade
    assert torch.equal(frames[:, 1:], official[:, -(36 + fade - 1):])  # frames[0] keeps weight 1 in the fade
    misaligned = vae_ops.decode(vae, latents[:, :, -sections.decode_latent_count(2, 2):])
    assert not torch.equal(misaligned[:, -36:], official[:, -36:])  # why k must be a multiple of 3


def test_context_decode_matches_the_official_video_within_bound(vae):
    latents = _latents(4, seed=1)
    official = _stitched(vae, latents, None)
    context = _stitched(vae, latents, sections.ALIGNED_CONTEXT)
    assert official.shape == context.shape and official.shape[1] == 1 + 36 * 4
    assert _psnr(context, official) >= CONTEXT_PSNR_DB
    assert not torch.equal(context, official)  # it is another decode, not the official one again
    every_section = _stitched_with_section_1(vae, latents)
    assert _psnr(every_section, official) < _psnr(context, official)  # why section 1 decodes officially


def _stitched_with_section_1(vae, latents):
    video = None
    for section in range((latents.shape[2] - 1) // f1.LATENT_WINDOW):
        end = 1 + f1.LATENT_WINDOW * (section + 1)
        count = sections.decode_latent_count(section, sections.ALIGNED_CONTEXT, from_section=1)
        frames, fade = sections.section_frames(vae_ops.decode(vae, latents[:, :, end - count:end]), section,
                                         sections.ALIGNED_CONTEXT, from_section=1)
        video = frames if video is None else soft_append(video, frames, fade, sections.OVERLAP_FRAMES)
    return video


def test_decode_counts_and_fades():
    assert [sections.decode_latent_count(s) for s in range(4)] == [10, 18, 18, 18]
    assert [sections.decode_latent_count(s, 3) for s in range(4)] == [10, 18, 12, 12]
    assert [sections.section_overlap(s, 3) for s in (1, 2)] == [33, 5]
    # k = 9 is the official decode
    assert sections.decode_latent_count(2, 9) == 18 and sections.section_overlap(2, 9) == 33
    assert sections.section_overlap(2, 1) == 1 and sections.decode_latent_count(2, 1) == 10  # 37 frames: 1 faded + 36
    with pytest.raises(ValueError):
        sections.check_decode_context(0)


def test_engine_decode_context_decodes_fewer_latents_same_frame_count(tiny_models_dir, tmp_path, monkeypatch):
    image = tmp_path / "start.png"
    y, x = np.mgrid[0:64, 0:64]
    Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)).save(image)
    manager = cpu_manager(tiny_models_dir)
    decoded: list[int] = []
    real_decode = vae_ops.decode
    monkeypatch.setattr(vae_ops, "decode", lambda v, z: decoded.append(z.shape[2]) or real_decode(v, z))

    def frames(name, fast_decode):
        """The job's spec decides (JobSpec.fast_decode: the app's and the CLI's default is the context decode)."""
        sink: list[np.ndarray] = []
        spec = JobSpec(image=str(image), prompt="a gradient", resolution=64, steps=4, seconds=3.6,  # 3 sections
                       fast_decode=fast_decode)
        end = f1.run(spec, tmp_path / f"{name}.mp4", manager, lambda e: None, frame_sink=sink.append)
        assert isinstance(end, Finished), end
        return np.concatenate(sink)

    assert JobSpec(image="", prompt="").fast_decode  # on by default
    official = frames("official", False)
    assert decoded == [10, 18, 18]
    decoded.clear()
    context = frames("context", True)
    assert decoded == [10, 18, 12]
    assert context.shape == official.shape and len(official) == 1 + 36 * 3
    assert _psnr(torch.from_numpy(context).float() / 127.5 - 1, torch.from_numpy(official).float() / 127.5 - 1) \
        >= CONTEXT_PSNR_DB


def test_bench_decode_tiny_runs(tmp_path, monkeypatch):
    """The H100 bench's own code path, on the tiny VAE with the smallest grid (the full --tiny run: seconds)."""
    import bench_decode

    out = tmp_path / "decode.json"
    monkeypatch.setattr(sys, "argv", ["bench_decode.py", "--tiny", "--tilings", "0", "--contexts", "3",
                                      "--no-full-decode", "--out", str(out)])
    bench_decode.main()
    result = json.loads(out.read_text())
    rows = {(r["decode"], r["cudnn_benchmark"]): r for r in result["rows"]}
    assert math.isinf(rows["official", False]["psnr_vs_official_untiled_dB"])  # the reference itself
    assert rows["context 3", False]["psnr_vs_official_untiled_dB"] >= CONTEXT_PSNR_DB
    assert rows["context 3", False]["latents_per_section"] == [10, 18, 12]
    assert ("context 3", True) in rows  # the cudnn.benchmark pass ran too
