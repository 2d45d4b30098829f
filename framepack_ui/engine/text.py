"""Prompt encoding as the official F1 demo does it: Llama hidden_states[-3] of the HunyuanVideo template,
cropped to the real tokens, plus CLIP-L's pooled output."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .lending import TEXT_ENCODERS, ModelLender

# The HunyuanVideo "dit-llm-encode-video" template (diffusers' DEFAULT_PROMPT_TEMPLATE).
PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
REAL_CROP_START = 95  # tokens of the template before the prompt with the real Llama-3 tokenizer
LLAMA_MAX_PROMPT_TOKENS = 256
CLIP_MAX_TOKENS = 77
LLAMA_HIDDEN_LAYER = -3  # the official demo reads the third-last hidden state, not the last


@dataclass
class PromptEmbeds:
    llama: torch.Tensor  # (1, L, D_llama): one vector per real prompt token
    llama_mask: torch.Tensor  # (1, L) int64, all ones (cropped to real tokens)
    clip_pooled: torch.Tensor  # (1, D_clip)
    notices: list[str] = field(default_factory=list)

    def to(self, device, dtype) -> "PromptEmbeds":
        return PromptEmbeds(self.llama.to(device, dtype), self.llama_mask.to(device),
                            self.clip_pooled.to(device, dtype), self.notices)


def template_prefix_length(tokenizer) -> int:
    """Tokens before the prompt, counted with the tokenizer in hand: 95 for the real one, so tiny test
    tokenizers crop at the right place too."""
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    return len(tokenizer(prefix).input_ids)


@torch.no_grad()
def encode_prompt(prompt: str, tokenizer, text_encoder, tokenizer_2, text_encoder_2) -> PromptEmbeds:
    notices = []
    crop_start = template_prefix_length(tokenizer)
    full = PROMPT_TEMPLATE.format(prompt)
    max_length = LLAMA_MAX_PROMPT_TOKENS + crop_start
    untruncated = len(tokenizer(full).input_ids)
    if untruncated > max_length:
        notices.append(f"prompt is {untruncated - crop_start - 1} Llama tokens; only the first "
                       f"{LLAMA_MAX_PROMPT_TOKENS} are used")
    llama_inputs = tokenizer([full], padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt", return_attention_mask=True)
    device = text_encoder.device
    ids, mask = llama_inputs.input_ids.to(device), llama_inputs.attention_mask.to(device)
    real_length = int(mask.sum())
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    llama = hidden[LLAMA_HIDDEN_LAYER][:, crop_start:real_length]  # (1, L, D)
    llama_mask = mask[:, crop_start:real_length]

    clip_untruncated = len(tokenizer_2(prompt).input_ids)
    if clip_untruncated > CLIP_MAX_TOKENS:
        notices.append(f"prompt is {clip_untruncated} CLIP tokens; only the first {CLIP_MAX_TOKENS} are used")
    clip_ids = tokenizer_2([prompt], padding="max_length", max_length=CLIP_MAX_TOKENS, truncation=True,
                           return_tensors="pt").input_ids
    pooled = text_encoder_2(clip_ids.to(text_encoder_2.device), output_hidden_states=False).pooler_output
    return PromptEmbeds(llama.float().cpu(), llama_mask.long().cpu(), pooled.float().cpu(), notices)


def mix_embeds(old: PromptEmbeds, new: PromptEmbeds, weight: float) -> PromptEmbeds:
    """`(1 - weight) * old + weight * new`, for blending across a prompt change (prompts.py).

    CLIP's pooled vectors have one shape and mix exactly. The Llama parts do not: each prompt has its own token
    count (L_old, L_new; masks all ones, cropped to the real tokens). Both are padded with zero vectors to the longer
    one and mixed position by position, the mask all ones over it (the transformer cuts the text where the mask's
    ones end, so it cannot skip positions in between): the longer prompt's extra tokens come in scaled by its
    share. Position i of one prompt is not the same word as position i of the other, so this mixes the
    conditioning as ComfyUI's ConditioningAverage does (which crops the other to the first's length instead of
    padding), not a sentence halfway between the two.
    """
    length = max(old.llama.shape[1], new.llama.shape[1])

    def padded(e: PromptEmbeds) -> torch.Tensor:  # (1, length, D)
        return torch.nn.functional.pad(e.llama.float(), (0, 0, 0, length - e.llama.shape[1]))

    llama = (1 - weight) * padded(old) + weight * padded(new)
    mask = torch.ones((1, length), dtype=old.llama_mask.dtype)
    pooled = (1 - weight) * old.clip_pooled.float() + weight * new.clip_pooled.float()
    return PromptEmbeds(llama, mask, pooled, [])


# Part of the prompt cache's key (the lender's prompt cache): anything here that changes the embeddings.
RECIPE_VERSION = 1


def recipe_identity() -> str:
    import hashlib

    parts = (RECIPE_VERSION, PROMPT_TEMPLATE, LLAMA_MAX_PROMPT_TOKENS, CLIP_MAX_TOKENS, LLAMA_HIDDEN_LAYER,
             "crop=template_prefix_length", "float32 cpu output")
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def cache_variant(device: torch.device, dtype: torch.dtype) -> str:
    """The recipe plus what changes the numbers of the text encoders' placement: device type and compute dtype."""
    return f"{recipe_identity()}:{torch.device(device).type}:{str(dtype).replace('torch.', '')}"


def encode_prompts(prompts: list[str], lender: ModelLender) -> tuple[list[PromptEmbeds], bool]:
    """Embeddings of each prompt, from the lender's prompt cache where known; the text encoders are loaded only
    if some prompt is not cached (then once, for all the missing ones). Returns (embeds, encoders_loaded)."""
    variant = cache_variant(*lender.compute_place(TEXT_ENCODERS))
    found: list[PromptEmbeds | None] = [None] * len(prompts)
    for i, prompt in enumerate(prompts):
        hit = lender.cached_prompt(prompt, variant)
        if hit is not None:
            tensors, notices = hit
            found[i] = PromptEmbeds(tensors["llama"], tensors["llama_mask"], tensors["clip_pooled"], notices)
    missing = [i for i, e in enumerate(found) if e is None]
    if not missing:
        return found, False
    with lender.use(TEXT_ENCODERS) as (tokenizer, tokenizer_2, text_encoder, text_encoder_2):
        for i in missing:
            # the same prompt twice (prompt == negative) is encoded once
            same = next((j for j in missing if j < i and prompts[j] == prompts[i]), None)
            if same is not None:
                found[i] = found[same]
                continue
            e = found[i] = encode_prompt(prompts[i], tokenizer, text_encoder, tokenizer_2, text_encoder_2)
            lender.cache_prompt(prompts[i], variant,
                                {"llama": e.llama, "llama_mask": e.llama_mask, "clip_pooled": e.clip_pooled}, e.notices)
    return found, True
