"""Full-size random models (`make-tiny-models DIR --full-size`): the real configs, dtypes, file names and shard sizes,
checked on the meta device (nothing written), and the same writer at a shrunk size (the `_shrink` seam) writing
files that the app's own loaders, through its ModelManager, read back unchanged."""
from __future__ import annotations

import json
from collections import namedtuple

import pytest
import torch
from safetensors import safe_open

from framepack_ui.cli import main as cli_main
from framepack_ui.weights import full_size, layout
from framepack_ui.weights.full_size import full_size_components, make_full_size_models, plan_writes, weight_files

from conftest import cpu_manager
from real_layout import (REAL_CLIP_CONFIG, REAL_LLAMA_CONFIG, REAL_PREPROCESSOR_CONFIG, REAL_SIGLIP_CONFIG,
                         REAL_TEXT_ENCODER_TOTAL_SIZE, REAL_TRANSFORMER_CONFIG, REAL_VAE_CONFIG, REAL_WEIGHT_FILE_GB)

REAL_CONFIGS = {"text_encoder": REAL_LLAMA_CONFIG, "text_encoder_2": REAL_CLIP_CONFIG,
                "image_encoder": REAL_SIGLIP_CONFIG, "feature_extractor": REAL_PREPROCESSOR_CONFIG,
                "vae": REAL_VAE_CONFIG, "transformer": REAL_TRANSFORMER_CONFIG}
SAFETENSORS_DTYPES = {"text_encoder": "F16", "text_encoder_2": "F16", "image_encoder": "BF16", "vae": "F32",
                      "transformer": "BF16"}
CHECKPOINT_PREFIXES = {"text_encoder_2": "text_model.", "image_encoder": "vision_model."}
SHRINK = 8  # the test seam: about 120 MB for the whole set
# the manager's entries and the layout folders whose weights they read, with the checkpoint's key prefix
LOADED_FROM = {"text_encoders": (("text_encoder", ""), ("text_encoder_2", "text_model.")),
               "image_encoder": (("image_encoder", "vision_model."),), "vae": (("vae", ""),),
               "transformer": (("transformer", ""),)}


@pytest.fixture(scope="module")
def real() -> dict:
    """The full-size components at the real size (configs and meta shapes only)."""
    return full_size_components()


@pytest.fixture(scope="module")
def shrunk_models(tmp_path_factory):
    models = tmp_path_factory.mktemp("fullsize")
    summary = make_full_size_models(plan_writes(models, _shrink=SHRINK))
    return models, summary


def _file_header(path) -> dict:
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length])


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_full_size_configs_are_the_real_files(real, name):
    assert real[name].config == REAL_CONFIGS[name]


def test_full_size_weight_files_have_the_real_names_sizes_and_dtypes(real):
    for name, files in REAL_WEIGHT_FILE_GB.items():
        component = real[name]
        written = dict(weight_files(component))
        assert list(written) == list(files)
        assert set(written) <= set(layout.COMPONENTS[name].files)  # where the app's loaders look
        for file_name, gb in files.items():
            assert written[file_name] / 1e9 == pytest.approx(gb, rel=0.012, abs=0.001), (name, file_name)
        expected = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}[SAFETENSORS_DTYPES[name]]
        assert component.dtype == expected
    # the text encoder's split reproduces the real index's total exactly
    assert sum(size for _, size in weight_files(real["text_encoder"])) == REAL_TEXT_ENCODER_TOTAL_SIZE


def test_full_size_tokenizer_ids_fit_the_real_vocabularies(tmp_path, real):
    plan = plan_writes(tmp_path, ("tokenizer", "tokenizer_2"))
    make_full_size_models(plan)
    llama_ids = json.loads((layout.COMPONENTS["tokenizer"].folder(tmp_path) / "tokenizer.json").read_text())
    clip_vocab = json.loads((layout.COMPONENTS["tokenizer_2"].folder(tmp_path) / "vocab.json").read_text())
    highest_llama = max([*llama_ids["model"]["vocab"].values(), *(t["id"] for t in llama_ids["added_tokens"])])
    assert highest_llama < real["text_encoder"].config["vocab_size"]
    assert max(clip_vocab.values()) < real["text_encoder_2"].config["vocab_size"]
    # CLIP pools at argmax(input_ids) (legacy eos_token_id 2): eos must stay the highest id
    assert clip_vocab["<|endoftext|>"] == max(clip_vocab.values())


