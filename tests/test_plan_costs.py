"""The plan's cost model (memory/plan/costs.py) on small hand-made weights, against figures worked out by hand from
its definitions: what each placement holds, the activations of each phase, and each phase's total. The machine
tables in test_memory_plan.py check the choices these costs lead to; a wrong cost that leaves every choice the same
passes them, and is caught here."""
from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from framepack_ui.errors import MemoryPlanError
from framepack_ui.memory.plan import host_share
from framepack_ui.memory.plan.budgets import COMMIT_MARGIN_BYTES, RAM_RESERVE_BYTES
from framepack_ui.memory.plan.catalogue import fp8_weights, storage_dtype
from framepack_ui.memory.plan.costs import (decode_activations, decode_seconds, entry_weights, frames_on_host,
                                            lora_beside_bytes,
                                            lora_bytes, phase_costs, place, runtime_baseline, sampling_activations,
                                            sampling_tokens, text_activations, tile_table, with_lora,
                                            with_pinned_sources)
from framepack_ui.memory.plan.explain import gb_text
from framepack_ui.memory.plan.measured import (VAE_DECODE_REF_PIXELS, VAE_DECODE_REF_UNTILED_BYTES,
                                               VAE_DECODE_SECONDS, VAE_DECODE_SECONDS_COMPILED,
                                               VAE_TILE_DECODE_BYTES, VAE_TILE_DECODE_BYTES_COMPILED)
from framepack_ui.memory.plan.types import ComponentPlan, LoraCost, PhaseCost
from framepack_ui.memory.plan.vocabulary import Storage, Where
from framepack_ui.memory.probe import ComponentWeights, Machine
from framepack_ui.units import GB, MB

# A transformer of four blocks (300 + 200 + 100 + 100 bytes) and 300 bytes outside them, 500 bf16 parameters.
TRANSFORMER = ComponentWeights("transformer", file_bytes=1000, params=500, storage_itemsize=2,
                               largest_tensor_bytes=40, block_bytes=(300, 200, 100, 100), hidden_size=64, dtype="BF16")
VAE = ComponentWeights("vae", file_bytes=80, params=20, storage_itemsize=4, largest_tensor_bytes=8, hidden_size=8,
                       dtype="F32")


# --- placements ----------------------------------------------------------------------------------------------------

def test_a_mappable_model_on_the_gpu_is_read_from_the_map_straight_into_vram():
    assert place("transformer", TRANSFORMER, Where.GPU) == ComponentPlan(
        "transformer", Where.GPU, Storage.MAP, "bfloat16", "bfloat16", True, 0, 0, 1000, 0,
        load_ram_bytes=0, load_commit_bytes=0, file_bytes=1000)


def test_fp8_weights_stay_fp8_in_vram():
    fp8 = replace(TRANSFORMER, file_bytes=600, storage_itemsize=1, dtype="F8_E4M3")
    plan = place("transformer", fp8, Where.GPU, note="why")
    assert (plan.storage_dtype, plan.compute_dtype, plan.vram_bytes, plan.note) == (
        "float8_e4m3fn", "bfloat16", 600, "why")


def test_a_model_the_library_loads_passes_through_ram_on_its_way_to_the_gpu():
    # 20 params in float16 on the GPU: 40 bytes of VRAM; loading holds that copy in RAM and commits it beside the
    # 80-byte file's copy-on-write map
    assert place("vae", VAE, Where.GPU, vae_tiling=True, note="tiles") == ComponentPlan(
        "vae", Where.GPU, Storage.RAM, "float32", "float16", True, 0, 0, 40, 0,
        load_ram_bytes=40, load_commit_bytes=120, file_bytes=80, vae_tiling=True, note="tiles")
    assert place("image_encoder", replace(VAE, name="image_encoder"), Where.GPU).keep is False


def test_a_streamed_transformer_holds_its_resident_blocks_two_spare_slots_and_two_pinned_staging_buffers():
    # 1 resident block (300); the other three (400) streamed; the largest streamed block (200) sizes two VRAM
    # slots and two pinned buffers; the 300 bytes outside the blocks always resident (and all that stays parked)
    assert place("transformer", TRANSFORMER, Where.GPU_STREAMED, resident_blocks=1) == ComponentPlan(
        "transformer", Where.GPU_STREAMED, Storage.MAP, "bfloat16", "bfloat16", True, 400, 400, 300 + 300 + 400, 400,
        resident_blocks=1, total_blocks=4, file_bytes=1000, note=f"{gb_text(400)} streamed from the file map per step",
        parked_vram_bytes=300)


