"""Tiny random stand-ins for every model, written in the real Hugging Face layout (see `layout.py`).

Tests and `make-tiny-models` use them so that the whole pipeline runs in seconds on a CPU while reading the
same folders, file names, config keys, storage dtypes, shard indexes and tokenizer files as the real
downloads. The traps of the real repositories are kept on purpose: the invalid root `config.json` of
HunyuanVideo, the `LlamaTokenizer` class name over a byte-level `tokenizer.json`, CLIP's legacy
`eos_token_id` 2 (argmax pooling), and the FramePack transformer's own `_class_name`.

Weights are random (normal, std 0.02; norm weights 1) and deterministic for a seed. They are generated
tensor by tensor from shapes taken from a model built on the `meta` device, so even a 1.5 GB transformer is
made in bf16 directly, one shard in memory at a time.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable

from framepack_ui.units import MB
from framepack_ui.weights.layout import COMPONENTS, F1_REPO, HUNYUAN_REPO, LORAS_DIR, REDUX_REPO

log = logging.getLogger(__name__)

INIT_STD = 0.02

# --- text used to train the tiny tokenizers ---------------------------------------------------------------

# diffusers' DEFAULT_PROMPT_TEMPLATE for HunyuanVideo: trained on, so that its prefix tokenizes to about as
# many tokens as with the real Llama-3 tokenizer (FramePack crops the first 95 positions).
HUNYUAN_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement "
    "changes of the objects.4. background environment, light, style and atmosphere.5. camera angles, "
    "movements, and transitions used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}"
    "<|eot_id|>"
)

CORPUS_SENTENCES = (
    "A cat walks on the grass, realistic style.",
    "The girl dances gracefully, with clear movements, full of charm.",
    "A man smiles and waves at the camera.",
    "A dog runs along the beach at sunset, waves crashing in the background.",
    "The camera slowly zooms in on a red car parked in the rain.",
    "An old woman reads a book by the window while snow falls outside.",
    "Two children play with a yellow ball in a sunny park.",
    "A bird flies over the mountains under a blue sky.",
    "The city lights flicker at night as people walk across the street.",
    "A chef cuts fresh vegetables on a wooden table in a bright kitchen.",
)

LLAMA_SPECIAL_TOKENS = (  # the real relative order (ids 128000.. and 128256..), minus most reserved tokens
    "<|begin_of_text|>", "<|end_of_text|>",
    "<|reserved_special_token_0|>", "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>", "<|reserved_special_token_4|>",
    "<|eot_id|>", "<unk>", "<image>", "<pad>",
)
LLAMA_BOS, LLAMA_EOS, LLAMA_PAD, LLAMA_UNK = "<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<unk>"
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"

# Llama-3's pre-tokenizer split; the real tokenizer.json applies it before a regex-free ByteLevel step.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
    "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 "
    "== 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt"
    " %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# --- tiny dimensions -------------------------------------------------------------------------------------------

LLAMA_HIDDEN = 32
CLIP_HIDDEN = 32
SIGLIP_HIDDEN = 32
SIGLIP_IMAGE_SIZE = 32  # patch 8 -> 16 image tokens (the real 384 / 14 gives 729)
SIGLIP_PATCH = 8
VAE_WIDTHS = [4, 4, 4, 4]  # narrow: CPU conv3d at full frame size dominates test time (26 s -> 5 s per decode at 128 px)
VAE_GROUPS = 2  # divides every width
LATENT_CHANNELS = 16  # FramePack's clean-latent embedders and the VAE agree on 16

TINY_TRANSFORMER = {
    "num_attention_heads": 2, "attention_head_dim": 8, "rope_axes_dim": [2, 2, 4],
    "num_layers": 1, "num_single_layers": 1, "num_refiner_layers": 1,
}
# Scaled transformers use wider heads (narrow ones below 16 MB, where a 32-wide head is already too big) so
# that the width moves in small steps relative to its size. rope_axes_dim must sum to the head dim.
SCALED_HEADS = {8: [2, 2, 4], 32: [8, 12, 12]}


# --- helpers ---------------------------------------------------------------------------------------------------

def _write_json(path: Path, obj: Any) -> None:
    # save_pretrained's style: sorted keys, 2-space indent, final newline
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (gone from transformers 5), in CLIP's vocabulary order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _special_token_entry(content: str, normalized: bool = False) -> dict:
    return {"content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False}


# --- Llama tokenizer (tokenizer/) ------------------------------------------------------------------------------

def build_llama_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE shaped like Llama-3's tokenizer.json: Split(regex) + ByteLevel, specials after the BPE
    tokens, bos prepended by TemplateProcessing. `vocab_size` is a cap: the small corpus saturates below it."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, special_tokens=[])
    template_text = HUNYUAN_PROMPT_TEMPLATE.format(" ".join(CORPUS_SENTENCES))
    for special in LLAMA_SPECIAL_TOKENS:  # specials are matched whole, never learned as text
        template_text = template_text.replace(special, "\n")
    tok.train_from_iterator([template_text, *CORPUS_SENTENCES], trainer)
    # Added after training so they get the highest ids, as in the real vocabulary (128000..128258).
    tok.add_special_tokens(list(LLAMA_SPECIAL_TOKENS))
    bos_id = tok.token_to_id(LLAMA_BOS)
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B:1",
                                      special_tokens=[(LLAMA_BOS, bos_id)]),
    ])
    return tok


def _write_llama_tokenizer(folder: Path) -> dict:
    tok = build_llama_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in LLAMA_SPECIAL_TOKENS}
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": _special_token_entry(LLAMA_BOS), "eos_token": _special_token_entry(LLAMA_EOS),
        "pad_token": _special_token_entry(LLAMA_PAD), "unk_token": _special_token_entry(LLAMA_UNK),
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": None,
        "added_tokens_decoder": {str(i): {**_special_token_entry(t), "special": True} for t, i in ids.items()},
        "bos_token": LLAMA_BOS,
        "chat_template": LLAMA3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": True,
        "eos_token": LLAMA_EOS,
        "extra_special_tokens": {},
        "legacy": True,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": LLAMA_PAD,
        "padding_side": "right",
        "processor_class": "LlavaProcessor",
        "tokenizer_class": "LlamaTokenizer",  # the real trap: names the (Metaspace) Llama class, not ByteLevel
        "unk_token": LLAMA_UNK,
        "use_default_system_prompt": False,
    })
    return {"length": tok.get_vocab_size(with_added_tokens=True), "bos_id": ids[LLAMA_BOS],
            "eos_id": ids[LLAMA_EOS], "pad_id": ids[LLAMA_PAD]}


# --- CLIP tokenizer (tokenizer_2/) -----------------------------------------------------------------------------

def _clip_words() -> dict[str, int]:
    """Corpus words as CLIPTokenizer sees them (NFC, lowercase, CLIP's split, byte-level characters)."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                       normalizers.Lowercase()])
    pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    counts: dict[str, int] = {}
    for sentence in CORPUS_SENTENCES:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(sentence)):
            counts[word] = counts.get(word, 0) + 1
    return counts


