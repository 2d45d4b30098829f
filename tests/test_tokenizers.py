"""Tokenizer loading: the Llama byte-level trap of transformers 5, and CLIP's eos-is-highest pooling rule."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from framepack_ui.weights.tokenizers import (CHECK_SENTENCE, CLIP_CHECK_SENTENCE, check_llama_tokenizer,
                                            load_clip_tokenizer, load_llama_tokenizer)
from framepack_ui.errors import ModelFilesError
from framepack_ui.weights import layout
from framepack_ui.weights.tiny import HUNYUAN_PROMPT_TEMPLATE

FRAMEPACK_CROP_START = 95  # FramePack drops this many template tokens (real Llama-3 tokenizer)


def _folder(models_dir, name):
    return layout.COMPONENTS[name].folder(models_dir)


def _pre_tokenizer_types(spec: dict) -> list[str]:
    spec = spec or {}
    return [spec.get("type")] + sum((_pre_tokenizer_types(p) for p in spec.get("pretokenizers", [])), [])


def test_llama_tokenizer_is_byte_level_despite_llamatokenizer_class(tiny_models_dir, tmp_path):
    folder = _folder(tiny_models_dir, "tokenizer")
    # the trap, as in the real repository: the config names the Llama class over a byte-level tokenizer.json
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    assert "ByteLevel" in _pre_tokenizer_types(json.loads((folder / "tokenizer.json").read_text())["pre_tokenizer"])

    tokenizer = load_llama_tokenizer(folder)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    assert "ByteLevel" in _pre_tokenizer_types(backend["pre_tokenizer"])
    assert "Metaspace" not in _pre_tokenizer_types(backend["pre_tokenizer"])
    ids = tokenizer(CHECK_SENTENCE)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == CHECK_SENTENCE
    assert tokenizer.padding_side == "right"
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token) == (
        "<|begin_of_text|>", "<|end_of_text|>", "<pad>", "<unk>")

    # The class the config names rebuilds the pre-tokenizer as Metaspace in transformers 5 (spaces lost); our
    # check must reject such a tokenizer, whatever the installed transformers version does with the folder.
    from transformers import LlamaTokenizerFast
    via_class = LlamaTokenizerFast.from_pretrained(folder)
    via_class_types = _pre_tokenizer_types(json.loads(via_class.backend_tokenizer.to_str())["pre_tokenizer"])
    if "Metaspace" in via_class_types:
        with pytest.raises(ModelFilesError):
            check_llama_tokenizer(via_class, folder)

    # A tokenizer.json whose pre-tokenizer is Metaspace is refused with a one-line message naming the folder.
    bad = tmp_path / "metaspace_tokenizer"
    shutil.copytree(folder, bad)
    spec = json.loads((bad / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    (bad / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ModelFilesError) as caught:
        load_llama_tokenizer(bad)
    assert str(bad) in caught.value.message and "\n" not in caught.value.message


def test_llama_tokenizer_missing_or_broken_file_is_a_model_files_error(tiny_models_dir, tmp_path):
    with pytest.raises(ModelFilesError, match="tokenizer.json"):
        load_llama_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFilesError):
        load_llama_tokenizer(tmp_path)


def test_llama_template_prefix_is_as_long_as_framepack_crops(tiny_models_dir):
    tokenizer = load_llama_tokenizer(_folder(tiny_models_dir, "tokenizer"))
    prefix = tokenizer(HUNYUAN_PROMPT_TEMPLATE.split("{}")[0])["input_ids"]
    assert len(prefix) == FRAMEPACK_CROP_START
    full = tokenizer(HUNYUAN_PROMPT_TEMPLATE.format("A dog jumps."), padding="max_length",
                     max_length=256 + FRAMEPACK_CROP_START, truncation=True)
    assert full["input_ids"][:FRAMEPACK_CROP_START] == prefix  # the prompt starts right at the crop
    assert tokenizer.decode(full["input_ids"][FRAMEPACK_CROP_START:], skip_special_tokens=True) == "A dog jumps."
    assert len(full["input_ids"]) == 256 + FRAMEPACK_CROP_START  # right padding with <pad>
    assert full["input_ids"][-1] == tokenizer.pad_token_id


def test_llama_config_vocab_covers_the_tokenizer(tiny_models_dir):
    tokenizer = load_llama_tokenizer(_folder(tiny_models_dir, "tokenizer"))
    config = json.loads((_folder(tiny_models_dir, "text_encoder") / "config.json").read_text())
    assert config["vocab_size"] >= len(tokenizer)
    assert (config["bos_token_id"], config["eos_token_id"]) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    # specials come after the BPE tokens, as in the real vocabulary
    assert tokenizer.convert_tokens_to_ids("<pad>") == len(tokenizer) - 1


def test_clip_tokenizer_eos_is_highest_id_and_pooler_picks_eos(tiny_models_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = _folder(tiny_models_dir, "tokenizer_2")
    tokenizer = load_clip_tokenizer(folder)
    vocab = tokenizer.get_vocab()
    assert tokenizer.eos_token_id == max(vocab.values()) == len(vocab) - 1
    assert tokenizer.bos_token_id == len(vocab) - 2
    assert tokenizer.decode(tokenizer(CLIP_CHECK_SENTENCE, add_special_tokens=False)["input_ids"]) == \
        CLIP_CHECK_SENTENCE
    # the plain constructor from the two files works too (what "CLIPTokenizer(vocab, merges)" means in v5)
    plain = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    assert plain("A Cat")["input_ids"] == tokenizer("A Cat")["input_ids"]

    encoded = tokenizer(["A cat walks on the grass, realistic style."], padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt")
    ids = encoded["input_ids"]  # [1, 77]: bos, words, eos, then eos as padding
    eos_position = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    assert ids[0, 0] == tokenizer.bos_token_id and 1 < eos_position < 76

    model = CLIPTextModel.from_pretrained(_folder(tiny_models_dir, "text_encoder_2"), torch_dtype=torch.float32)
    assert model.config.eos_token_id == 2  # the real legacy value: pooling takes argmax(input_ids)
    with torch.no_grad():
        out = model(input_ids=ids)
    assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, eos_position])


def test_clip_tokenizer_with_eos_not_highest_is_refused(tiny_models_dir, tmp_path):
    folder = tmp_path / "tokenizer_2"
    shutil.copytree(_folder(tiny_models_dir, "tokenizer_2"), folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    # swap eos with token 0: pooling by argmax would now land on the wrong position
    first = next(t for t, i in vocab.items() if i == 0)
    vocab[first], vocab["<|endoftext|>"] = vocab["<|endoftext|>"], 0
    (folder / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(ModelFilesError, match="highest"):
        load_clip_tokenizer(folder)