@pytest.mark.parametrize("asked, resident", [(None, 4), (4, 4), (9, 4), (0, 0), (-2, 0), (2, 2)])
def test_the_resident_block_count_is_clamped_to_the_model(asked, resident):
    plan = place("transformer", TRANSFORMER, Where.GPU_STREAMED, resident_blocks=asked, note="n")
    largest_streamed = max(TRANSFORMER.block_bytes[resident:], default=0)
    assert (plan.resident_blocks, plan.total_blocks, plan.note) == (resident, 4, "n")
    assert plan.page_cache_bytes == sum(TRANSFORMER.block_bytes[resident:])
    assert plan.vram_bytes == 300 + sum(TRANSFORMER.block_bytes[:resident]) + 2 * largest_streamed
    assert plan.ram_bytes == plan.commit_bytes == 2 * largest_streamed


def test_on_the_cpu_a_model_is_a_float32_copy_in_ram():
    assert place("vae", VAE, Where.CPU, vae_tiling=True, note="cpu") == ComponentPlan(
        "vae", Where.CPU, Storage.RAM, "float32", "float32", True, 80, 80, 0, 0, load_commit_bytes=80,
        file_bytes=80, vae_tiling=True, note="cpu")


def test_computed_from_the_map_a_model_holds_two_float32_copies_of_its_largest_tensor():
    # largest tensor 40 bytes in bf16 = 20 elements = 80 bytes in float32, two copies
    assert place("transformer", TRANSFORMER, Where.MMAP) == ComponentPlan(
        "transformer", Where.MMAP, Storage.MAP, "bfloat16", "float32", True, 160, 160, 0, 1000, file_bytes=1000,
        note="read-only file map, CPU")
    assert place("transformer", replace(TRANSFORMER, storage_itemsize=0), Where.MMAP, note="x").ram_bytes == 320
    assert type(place("transformer", TRANSFORMER, Where.MMAP).ram_bytes) is int  # whole bytes
    with pytest.raises(MemoryPlanError, match="^vae cannot be computed from the file map "
                                              r"\(only text_encoders, transformer\)$"):
        place("vae", VAE, Where.MMAP)
    with pytest.raises(ValueError, match="unknown placement"):
        place("vae", VAE, "disk")


def test_pinned_sources_move_the_streamed_blocks_from_the_page_cache_to_page_locked_ram():
    streamed = place("transformer", TRANSFORMER, Where.GPU_STREAMED, resident_blocks=1)
    pinned = with_pinned_sources(streamed, TRANSFORMER)
    assert pinned == replace(streamed, ram_bytes=400, commit_bytes=400, page_cache_bytes=0, pinned_sources=True,
                             note=f"{gb_text(400)} streamed per step from page-locked RAM")
    # parked resident blocks come back from the map after the decode (placement adds them to the page cache);
    # pinned, they come back from page-locked RAM instead
    parked = replace(streamed, park_for_decode=True, page_cache_bytes=400 + 300)
    assert with_pinned_sources(parked, TRANSFORMER) == replace(
        parked, ram_bytes=700, commit_bytes=700, page_cache_bytes=0, pinned_sources=True,
        note=f"{gb_text(400)} streamed per step from page-locked RAM")


def test_loras_cost_their_matrices_and_one_merged_layer_on_the_device_the_transformer_computes_on():
    assert lora_bytes(None, 2) == 0
    assert lora_bytes(LoraCost(params=10, largest_layer_params=5, layers=3), 4) == 60
    # a sampling step adding the widest layer's update beside its output (tokens x out) needs what that is beyond
    # the merged layer lora_bytes counts, and nothing where merging is the larger
    cost = LoraCost(params=10, largest_layer_params=12, layers=3, largest_out_features=4)
    assert lora_beside_bytes(None, 2, tokens=4) == 0
    assert lora_beside_bytes(cost, 2, tokens=2) == 0
    assert lora_beside_bytes(cost, 2, tokens=5) == (20 - 12) * 2
    on_gpu = place("transformer", TRANSFORMER, Where.GPU_STREAMED, resident_blocks=1)
    assert with_lora(on_gpu, 0) is on_gpu
    assert with_lora(on_gpu, 7) == replace(on_gpu, vram_bytes=1007, parked_vram_bytes=307, lora_bytes=7)
    on_cpu = place("transformer", TRANSFORMER, Where.MMAP)
    assert with_lora(on_cpu, 7) == replace(on_cpu, ram_bytes=167, commit_bytes=167, lora_bytes=7)


