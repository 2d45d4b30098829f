"""SectionVideoWriter: streamed F1 sections must equal the official whole-video soft append, on disk as it grows."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from PIL import Image

from framepack_ui.engine.video import (
    OVERLAP_FRAMES,
    SectionVideoWriter,
    count_frames,
    crossfade_weights,
    read_metadata,
    soft_append,
    to_uint8,
)
from framepack_ui.sidecar import sidecar_path, write_sidecar

W, H = 64, 48
FIRST, LATER = 37, 69  # F1: 10 latents -> 37 frames; 18 latents -> 69 frames


def _sections(n: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # a little beyond [-1, 1] so the clamp is exercised too
    return [
        (torch.rand(3, FIRST if i == 0 else LATER, H, W, generator=g) * 2.2 - 1.1).to(dtype) for i in range(n)
    ]


def _official(sections: list[torch.Tensor]) -> torch.Tensor:
    history = sections[0]
    for current in sections[1:]:
        history = soft_append(history, current, OVERLAP_FRAMES)
    return history  # (3, T, H, W)


def _decode_count(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_streamed_frames_equal_official_soft_append(tmp_path, dtype):
    sections = _sections(4, seed=1, dtype=dtype)
    chunks: list[np.ndarray] = []
    with SectionVideoWriter(tmp_path / "v.mp4", W, H, frame_sink=chunks.append) as writer:
        for s in sections:
            writer.add_section(s)
    streamed = np.concatenate(chunks)  # (T, H, W, 3) uint8, exactly what went to the encoder
    # the reference blends whole videos in float32 (the writer's blend precision), then the official uint8 cast
    expected = to_uint8(_official([s.float() for s in sections])).permute(1, 2, 3, 0).numpy()
    assert streamed.shape == expected.shape == (1 + 36 * 4, H, W, 3)
    assert np.array_equal(streamed, expected)


@pytest.mark.parametrize(("lengths", "overlap"), [([40, 50, 34, 69], 33), ([6, 9, 5, 12, 5], 5), ([3, 4, 4], 1)])
def test_streamed_frames_equal_soft_append_irregular(tmp_path, lengths, overlap):
    # sections adding fewer than overlap - 1 new frames: the held frames then include blended ones
    g = torch.Generator().manual_seed(2)
    sections = [(torch.rand(3, t, H, W, generator=g) * 2 - 1).half() for t in lengths]
    chunks: list[np.ndarray] = []
    with SectionVideoWriter(tmp_path / "v.mp4", W, H, overlap=overlap, frame_sink=chunks.append) as writer:
        for s in sections:
            writer.add_section(s)
            assert writer.held_frames <= overlap - 1
    history = sections[0].float()
    for current in sections[1:]:
        history = soft_append(history, current.float(), overlap)
    expected = to_uint8(history).permute(1, 2, 3, 0).numpy()
    assert np.array_equal(np.concatenate(chunks), expected)
    assert count_frames(tmp_path / "v.mp4") == history.shape[1] == writer.frames_written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_short_fades_equal_soft_append_with_the_official_ramp(tmp_path, dtype):
    # the context decode (sections.section_frames): sections of 36 new frames after a fade of 33 (official), 5, 17 or 1
    g = torch.Generator().manual_seed(3)
    fades = [None, 33, 5, 17, 1, 33]
    sections = [(torch.rand(3, FIRST if f is None else 36 + f, H, W, generator=g) * 2.2 - 1.1).to(dtype)
                for f in fades]
    chunks: list[np.ndarray] = []
    with SectionVideoWriter(tmp_path / "v.mp4", W, H, frame_sink=chunks.append) as writer:
        for section, fade in zip(sections, fades):
            writer.add_section(section, fade)
            assert writer.held_frames == OVERLAP_FRAMES - 1  # still only the frames a next section may change
    video = sections[0].float()
    for section, fade in zip(sections[1:], fades[1:]):
        video = soft_append(video, section.float(), fade, ramp=OVERLAP_FRAMES)
    assert video.shape[1] == 1 + 36 * (len(fades))
    assert np.array_equal(np.concatenate(chunks), to_uint8(video).permute(1, 2, 3, 0).numpy())
    assert count_frames(tmp_path / "v.mp4") == video.shape[1]


def test_crossfade_weights_end_like_the_official_fade():
    official = torch.linspace(1, 0, OVERLAP_FRAMES)
    assert torch.equal(crossfade_weights(OVERLAP_FRAMES), official)
    assert torch.equal(crossfade_weights(OVERLAP_FRAMES, OVERLAP_FRAMES), official)
    short = crossfade_weights(5, OVERLAP_FRAMES)
    assert short[0] == 1 and torch.equal(short[1:], official[-4:])  # old[-5] stays; then the official weights
    assert torch.equal(crossfade_weights(1, OVERLAP_FRAMES), torch.ones(1))
    with pytest.raises(ValueError):
        crossfade_weights(34, OVERLAP_FRAMES)


def test_soft_append_matches_formula():
    a, b = torch.rand(3, 40, 4, 4), torch.rand(3, 50, 4, 4)
    out = soft_append(a, b, 33)
    w = torch.linspace(1, 0, 33)
    assert out.shape[1] == 40 + 50 - 33
    assert torch.equal(out[:, :7], a[:, :7])
    for i in (0, 1, 16, 32):
        assert torch.allclose(out[:, 7 + i], w[i] * a[:, 7 + i] + (1 - w[i]) * b[:, i])
    assert torch.equal(out[:, 7], a[:, 7])  # w[0] = 1: old[-33] never changes
    assert torch.equal(out[:, 40:], b[:, 33:])
    # batched (B, C, T, H, W) as the official calls it
    assert torch.equal(soft_append(a[None], b[None], 33)[0], out)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_frame_counts_1_plus_36n(tmp_path, n):
    path = tmp_path / f"v{n}.mp4"
    with SectionVideoWriter(path, W, H, fps=30) as writer:
        for s in _sections(n):
            writer.add_section(s)
    assert writer.frames_written == writer.frames_total == 1 + 36 * n
    assert count_frames(path) == 1 + 36 * n
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert stream.average_rate == 30
        assert (stream.codec_context.width, stream.codec_context.height) == (W, H)
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert sum(1 for _ in c.decode(video=0)) == 1 + 36 * n


def test_file_plays_midway(tmp_path):
    path = tmp_path / "v.mp4"
    with SectionVideoWriter(path, W, H) as writer:
        sections = _sections(3)
        writer.add_section(sections[0])
        assert writer.frames_written == FIRST - (OVERLAP_FRAMES - 1)  # 5
        on_disk_1 = _decode_count(path)
        writer.add_section(sections[1])
        assert writer.frames_written == 1 + 36 * 2 - (OVERLAP_FRAMES - 1)  # 41
        on_disk_2 = _decode_count(path)  # another handle, writer still open
        assert on_disk_2 == writer.frames_on_disk == writer.frames_written - 1  # what a section reports as saved
        assert on_disk_1 == 5 - 1
        writer.add_section(sections[2])
    assert count_frames(path) == 1 + 36 * 3


def test_held_back_frames_flushed_on_close_after_exception(tmp_path):
    path = tmp_path / "v.mp4"
    chunks: list[np.ndarray] = []
    with pytest.raises(RuntimeError, match="boom"):
        with SectionVideoWriter(path, W, H, frame_sink=chunks.append) as writer:
            for s in _sections(2):
                writer.add_section(s)
            assert writer.held_frames == OVERLAP_FRAMES - 1
            raise RuntimeError("boom")
    assert writer.closed
    assert writer.held_frames == 0
    assert writer.frames_written == 1 + 36 * 2
    assert sum(len(c) for c in chunks) == 1 + 36 * 2
    assert count_frames(path) == 1 + 36 * 2
    writer.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        writer.add_section(_sections(1)[0])


def test_bad_section_leaves_writer_usable(tmp_path):
    path = tmp_path / "v.mp4"
    with SectionVideoWriter(path, W, H) as writer:
        writer.add_section(_sections(1)[0])
        with pytest.raises(ValueError):
            writer.add_section(torch.zeros(3, 69, H + 16, W))  # wrong size
        with pytest.raises(ValueError):
            writer.add_section(torch.zeros(3, 20, H, W))  # shorter than the overlap
        writer.add_section(_sections(2)[1])
    assert count_frames(path) == 1 + 36 * 2


def test_metadata_roundtrip(tmp_path):
    path = tmp_path / "v.mp4"
    meta = {"framepack_seed": "31337", "framepack_prompt": "a cat, dancing — ünïcode", "comment": "hi"}
    with SectionVideoWriter(path, W, H, metadata=meta) as writer:
        writer.add_section(_sections(1)[0])
    got = read_metadata(path)
    for key, value in meta.items():
        assert got[key] == value
    with av.open(str(path)) as c:  # straight through PyAV as well
        assert c.metadata["framepack_seed"] == "31337"


def test_sidecar_and_image_copy(tmp_path):
    video = tmp_path / "out" / "clip_0001.mp4"
    video.parent.mkdir()
    video.write_bytes(b"")
    image = tmp_path / "start.PNG"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(image, format="PNG")
    settings = {"seed": 31337, "prompt": "a cat", "steps": 25, "nested": {"gs": 10.0}}

    json_path = write_sidecar(video, settings, image)

    assert json_path == sidecar_path(video) == video.with_suffix(".json")
    record = json.loads(json_path.read_text(encoding="utf-8"))
    assert record["input_image_file"] == "clip_0001.input.png"
    assert {k: record[k] for k in settings} == settings
    assert "input_image_file" not in settings  # caller's dict untouched
    copy = video.parent / record["input_image_file"]
    assert copy.read_bytes() == image.read_bytes()
    assert "\n  " in json_path.read_text(encoding="utf-8")  # pretty
    assert sorted(p.name for p in video.parent.iterdir()) == ["clip_0001.input.png", "clip_0001.json", "clip_0001.mp4"]

    # rewriting (e.g. a re-run) replaces both in place, no temp files left behind
    settings["seed"] = 1
    write_sidecar(video, settings, image)
    assert json.loads(json_path.read_text(encoding="utf-8"))["seed"] == 1
    assert len(list(video.parent.iterdir())) == 3

    # no image: JSON only
    other = tmp_path / "out" / "clip_0002.mp4"
    record2 = json.loads(write_sidecar(other, {"seed": 2}, None).read_text(encoding="utf-8"))
    assert record2 == {"seed": 2, "input_image_file": None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_memory_flat(tmp_path, dtype):
    path = tmp_path / "v.mp4"
    with SectionVideoWriter(path, W, H) as writer:
        for i, s in enumerate(_sections(6, dtype=dtype)):
            writer.add_section(s)
            # the only pixels kept between calls: the 32 frames the next section can still change
            assert writer.held_frames == OVERLAP_FRAMES - 1
            held = writer._held
            assert held is not None and held.shape == (3, OVERLAP_FRAMES - 1, H, W)
            assert held.dtype == dtype  # raw section frames: fp16 stays fp16 (exact when blended in fp32)
            assert held.untyped_storage().nbytes() == held.nbytes  # no view into a bigger buffer
            assert held.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
            assert writer.frames_total == 1 + 36 * (i + 1)
            assert writer.frames_written == writer.frames_total - (OVERLAP_FRAMES - 1)
            pixel_tensors = [v for v in vars(writer).values() if isinstance(v, torch.Tensor) and v.dim() == 4]
            assert pixel_tensors == [held]
    assert writer.held_frames == 0
