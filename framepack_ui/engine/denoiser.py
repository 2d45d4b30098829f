"""The transformer as the samplers see it: `denoise(x, sigma) -> x0`, with real CFG and its rescale.

F1's transformer predicts a velocity (flow matching); the samplers (sampling.py) want the denoised latent. The
Denoiser adapts one to the other, feeds the section's conditioning, and keeps the text mask on the host so that no
step waits for the GPU to read it.
"""
from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from . import text

GUIDANCE_SCALE = 1000.0  # distilled guidance is fed to the model as gs * 1000
TIMESTEP_SCALE = 1000.0  # the model's timestep is sigma * 1000


class Denoiser:
    """Adapts the transformer (a velocity predictor) to the samplers' `denoise(x, sigma) -> x0` and owns
    real CFG. One Denoiser per section: it holds that section's clean-latent conditioning and step count."""

    def __init__(self, transformer, positive: dict, negative: dict | None, cfg: float, rs: float, steps: int,
                 teacache=None, conditioning: dict | None = None):
        device, dtype = transformer.device, transformer.dtype
        cond = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device))
                for k, v in (conditioning or {}).items()}
        take_text_mask_on_host(transformer)
        self.transformer = transformer
        self.positive = _with_host_mask({**positive, **cond}, device)
        self.negative = _with_host_mask({**negative, **cond}, device) if negative is not None and cfg != 1 else None
        self.cfg, self.rs, self.steps, self.teacache = cfg, rs, steps, teacache
        self.step = 0
        self.calls = 0
        if teacache is not None:
            teacache.reset()  # each section starts again at sigma 1

    def _velocity(self, x: torch.Tensor, timestep: torch.Tensor, inputs: dict, branch: str) -> torch.Tensor:
        if self.teacache is not None:
            self.teacache.begin(self.step, self.steps, branch)
        self.calls += 1
        return self.transformer(hidden_states=x, timestep=timestep, return_dict=False, **inputs)[0].float()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        dtype, device = self.transformer.dtype, self.transformer.device
        # sigma stays a tensor where the sampler keeps it (on the GPU: reading it would wait for the GPU); the
        # timestep is rounded from float64 as the official float(sigma) * 1000 is
        sigma = torch.as_tensor(sigma, dtype=torch.float32).to(device)
        x_model = x.to(device, dtype)  # (1, 16, 9, h, w)
        timestep = (sigma.double() * TIMESTEP_SCALE).to(dtype).reshape(1)
        velocity = self._velocity(x_model, timestep, self.positive, "positive")
        if self.negative is not None:
            negative = self._velocity(x_model, timestep, self.negative, "negative")
            guided = negative + self.cfg * (velocity - negative)
            velocity = rescale_cfg(guided, velocity, self.rs)
        self.step += 1
        # x0 from the model's own (possibly rounded) input, as the official wrapper does
        return (x_model.float() - velocity * sigma).to(x.device)


def rescale_cfg(guided: torch.Tensor, positive: torch.Tensor, rs: float) -> torch.Tensor:
    if rs == 0:
        return guided
    dims = list(range(1, guided.ndim))
    rescaled = guided * (positive.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return rs * rescaled + (1 - rs) * guided


def model_inputs(embeds: text.PromptEmbeds, image_embeds: torch.Tensor, pooled_guidance: torch.Tensor,
                 device, dtype) -> dict:
    e = embeds.to(device, dtype)
    return dict(encoder_hidden_states=e.llama, encoder_attention_mask=e.llama_mask, pooled_projections=e.clip_pooled,
                image_embeds=image_embeds.to(device, dtype), guidance=pooled_guidance)


def _with_host_mask(inputs: dict, device) -> dict:
    """The text mask moved to the host: diffusers' forward cuts the text tokens at the mask's sum (batch 1), and
    with the mask on the GPU that read waits for the GPU to finish the previous step, every step. The context
    embedder, the one user of the mask on the device, gets a copy (TextMaskToDevice)."""
    mask = inputs.get("encoder_attention_mask")
    if mask is None:
        return inputs
    mask = mask.cpu()
    return {**inputs, "encoder_attention_mask": mask.pin_memory() if torch.device(device).type == "cuda" else mask}


TEXT_MASK_HOOK = "framepack_text_mask_to_device"


class TextMaskToDevice(ModelHook):
    """Moves the text mask, kept on the host (_with_host_mask), to the context embedder's device."""

    def new_forward(self, module, hidden_states, timestep, attention_mask=None):
        if attention_mask is not None:
            attention_mask = attention_mask.to(hidden_states.device, non_blocking=True)
        return self.fn_ref.original_forward(hidden_states, timestep, attention_mask)


def take_text_mask_on_host(transformer) -> None:
    """Let the transformer take the text mask on the host (see _with_host_mask): a named hook on its context
    embedder, the one user of the mask on the device; idempotent."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer.context_embedder)
    if registry.get_hook(TEXT_MASK_HOOK) is None:
        registry.register_hook(TextMaskToDevice(), TEXT_MASK_HOOK)