def test_the_text_encoders_entry_sums_both_encoders():
    llama = ComponentWeights("text_encoder", 100, 50, 2, 30, hidden_size=16, heads=2)
    clip = ComponentWeights("text_encoder_2", 10, 5, 2, 40, hidden_size=4)
    weights = {"text_encoder": llama, "text_encoder_2": clip, "vae": VAE}
    assert entry_weights("text_encoders", weights) == ComponentWeights(
        "text_encoders", 110, 55, 2, 40, hidden_size=16, heads=2)
    assert entry_weights("vae", weights) is VAE


# --- activations ---------------------------------------------------------------------------------------------------

def test_a_transformer_call_sees_eleven_latent_frames_the_history_the_prompt_and_the_image():
    # at 640 px: 1600 tokens per latent frame x (9 new + 2 clean) + 2 x 400 history tokens + 256 prompt + 729 image
    assert sampling_tokens(640) == 17600 + 800 + 256 + 729
    assert sampling_tokens(320, image_tokens=10) == 4400 + 200 + 256 + 10
    assert sampling_tokens(100) == int(100 * 100 / 256 * 11 + 2 * 100 * 100 / 1024) + 256 + 729


def test_sampling_activations_are_sixteen_hidden_states_per_token():
    image = ComponentWeights("image_encoder", 1, 1, 2, 1, tokens=10)
    tokens = 4400 + 200 + 256 + 10
    assert sampling_activations(TRANSFORMER, image, 320, 2) == tokens * 64 * 2 * 16
    # a model without a recorded width or token count: the real model's (3072 wide, 729 image tokens)
    unknown = replace(TRANSFORMER, hidden_size=0)
    assert sampling_activations(unknown, replace(image, tokens=0), 320, 4) == (4400 + 200 + 256 + 729) * 3072 * 4 * 16


def test_the_text_encoder_returns_every_hidden_state():
    te = ComponentWeights("text_encoders", 1, 1, 2, 1, hidden_size=16)
    assert text_activations(te, 2) == 40 * 351 * 16 * 2
    assert text_activations(replace(te, hidden_size=0), 4) == 40 * 351 * 4096 * 4


def test_the_vae_decode_scales_the_measured_figure_by_pixels_width_and_dtype():
    real = replace(VAE, hidden_size=128)
    untiled = VAE_DECODE_REF_UNTILED_BYTES * 69 * 640 * 640 / VAE_DECODE_REF_PIXELS
    assert decode_activations(real, 640, None, 2) == pytest.approx(untiled, rel=1e-12, abs=1)
    # a VAE 16x narrower in float32: 1/16 x 2
    assert decode_activations(VAE, 640, None, 4) == pytest.approx(untiled / 8, rel=1e-12, abs=1)
    assert decode_activations(replace(VAE, hidden_size=0), 640, None, 2) == decode_activations(real, 640, None, 2)
    # the compiled decoder peaks lower, untiled and in tiles
    regional = 0.65 * 1.09  # the whole graph's ratio, and region by region's 9 % over it
    assert decode_activations(real, 640, None, 2, compiled=True) == pytest.approx(untiled * regional, rel=1e-12, abs=1)
    assert decode_activations(real, 640, 256, 2) == VAE_TILE_DECODE_BYTES[256]
    assert decode_activations(real, 640, 256, 2, compiled=True) == VAE_TILE_DECODE_BYTES_COMPILED[256]
    # a picture smaller than a tile costs its untiled decode
    small = VAE_DECODE_REF_UNTILED_BYTES * 69 * 64 * 64 / VAE_DECODE_REF_PIXELS
    assert small < VAE_TILE_DECODE_BYTES[256]
    assert decode_activations(real, 64, 256, 2) == pytest.approx(small, rel=1e-12, abs=1)


def test_tile_tables_and_decode_seconds_follow_the_compiled_choice():
    assert tile_table(False) is VAE_TILE_DECODE_BYTES and tile_table(True) is VAE_TILE_DECODE_BYTES_COMPILED

    def seconds(tiling, tile_px, compiled):
        vae = SimpleNamespace(vae_tiling=tiling, vae_tile_px=tile_px, compile=compiled)
        return decode_seconds(SimpleNamespace(components={"vae": vae}))

    assert seconds(False, 256, False) == VAE_DECODE_SECONDS[None]
    assert seconds(True, 256, False) == VAE_DECODE_SECONDS[256]
    assert seconds(True, 448, True) == VAE_DECODE_SECONDS_COMPILED[448]
    assert seconds(False, 448, True) == VAE_DECODE_SECONDS_COMPILED[None]