def _train_clip_merges() -> list[tuple[str, str]]:
    """BPE merges in CLIP's convention ("</w>" ends a word), learned until every corpus word is one token.

    A plain Python trainer: the `tokenizers` trainer with an end-of-word suffix numbers its alphabet in hash
    order, so equal-count merges come out in a different order on every run.
    """
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in _clip_words().items()}
    merges = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            return merges
        best = max(sorted(pairs), key=lambda pair: pairs[pair])  # most frequent, then alphabetical
        merges.append(best)
        words = {_merge_pair(symbols, best): n for symbols, n in words.items()}


def _merge_pair(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(symbols):
        if symbols[i:i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _write_clip_tokenizer(folder: Path) -> dict:
    merges = _train_clip_merges()
    # CLIP's vocabulary order: 256 byte characters, the same with "</w>", merge results, then bos and eos
    # last, so that eos is the highest id (CLIPTextModel's argmax pooling relies on it).
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    seen = set(tokens)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            tokens.append(a + b)
    tokens += [CLIP_BOS, CLIP_EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    bos_id, eos_id = vocab[CLIP_BOS], vocab[CLIP_EOS]
    _write_json(folder / "special_tokens_map.json", {
        "bos_token": _special_token_entry(CLIP_BOS, normalized=True), "eos_token": _special_token_entry(CLIP_EOS),
        "pad_token": _special_token_entry(CLIP_EOS), "unk_token": _special_token_entry(CLIP_EOS),
    })
    _write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(bos_id): {**_special_token_entry(CLIP_BOS, normalized=True), "special": True},
            str(eos_id): {**_special_token_entry(CLIP_EOS), "special": True},
        },
        "bos_token": CLIP_BOS,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": CLIP_EOS,
        "errors": "replace",
        "extra_special_tokens": {},
        "model_max_length": 77,
        "pad_token": CLIP_EOS,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": CLIP_EOS,
    })
    return {"length": len(vocab), "bos_id": bos_id, "eos_id": eos_id}


