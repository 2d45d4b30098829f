"""Streams F1 sections into one MP4 as they are decoded, with constant memory.

The official demo keeps every decoded pixel of the video in RAM and re-encodes the whole video to a new MP4
after each section. F1 sections overlap: section 0 gives 37 frames, each later one 69 frames whose first 33 are
cross-faded into the last 33 frames of the video so far (weights ``linspace(1, 0, 33)``), net +36 frames. Since
the first weight is 1, ``old[-33]`` never changes: only the last ``overlap - 1`` (32) frames of the video can
still change when the next section arrives. ``SectionVideoWriter`` therefore encodes everything else at once and
holds back just those 32 frames until the next section or ``close()``. A section may also fade over fewer
frames (the context decode of f1.py), with the end of the same 33 weights.

The MP4 is fragmented (one fragment per frame, ``empty_moov``) and flushed per packet, so after each
``add_section`` the file on disk plays with all but the last written frame (the muxer keeps the newest packet
until it knows its duration): ``frames_on_disk`` counts them, and is what a section reports as saved, so that a
process killed after it leaves a file with exactly that many frames. Such files report 0 frames in the header: use
``count_frames`` (decodes).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping
from fractions import Fraction
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import av
import numpy as np
import torch
from av.bitstream import BitStreamFilterContext

from .sections import OVERLAP_FRAMES

log = logging.getLogger(__name__)

_MOVFLAGS = "frag_every_frame+empty_moov+default_base_moof+use_metadata_tags"
_ENCODE_CHUNK_FRAMES = 8  # frames converted to uint8 at a time: bounds the temporary copies

FrameSink = Callable[[np.ndarray], None]  # receives uint8 (N, H, W, 3) exactly as handed to the encoder


def open_output(path: Path) -> BinaryIO:
    """The video file, opened by Python rather than by FFmpeg: every byte of the video goes through this file's
    write, the one place a write error (a full disk: ENOSPC) arises, whatever part of the muxer wrote. Unbuffered,
    so each fragment the muxer flushes is in the OS's hands at once (it survives the process being killed)."""
    return open(path, "wb", buffering=0)