def test_the_runtime_baseline_adds_cudas_host_state_only_where_the_plan_uses_the_gpu():
    assert runtime_baseline(False) == (300 * MB, 430 * MB)
    assert runtime_baseline(True) == (300 * MB + 1600 * MB, 430 * MB + 1600 * MB)


def test_sampling_and_decoding_hold_decoded_frames_on_the_host():
    """The writer's 33 held frames, a later section's 69 decoded ones and the cross-fade's two temporaries of 32
    (float32 RGB), in both phases: the writer encodes a section while the next one samples. Charged to RAM and
    commit of those two phases only, wherever the VAE decodes."""
    frame = 3 * 640 * 640 * 4
    assert frames_on_host(640) == {"sampling": (33 + 69 + 64) * frame, "decode": (33 + 69 + 64) * frame}
    plans = {
        "text_encoders": entry("text_encoders", Where.MMAP, 1, 2, 0, 8, 16, 32),
        "image_encoder": entry("image_encoder", Where.GPU, 0, 0, 64, 0, 0, 0),
        "vae": entry("vae", Where.GPU, 0, 0, 128, 0, 0, 0),
        "transformer": entry("transformer", Where.GPU, 0, 0, 1 << 20, 0, 0, 0),
    }
    plain = phase_costs(plans, 0, 0, 0, 0, 0, 0)
    held = phase_costs(plans, 0, 0, 0, 0, 0, 0, {"sampling": 1000, "decode": 5000})
    for before, after in zip(plain, held):
        extra = {"sampling": 1000, "decode": 5000}.get(before.phase, 0)
        assert (after.ram_bytes - before.ram_bytes, after.commit_bytes - before.commit_bytes) == (extra, extra)
        assert after.frames_ram_bytes == extra and after.vram_bytes == before.vram_bytes


# --- phases --------------------------------------------------------------------------------------------------------

def entry(name, where, ram, commit, vram, cache, load_ram, load_commit, parked=0, park=False):
    return ComponentPlan(name, where, Storage.MAP, "bfloat16", "bfloat16", True, ram, commit, vram, cache,
                         load_ram_bytes=load_ram, load_commit_bytes=load_commit, parked_vram_bytes=parked,
                         park_for_decode=park)


def test_each_phase_totals_its_entries_the_one_loading_and_its_activations_on_the_gpu():
    # each figure a different power of two, so any wrong term changes the sum
    plans = {
        "text_encoders": entry("text_encoders", Where.GPU, 1, 2, 4, 8, 16, 32),
        "image_encoder": entry("image_encoder", Where.GPU, 64, 128, 256, 512, 1024, 2048),
        "vae": entry("vae", Where.GPU, 4096, 8192, 16384, 32768, 65536, 131072),
        "transformer": entry("transformer", Where.GPU_STREAMED, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22,
                             1 << 23, parked=1 << 24, park=True),
    }
    base_ram, base_commit, cpu_act, gpu_act, text_act, decode_act = 1 << 25, 1 << 26, 1 << 27, 1 << 28, 1 << 29, 1 << 30
    text, image, sampling, decode = phase_costs(plans, base_ram, base_commit, cpu_act, gpu_act, text_act, decode_act)
    assert text == PhaseCost("text", ("text_encoders",), base_ram + 1 + 16, base_commit + 2 + 32, 4 + text_act, 8,
                             0, text_act)
    # two entries load in the image phase: the larger load counts, once
    assert image == PhaseCost("image", ("image_encoder", "vae"), base_ram + 64 + 4096 + 65536,
                              base_commit + 128 + 8192 + 131072, 256 + 16384, 512 + 32768, 0, 0)
    # the VAE loaded in the image phase: only the transformer loads now
    assert sampling == PhaseCost("sampling", ("vae", "transformer"), base_ram + 4096 + (1 << 18) + (1 << 22) + cpu_act,
                                 base_commit + 8192 + (1 << 19) + (1 << 23) + cpu_act,
                                 16384 + (1 << 20) + gpu_act, 32768 + (1 << 21), cpu_act, gpu_act)
    # nothing loads while decoding; the transformer holds only its parked VRAM
    assert decode == PhaseCost("decode", ("vae", "transformer"), base_ram + 4096 + (1 << 18),
                               base_commit + 8192 + (1 << 19), 16384 + (1 << 24) + decode_act, 32768 + (1 << 21),
                               0, decode_act)


