"""Read-only weight storage: the transformer mapped from its files gives the same numbers as diffusers' loader,
and every broken file becomes one line naming that file. That `generate` runs with it under a data limit below its
own size (`prlimit --data`), where safetensors' load of the same files fails: test_cli.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from framepack_ui.errors import ModelFilesError
from framepack_ui.memory import loading, storage
from framepack_ui.weights.layout import COMPONENTS


# --- the map itself (tiny default model: fast) ------------------------------------------------------------------

def _transformer_inputs(seed=0, h=8, w=8):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return dict(hidden_states=r(1, 16, 9, h, w), timestep=torch.tensor([500.0]), encoder_hidden_states=r(1, 20, 32),
                encoder_attention_mask=torch.ones(1, 20, dtype=torch.bool), pooled_projections=r(1, 32),
                image_embeds=r(1, 16, 32), guidance=torch.tensor([10000.0]), indices_latents=torch.arange(20, 29),
                latents_clean=r(1, 16, 2, h, w), indices_latents_clean=torch.tensor([0, 19]),
                latents_history_2x=r(1, 16, 2, h, w), indices_latents_history_2x=torch.tensor([17, 18]),
                latents_history_4x=r(1, 16, 16, h, w), indices_latents_history_4x=torch.arange(1, 17),
                return_dict=False)


def test_mapped_transformer_equals_from_pretrained(tiny_models_dir):
    """Mapped bf16 weights computed in float32 per module == diffusers' loader upcasting to float32 (exactly:
    the same float32 weights and the same ops; tolerance 0)."""
    mapped = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"), storage="map")
    reference = loading.load_transformer(tiny_models_dir, torch.float32, torch.device("cpu"), storage="ram")
    assert mapped.dtype == torch.float32  # what the engine reads to cast its inputs
    weights = dict(mapped.named_parameters())
    pointers = {n: p.data_ptr() for n, p in weights.items()}
    assert all(p.dtype == torch.bfloat16 for p in weights.values())  # storage stays as in the files
    with torch.no_grad():
        ours = mapped(**_transformer_inputs())[0]
        theirs = reference(**_transformer_inputs())[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # after a forward every weight is still the mapped tensor (not an anonymous copy)
    assert {n: p.data_ptr() for n, p in mapped.named_parameters()} == pointers
    assert all(p.dtype == torch.bfloat16 for p in mapped.parameters())


def test_mapped_text_encoders_equal_from_pretrained(tiny_models_dir):
    from framepack_ui.engine import text

    tokenizer, tokenizer_2 = loading.load_tokenizers(tiny_models_dir)
    cpu = torch.device("cpu")
    mapped = [loading.load_text_encoder(tiny_models_dir, torch.float32, cpu, "map"),
              loading.load_text_encoder_2(tiny_models_dir, torch.float32, cpu, "map")]
    reference = [loading.load_text_encoder(tiny_models_dir, torch.float32, cpu),
                 loading.load_text_encoder_2(tiny_models_dir, torch.float32, cpu)]
    assert mapped[0].embed_tokens.weight.dtype == torch.float16  # as stored
    with torch.no_grad():
        ours = text.encode_prompt("a cat walks on the grass", tokenizer, mapped[0], tokenizer_2, mapped[1])
        theirs = text.encode_prompt("a cat walks on the grass", tokenizer, reference[0], tokenizer_2, reference[1])
    torch.testing.assert_close(ours.llama, theirs.llama, rtol=0, atol=0)
    torch.testing.assert_close(ours.clip_pooled, theirs.clip_pooled, rtol=0, atol=0)


def test_mapped_tensors_are_read_only_file_pages(tiny_models_dir):
    folder = COMPONENTS["transformer"].folder(tiny_models_dir)
    tensors, origin = storage.map_files(storage.shard_files(folder, "diffusion_pytorch_model.safetensors.index.json",
                                                            None))
    name = next(iter(tensors))
    maps = Path("/proc/self/maps").read_text().splitlines() if Path("/proc/self/maps").exists() else []
    lines = [line for line in maps if str(origin[name]) in line]
    if maps:  # Linux: the file is mapped shared and read-only ("r--s"), not private writable ("rw-p")
        assert lines and all(line.split()[1] == "r--s" for line in lines)
    from safetensors.torch import load_file

    torch.testing.assert_close(tensors[name], load_file(str(origin[name]))[name], rtol=0, atol=0)


# --- broken files: one line naming the file -----------------------------------------------------------------------

@pytest.fixture
def broken_copy(tiny_models_dir, tmp_path) -> Path:
    """A private copy of the tiny models to damage."""
    target = tmp_path / "models"
    shutil.copytree(tiny_models_dir, target)
    return target


def _load_error(models: Path) -> str:
    with pytest.raises(ModelFilesError) as info:
        loading.load_transformer(models, torch.float32, torch.device("cpu"), storage="map")
    message = info.value.message
    assert "\n" not in message
    return message


def _shard(models: Path, i: int) -> Path:
    return COMPONENTS["transformer"].folder(models) / f"diffusion_pytorch_model-0000{i}-of-00003.safetensors"


def test_truncated_shard_names_the_file(broken_copy):
    shard = _shard(broken_copy, 2)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    message = _load_error(broken_copy)
    assert str(shard) in message and "truncated" in message


def test_bad_header_names_the_file(broken_copy):
    shard = _shard(broken_copy, 1)
    data = bytearray(shard.read_bytes())
    data[8:12] = b"{{{{"
    shard.write_bytes(bytes(data))
    message = _load_error(broken_copy)
    assert str(shard) in message and "header" in message
    shard.write_bytes((10**12).to_bytes(8, "little") + bytes(data[8:]))  # a header length past the end
    assert str(shard) in _load_error(broken_copy)


def test_missing_shard_names_the_file(broken_copy):
    shard = _shard(broken_copy, 3)
    shard.unlink()
    message = _load_error(broken_copy)
    assert shard.name in message and "missing" in message


def test_wrong_shape_names_the_file_and_key(broken_copy):
    from safetensors.torch import load_file, save_file

    shard = _shard(broken_copy, 1)
    tensors = load_file(str(shard))
    key = next(k for k, t in tensors.items() if t.ndim >= 1)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:], dtype=tensors[key].dtype)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    message = _load_error(broken_copy)
    assert str(shard) in message and key in message and "shape" in message


def test_unexpected_and_missing_keys_name_the_file(broken_copy):
    from safetensors.torch import load_file, save_file

    shard = _shard(broken_copy, 1)
    tensors = load_file(str(shard))
    tensors["not_a_weight.weight"] = torch.zeros(2, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    message = _load_error(broken_copy)
    assert str(shard) in message and "not_a_weight.weight" in message
    dropped = next(iter(load_file(str(shard))))
    del tensors["not_a_weight.weight"], tensors[dropped]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    message = _load_error(broken_copy)
    assert dropped in message and "lacks" in message and str(shard) in message  # the shard the index names