def test_full_size_set_is_complete_in_the_real_layout(shrunk_models):
    models, summary = shrunk_models
    assert layout.missing(models) == {}
    for name, dtype in SAFETENSORS_DTYPES.items():
        folder = layout.COMPONENTS[name].folder(models)
        for path in folder.glob("*.safetensors"):
            header = _file_header(path)
            assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {dtype}, path
            # the real checkpoints' keys carry the pre-v5 module prefixes (transformers 5 loads either)
            prefix = CHECKPOINT_PREFIXES.get(name, "")
            assert all(k.startswith(prefix) for k in header if k != "__metadata__"), path
    for name, index_name in (("text_encoder", "model.safetensors.index.json"),
                             ("transformer", "diffusion_pytorch_model.safetensors.index.json")):
        folder = layout.COMPONENTS[name].folder(models)
        index = json.loads((folder / index_name).read_text())
        total = 0
        for shard in sorted(set(index["weight_map"].values())):
            header = _file_header(folder / shard)
            assert {k for k, v in index["weight_map"].items() if v == shard} == set(header) - {"__metadata__"}
            total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
        assert index["metadata"]["total_size"] == total == summary["components"][name]["bytes"]


def test_full_size_files_load_unchanged_through_the_app_manager(shrunk_models):
    """Every model through ModelManager's own loaders (memory/loading.py); each weight in the files reaches the model
    (a key or prefix mismatch would leave it at random initialisation)."""
    models, _ = shrunk_models
    manager = cpu_manager(models, prompt_cache_dir=None)
    for entry, sources in LOADED_FROM.items():
        with manager.use(entry) as loaded:
            modules = {"text_encoders": lambda m: (m[2], m[3]), "image_encoder": lambda m: (m[1],)}.get(
                entry, lambda m: (m,))(loaded)
            for module, (folder_name, prefix) in zip(modules, sources):
                state = module.state_dict()
                folder = layout.COMPONENTS[folder_name].folder(models)
                checked = 0
                for path in folder.glob("*.safetensors"):
                    with safe_open(str(path), "pt") as f:
                        for key in f.keys():
                            tensor = f.get_tensor(key)
                            assert torch.equal(state[key.removeprefix(prefix)].to(tensor.dtype), tensor), key
                            checked += 1
                assert checked == len(state), (entry, folder_name)
    manager.free()


def test_only_writes_those_components_with_the_same_bytes(shrunk_models, tmp_path):
    models, _ = shrunk_models
    make_full_size_models(plan_writes(tmp_path, ("vae", "feature_extractor"), _shrink=SHRINK))
    assert set(layout.missing(tmp_path)) == set(layout.COMPONENTS) - {"vae", "feature_extractor"}
    vae = "hunyuanvideo-community/HunyuanVideo/vae/diffusion_pytorch_model.safetensors"
    assert (tmp_path / vae).read_bytes() == (models / vae).read_bytes()  # seeds do not depend on --only


def test_cli_prints_what_it_writes_then_refuses_a_small_disk(tmp_path, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(full_size.shutil, "disk_usage", lambda path: usage(100 * 10**9, 90 * 10**9, 10 * 10**9))

    def write(*args, **kwargs):
        raise AssertionError("began writing 25.7 GB with 10 GB free")

    monkeypatch.setattr(full_size, "_write_component", write)
    code = cli_main(["make-tiny-models", str(tmp_path / "models"), "--full-size", "--only", "transformer"])
    printed = capsys.readouterr()
    assert code == 2
    assert printed.out.startswith("full-size models: writing 25.7 GB") and "10.0 GB free" in printed.out
    assert printed.err.count("\n") == 1 and "not enough disk" in printed.err and "--only" in printed.err
    assert not (tmp_path / "models").exists()  # nothing written


def test_cli_counts_the_files_it_replaces_as_room(tmp_path, monkeypatch, capsys):
    """Writing the set again over itself needs no more room than the files it replaces free."""
    make_full_size_models(plan_writes(tmp_path, ("vae",), _shrink=SHRINK))
    vae_file = layout.COMPONENTS["vae"].folder(tmp_path) / "diffusion_pytorch_model.safetensors"
    plan = plan_writes(tmp_path, ("vae",), _shrink=SHRINK)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(full_size.shutil, "disk_usage", lambda path: usage(10**12, 10**12, 0))
    replanned = plan_writes(tmp_path, ("vae",), _shrink=SHRINK)
    assert replanned.free_bytes == vae_file.stat().st_size >= plan.total_bytes
    replanned.check_room()  # no error


@pytest.mark.parametrize("args, words", [
    (["--full-size", "--only", "transformer,bogus"], "--only takes component names"),
    (["--full-size", "--transformer-mb", "5"], "exclude each other"),
    (["--only", "vae"], "go with --full-size"),
    (["--device", "cuda"], "go with --full-size"),
])
def test_cli_full_size_bad_options_are_one_line(tmp_path, capsys, args, words):
    assert cli_main(["make-tiny-models", str(tmp_path / "m"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err


def test_cli_full_size_on_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = cli_main(["make-tiny-models", str(tmp_path / "m"), "--full-size", "--only", "vae", "--device", "cuda"])
    assert code == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "m" / layout.HUNYUAN_REPO / "vae").exists()