def test_activations_of_encoders_and_decoder_on_the_cpu_are_ram_and_commit():
    plans = {
        "text_encoders": entry("text_encoders", Where.MMAP, 1, 2, 0, 8, 16, 32),
        "image_encoder": entry("image_encoder", Where.CPU, 64, 128, 0, 0, 1024, 2048),
        "vae": entry("vae", Where.CPU, 4096, 8192, 0, 0, 65536, 131072),
        "transformer": entry("transformer", Where.GPU, 0, 0, 1 << 20, 0, 0, 0, parked=1 << 24, park=False),
    }
    text, image, sampling, decode = phase_costs(plans, 0, 0, 0, 0, 1 << 29, 1 << 30)
    assert (text.ram_bytes, text.commit_bytes, text.vram_bytes) == (1 + 16 + (1 << 29), 2 + 32 + (1 << 29), 0)
    assert (text.activation_ram_bytes, text.activation_vram_bytes) == (1 << 29, 0)
    # a transformer that does not park holds all its VRAM while the VAE decodes
    assert (decode.ram_bytes, decode.commit_bytes, decode.vram_bytes) == (
        4096 + (1 << 30), 8192 + (1 << 30), 1 << 20)
    assert (decode.activation_ram_bytes, decode.activation_vram_bytes) == (1 << 30, 0)


# --- the fp8 weights and a worker's share of the host ----------------------------------------------------------------

def test_fp8_weights_halve_the_blocks_and_keep_the_rest():
    # blocks of 301 and 201 bf16 bytes: 150 and 100 bytes of e4m3 (a part-element rounds down); 498 bytes outside them
    t = replace(TRANSFORMER, file_bytes=1000, block_bytes=(301, 201), largest_tensor_bytes=41)
    assert fp8_weights(t) == replace(t, file_bytes=498 + 250, storage_itemsize=1, dtype="F8_E4M3",
                                     block_bytes=(150, 100), largest_tensor_bytes=20)
    assert all(isinstance(b, int) for b in fp8_weights(t).block_bytes)
    stored = replace(t, storage_itemsize=1, dtype="")  # already one byte an element: as it is
    assert fp8_weights(stored) is stored


HOST = Machine(ram_total_bytes=RAM_RESERVE_BYTES + 10, ram_available_bytes=11, swap_total_bytes=13, swap_free_bytes=7,
               commit_limit_bytes=100, commit_available_bytes=COMMIT_MARGIN_BYTES + 10, vram_total_bytes=5,
               vram_free_bytes=4, description="a host")


def test_a_workers_share_divides_what_is_above_the_reserves_in_whole_bytes():
    share = host_share(HOST, 3)
    assert share == replace(HOST, ram_total_bytes=RAM_RESERVE_BYTES + 3, ram_available_bytes=3, swap_total_bytes=4,
                            swap_free_bytes=2, commit_limit_bytes=33, commit_available_bytes=COMMIT_MARGIN_BYTES + 3,
                            description="a host, one of 3 workers' shares of its RAM and commit")
    assert all(isinstance(getattr(share, name), int) for name in (
        "ram_total_bytes", "ram_available_bytes", "swap_total_bytes", "swap_free_bytes", "commit_limit_bytes",
        "commit_available_bytes"))
    assert host_share(HOST, 1) is HOST


def test_a_share_of_commit_at_or_below_the_margin_is_what_the_host_has():
    # one byte above the margin, three workers: each gets the margin and no byte more
    assert host_share(replace(HOST, commit_available_bytes=COMMIT_MARGIN_BYTES + 1), 3).commit_available_bytes == (
        COMMIT_MARGIN_BYTES)
    below = replace(HOST, commit_available_bytes=COMMIT_MARGIN_BYTES - 10)
    assert host_share(below, 3).commit_available_bytes == COMMIT_MARGIN_BYTES - 10
    unknown = host_share(replace(HOST, commit_limit_bytes=None, commit_available_bytes=None, swap_free_bytes=None), 2)
    assert (unknown.commit_limit_bytes, unknown.commit_available_bytes, unknown.swap_free_bytes) == (None, None, 0)


