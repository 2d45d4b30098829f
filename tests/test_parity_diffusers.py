"""Parity with an implementation nobody here wrote: diffusers' HunyuanVideoFramepackPipeline (vanilla = F1).

Same tiny weights, Euler solver, 2 sections. The pipeline is given the engine's start latent and SigLIP
features (its own image preprocessing resizes floats where the official demo resizes uint8) and draws each
section's noise from the same CPU generator in the same order. It encodes the prompt itself, padding where
the engine crops; with batch 1 the transformer drops the padding, so the frames should agree to rounding.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from framepack_ui.engine import f1, sections, image as image_ops, text, vae as vae_ops
from framepack_ui.events import Finished
from conftest import cpu_manager
from framepack_ui.spec import JobSpec

# Frames are compared in 0..255 units: the engine truncates to uint8 as the official demo does, the pipeline
# returns floats; 1 level of rounding plus float32 noise through two sections.
MAX_ABS_DIFF = 2.0
MEAN_ABS_DIFF = 0.6


def test_engine_matches_diffusers_framepack_pipeline_euler(tiny_models_dir, start_image_128x128, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackPipeline

    seed, steps, gs, prompt = 123, 6, 10.0, "a gradient slowly turns"
    spec = JobSpec(image=start_image_128x128, prompt=prompt, seconds=2.4, seed=seed, steps=steps, gs=gs, resolution=64,
                   sampler="euler", teacache=False, fast_decode=False)
    manager = cpu_manager(tiny_models_dir)
    engine_frames = []
    end = f1.run(spec, tmp_path / "engine.mp4", manager, lambda e: None, frame_sink=engine_frames.append)
    assert isinstance(end, Finished) and end.frames == 73
    ours = np.concatenate(engine_frames).astype(np.float32)  # (73, H, W, 3) uint8 values

    # The engine's own start image, SigLIP features and start latent, recomputed deterministically.
    source = image_ops.load_image(start_image_128x128)
    height, width = image_ops.nearest_bucket(*source.shape[:2], resolution=64)
    cropped = image_ops.resize_and_center_crop(source, width, height)
    with manager.use("image_encoder") as (processor, image_encoder):
        image_embeds = image_ops.encode_siglip(cropped, processor, image_encoder)
    generator_for_latent = torch.Generator("cpu").manual_seed(seed)
    with manager.use("vae") as vae:
        start_latent = vae_ops.encode(vae, image_ops.to_model_tensor(cropped), generator_for_latent)

    class EngineConditionedPipeline(HunyuanVideoFramepackPipeline):
        def prepare_image_latents(self, image, dtype=None, device=None, generator=None, latents=None):
            torch.randn(start_latent.shape, generator=generator)  # the draw the engine made for its start latent
            return start_latent.to(device=device, dtype=dtype)

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
            result = pipe(image=Image.fromarray(cropped), prompt=prompt, height=height, width=width,
                          num_frames=2 * 33, latent_window_size=9, num_inference_steps=steps, guidance_scale=gs,
                          true_cfg_scale=1.0, generator=torch.Generator("cpu").manual_seed(seed),
                          sampling_type="vanilla", output_type="np", prompt_template=template,
                          max_sequence_length=256)
    theirs = np.asarray(result.frames[0], dtype=np.float32) * 255  # (73, H, W, 3) in 0..255
    assert theirs.shape == ours.shape
    diff = np.abs(theirs - ours)
    print(f"parity: max abs diff {diff.max():.3f}, mean {diff.mean():.4f} (0..255 units)")
    assert diff.max() <= MAX_ABS_DIFF, f"max abs diff {diff.max():.3f}"
    assert diff.mean() <= MEAN_ABS_DIFF, f"mean abs diff {diff.mean():.3f}"
    # and the comparison is not vacuous: the video moves away from its first frame
    assert np.abs(ours[-1] - ours[0]).mean() > 1.0
