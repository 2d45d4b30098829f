"""Parity with an implementation nobody here wrote: diffusers' HunyuanVideoFramepackPipeline (vanilla = F1).

Same tiny weights, Euler solver, 2 sections. The pipeline drives its own section loop; it is given only what both
must share: the engine's start latent and SigLIP features (its own image preprocessing resizes floats where the
official demo resizes uint8). Each section's noise comes from `torch.Generator("cpu").manual_seed(seed)` in order,
as the official worker draws it (the engine's start latent has a generator of its own). It encodes the prompt
itself, padding where the engine crops; with batch 1 the transformer drops the padding, so the frames should agree
to rounding.

The tiny random transformer hardly reacts to its history (its blocks' gates are near 0 and its attention is near
uniform): a wrong section loop would pass. The parity model opens it up (`conditioning_sensitive`), and
`test_parity_fails_for_a_wrong_section_loop` checks that each plausible mistake in the loop then fails the
comparison.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from framepack_ui.engine import f1, sections, image as image_ops, text, vae as vae_ops
from framepack_ui.events import Finished
from framepack_ui.memory.manager import BUILDERS, ModelManager
from conftest import cpu_plan
from framepack_ui.spec import JobSpec

# Frames are compared in 0..255 units: the engine truncates to uint8 as the official demo does, the pipeline
# returns floats; 1 level of rounding plus float32 noise through two sections.
MAX_ABS_DIFF = 2.0
MEAN_ABS_DIFF = 0.6
SEED, STEPS, GS, PROMPT = 123, 6, 10.0, "a gradient slowly turns"


def conditioning_sensitive(models_dir, c, device):
    """The tiny transformer, loaded by the app's own builder, with its blocks made to matter: each block's AdaLN
    gate biased to 1 (random gates are about 0.05, so the blocks barely touch the residual), its attention values
    and outputs x10, and its q/k norms x4 (sharper attention). Its output then depends on the clean-latent history:
    each mistake below moves frames by 9-45 levels (against 1 without this), measured when the test was written."""
    transformer = BUILDERS["transformer"](models_dir, c, device)
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            # new tensors, never in place: the weights may be read-only file maps
            if name.endswith(("norm1.linear.bias", "norm.linear.bias")):  # (shift, scale, gate, ...) chunks
                opened = param.data.clone()
                opened[2 * width:3 * width] += 1.0
                param.data = opened
            elif name.endswith(("to_v.weight", "to_out.0.weight", "blocks.0.proj_out.weight")):
                param.data = param.data * 10
            elif name.endswith(("norm_q.weight", "norm_k.weight")):
                param.data = param.data * 4
    return transformer


def parity_manager(models_dir) -> ModelManager:
    return ModelManager(models_dir, cpu_plan(models_dir), gpu="cpu",
                        builders={**BUILDERS, "transformer": conditioning_sensitive})


def job_spec(image) -> JobSpec:
    return JobSpec(image=image, prompt=PROMPT, seconds=2.4, seed=SEED, steps=STEPS, gs=GS, resolution=64,
                   sampler="euler", teacache=False, fast_decode=False)


def engine_frames(manager, image, out_path) -> np.ndarray:
    frames = []
    end = f1.run(job_spec(image), out_path, manager, lambda e: None, frame_sink=frames.append)
    assert isinstance(end, Finished) and end.frames == 73
    return np.concatenate(frames).astype(np.float32)  # (73, H, W, 3) uint8 values


def diffusers_frames(manager, image) -> np.ndarray:
    """The video diffusers' pipeline makes from the same weights, start latent and SigLIP features."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline

    # The engine's own start image, SigLIP features and start latent, recomputed deterministically.
    source = image_ops.load_image(image)
    height, width = image_ops.nearest_bucket(*source.shape[:2], resolution=64)
    cropped = image_ops.resize_and_center_crop(source, width, height)
    with manager.use("image_encoder") as (processor, image_encoder):
        image_embeds = image_ops.encode_siglip(cropped, processor, image_encoder)
    with manager.use("vae") as vae:
        start_latent = vae_ops.encode(vae, image_ops.to_model_tensor(cropped), f1.start_latent_generator(SEED))

    class EngineConditionedPipeline(HunyuanVideoFramepackPipeline):
        def prepare_image_latents(self, image, dtype=None, device=None, generator=None, latents=None):
            return start_latent.to(device=device, dtype=dtype)  # drawing nothing from the sections' generator

        def encode_image(self, image, device=None, dtype=None):
            return image_embeds.to(device=device, dtype=dtype or torch.float32)

    with manager.use("text_encoders") as (tokenizer, tokenizer_2, text_encoder, text_encoder_2), \
            manager.use("image_encoder") as (processor, image_encoder):
        with manager.use("transformer") as transformer, manager.use("vae") as vae:
            scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                        max_shift=1.15, base_image_seq_len=256,
                                                        max_image_seq_len=4096)
            pipe = EngineConditionedPipeline(text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
                                             vae=vae, scheduler=scheduler, text_encoder_2=text_encoder_2,
                                             tokenizer_2=tokenizer_2, image_encoder=image_encoder,
                                             feature_extractor=processor)
            template = {"template": text.PROMPT_TEMPLATE, "crop_start": text.template_prefix_length(tokenizer)}
            result = pipe(image=Image.fromarray(cropped), prompt=PROMPT, height=height, width=width,
                          num_frames=2 * 33, latent_window_size=9, num_inference_steps=STEPS, guidance_scale=GS,
                          true_cfg_scale=1.0, generator=torch.Generator("cpu").manual_seed(SEED),
                          sampling_type="vanilla", output_type="np", prompt_template=template,
                          max_sequence_length=256)
    manager.free()
    return np.asarray(result.frames[0], dtype=np.float32) * 255  # (73, H, W, 3) in 0..255