# --- configs: the real key sets, tiny values -------------------------------------------------------------------

def llama_config(vocab_size: int, bos_id: int, eos_id: int) -> dict:
    return {
        "_name_or_path": "/raid/aryan/llava-llama-3-8b-v1_1-extracted/text_encoder",
        "architectures": ["LlamaModel"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "head_dim": 8, "hidden_act": "silu",
        "hidden_size": LLAMA_HIDDEN, "initializer_range": 0.02, "intermediate_size": 64,
        "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 4,
        "num_hidden_layers": 3,  # FramePack reads hidden_states[-3]
        "num_key_value_heads": 2, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
        "transformers_version": "4.48.0.dev0", "use_cache": True, "vocab_size": vocab_size,
    }


def clip_text_config(vocab_size: int) -> dict:
    return {
        "_name_or_path": "/raid/aryan/llava-llama-3-8b-v1_1-extracted/text_encoder_2",
        "architectures": ["CLIPTextModel"], "attention_dropout": 0.0,
        # The real legacy ids: eos_token_id 2 makes the pooler take argmax(input_ids), i.e. the eos position
        # as long as eos is the highest id in the vocabulary.
        "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2, "hidden_act": "quick_gelu",
        "hidden_size": CLIP_HIDDEN, "initializer_factor": 1.0, "initializer_range": 0.02,
        "intermediate_size": 64, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
        "model_type": "clip_text_model", "num_attention_heads": 4, "num_hidden_layers": 2, "pad_token_id": 1,
        "projection_dim": CLIP_HIDDEN, "torch_dtype": "float16", "transformers_version": "4.48.0.dev0",
        "vocab_size": vocab_size,
    }


def siglip_config() -> dict:
    return {
        "_name_or_path": "/home/lvmin/.cache/huggingface/hub/models--black-forest-labs--FLUX.1-Redux-dev/"
                         "snapshots/1282f955f706b5240161278f2ef261d2a29ad649/image_encoder",
        "architectures": ["SiglipVisionModel"], "attention_dropout": 0.0, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": SIGLIP_HIDDEN, "image_size": SIGLIP_IMAGE_SIZE, "intermediate_size": 64,
        "layer_norm_eps": 1e-06, "model_type": "siglip_vision_model", "num_attention_heads": 4,
        "num_channels": 3, "num_hidden_layers": 2, "patch_size": SIGLIP_PATCH, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2",
    }


def preprocessor_config() -> dict:
    return {
        "do_convert_rgb": None, "do_normalize": True, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5], "processor_class": "SiglipProcessor", "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE},
    }


def vae_config() -> dict:
    return {
        "_class_name": "AutoencoderKLHunyuanVideo", "_diffusers_version": "0.32.0.dev0", "act_fn": "silu",
        "block_out_channels": VAE_WIDTHS, "down_block_types": ["HunyuanVideoDownBlock3D"] * 4,
        "in_channels": 3, "latent_channels": LATENT_CHANNELS, "layers_per_block": 1,
        "mid_block_add_attention": True, "norm_num_groups": VAE_GROUPS, "out_channels": 3,
        "scaling_factor": 0.476986, "spatial_compression_ratio": 8, "temporal_compression_ratio": 4,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * 4,
    }