def crossfade_weights(overlap: int, ramp: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights of the old video over the last ``overlap`` frames: ``linspace(1, 0, overlap)`` by default.

    With ``ramp`` > ``overlap`` they are the last ``overlap`` values of ``linspace(1, 0, ramp)`` with the first set
    to 1: a short fade that ends exactly as the official 33-frame one does (the context decode has only the last
    few old frames to fade with). The first weight is always 1, so ``old[-overlap]`` never changes.
    """
    ramp = overlap if ramp is None else ramp
    if not 1 <= overlap <= ramp:
        raise ValueError(f"need 1 <= overlap <= ramp, got overlap {overlap}, ramp {ramp}")
    weights = torch.linspace(1, 0, ramp, dtype=dtype)[ramp - overlap :].clone()
    weights[0] = 1
    return weights


def soft_append(history: torch.Tensor, current: torch.Tensor, overlap: int, ramp: int | None = None) -> torch.Tensor:
    """Whole-tensor reference of the official ``soft_append_bcthw``: time is dim -3 ((C,T,H,W) or (B,C,T,H,W)).

    ``history[-overlap:]`` and ``current[:overlap]`` are cross-faded with weights ``linspace(1, 0, overlap)`` in
    ``history``'s dtype (``crossfade_weights(overlap, ramp)`` when ``ramp`` is given), then ``current[overlap:]``
    is appended. Kept for tests and as the definition the streaming writer must match.
    """
    if overlap <= 0:
        return torch.cat([history, current], dim=-3)
    if history.shape[-3] < overlap or current.shape[-3] < overlap:
        raise ValueError(f"both videos need at least {overlap} frames: {history.shape[-3]}, {current.shape[-3]}")
    if ramp is None:
        weights = torch.linspace(1, 0, overlap, dtype=history.dtype, device=history.device)
    else:
        weights = crossfade_weights(overlap, ramp, history.dtype).to(history.device)
    weights = weights.view(-1, 1, 1)  # (T, 1, 1)
    blended = weights * history[..., -overlap:, :, :] + (1 - weights) * current[..., :overlap, :, :]
    out = torch.cat([history[..., :-overlap, :, :], blended, current[..., overlap:, :, :]], dim=-3)
    return out.to(history)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 exactly as the official save does (clamp, * 127.5 + 127.5, truncate)."""
    # one float temporary, the same roundings as clamp(x) * 127.5 + 127.5
    return pixels.to(torch.float32, copy=True).clamp_(-1.0, 1.0).mul_(127.5).add_(127.5).to(torch.uint8)


class SectionVideoWriter:
    """Writes F1 sections (pixels (3, T, H, W) in [-1, 1]) to an H.264 MP4 that plays while it grows.

    Holds at most ``overlap - 1`` frames between calls (in the sections' float dtype, float32 once blended);
    never the whole video. Blending is done in float32. A section may fade over fewer frames than ``overlap``
    (``add_section(pixels, fade)``): then with the end of the ``overlap``-frame fade (see ``crossfade_weights``).
    ``frame_sink`` (tests, previews) receives each uint8 (N, H, W, 3) chunk as it goes to the encoder.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        width: int,
        height: int,
        fps: int = 30,
        crf: int = 16,
        metadata: Mapping[str, str] | None = None,
        overlap: int = OVERLAP_FRAMES,
        frame_sink: FrameSink | None = None,
    ):
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"yuv420p needs positive even width and height, got {width}x{height}")
        if overlap < 1:
            raise ValueError(f"overlap must be >= 1, got {overlap}")
        self.path = Path(path)
        self.width = int(width)
        self.height = int(height)
        self.fps = int(fps)
        self.overlap = int(overlap)
        self._frame_sink = frame_sink
        self._frames_written = 0  # frames handed to the encoder
        self._frames_total = 0  # frames of the video so far, held-back ones included
        # (3, <= overlap-1, H, W) on the CPU: the frames the next section may still change. Raw section frames keep
        # the section's float dtype (fp16 -> fp32 is exact, and half the RAM: 75 MB at 640x608); blended ones fp32.
        self._held: torch.Tensor | None = None
        self._weights = crossfade_weights(self.overlap)  # same values as soft_append's
        self._closed = False

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open_output(self.path)
        try:
            self._container = av.open(
                self._file,
                mode="w",
                format="mp4",
                # frag_every_frame + flush_packets: each frame reaches the disk as its own fragment (all but the
                # newest, whose duration the muxer needs first); use_metadata_tags keeps custom keys.
                options={"movflags": _MOVFLAGS, "flush_packets": "1"},
            )
        except BaseException:
            self._file.close()
            raise
        try:
            for key, value in (metadata or {}).items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise TypeError(f"metadata keys and values must be str: {key!r}: {value!r}")
                self._container.metadata[key] = value
            self._stream = self._container.add_stream("libx264", rate=self.fps)
            self._stream.width = self.width
            self._stream.height = self.height
            self._stream.pix_fmt = "yuv420p"
            # zerolatency: no lookahead or B-frames, so each frame's packet comes out of encode() at once.
            self._stream.options = {"crf": str(int(crf)), "tune": "zerolatency"}
            self._time_base = Fraction(1, self.fps)
        except BaseException:
            self._close_files()
            raise

    # -- public -------------------------------------------------------------------------------------------------

    @property
    def frames_written(self) -> int:
        """Frames handed to the encoder so far (final; the held-back ones are not counted)."""
        return self._frames_written

    @property
    def frames_on_disk(self) -> int:
        """Frames the file holds now, should the process die this instant: one fewer than were encoded while the
        writer is open (the muxer writes a frame's fragment when the next frame's packet arrives, since it needs
        the next timestamp for the duration; PyAV offers no call that flushes that fragment), all after close."""
        return self._frames_written if self._closed else max(self._frames_written - 1, 0)

    @property
    def frames_total(self) -> int:
        """Frames of the video so far, held-back frames included (what the file has after close)."""
        return self._frames_total

    @property
    def held_frames(self) -> int:
        """Frames held back because the next section may still blend into them (at most overlap - 1)."""
        return 0 if self._held is None else int(self._held.shape[1])

    @property
    def closed(self) -> bool:
        return self._closed

    def add_section(self, pixels: torch.Tensor, fade: int | None = None) -> None:
        """Append one decoded section: (3, T, H, W) or (1, 3, T, H, W), floats in [-1, 1], any device.

        Its first ``fade`` frames (default ``overlap``, at most that) are cross-faded into the video's last ones;
        soft_append(video, pixels, fade, ramp=overlap) is the reference.
        """
        if self._closed:
            raise RuntimeError("writer is closed")
        fade = self.overlap if fade is None else int(fade)
        if not 1 <= fade <= self.overlap:
            raise ValueError(f"fade must be 1..{self.overlap}, got {fade}")
        pixels = self._check(pixels)
        frames = pixels.shape[1]
        keep = self.overlap - 1
        if self._frames_total == 0:
            segments = [pixels]
        else:
            if self._frames_total < self.overlap or frames < fade:
                raise ValueError(
                    f"cross-fade needs {self.overlap} frames in the video and {fade} in the section: video has "
                    f"{self._frames_total}, section has {frames}"
                )
            assert self.held_frames == keep
            segments = [*self._fade(pixels, fade), pixels[:, fade:]]
        tail = sum(s.shape[1] for s in segments)  # frames not yet written
        n_write = max(tail - keep, 0)
        self._write_segments(segments, n_write)
        self._held = self._slice_tail(segments, n_write)
        self._frames_total += frames if self._frames_total == 0 else frames - fade

    def append(self, pixels: torch.Tensor) -> None:
        """Append frames with no cross-fade ((3, T, H, W) in [-1, 1]): everything but the last ``overlap - 1``
        frames of the video is encoded, those are held for the next section's fade. A continued video is put
        back this way (its frames after the copied ones, or a whole video brought to extend, a chunk at a time)."""
        if self._closed:
            raise RuntimeError("writer is closed")
        pixels = self._check(pixels)
        segments = [pixels] if self._held is None else [self._held, pixels]
        tail = sum(s.shape[1] for s in segments)
        n_write = max(tail - (self.overlap - 1), 0)
        self._write_segments(segments, n_write)
        self._held = self._slice_tail(segments, n_write)
        self._frames_total += pixels.shape[1]

    def copy_frames(self, source: str | os.PathLike[str], frames: int) -> None:
        """Put the first ``frames`` frames of ``source`` (an MP4 this writer's settings made) into this file as they
        are: their H.264 packets copied, not decoded and encoded again, so they decode to the same pixels. Only
        before anything else is written. The new encoder then starts a stream of its own at the next frame (an
        IDR frame: x264 cannot take up an old encoder's state).

        Why by hand: the packets must reach the MP4 muxer in Annex B, as x264's own do (the muxer converts those
        to length-prefixed NAL units), and the new encoder's SPS and PPS, written once in the file's header, must
        be the ones the copied frames were encoded with; raises ValueError where they differ (another x264 build
        or settings) or ``source`` has fewer frames.
        """
        if self._frames_total or self._closed:
            raise RuntimeError("copy_frames comes before any frame is written")
        with av.open(str(source)) as src:
            in_stream = src.streams.video[0]
            if (in_stream.codec_context.name, in_stream.width, in_stream.height) != ("h264", self.width, self.height):
                raise ValueError(f"{source} is not an H.264 video of {self.width}x{self.height}")
            self._container.start_encoding()  # opens x264: its SPS and PPS go into the header now
            if _parameter_sets(in_stream.codec_context.extradata) != _parameter_sets(self._stream.codec_context.extradata):
                raise ValueError(f"{source} was encoded with other H.264 parameters than this encoder's")
            to_annex_b = BitStreamFilterContext("h264_mp4toannexb", in_stream)
            copied = 0
            for packet in src.demux(in_stream):
                for out in to_annex_b.filter(packet if packet.size else None):
                    if copied < frames:
                        out.stream = self._stream
                        out.pts = out.dts = copied
                        out.time_base, out.duration = self._time_base, 1
                        self._container.mux(out)
                        copied += 1
                if copied >= frames:
                    break
        if copied < frames:
            raise ValueError(f"{source} has {copied} whole frames, {frames} were needed")
        self._frames_written = self._frames_total = frames

    def close(self) -> None:
        """Encode the held-back frames and finalise the file. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._held is not None and self._held.shape[1] > 0:
                self._write_segments([self._held], self._held.shape[1])
            self._held = None
            for packet in self._stream.encode(None):
                self._container.mux(packet)
        finally:
            self._held = None
            self._close_files()

    def __enter__(self) -> SectionVideoWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        # Keep what is done (a stop or a failure mid-job): flush the held frames, but never mask the original error.
        try:
            self.close()
        except Exception:
            log.exception("closing %s after an error failed", self.path)

    # -- internals ----------------------------------------------------------------------------------------------

    def _close_files(self) -> None:
        try:
            self._container.close()  # writes what the muxer still holds: may fail on a full disk
        finally:
            self._file.close()

    def _fade(self, pixels: torch.Tensor, fade: int) -> list[torch.Tensor]:
        """The held frames with the section's first ``fade`` frames cross-faded into their end."""
        # soft_append's blended[i] = w[i] * old[-fade + i] + (1 - w[i]) * new[i]. blended[0] = old[-fade] (w[0] = 1)
        # stays as it is; old[-fade + 1:] are the last fade - 1 held frames, i = 1 .. fade - 1.
        if fade == 1:
            return [] if self._held is None else [self._held]
        w = (self._weights if fade == self.overlap else crossfade_weights(fade, self.overlap))[1:].view(-1, 1, 1)
        # soft_append's fp32 expression w * old + (1 - w) * new, term by term into fresh tensors: the same
        # roundings, two temporaries of fade - 1 frames instead of four (the plan's costs.HOST_FRAMES counts two)
        blended = pixels[:, 1:fade].to(device="cpu", dtype=torch.float32, copy=True).mul_(1 - w)
        blended.add_(self._held[:, -(fade - 1):].to(torch.float32, copy=True).mul_(w))
        untouched = self._held[:, : self._held.shape[1] - (fade - 1)]
        return [untouched, blended] if untouched.shape[1] else [blended]

    def _check(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dim() == 5 and pixels.shape[0] == 1:
            pixels = pixels[0]
        if pixels.dim() != 4 or pixels.shape[0] != 3:
            raise ValueError(f"pixels must be (3, T, H, W), got {tuple(pixels.shape)}")
        if (pixels.shape[2], pixels.shape[3]) != (self.height, self.width):
            raise ValueError(f"frames are {pixels.shape[3]}x{pixels.shape[2]}, writer is {self.width}x{self.height}")
        if not pixels.is_floating_point():
            raise ValueError(f"pixels must be floating point in [-1, 1], got {pixels.dtype}")
        if pixels.shape[1] == 0:
            raise ValueError("section has no frames")
        return pixels.detach()

    def _write_segments(self, segments: list[torch.Tensor], n: int) -> None:
        """Encode the first n frames of the concatenation of segments (each (3, T, H, W)), a chunk at a time."""
        for seg in segments:
            if n <= 0:
                return
            take = min(n, seg.shape[1])
            for start in range(0, take, _ENCODE_CHUNK_FRAMES):
                chunk = seg[:, start : min(start + _ENCODE_CHUNK_FRAMES, take)]
                rgb = to_uint8(chunk.to("cpu")).permute(1, 2, 3, 0).contiguous().numpy()  # (N, H, W, 3)
                if self._frame_sink is not None:
                    self._frame_sink(rgb)
                for frame_rgb in rgb:
                    frame = av.VideoFrame.from_ndarray(frame_rgb, format="rgb24")
                    frame.pts = self._frames_written
                    frame.time_base = self._time_base
                    for packet in self._stream.encode(frame):
                        self._container.mux(packet)
                    self._frames_written += 1
            n -= take

    @staticmethod
    def _slice_tail(segments: list[torch.Tensor], skip: int) -> torch.Tensor | None:
        """The frames after the first `skip` of the segments' concatenation, as one new CPU tensor."""
        parts = []
        for seg in segments:
            if skip >= seg.shape[1]:
                skip -= seg.shape[1]
                continue
            parts.append(seg[:, skip:])
            skip = 0
        if not parts:
            return None
        if len(parts) == 1:
            # copy=True: never keep a view into the caller's whole section (or a larger blend buffer) alive
            return parts[0].to(device="cpu", copy=True)
        return torch.cat([p.to(device="cpu", dtype=torch.float32) for p in parts], dim=1)  # a new tensor


class BackgroundWriter:
    """Runs `writer.add_section` on a helper thread, so x264 (about 0.5 s a section on an H100 host) overlaps
    the next section's sampling instead of delaying it.

    At most one section waits in the queue (`put` blocks while one does): with the one being written and the
    one being decoded that bounds the pixels in RAM to three sections (in practice one: encoding a section
    takes far less than sampling the next). `on_saved(section, frames_on_disk)` runs on the helper thread once
    the section is in the file. An error there is kept, the sections after it are dropped, and the next `put`
    or `finish` raises it on the job's thread, where it fails the job as an inline error would.
    """

    def __init__(self, writer: SectionVideoWriter, on_saved):
        self.writer = writer
        self._on_saved = on_saved
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._raised = False
        self._end_sent = False
        self._thread = threading.Thread(target=self._loop, name="f1-encoder", daemon=True)
        self._thread.start()

    def put(self, section: int, pixels: torch.Tensor, fade: int | None = None) -> None:
        self._raise()
        self._queue.put((section, pixels, fade))

    def finish(self) -> None:
        """Wait until every queued section is written (safe to call again); raise the encoder's error, once."""
        if not self._end_sent:  # once: a second None would block the full queue of a finished thread
            self._queue.put(None)
            self._end_sent = True
        self._thread.join()
        self._raise()

    def close(self) -> int:
        """Finish (an error is logged, not raised: the job's outcome is already decided), close the file;
        returns the frames in it."""
        try:
            self.finish()
        except Exception:
            log.exception("encoding a section failed")
        self.writer.close()  # flushes the held-back frames: they are final once no section follows
        return self.writer.frames_written

    def _raise(self) -> None:
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:  # after an error the job is failing: drop the rest
                self._write(*item)
            del item  # free this section's pixels before waiting for the next

    def _write(self, section: int, pixels: torch.Tensor, fade: int | None) -> None:
        try:
            self.writer.add_section(pixels, fade)
            self._on_saved(section, self.writer.frames_on_disk)
        except BaseException as exc:  # noqa: BLE001 - handed to the job's thread
            self._error = exc


def _parameter_sets(extradata: bytes | None) -> list[bytes]:
    """The SPS and PPS NAL units of H.264 extradata, in Annex B (x264's) or avcC (an MP4 track's) form."""
    data = bytes(extradata or b"")
    if data[:1] == b"\x01":  # avcC: version, profile, compat, level, length size, SPS count, then sized units
        units, pos = [], 5
        for count_mask in (0x1F, 0xFF):
            count, pos = data[pos] & count_mask, pos + 1
            for _ in range(count):
                size = int.from_bytes(data[pos:pos + 2], "big")
                units.append(data[pos + 2:pos + 2 + size])
                pos += 2 + size
        return units
    units = [unit.strip(b"\x00") for unit in data.split(b"\x00\x00\x01")]
    return [unit for unit in units if unit and unit[0] & 0x1F in (7, 8)]  # SPS, PPS (not x264's SEI)


def count_frames(path: str | os.PathLike[str]) -> int:
    """Frames in the first video stream, by decoding (fragmented MP4 headers say 0)."""
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Container-level metadata tags (custom keys included when written with use_metadata_tags)."""
    with av.open(str(path)) as container:
        return dict(container.metadata)