def parity(ours: np.ndarray, theirs: np.ndarray) -> tuple[bool, str]:
    assert theirs.shape == ours.shape
    diff = np.abs(theirs - ours)
    return (diff.max() <= MAX_ABS_DIFF and diff.mean() <= MEAN_ABS_DIFF,
            f"max abs diff {diff.max():.3f}, mean {diff.mean():.4f} (0..255 units)")


@pytest.fixture(scope="module")
def reference(tiny_models_dir, start_image_128x128) -> np.ndarray:
    return diffusers_frames(parity_manager(tiny_models_dir), start_image_128x128)


def test_engine_matches_diffusers_framepack_pipeline_euler(tiny_models_dir, start_image_128x128, reference, tmp_path):
    ours = engine_frames(parity_manager(tiny_models_dir), start_image_128x128, tmp_path / "engine.mp4")
    same, report = parity(ours, reference)
    print("parity:", report)
    assert same, report
    # and the comparison is not vacuous: the video moves away from its first frame
    assert np.abs(ours[-1] - ours[0]).mean() > 1.0


def _split_reversed(history, start_latent):
    """The oldest history frame fed as the 1x clean latent, the newest 16 at 4x."""
    inputs = _REAL_CONDITIONING(history, start_latent)
    kept = history.latents[:, :, -sum(sections.HISTORY_SIZES):]
    latents_1x, latents_2x, latents_4x = kept.split(sections.HISTORY_SIZES[::-1], dim=2)
    return {**inputs, "latents_clean": torch.cat([start_latent, latents_1x], dim=2),
            "latents_history_2x": latents_2x, "latents_history_4x": latents_4x}


def _new_indices_shifted(history, start_latent):
    inputs = _REAL_CONDITIONING(history, start_latent)
    return {**inputs, "indices_latents": inputs["indices_latents"] + 1}


def _start_latent_as_1x(history, start_latent):
    inputs = _REAL_CONDITIONING(history, start_latent)
    return {**inputs, "latents_clean": torch.cat([start_latent, start_latent], dim=2)}


def _coarse_history_zeroed(history, start_latent):
    inputs = _REAL_CONDITIONING(history, start_latent)
    return {**inputs, "latents_history_2x": torch.zeros_like(inputs["latents_history_2x"]),
            "latents_history_4x": torch.zeros_like(inputs["latents_history_4x"])}


_REAL_CONDITIONING = sections.History.conditioning
LOOP_MISTAKES = {
    "history split reversed": ("conditioning", _split_reversed),
    "new-latent indices shifted by one": ("conditioning", _new_indices_shifted),
    "1x clean latent replaced by the start latent": ("conditioning", _start_latent_as_1x),
    "2x and 4x history zeroed": ("conditioning", _coarse_history_zeroed),
    "history never appended": ("append", lambda history, new_latents: None),
}


@pytest.mark.parametrize("mistake", LOOP_MISTAKES)
def test_parity_fails_for_a_wrong_section_loop(tiny_models_dir, start_image_128x128, reference, tmp_path,
                                              monkeypatch, mistake):
    method, wrong = LOOP_MISTAKES[mistake]
    monkeypatch.setattr(sections.History, method, wrong)
    ours = engine_frames(parity_manager(tiny_models_dir), start_image_128x128, tmp_path / "engine.mp4")
    same, report = parity(ours, reference)
    print(f"{mistake}: {report}")
    assert not same, f"parity still holds with the mistake ({report})"
