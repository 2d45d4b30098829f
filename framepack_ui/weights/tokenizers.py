"""Loading the two tokenizers without transformers 5's silent traps, and proving they tokenize sanely.

The Llama tokenizer folder says `tokenizer_class: LlamaTokenizer`. In transformers 5 that class (and
LlamaTokenizerFast, AutoTokenizer, DiffusionPipeline, which go through it) can replace the byte-level
pre-tokenizer of Llama-3's `tokenizer.json` with Metaspace: spaces vanish, ids change, and no error is raised.
So the Llama tokenizer is built straight from `tokenizer.json` and then checked: ByteLevel pre-tokenizer,
exact round trip of a known sentence, bos first.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import CLIPTokenizer, PreTrainedTokenizerFast

from ..errors import ModelFilesError

log = logging.getLogger(__name__)

CHECK_SENTENCE = "A cat walks on the grass, realistic style."
# CLIP lowercases and splits punctuation into separate words, which decode puts spaces around: no punctuation.
CLIP_CHECK_SENTENCE = "a cat walks on the grass realistic style"
LLAMA_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFilesError(f"{path} is not readable JSON ({exc}).") from exc


def _special_tokens(folder: Path) -> dict[str, str]:
    """bos/eos/pad/unk strings: special_tokens_map.json first, tokenizer_config.json as fallback."""
    found = {}
    for source in (_read_json(folder / "tokenizer_config.json"), _read_json(folder / "special_tokens_map.json")):
        for key in LLAMA_SPECIAL_KEYS:
            value = source.get(key)
            if isinstance(value, dict):  # {"content": ..., "lstrip": ...} form
                value = value.get("content")
            if isinstance(value, str):
                found[key] = value
    return found


def _pre_tokenizer_types(tokenizer) -> list[str]:
    """Types of the backend pre-tokenizer, flattened through Sequence (read from its JSON, which is stable)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    types, stack = [], [spec]
    while stack:
        node = stack.pop()
        types.append(node.get("type"))
        stack.extend(node.get("pretokenizers", []))
    return types


def check_llama_tokenizer(tokenizer, folder: Path | str) -> None:
    """Raises ModelFilesError unless `tokenizer` behaves like Llama-3's byte-level tokenizer."""
    types = _pre_tokenizer_types(tokenizer)
    if "ByteLevel" not in types or "Metaspace" in types:
        raise ModelFilesError(f"The Llama tokenizer in {folder} has pre-tokenizer {types}, not ByteLevel: "
                              "it would drop spaces and give wrong ids.")
    ids = tokenizer(CHECK_SENTENCE, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids)
    if decoded != CHECK_SENTENCE:
        raise ModelFilesError(f"The Llama tokenizer in {folder} does not round-trip text "
                              f"({CHECK_SENTENCE!r} came back as {decoded!r}).")
    with_bos = tokenizer(CHECK_SENTENCE)["input_ids"]
    if tokenizer.bos_token_id is None or with_bos[:1] != [tokenizer.bos_token_id]:
        raise ModelFilesError(f"The Llama tokenizer in {folder} does not start prompts with its bos token.")


def load_llama_tokenizer(folder: Path | str) -> PreTrainedTokenizerFast:
    """The HunyuanVideo Llama tokenizer from `tokenizer.json`, checked (see module docstring)."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ModelFilesError(f"The Llama tokenizer file {path} is missing.")
    try:
        # The generic class keeps tokenizer.json's pipeline as written; the Llama class would rebuild it.
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), padding_side="right",
                                            **_special_tokens(folder))
    except Exception as exc:  # tokenizers raises bare Exceptions on malformed files
        raise ModelFilesError(f"The Llama tokenizer in {folder} cannot be read ({exc}).") from exc
    check_llama_tokenizer(tokenizer, folder)
    log.debug("Llama tokenizer from %s: %d tokens", folder, len(tokenizer))
    return tokenizer


def check_clip_tokenizer(tokenizer, folder: Path | str) -> None:
    """Raises ModelFilesError unless the CLIP tokenizer round-trips and its eos is the highest id.

    CLIPTextModel with the real config (eos_token_id 2) pools at argmax(input_ids): that is the eos position
    only when eos is the highest id, as in the real vocabulary (49407 of 49408).
    """
    ids = tokenizer(CLIP_CHECK_SENTENCE, add_special_tokens=False)["input_ids"]
    decoded = tokenizer.decode(ids)
    if decoded != CLIP_CHECK_SENTENCE:
        raise ModelFilesError(f"The CLIP tokenizer in {folder} does not round-trip text "
                              f"({CLIP_CHECK_SENTENCE!r} came back as {decoded!r}).")
    highest = max(tokenizer.get_vocab().values())
    if tokenizer.eos_token_id != highest:
        raise ModelFilesError(f"The CLIP tokenizer in {folder} has eos id {tokenizer.eos_token_id}, not the "
                              f"highest id {highest}: the text encoder would pool the wrong position.")


def load_clip_tokenizer(folder: Path | str) -> CLIPTokenizer:
    """The CLIP tokenizer from `vocab.json` + `merges.txt`, checked."""
    folder = Path(folder)
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab, merges):
        if not path.is_file():
            raise ModelFilesError(f"The CLIP tokenizer file {path} is missing.")
    try:
        tokenizer = CLIPTokenizer(vocab=str(vocab), merges=str(merges), model_max_length=77)
    except Exception as exc:
        raise ModelFilesError(f"The CLIP tokenizer in {folder} cannot be read ({exc}).") from exc
    check_clip_tokenizer(tokenizer, folder)
    return tokenizer
