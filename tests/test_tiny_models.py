"""The tiny random model set: real layout, real config keys, real classes, size scaling, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from framepack_ui.weights import layout
from framepack_ui.weights.tiny import _split_into_shards, make_tiny_models, transformer_shape_for
from real_layout import (REAL_CLIP_CONFIG, REAL_CLIP_TOKENIZER_CONFIG_KEYS, REAL_HY_MODEL_INDEX, REAL_LLAMA_CONFIG,
                         REAL_LLAMA_TOKENIZER_CONFIG_KEYS, REAL_PREPROCESSOR_CONFIG, REAL_SIGLIP_CONFIG,
                         REAL_TRANSFORMER_CONFIG, REAL_VAE_CONFIG)

HY = layout.HUNYUAN_REPO

# Config values that are not sizes must stay as in the real files (dtypes, activations, ids, ratios...).
SAME_VALUE_KEYS = {
    "text_encoder": (REAL_LLAMA_CONFIG, {"architectures", "hidden_act", "model_type", "rope_theta", "torch_dtype",
                                         "tie_word_embeddings", "max_position_embeddings", "rope_scaling"}),
    "text_encoder_2": (REAL_CLIP_CONFIG, {"architectures", "bos_token_id", "eos_token_id", "pad_token_id",
                                          "hidden_act", "model_type", "max_position_embeddings", "torch_dtype"}),
    "image_encoder": (REAL_SIGLIP_CONFIG, {"architectures", "hidden_act", "model_type", "torch_dtype",
                                           "num_channels", "layer_norm_eps"}),
    "vae": (REAL_VAE_CONFIG, {"_class_name", "act_fn", "down_block_types", "up_block_types", "in_channels",
                              "latent_channels", "out_channels", "scaling_factor", "spatial_compression_ratio",
                              "temporal_compression_ratio", "mid_block_add_attention"}),
    "transformer": (REAL_TRANSFORMER_CONFIG, {"_class_name", "guidance_embeds", "has_clean_x_embedder",
                                              "has_image_proj", "in_channels", "out_channels", "mlp_ratio",
                                              "patch_size", "patch_size_t", "qk_norm", "rope_theta"}),
}
STORAGE_DTYPES = {"text_encoder": "F16", "text_encoder_2": "F16", "image_encoder": "BF16", "vae": "F32",
                  "transformer": "BF16"}


def _folder(models_dir: Path, name: str) -> Path:
    return layout.COMPONENTS[name].folder(models_dir)


def _config(models_dir: Path, name: str, file: str = "config.json") -> dict:
    return json.loads((_folder(models_dir, name) / file).read_text())


def _file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _weight_bytes(models_dir: Path) -> dict[str, bytes]:
    # .cache/ holds the prompt-embedding cache that jobs on the shared tiny set write (memory/prompt_cache.py)
    return {str(p.relative_to(models_dir)): p.read_bytes() for p in sorted(models_dir.rglob("*"))
            if p.is_file() and ".cache" not in p.relative_to(models_dir).parts}


def test_every_layout_file_exists(tiny_models_dir):
    assert layout.missing(tiny_models_dir) == {}


@pytest.mark.parametrize("name, file, real", [
    ("text_encoder", "config.json", REAL_LLAMA_CONFIG),
    ("text_encoder_2", "config.json", REAL_CLIP_CONFIG),
    ("image_encoder", "config.json", REAL_SIGLIP_CONFIG),
    ("feature_extractor", "preprocessor_config.json", REAL_PREPROCESSOR_CONFIG),
    ("vae", "config.json", REAL_VAE_CONFIG),
    ("transformer", "config.json", REAL_TRANSFORMER_CONFIG),
])
def test_configs_have_the_real_key_sets_and_values(tiny_models_dir, name, file, real):
    config = _config(tiny_models_dir, name, file)
    assert set(config) == set(real)
    _, same = SAME_VALUE_KEYS.get(name, (None, set(real) - {"size"}))
    assert {k: config[k] for k in same} == {k: real[k] for k in same}


def test_tokenizer_configs_have_the_real_key_sets(tiny_models_dir):
    assert set(_config(tiny_models_dir, "tokenizer", "tokenizer_config.json")) == REAL_LLAMA_TOKENIZER_CONFIG_KEYS
    assert set(_config(tiny_models_dir, "tokenizer_2", "tokenizer_config.json")) == REAL_CLIP_TOKENIZER_CONFIG_KEYS
    llama_map = _config(tiny_models_dir, "tokenizer", "special_tokens_map.json")
    assert {k: v["content"] for k, v in llama_map.items()} == {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<pad>", "unk_token": "<unk>"}
    clip_map = _config(tiny_models_dir, "tokenizer_2", "special_tokens_map.json")
    assert {k: v["content"] for k, v in clip_map.items()} == {
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>"}


def test_cross_component_dimensions_are_tied(tiny_models_dir):
    transformer = _config(tiny_models_dir, "transformer")
    assert transformer["text_embed_dim"] == _config(tiny_models_dir, "text_encoder")["hidden_size"]
    assert transformer["pooled_projection_dim"] == _config(tiny_models_dir, "text_encoder_2")["hidden_size"]
    assert transformer["image_proj_dim"] == _config(tiny_models_dir, "image_encoder")["hidden_size"]
    assert transformer["in_channels"] == _config(tiny_models_dir, "vae")["latent_channels"] == 16
    assert sum(transformer["rope_axes_dim"]) == transformer["attention_head_dim"]
    siglip = _config(tiny_models_dir, "image_encoder")
    assert _config(tiny_models_dir, "feature_extractor", "preprocessor_config.json")["size"] == {
        "height": siglip["image_size"], "width": siglip["image_size"]}


def test_hunyuan_root_config_json_is_the_real_invalid_file(tiny_models_dir):
    path = tiny_models_dir / HY / "config.json"
    assert path.read_bytes() == b'{\n  "Name": [\n    "HunyuanVideo"\n  ],\n}'
    assert len(path.read_bytes()) == 39
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())
    assert json.loads((tiny_models_dir / HY / "model_index.json").read_text()) == REAL_HY_MODEL_INDEX
    redux_index = json.loads((tiny_models_dir / layout.REDUX_REPO / "model_index.json").read_text())
    assert redux_index["image_encoder"] == ["transformers", "SiglipVisionModel"]


@pytest.mark.parametrize("name, index_name, shards", [
    ("text_encoder", "model.safetensors.index.json", 4),
    ("transformer", "diffusion_pytorch_model.safetensors.index.json", 3),
])
def test_shard_indexes_match_the_shards(tiny_models_dir, name, index_name, shards):
    folder = _folder(tiny_models_dir, name)
    index = json.loads((folder / index_name).read_text())
    assert len(set(index["weight_map"].values())) == shards  # no empty shard
    total = 0
    for file_name in set(index["weight_map"].values()):
        with safe_open(str(folder / file_name), "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == file_name} == set(f.keys())
            total += sum(f.get_tensor(k).nbytes for k in f.keys())
    assert index["metadata"]["total_size"] == total


@pytest.mark.parametrize("name", sorted(STORAGE_DTYPES))
def test_storage_dtypes_are_the_real_ones(tiny_models_dir, name):
    for path in _folder(tiny_models_dir, name).glob("*.safetensors"):
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        header = json.loads(path.read_bytes()[8:8 + header_len])
        assert header["__metadata__"] == {"format": "pt"}
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {STORAGE_DTYPES[name]}


def _assert_loaded_from_files(model, folder: Path, prefix: str = "") -> None:
    """Every file tensor reached the model unchanged (a prefix or key mismatch would leave random weights)."""
    state = model.state_dict()
    files = {k.removeprefix(prefix): v for k, v in _file_tensors(folder).items()}
    assert set(files) == set(state)
    for key, tensor in files.items():
        assert torch.equal(state[key].to(tensor.dtype), tensor), key


def test_text_encoders_load_with_their_real_classes(tiny_models_dir):
    from transformers import CLIPTextModel, LlamaModel

    llama = LlamaModel.from_pretrained(_folder(tiny_models_dir, "text_encoder"), torch_dtype=torch.float16)
    _assert_loaded_from_files(llama, _folder(tiny_models_dir, "text_encoder"))
    ids = torch.tensor([[5, 6, 7, 8]])
    hidden = llama(ids, output_hidden_states=True).hidden_states
    assert len(hidden) == 4 and hidden[-3].shape == (1, 4, 32)  # FramePack reads hidden_states[-3]
    assert torch.isfinite(hidden[-3]).all()

    clip = CLIPTextModel.from_pretrained(_folder(tiny_models_dir, "text_encoder_2"), torch_dtype=torch.float16)
    _assert_loaded_from_files(clip, _folder(tiny_models_dir, "text_encoder_2"), prefix="text_model.")
    pooled = clip(torch.tensor([[3, 4, 5]])).pooler_output
    assert pooled.shape == (1, 32) and torch.isfinite(pooled).all()


def test_image_encoder_and_feature_extractor_load_with_their_real_classes(tiny_models_dir):
    from PIL import Image
    from transformers import SiglipImageProcessor, SiglipVisionModel

    processor = SiglipImageProcessor.from_pretrained(_folder(tiny_models_dir, "feature_extractor"))
    pixels = processor(images=Image.new("RGB", (80, 48), (200, 30, 90)), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    encoder = SiglipVisionModel.from_pretrained(_folder(tiny_models_dir, "image_encoder"), torch_dtype=torch.bfloat16)
    _assert_loaded_from_files(encoder, _folder(tiny_models_dir, "image_encoder"), prefix="vision_model.")
    out = encoder(pixel_values=pixels.to(torch.bfloat16)).last_hidden_state
    assert out.shape == (1, 16, 32) and torch.isfinite(out).all()  # (32 / 8)^2 image tokens, SigLIP hidden 32


def test_vae_loads_with_its_real_class(tiny_models_dir):
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo.from_pretrained(_folder(tiny_models_dir, "vae"))
    _assert_loaded_from_files(vae, _folder(tiny_models_dir, "vae"))
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1  # 5 frames -> 2 latent frames, 32 px -> 4 latent px
    latents = vae.encode(video).latent_dist.mode()
    assert latents.shape == (1, 16, 2, 4, 4)
    decoded = vae.decode(latents).sample
    assert decoded.shape == (1, 3, 5, 32, 32) and torch.isfinite(decoded).all()


def test_transformer_loads_with_diffusers_class_despite_packed_class_name(tiny_models_dir):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    folder = _folder(tiny_models_dir, "transformer")
    assert _config(tiny_models_dir, "transformer")["_class_name"] == "HunyuanVideoTransformer3DModelPacked"
    model = HunyuanVideoFramepackTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16)
    _assert_loaded_from_files(model, folder)
    assert model.image_projection is not None and model.clean_x_embedder is not None
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    out = model(hidden_states=rand(1, 16, 2, 8, 8), timestep=torch.tensor([500.0]),
                encoder_hidden_states=rand(1, 12, 32), encoder_attention_mask=torch.ones(1, 12, dtype=torch.bool),
                pooled_projections=rand(1, 32), image_embeds=rand(1, 16, 32), indices_latents=torch.arange(4, 6),
                guidance=torch.tensor([10000.0]), latents_clean=rand(1, 16, 2, 8, 8),
                indices_latents_clean=torch.tensor([0, 3]), latents_history_2x=rand(1, 16, 2, 8, 8),
                indices_latents_history_2x=torch.tensor([1, 2]), latents_history_4x=rand(1, 16, 16, 8, 8),
                indices_latents_history_4x=torch.arange(6, 22)).sample
    assert out.shape == (1, 16, 2, 8, 8) and torch.isfinite(out).all()


def test_transformer_mb_scales_the_transformer_only(tiny_models_dir, tmp_path):
    summary = make_tiny_models(tmp_path, transformer_mb=40)
    folder = _folder(tmp_path, "transformer")
    on_disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert 32e6 <= on_disk <= 48e6
    assert summary["transformer_bytes"] == json.loads(
        (folder / "diffusion_pytorch_model.safetensors.index.json").read_text())["metadata"]["total_size"]
    config = _config(tmp_path, "transformer")
    assert (config["text_embed_dim"], config["pooled_projection_dim"], config["image_proj_dim"]) == (32, 32, 32)
    assert sum(config["rope_axes_dim"]) == config["attention_head_dim"]
    # the encoders are untouched by the transformer's size: byte-identical to the default set (same seed)
    tiny = _weight_bytes(tiny_models_dir)
    scaled = _weight_bytes(tmp_path)
    encoder_files = [k for k in tiny if not k.startswith((layout.F1_REPO, "loras/"))]  # LoRAs fit the transformer
    assert {k: scaled[k] for k in encoder_files} == {k: tiny[k] for k in encoder_files}


@pytest.mark.parametrize("mb", [1, 5, 16, 100, 1500, 4000])
def test_transformer_shape_for_hits_the_size(mb):
    from framepack_ui.weights.tiny import _param_count

    assert abs(_param_count(transformer_shape_for(mb)) * 2 / (mb * 1e6) - 1) <= 0.2


def test_same_seed_same_bytes_other_seed_other_weights(tiny_models_dir, tmp_path):
    make_tiny_models(tmp_path / "again", seed=0)
    make_tiny_models(tmp_path / "other", seed=1)
    reference = _weight_bytes(tiny_models_dir)
    assert _weight_bytes(tmp_path / "again") == reference
    other = _weight_bytes(tmp_path / "other")
    assert other.keys() == reference.keys()
    weights = [k for k in reference if k.endswith(".safetensors")]
    assert all(other[k] != reference[k] for k in weights)
    assert all(other[k] == reference[k] for k in reference if k not in weights)  # configs and tokenizers


def test_split_into_shards_never_leaves_a_shard_empty():
    # one huge tensor first, then small ones: a byte split alone would leave shards empty
    shapes = {"big": (1000, 1000), "a": (1,), "b": (1,), "c": (1,)}
    groups = _split_into_shards(shapes, 3, 2)
    assert [len(g) for g in groups] == [1, 1, 2]
    assert sum(groups, []) == list(shapes)
    with pytest.raises(ValueError):
        _split_into_shards({"a": (1,)}, 2, 2)
