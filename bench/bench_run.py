"""A whole multi-section job through the real engine (`framepack_ui.engine.f1.run`) at full size: sampling, VAE
decode and video encode of every section, timed from the engine's own events.

    python bench/bench_run.py --seconds 6 --out run.json [--compile] [--vram-gb 8 [--pinned] [--vae-tile 320/256]]
        [--teacache] [--fp8-matmul] [--attention NAME] [--tiny]

The models are the real configs with random weights, built on the GPU and lent to the engine by a stand-in for
the memory manager (same `use(name)` contract). The text encoders are replaced by random prompt embeddings of
the real shape served as prompt-cache hits (they run once per new prompt, not per section); SigLIP and the VAE
run for real. `--vram-gb 8` simulates an 8 GB card: the transformer streamed (memory/streaming.py) beside a
filler allocation, the VAE decoding tiled.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench_engine import (REAL_TRANSFORMER, TINY_TRANSFORMER, TINY_VAE, TEXT_TOKENS, build, proc_status_mib,  # noqa: E402
                          resident_blocks_for)
from bench_fp8 import quantize_in_place  # noqa: E402
from bench_levers import Utilisation  # noqa: E402
from framepack_ui.engine import f1  # noqa: E402
from framepack_ui.events import Phase, Step  # noqa: E402
from framepack_ui.compute import attention, compile as kernels, fp8_linear  # noqa: E402
from framepack_ui.memory import allocator, fp8  # noqa: E402
from framepack_ui.memory.streaming import stream_transformer  # noqa: E402
from framepack_ui.spec import JobSpec  # noqa: E402

REAL_SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=28, patch_size=14)


class RandomPrompts:
    """Prompt-cache stand-in: every prompt is a hit with random embeddings of the real shape."""

    def __init__(self, cfg: dict):
        g = torch.Generator().manual_seed(1)
        self.tensors = {"llama": torch.randn(1, TEXT_TOKENS, cfg["text_embed_dim"], generator=g),
                        "llama_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.long),
                        "clip_pooled": torch.randn(1, cfg["pooled_projection_dim"], generator=g)}

    def get(self, prompt, variant=""):
        return self.tensors, []


class LendingManager:
    """The memory manager's contract (`use(name)`, `placement`, `prompt_cache`) over models built up front.
    With a streamer, using the VAE parks the resident blocks and restores them after, as the manager does on
    small cards (memory/manager.py)."""

    def __init__(self, models: dict, prompt_cache, streamer=None):
        self.models, self.prompt_cache, self.streamer = models, prompt_cache, streamer
        self.on_transformer = None
        self.vae_timings: list[dict] = []  # per VAE use: park, use (the decode), restore seconds

    def placement(self, name):
        return None

    @contextlib.contextmanager
    def use(self, name):
        if name == "transformer" and self.on_transformer is not None:
            self.on_transformer()  # the app loads it after SigLIP is freed: the VRAM budget starts here
            self.on_transformer = None
        if name == "vae":
            t0 = time.perf_counter()
            if self.streamer is not None:
                self.streamer.park()
            t1 = time.perf_counter()
            try:
                yield self.models[name]
            finally:
                t2 = time.perf_counter()
                if self.streamer is not None:
                    self.streamer.restore()  # no synchronize: with pinned sources the copies overlap the next step
                self.vae_timings.append({"park_s": t1 - t0, "vae_s": t2 - t1, "restore_s": time.perf_counter() - t2})
            return
        yield self.models[name]
        if name == "image_encoder":  # once per job: freed after use, as the manager does (placement keep=False)
            del self.models[name]
            gc.collect()
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


def build_models(a, device):
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoFramepackTransformer3DModel
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    cuda = device.type == "cuda"
    half, brain = (torch.float16, torch.bfloat16) if cuda else (torch.float32, torch.float32)
    cfg = TINY_TRANSFORMER if a.tiny else REAL_TRANSFORMER
    transformer = build(HunyuanVideoFramepackTransformer3DModel, cfg, device, brain)
    vae = build(AutoencoderKLHunyuanVideo, TINY_VAE if a.tiny else {}, device, half)
    siglip_cfg = TINY_SIGLIP if a.tiny else REAL_SIGLIP
    siglip = build(lambda **k: SiglipVisionModel(SiglipVisionConfig(**k)), siglip_cfg, device, half)
    size = siglip_cfg["image_size"]
    processor = SiglipImageProcessor(size={"height": size, "width": size})
    return cfg, transformer, vae, (processor, siglip)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--teacache", action="store_true")
    p.add_argument("--compile", action="store_true", help="compile the transformer blocks (memory/kernels.py)")
    p.add_argument("--compile-vae", action="store_true",
                   help="compile the VAE decoder (kernels.compile_vae_decoder; the plan does where it buys a tile)")
    p.add_argument("--vram-gb", type=float, default=None, help="simulate a card with this much VRAM")
    p.add_argument("--tiled-decode", action="store_true", help="tile the VAE decode (always with --vram-gb)")
    p.add_argument("--vae-tile", default=None, metavar="TILE/STRIDE",
                   help="spatial tile and stride in px (default: diffusers' 256/192)")
    p.add_argument("--pinned", action="store_true", help="with --vram-gb: streamed and parked blocks in "
                   "page-locked RAM (the plan's choice where RAM allows)")
    p.add_argument("--decode-context", type=int, default=None,
                   help="later sections decode their 9 new latents after this many older ones (engine option)")
    p.add_argument("--fp8-matmul", action="store_true", help="the block Linears stored in fp8 and multiplied in fp8 "
                                                             "(memory/fp8.py), as the app does with --fp8")
    p.add_argument("--attention", default=None, help="one of memory/kernels.py ATTENTION_BACKENDS")
    p.add_argument("--out", default="run.json")
    a = p.parse_args()
    allocator.configure()  # as the app does, before CUDA starts

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    cfg, transformer, vae, image_encoder = build_models(a, device)
    if a.fp8_matmul:
        quantize_in_place(transformer)
        fp8.apply_fp8_compute(transformer, torch.bfloat16)
        fp8_linear.set_fp8_matmul(transformer, True)
        torch.cuda.empty_cache()
    attention.set_attention(transformer, a.attention)
    if a.compile:
        kernels.compile_blocks(transformer)
    if a.compile_vae:
        kernels.compile_vae_decoder(vae)
    streamer = None
    R: dict = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__, "command": " ".join(sys.argv), "tiny": a.tiny,
               "decode_context": a.decode_context, "compile": a.compile, "compile_vae": a.compile_vae,
               "vram_gb": a.vram_gb, "fp8_matmul": a.fp8_matmul, "attention": a.attention}
    if a.vram_gb:
        resident = resident_blocks_for(transformer, a.vram_gb, 2.5)
        t = time.perf_counter()
        streamer = stream_transformer(transformer, device, resident, pin_sources=a.pinned, pin_parked=a.pinned)
        R["streamer_setup_s"], R["pinned_sources"] = time.perf_counter() - t, streamer.pinned_sources
        R["pinned_parked"] = streamer.pinned_parked
        gc.collect()
        torch.cuda.empty_cache()
        R["resident_blocks"] = resident
    if a.vram_gb or a.tiled_decode or a.vae_tile:
        if a.vae_tile:
            tile, stride = (int(v) for v in a.vae_tile.split("/"))
            vae.enable_tiling(tile_sample_min_height=tile, tile_sample_min_width=tile,
                              tile_sample_stride_height=stride, tile_sample_stride_width=stride)
        else:
            vae.enable_tiling()
    manager = LendingManager({"transformer": transformer, "vae": vae, "image_encoder": image_encoder},
                             RandomPrompts(cfg), streamer)
    del image_encoder  # the manager stand-in holds the only reference: it frees SigLIP after the image phase

    fill = {}

    def leave_only_the_budget():
        gc.collect()
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        in_use = torch.cuda.memory_allocated()
        fill["filler"] = torch.empty(max(0, int(free - max(a.vram_gb * 2**30 - in_use, 0))), dtype=torch.uint8,
                                     device=device)
        R["allocated_GiB_when_the_transformer_starts"] = in_use / 2**30

    if a.vram_gb:
        manager.on_transformer = leave_only_the_budget
    size = (64, 64) if a.tiny else (608, 640)  # (width, height): the 640x608 bucket of the figures
    events: list[tuple[float, object]] = []
    util = Utilisation()
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "start.png"
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(image)
        spec = JobSpec(image=str(image), prompt="bench", seconds=a.seconds, steps=a.steps, teacache=a.teacache,
                       resolution=64 if a.tiny else 640, seed=0)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        with util.measure():
            result = f1.run(spec, Path(tmp) / "run.mp4", manager,
                            lambda e: events.append((time.perf_counter() - started, e)),
                            decode_context=a.decode_context)
        wall = time.perf_counter() - started
    R["events"] = [(round(t, 3), type(e).__name__, getattr(e, "detail", None) or getattr(e, "section", None))
                   for t, e in events if not type(e).__name__.startswith("Preview")]
    Path(a.out).write_text(json.dumps(R, indent=1, default=str))  # the timeline survives a failing summary
    R.update(summarise(events, result, wall, a))
    R["vae_uses"] = manager.vae_timings
    R["gpu_util_pct"] = util.mean
    if cuda:
        R["peak_vram_GiB_excluding_filler"] = (torch.cuda.max_memory_allocated()
                                               - (fill["filler"].numel() if fill else 0)) / 2**30
    R["host_MiB"] = proc_status_mib()
    print(json.dumps(R, indent=1), flush=True)
    Path(a.out).write_text(json.dumps(R, indent=1, default=str))


def summarise(events, result, wall: float, a) -> dict:
    """Per later section, from the engine's events: section_s is the time between the starts of two decodes
    (one sampling, one decode, and whatever of the encode is not hidden); sampling_s: its steps at their median."""
    if result.__class__.__name__ != "Finished":
        return {"result": repr(result)}
    decode_starts, steps = [], {}
    for t, e in events:
        if isinstance(e, Phase) and e.name == "decode" and e.detail.startswith("decoding section"):
            decode_starts.append(t)  # not the compile notice a compiled decoder adds at its first decode
        if isinstance(e, Step):
            steps.setdefault(e.section, []).append(t)
    rows = []
    for i in range(1, len(decode_starts)):
        times = steps[i]
        # the median time between step events, times the steps: the engine reports a step once the next one is
        # queued, so the first and last intervals are not a step's (the last one measured 0.58 s against 0.86)
        sampling = statistics.median(b - a for a, b in zip(times, times[1:])) * len(times) if len(times) > 1 else 0.0
        section = decode_starts[i] - decode_starts[i - 1]
        rows.append({"section": i, "section_s": section, "sampling_s": sampling, "finishing_s": section - sampling})
    # Row i holds section i-1's decode: row 1 section 0's short one, row 2 section 1's (always the official 18
    # latents); from row 3 on the decode repeats for the rest of the video.
    later = rows[2:] or rows[-1:]
    per_section = statistics.median(r["section_s"] for r in later)
    return {"frames": result.frames, "sections": len(decode_starts), "wall_s": wall,
            "wall_s_per_frame": wall / result.frames, "steady_section_s": per_section,
            "steady_s_per_frame": per_section / 36,
            "steady_sampling_s_per_frame": statistics.median(r["sampling_s"] for r in later) / 36,
            "steady_finishing_s": statistics.median(r["finishing_s"] for r in later),
            "first_step_s": steps[0][0] - next(t for t, e in events if isinstance(e, Phase) and e.name == "transformer"),
            "per_section": rows}


if __name__ == "__main__":
    main()