def transformer_config(shape: dict | None = None) -> dict:
    """The F1 config's keys, including lllyasviel's `_class_name` (diffusers' class is named differently)."""
    return {
        "_class_name": "HunyuanVideoTransformer3DModelPacked", "_diffusers_version": "0.33.0.dev0",
        "_name_or_path": "hunyuanvideo-community/HunyuanVideo", "guidance_embeds": True,
        "has_clean_x_embedder": True, "has_image_proj": True, "image_proj_dim": SIGLIP_HIDDEN,
        "in_channels": LATENT_CHANNELS, "mlp_ratio": 4.0, "out_channels": LATENT_CHANNELS, "patch_size": 2,
        "patch_size_t": 1, "pooled_projection_dim": CLIP_HIDDEN, "qk_norm": "rms_norm", "rope_theta": 256.0,
        "text_embed_dim": LLAMA_HIDDEN,
        **(shape or TINY_TRANSFORMER),
    }


def _init_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --- meta-device shapes and random tensors ---------------------------------------------------------------------

def _meta_shapes(build: Callable[[], Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a model's saved tensors, without allocating them."""
    import torch

    with torch.device("meta"):
        model = build()
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _llama_builder(config: dict):
    def build():
        from transformers import LlamaConfig, LlamaModel
        return LlamaModel(LlamaConfig(**config))
    return build


def _clip_builder(config: dict):
    def build():
        from transformers import CLIPTextConfig, CLIPTextModel
        return CLIPTextModel(CLIPTextConfig(**config))
    return build


def _siglip_builder(config: dict):
    def build():
        from transformers import SiglipVisionConfig, SiglipVisionModel
        return SiglipVisionModel(SiglipVisionConfig(**config))
    return build


def _vae_builder(config: dict):
    def build():
        from diffusers import AutoencoderKLHunyuanVideo
        return AutoencoderKLHunyuanVideo(**_init_kwargs(config))
    return build


def _transformer_builder(config: dict):
    def build():
        from diffusers import HunyuanVideoFramepackTransformer3DModel
        return HunyuanVideoFramepackTransformer3DModel(**_init_kwargs(config))
    return build


class _RandomFill:
    """Random tensors for one component, deterministic for a seed (and the device that draws them).

    On the CPU, small tensors get their own normal_ draws and tensors larger than the pool are tiled from one pool
    of normal draws (starting at a random offset): drawing 750 M normals for a 1.5 GB test transformer takes ~10 s,
    copying takes well under one, and a size or memory test does not care that the values repeat. On a GPU every
    tensor is drawn whole, on the device (fast enough for the 42 GB full-size set), and handed back on the CPU.
    """

    POOL_SIZE = 1_048_573  # prime, so tiled rows don't line up with power-of-two widths

    def __init__(self, seed: int, dtype, device=None):
        import torch

        self.device = torch.device(device or "cpu")
        self.generator = torch.Generator(self.device).manual_seed(seed)
        self.dtype = dtype
        self.pool = None

    def tensor(self, name: str, shape: tuple[int, ...]):
        import torch

        if len(shape) == 1 and "norm" in name and name.endswith("weight"):
            return torch.ones(shape, dtype=self.dtype)  # norm scales of 1 keep activations at a sane size
        if self.device.type != "cpu":
            drawn = torch.empty(shape, dtype=self.dtype, device=self.device)
            return drawn.normal_(0.0, INIT_STD, generator=self.generator).cpu()  # one tensor on the device at a time
        count = math.prod(shape)
        if count <= self.POOL_SIZE:
            # normal_ fills bf16/fp16 directly: no fp32 copy of a large model is ever made
            return torch.empty(shape, dtype=self.dtype).normal_(0.0, INIT_STD, generator=self.generator)
        if self.pool is None:
            self.pool = torch.empty(self.POOL_SIZE, dtype=self.dtype).normal_(0.0, INIT_STD, generator=self.generator)
        out = torch.empty(count, dtype=self.dtype)
        pos = int(torch.randint(self.POOL_SIZE, (1,), generator=self.generator))
        done = 0
        while done < count:
            take = min(self.POOL_SIZE - pos, count - done)
            out[done:done + take] = self.pool[pos:pos + take]
            done, pos = done + take, 0
        return out.view(shape)


def _split_into_shards(shapes: dict[str, tuple[int, ...]], count: int, itemsize: int) -> list[list[str]]:
    """Contiguous groups of about equal bytes, none empty (like save_pretrained's sharding, fixed count)."""
    names = list(shapes)
    if len(names) < count:
        raise ValueError(f"cannot split {len(names)} tensors into {count} shards")
    sizes = [math.prod(shapes[n]) * itemsize for n in names]
    total = sum(sizes)
    before = list(itertools.accumulate(sizes, initial=0))  # bytes ahead of each tensor
    bounds = [0]
    for k in range(1, count):
        start = next((i for i, b in enumerate(before) if b >= total * k / count), len(names))
        bounds.append(min(max(start, bounds[-1] + 1), len(names) - (count - k)))
    bounds.append(len(names))
    return [names[bounds[k]:bounds[k + 1]] for k in range(count)]


def _split_by_max_bytes(shapes: dict[str, tuple[int, ...]], max_bytes: int, itemsize: int) -> list[list[str]]:
    """save_pretrained's own sharding (huggingface_hub's split_state_dict_into_shards): tensors in order, a new
    shard whenever the next tensor would take the current one past `max_bytes`. At the real configs this gives the
    real repositories' shard sizes (text encoder 4.98/5.00/4.92/0.12 GB with "5GB"; transformer about 10/10/5.8 GB
    with "10GB")."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def _weight_files(shapes: dict[str, tuple[int, ...]], itemsize: int, *, prefix: str = "",
                  single_name: str | None = None, shard_stem: str | None = None, shard_count: int = 1,
                  index_name: str | None = None, max_shard_bytes: int | None = None) -> list[tuple[str, list[str]]]:
    """(file name, tensor names with the checkpoint's prefix) of each file, in writing order. `max_shard_bytes`:
    split as save_pretrained does, which must give `shard_count` shards (the real file names say how many)."""
    keyed = [prefix + n for n in shapes]  # real checkpoints carry the pre-v5 module prefixes
    if single_name:
        return [(single_name, keyed)]
    keyed_shapes = {prefix + n: s for n, s in shapes.items()}
    if max_shard_bytes is not None:
        groups = _split_by_max_bytes(keyed_shapes, max_shard_bytes, itemsize)
        if len(groups) != shard_count:
            raise ValueError(f"{max_shard_bytes / 1e9:g} GB shards give {len(groups)} files, not {shard_count}")
    else:
        groups = _split_into_shards(keyed_shapes, shard_count, itemsize)
    return [(f"{shard_stem}-{i:05d}-of-{shard_count:05d}.safetensors", group)
            for i, group in enumerate(groups, start=1)]


def _write_weights(folder: Path, shapes: dict[str, tuple[int, ...]], dtype, seed: int, *, device=None,
                   on_file: Callable[[Path, int, float], None] | None = None, **files) -> int:
    """Writes random tensors (one file, or shards and an index: `_weight_files`' arguments); returns the tensor
    bytes. `device`: where the values are drawn (default the CPU). `on_file(path, bytes, seconds)` after each file."""
    import time

    import torch
    from safetensors.torch import save_file

    fill = _RandomFill(seed, dtype, device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    prefix = files.get("prefix", "")
    index_name = files.get("index_name")
    folder.mkdir(parents=True, exist_ok=True)
    total, weight_map = 0, {}
    for file_name, group in _weight_files(shapes, itemsize, **files):
        started = time.perf_counter()
        # one shard in memory at a time; the generator runs in key order, so shard boundaries don't matter
        tensors = {n: fill.tensor(n, shapes[n.removeprefix(prefix)]) for n in group}
        save_file(tensors, str(folder / file_name), metadata={"format": "pt"})
        written = sum(t.numel() * itemsize for t in tensors.values())
        total += written
        weight_map.update({n: file_name for n in group})
        del tensors
        if on_file is not None:
            on_file(folder / file_name, written, time.perf_counter() - started)
    if index_name:
        _write_json(folder / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


# --- LoRA files ------------------------------------------------------------------------------------------------

TINY_LORA_RANK = 4
TINY_LORA_STD = 0.1  # down and up: an update of about the weights' own size (rank 4 x 0.1 x 0.1 ~ 0.02)
# One file per format the app reads, with the key names real trainers write (memory/lora.py):
#   musubi-tuner (kohya keys, this transformer's layer names; every block Linear without "norm" in its name, as
#   musubi-tuner's FramePack network excludes them), alpha 2 at rank 4 (scale 0.5), bf16;
#   diffusers (PEFT keys under `transformer.`, the attention Linears), lora_alpha 8 / r 4 in the file's metadata, fp32;
#   kohya HunyuanVideo (the original code's layer names, qkv and linear1 fused), alpha 4 (scale 1), fp16, with a few
#   text-encoder keys the app ignores;
#   ComfyUI / diffusion-pipe style (PEFT keys under `diffusion_model.`, original names), no alpha (scale 1), bf16.
TINY_LORAS = ("tiny-musubi-framepack.safetensors", "tiny-diffusers.safetensors",
              "tiny-kohya-hunyuanvideo.safetensors", "tiny-comfy-hunyuanvideo.safetensors")
ATTENTION_LINEARS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out")


def _original_layers(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, int]]:
    """The original HunyuanVideo code's block Linears ((out, in)) for a transformer of these diffusers shapes."""
    def shape(name):
        return shapes[f"{name}.weight"]

    layers = {}
    duals = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("transformer_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("single_transformer_blocks.")})
    for n in duals:
        b = f"transformer_blocks.{n}"
        for side, q, out, ff, mod in (("img", "to_q", "to_out.0", "ff", "norm1"),
                                      ("txt", "add_q_proj", "to_add_out", "ff_context", "norm1_context")):
            width, into = shape(f"{b}.attn.{q}")
            layers[f"double_blocks.{n}.{side}_attn_qkv"] = (3 * width, into)
            layers[f"double_blocks.{n}.{side}_attn_proj"] = shape(f"{b}.attn.{out}")
            layers[f"double_blocks.{n}.{side}_mlp.fc1"] = shape(f"{b}.{ff}.net.0.proj")
            layers[f"double_blocks.{n}.{side}_mlp.fc2"] = shape(f"{b}.{ff}.net.2")
            layers[f"double_blocks.{n}.{side}_mod.linear"] = shape(f"{b}.{mod}.linear")
    for n in singles:
        b = f"single_transformer_blocks.{n}"
        width, into = shape(f"{b}.attn.to_q")
        layers[f"single_blocks.{n}.linear1"] = (3 * width + shape(f"{b}.proj_mlp")[0], into)
        layers[f"single_blocks.{n}.linear2"] = shape(f"{b}.proj_out")
        layers[f"single_blocks.{n}.modulation.linear"] = shape(f"{b}.norm.linear")
    return layers


def tiny_lora_tensors(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, tuple[dict, dict]]:
    """file name -> (tensors, metadata) of the tiny LoRA files (TINY_LORAS) for a transformer of these shapes. One
    metadata entry per file: safetensors writes several in no fixed order, and the same seed must give the same
    bytes."""
    import torch

    g = torch.Generator().manual_seed(seed)
    r = TINY_LORA_RANK

    def pair(out_in, dtype):
        out, into = out_in
        down = (torch.randn(r, into, generator=g) * TINY_LORA_STD).to(dtype)
        up = (torch.randn(out, r, generator=g) * TINY_LORA_STD).to(dtype)
        return down, up

    blocks = {k[: -len(".weight")]: v for k, v in shapes.items() if len(v) == 2 and k.endswith(".weight")
              and k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    files = {}

    musubi = {}
    for name, out_in in blocks.items():
        if "norm" in name:
            continue
        key = "lora_unet_" + name.replace(".", "_")
        musubi[f"{key}.lora_down.weight"], musubi[f"{key}.lora_up.weight"] = pair(out_in, torch.bfloat16)
        musubi[f"{key}.alpha"] = torch.tensor(2.0)
    files[TINY_LORAS[0]] = (musubi, {"format": "pt"})

    peft = {}
    for name, out_in in blocks.items():
        if name.split(".", 2)[2] in ATTENTION_LINEARS:
            peft[f"transformer.{name}.lora_A.weight"], peft[f"transformer.{name}.lora_B.weight"] = \
                pair(out_in, torch.float32)
    config = {"transformer.r": r, "transformer.lora_alpha": 2 * r, "transformer.alpha_pattern": {},
              "transformer.rank_pattern": {}, "transformer.target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
              "transformer.use_dora": False, "transformer.use_rslora": False}
    files[TINY_LORAS[1]] = (peft, {"lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)})

    original = _original_layers(shapes)
    kohya = {}
    for name, out_in in original.items():
        key = "lora_unet_" + name.replace(".", "_")
        kohya[f"{key}.lora_down.weight"], kohya[f"{key}.lora_up.weight"] = pair(out_in, torch.float16)
        kohya[f"{key}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
    for te_layer in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                     "lora_te_text_model_encoder_layers_0_mlp_fc1"):  # the text encoder's: ignored with a notice
        kohya[f"{te_layer}.lora_down.weight"], kohya[f"{te_layer}.lora_up.weight"] = pair((32, 32), torch.float16)
        kohya[f"{te_layer}.alpha"] = torch.tensor(float(r), dtype=torch.float16)
    files[TINY_LORAS[2]] = (kohya, {"format": "pt"})

    comfy = {}
    for name, out_in in original.items():
        if name.endswith(("attn_qkv", "linear1", "linear2")):
            comfy[f"diffusion_model.{name}.lora_A.weight"], comfy[f"diffusion_model.{name}.lora_B.weight"] = \
                pair(out_in, torch.bfloat16)
    files[TINY_LORAS[3]] = (comfy, {"format": "pt"})
    return files


def write_tiny_loras(folder: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[str]:
    """The tiny LoRA files (TINY_LORAS) for a transformer of these shapes, written into `folder`; their paths."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (tensors, metadata) in tiny_lora_tensors(shapes, seed).items():
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(folder / name), metadata=metadata)
        paths.append(str(folder / name))
    return paths


# --- transformer size ------------------------------------------------------------------------------------------

def _param_count(shape: dict) -> int:
    return sum(math.prod(s) for s in _meta_shapes(_transformer_builder(transformer_config(shape))).values())


def transformer_shape_for(transformer_mb: float | None) -> dict:
    """Heads and layers whose bf16 weights total about `transformer_mb` MB (text/pooled/image dims stay tied
    to the tiny encoders). None gives the tiny default."""
    if transformer_mb is None:
        return dict(TINY_TRANSFORMER)
    target = transformer_mb * MB / 2  # bf16 parameters
    layers = max(1, min(20, round(transformer_mb / 200)))  # the real 1:2 dual:single ratio, deeper when big
    head_dim = 32 if transformer_mb >= 16 else 8

    def shape(heads: int) -> dict:
        return {"num_attention_heads": heads, "attention_head_dim": head_dim,
                "rope_axes_dim": list(SCALED_HEADS[head_dim]), "num_layers": layers,
                "num_single_layers": 2 * layers, "num_refiner_layers": 1}

    # The parameter count is exactly quadratic in the width (heads x head dim) for fixed depth: fit it on
    # three small meta builds instead of building big candidates.
    c1, c2, c3 = (_param_count(shape(h)) for h in (1, 2, 3))
    a = (c3 - 2 * c2 + c1) / 2
    b = c2 - c1 - 3 * a
    c = c1 - a - b
    heads = (-b + math.sqrt(b * b - 4 * a * (c - target))) / (2 * a) if target > c1 else 1.0
    best = min({max(1, math.floor(heads)), max(1, math.ceil(heads))},
               key=lambda h: abs(a * h * h + b * h + c - target))
    return shape(best)


# --- the whole set ---------------------------------------------------------------------------------------------

def _write_repo_roots(models_dir: Path) -> None:
    hunyuan = models_dir / HUNYUAN_REPO
    hunyuan.mkdir(parents=True, exist_ok=True)
    # Exactly the real 39-byte file: a trailing comma makes it invalid JSON. Loaders must not json.load it.
    (hunyuan / "config.json").write_text('{\n  "Name": [\n    "HunyuanVideo"\n  ],\n}', encoding="utf-8")
    _write_json(hunyuan / "model_index.json", {
        "_class_name": "HunyuanVideoPipeline", "_diffusers_version": "0.32.0.dev0",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "LlamaModel"], "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "LlamaTokenizerFast"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
    })
    _write_json(models_dir / REDUX_REPO / "model_index.json", {
        "_class_name": "FluxPriorReduxPipeline", "_diffusers_version": "0.32.0.dev0",
        "_name_or_path": "black-forest-labs/FLUX.1-Redux-dev",
        "feature_extractor": ["transformers", "SiglipImageProcessor"],
        "image_embedder": ["flux", "ReduxImageEncoder"], "image_encoder": ["transformers", "SiglipVisionModel"],
        "text_encoder": [None, None], "text_encoder_2": [None, None], "tokenizer": [None, None],
        "tokenizer_2": [None, None],
    })
    (models_dir / F1_REPO).mkdir(parents=True, exist_ok=True)


def make_tiny_models(models_dir: Path, transformer_mb: float | None = None, seed: int = 0) -> dict:
    """Writes a complete tiny random model set under `models_dir` in the real layout; returns a summary.

    `transformer_mb` scales only the transformer (about that many MB of bf16 weights, +-20%); the encoders and
    the VAE stay tiny. Tiny LoRA files for that transformer go into `models_dir/loras/`, one per format the app
    reads (TINY_LORAS). Same seed, same bytes.
    """
    import torch

    models_dir = Path(models_dir)
    folders = {name: c.folder(models_dir) for name, c in COMPONENTS.items()}
    _write_repo_roots(models_dir)
    llama_tok = _write_llama_tokenizer(folders["tokenizer"])
    clip_tok = _write_clip_tokenizer(folders["tokenizer_2"])
    _write_json(folders["feature_extractor"] / "preprocessor_config.json", preprocessor_config())

    # Like the real 128320 for a 128259-token tokenizer: the embedding is a bit larger than the tokenizer.
    llama_vocab = 64 * math.ceil(llama_tok["length"] / 64)
    shape = transformer_shape_for(transformer_mb)
    # (component, config, builder, storage dtype, key prefix of the real checkpoint, file arguments)
    plan = [
        ("text_encoder", llama_config(llama_vocab, llama_tok["bos_id"], llama_tok["eos_id"]), _llama_builder,
         torch.float16, "", {"shard_stem": "model", "shard_count": 4, "index_name": "model.safetensors.index.json"}),
        ("text_encoder_2", clip_text_config(clip_tok["length"]), _clip_builder, torch.float16, "text_model.",
         {"single_name": "model.safetensors"}),
        ("image_encoder", siglip_config(), _siglip_builder, torch.bfloat16, "vision_model.",
         {"single_name": "model.safetensors"}),
        ("vae", vae_config(), _vae_builder, torch.float32, "",
         {"single_name": "diffusion_pytorch_model.safetensors"}),
        ("transformer", transformer_config(shape), _transformer_builder, torch.bfloat16, "",
         {"shard_stem": "diffusion_pytorch_model", "shard_count": 3,
          "index_name": "diffusion_pytorch_model.safetensors.index.json"}),
    ]
    summary: dict[str, Any] = {"models_dir": str(models_dir), "seed": seed, "components": {},
                               "llama_tokenizer": llama_tok, "clip_tokenizer": clip_tok}
    for offset, (name, config, builder, dtype, prefix, files) in enumerate(plan):
        folder = folders[name]
        _write_json(folder / "config.json", config)
        shapes = _meta_shapes(builder(config))
        # each component has its own stream, so scaling the transformer leaves the encoders' bytes unchanged
        written = _write_weights(folder, shapes, dtype, seed * 1000 + offset, prefix=prefix, **files)
        summary["components"][name] = {"folder": str(folder), "params": sum(math.prod(s) for s in shapes.values()),
                                       "bytes": written, "dtype": str(dtype).removeprefix("torch.")}
        log.info("tiny %s: %d tensors, %.2f MB in %s", name, len(shapes), written / MB, folder)
        if name == "transformer":
            summary["loras"] = write_tiny_loras(models_dir / LORAS_DIR, shapes, seed)
    for name in ("tokenizer", "tokenizer_2", "feature_extractor"):
        summary["components"][name] = {"folder": str(folders[name])}
    summary["transformer_bytes"] = summary["components"]["transformer"]["bytes"]
    summary["transformer_shape"] = shape
    return summary