def test_a_share_needs_a_worker():
    with pytest.raises(ValueError, match="^workers must be at least 1$"):
        host_share(HOST, 0)


def test_the_real_models_as_the_plan_knows_them_before_a_download():
    """real_weights() against the models' published configs (shared/reference/framepack-f1.md): each largest tensor
    and block worked out from the layer shapes, the dtypes as shipped, the file sizes from weights/layout.py."""
    from framepack_ui.memory.plan import real_weights
    from framepack_ui.weights.layout import COMPONENTS

    size = {name: COMPONENTS[name].approx_bytes for name in COMPONENTS}
    # Llama-3-8B in fp16: 32 layers of q, o (4096 x 4096), k, v (4096 x 1024: 8 KV heads of 128), gate, up, down
    # (4096 x 14336) and two norms; the largest tensor off the embedding table is an MLP matrix
    llama_layer = 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096)
    # the F1 transformer in bf16: 20 dual-stream blocks of ~340 M parameters and 40 single-stream ones of ~141.5 M
    # (from the block shapes at width 3072); the largest tensor a single block's output projection (3072 + 4 x 3072
    # in, 3072 out)
    transformer_blocks = (2 * 340_000_000,) * 20 + (2 * 141_500_000,) * 40
    assert real_weights() == {
        "text_encoder": ComponentWeights("text_encoder", size["text_encoder"], size["text_encoder"] // 2, 2,
                                         2 * 4096 * 14336, block_bytes=(llama_layer,) * 32, hidden_size=4096,
                                         heads=32, on_disk=False),
        # CLIP-L's text model in fp16: width 768, 12 heads, MLP 768 x 3072
        "text_encoder_2": ComponentWeights("text_encoder_2", size["text_encoder_2"], size["text_encoder_2"] // 2, 2,
                                           2 * 768 * 3072, hidden_size=768, heads=12, on_disk=False),
        # SigLIP so400m in fp16: width 1152, 16 heads, MLP 1152 x 4304, 729 tokens an image
        "image_encoder": ComponentWeights("image_encoder", size["image_encoder"], size["image_encoder"] // 2, 2,
                                          2 * 1152 * 4304, hidden_size=1152, heads=16, tokens=729, on_disk=False),
        # HunyuanVideo's VAE in float32: its largest tensor a 512 -> 512 3x3x3 convolution; decoder top width 128
        "vae": ComponentWeights("vae", size["vae"], size["vae"] // 4, 4, 4 * 512 * 512 * 27, hidden_size=128,
                                on_disk=False),
        "transformer": ComponentWeights("transformer", size["transformer"], size["transformer"] // 2, 2,
                                        2 * 3072 * (3072 + 4 * 3072), block_bytes=transformer_blocks, hidden_size=3072,
                                        heads=24, on_disk=False),
    }
    assert all(type(w.params) is int for w in real_weights().values())
    assert 0.96 < sum(transformer_blocks) / size["transformer"] < 0.98  # the blocks are ~97 % of the 25.7 GB
    assert 0.85 < 32 * llama_layer / size["text_encoder"] < 0.95  # the rest: the 128k-token embedding and head


@pytest.mark.parametrize("entry, dtype, itemsize, stored", [
    ("transformer", "BF16", 2, "bfloat16"), ("vae", "F16", 2, "float16"), ("vae", "F32", 4, "float32"),
    ("transformer", "F8_E4M3", 1, "float8_e4m3fn"), ("image_encoder", "F16", 2, "float16"),  # the header wins
    # no dtype in the header (weights not on disk yet): guessed from the item size, bf16 for the transformer and
    # SigLIP as shipped, fp16 for the others
    ("transformer", "", 2, "bfloat16"), ("image_encoder", "", 2, "bfloat16"), ("text_encoders", "", 2, "float16"),
    ("vae", "", 2, "float16"), ("transformer", "", 1, "float8_e4m3fn"), ("vae", "", 4, "float32"),
    ("transformer", "", 3, "bfloat16"), ("transformer", "I64", 8, "bfloat16"),
])
def test_the_storage_dtype_is_the_headers_else_guessed_from_the_item_size(entry, dtype, itemsize, stored):
    weights = replace(VAE, dtype=dtype, storage_itemsize=itemsize)
    assert storage_dtype(entry, weights) == stored
    if entry == "transformer":
        assert place(entry, weights, Where.GPU).storage_dtype == stored
