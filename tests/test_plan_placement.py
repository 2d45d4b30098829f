"""The placement rules (memory/plan/placement.py) at their edges: each boundary met exactly (and missed by a byte),
each refusal's whole message, each note's whole text. The machine tables in test_memory_plan.py check the choices on
real machines, whose figures sit far from every line; a rule off by a byte, a flipped comparison or a garbled
message leaves those choices the same, and is caught here.

Most tests use a small hand-made model set whose sizes are round numbers of GB, on a machine whose VRAM budget
(what is free less the CUDA margin) is set to the byte; where the activations matter they are fixed by hand too, so
each room the rules compare comes out exact. The real weights serve where the rule reads them as they are."""
from __future__ import annotations

import re
from dataclasses import replace

import pytest

from framepack_ui.errors import MemoryPlanError
from framepack_ui.memory.plan import (PIN_HEADROOM_BYTES, RAM_RESERVE_BYTES, LoraCost, PlanOverrides, fp8_weights,
                                      make_plan, placement, real_weights)
from framepack_ui.memory.plan.budgets import (COMMIT_MARGIN_BYTES, FP8_CONVERSION_MARGIN_BYTES, VRAM_MARGIN_BYTES,
                                              DoesNotFit, page_cache_room)
from framepack_ui.memory.plan.costs import decode_activations, place, sampling_activations
from framepack_ui.memory.plan.explain import gb_text
from framepack_ui.memory.plan.vocabulary import Storage, Where
from framepack_ui.memory.probe import ComponentWeights, Machine
from framepack_ui.units import GB, MB

REAL = real_weights()

# --- a small model set, in round GB -----------------------------------------------------------------------------------
# The transformer: four blocks of 3, 2, 1, 1 GB and 3 GB outside them; 5 G bf16 parameters (10 GB resident). Streamed
# with n blocks resident it holds the 3 GB outside them, the resident blocks and two slots of the largest streamed one:
#   n = 0: 3 + 0 + 2x3 = 9 GB;  n = 1: 3 + 3 + 2x2 = 10;  n = 2: 3 + 5 + 2x1 = 10;  n = 3: 3 + 6 + 2x1 = 11;  n = 4: 10
TRANSFORMER = ComponentWeights("transformer", file_bytes=10 * GB, params=5 * GB, storage_itemsize=2,
                               largest_tensor_bytes=100 * MB, block_bytes=(3 * GB, 2 * GB, GB, GB), hidden_size=64,
                               dtype="BF16")
# The VAE: 0.25 G float32 parameters, 0.5 GB in float16 on the GPU; 16x narrower than the real one (small decodes)
VAE = ComponentWeights("vae", file_bytes=GB, params=GB // 4, storage_itemsize=4, largest_tensor_bytes=10 * MB,
                       hidden_size=8, dtype="F32")
IMAGE_ENCODER = ComponentWeights("image_encoder", file_bytes=400 * MB, params=200 * MB, storage_itemsize=2,
                                 largest_tensor_bytes=10 * MB, hidden_size=32, tokens=729, dtype="BF16")
# The text encoders: four layers of 5 GB and 10 GB outside them, plus a 2 GB second encoder: 32 GB on the GPU, and
# streamed with n layers resident 12 GB + the resident layers + two 5 GB slots:
#   n = 0: 22 GB;  n = 1: 27;  n = 2: 32;  n = 3: 37;  n = 4: 32 (nothing streamed)
TEXT_ENCODER = ComponentWeights("text_encoder", file_bytes=30 * GB, params=15 * GB, storage_itemsize=2,
                                largest_tensor_bytes=GB, block_bytes=(5 * GB,) * 4, hidden_size=16, dtype="BF16")
TEXT_ENCODER_2 = ComponentWeights("text_encoder_2", file_bytes=2 * GB, params=GB, storage_itemsize=2,
                                  largest_tensor_bytes=100 * MB, hidden_size=4, dtype="F16")
SMALL = {"transformer": TRANSFORMER, "vae": VAE, "image_encoder": IMAGE_ENCODER, "text_encoder": TEXT_ENCODER,
         "text_encoder_2": TEXT_ENCODER_2}
TEXT_ACT = 40 * 351 * 16 * 2  # every hidden state of 351 tokens, 16 wide, in float16 (costs.text_activations)
LORA = LoraCost(params=90 * MB, largest_layer_params=10 * MB, layers=4)  # 100 M elements: 200 MB in bf16, 400 in fp32


def gpu_machine(vram_budget: int, ram_budget: int = 200 * GB, **changes) -> Machine:
    """A machine whose plan may use exactly `vram_budget` bytes of VRAM and `ram_budget` of RAM."""
    return Machine(ram_total_bytes=ram_budget + RAM_RESERVE_BYTES, ram_available_bytes=ram_budget,
                   vram_total_bytes=vram_budget + VRAM_MARGIN_BYTES, vram_free_bytes=vram_budget + VRAM_MARGIN_BYTES,
                   gpu_name="test GPU", **changes)


def cpu_machine(ram_budget: int, **changes) -> Machine:
    return Machine(ram_total_bytes=ram_budget + RAM_RESERVE_BYTES, ram_available_bytes=ram_budget, **changes)


@pytest.fixture
def activations(monkeypatch):
    """Fixes the sampling activations and the VAE decode (untiled, or per tile: `tiles`) at the sizes given, so the
    transformer's rooms come out in round numbers."""
    def fix(sampling: int, untiled: int, tiles: dict[int, int] | None = None):
        monkeypatch.setattr(placement, "sampling_activations", lambda *args, **kwargs: sampling)
        monkeypatch.setattr(placement, "decode_activations",
                            lambda vae, resolution, tile_px, itemsize, compiled=False:
                            untiled if tile_px is None else min(untiled, tiles[tile_px]))
    return fix


def small_plan(vram_budget: int, **overrides):
    """The small model set on a GPU, bf16 (no storage choice), streamed blocks not pinned unless asked."""
    return make_plan(gpu_machine(vram_budget), SMALL, PlanOverrides(**{"fp8": False, "pin_streamed": False,
                                                                       **overrides}))


def message(exc_info) -> str:
    return str(exc_info.value)


# --- overrides that cannot be honoured: refused whatever the machine, in one line -------------------------------------

def test_fp8_matmuls_without_fp8_storage_are_refused_whatever_the_fit():
    hopper = replace(Machine.supposed(128, 80), cuda_capability=(9, 0))
    expected = "--fp8-matmul needs the transformer stored as fp8 (add --fp8)"
    for fp8 in (None, False):  # unforced storage is refused before any plan is made; bf16 once its plan is
        with pytest.raises(MemoryPlanError) as refused:
            make_plan(hopper, REAL, PlanOverrides(fp8=fp8, fp8_matmul=True))
        assert message(refused) == expected


def test_fp8_matmuls_with_fp8_storage_on_an_fp8_capable_gpu_are_planned_and_the_fp8_note_gives_the_cache_size():
    plan = make_plan(replace(Machine.supposed(128, 80), cuda_capability=(9, 0)), REAL,
                     PlanOverrides(fp8=True, fp8_matmul=True))
    t = plan.components["transformer"]
    assert (t.storage, t.fp8_matmul) == (Storage.FP8, True)
    on_disk = gb_text(fp8_weights(REAL["transformer"]).file_bytes)
    assert plan.notes[0] == (f"fp8: the transformer blocks' Linear weights as e4m3fn with per-channel scales "
                             f"({on_disk} on disk), converted once from the bf16 shards into the fp8/ cache "
                             f"(needs that much free disk the first time)")


@pytest.mark.parametrize("overrides, machine, expected", [
    (PlanOverrides(plan="disk"), Machine.supposed(64, 24),
     "--plan must be one of auto, gpu, streamed, mmap, cpu, not 'disk'"),
    (PlanOverrides(plan="cpu", fp8=True), Machine.supposed(128, 0),
     "--fp8 needs the read-only file map (--plan auto, gpu, streamed or mmap), not --plan cpu"),
    (PlanOverrides(plan="gpu"), Machine.supposed(128, 0),
     "--plan gpu needs a CUDA GPU, and none was found (use --plan mmap or auto)"),
    (PlanOverrides(plan="streamed"), Machine.supposed(128, 0),
     "--plan streamed needs a CUDA GPU, and none was found (use --plan mmap or auto)"),
    (PlanOverrides(attention="fast"), Machine.supposed(64, 24),
     "--attention must be one of native, _native_cudnn, _native_flash, _native_efficient, sage1, cudnn_fp8, "
     "not 'fast'"),
    (PlanOverrides(attention="sage1"), Machine.supposed(64, 0),
     "--attention sage1 needs the transformer on a CUDA GPU"),
    (PlanOverrides(attention="sage1"), replace(Machine.supposed(64, 24), cuda_capability=(7, 5)),
     "--attention sage1 needs a GPU of compute capability 8.0 or later"),
])
def test_an_override_that_cannot_be_honoured_is_refused_in_one_exact_line(overrides, machine, expected):
    with pytest.raises(MemoryPlanError) as refused:
        make_plan(machine, REAL, overrides)
    assert message(refused) == expected


# --- --plan cpu and mmap: the GPU left unused -------------------------------------------------------------------------

def test_plan_cpu_copies_every_model_into_ram_even_on_a_machine_with_a_gpu():
    plan = make_plan(Machine.supposed(128, 80), REAL, PlanOverrides(plan="cpu"))
    assert plan.device == "cpu"
    assert {name: c.where for name, c in plan.components.items()} == {
        "text_encoders": Where.CPU, "image_encoder": Where.CPU, "vae": Where.CPU, "transformer": Where.CPU}


def test_plan_cpu_that_does_not_fit_is_refused_with_its_shortfall_not_turned_to_fp8():
    # 13 G float32 parameters alone are 51 GB: nothing fits the 12 GB budget, and fp8 is read from its map only
    with pytest.raises(DoesNotFit) as refused:
        make_plan(Machine.supposed(16, 8), REAL, PlanOverrides(plan="cpu"))
    assert re.fullmatch(r"no plan fits: the \w+ phase needs [\d.]+G of RAM and 12\.0G can be used \(total minus 4 GB "
                        r"for the system, or what is free now\): [\d.]+ GB short; close other programs, add RAM, or "
                        r"lower --resolution", message(refused)), message(refused)


@pytest.mark.parametrize("plan, ram_gb", [("mmap", 12), ("cpu", 63)])
def test_a_plan_on_the_cpu_never_compiles_the_vae_decoder_even_where_only_the_compiled_one_would_fit(plan, ram_gb):
    # On the CPU the tiled decode in float32 takes 8.14 GB eager and 5.40 GB compiled: with 8 GB (mmap: the
    # transformer computed from its map) or 59 GB (cpu: its 51 GB float32 copy) to use, only a compiled decoder
    # would fit, and the plan compiles it only for the GPU (the compile is Triton's GPU code): refused.
    machine = replace(Machine.supposed(ram_gb, 8), compile_supported=True)
    with pytest.raises(DoesNotFit) as refused:
        make_plan(machine, REAL, PlanOverrides(plan=plan))
    assert message(refused).startswith("no plan fits: the decode phase needs ")


def test_on_the_cpu_the_sampling_activations_are_float32_in_ram_and_none_in_vram():
    plan = make_plan(Machine.supposed(128, 0), REAL)
    sampling = sampling_activations(REAL["transformer"], REAL["image_encoder"], 640, itemsize=4)
    assert (plan.phase("sampling").activation_ram_bytes, plan.phase("sampling").activation_vram_bytes) == (sampling, 0)


# --- what the plan computes on the GPU: activations in the compute dtype ----------------------------------------------

def test_on_the_gpu_the_text_activations_are_float16_and_the_untiled_decode_costs_the_untiled_figure():
    plan = make_plan(Machine.supposed(128, 80), REAL)
    assert plan.phase("text").activation_vram_bytes == 40 * 351 * 4096 * 2
    assert plan.phase("decode").activation_vram_bytes == decode_activations(REAL["vae"], 640, None, 2)


@pytest.mark.parametrize("compile_supported", [False, True])
def test_an_untiled_vae_on_the_gpu_carries_no_note_no_tile_and_an_eager_decoder(compile_supported):
    # 80 GB: the untiled decode fits beside the whole transformer; compiling would gain 2.45 -> 2.19 s: kept eager
    plan = make_plan(replace(Machine.supposed(128, 80), compile_supported=compile_supported), REAL)
    assert plan.components["vae"] == place("vae", REAL["vae"], Where.GPU)  # compile False, note "", not tiled


# --- LoRAs, the resolution and the notes carried into the plan --------------------------------------------------------

@pytest.mark.parametrize("vram_gb, lora_bytes, memory", [(80, 8 * MB, "VRAM"), (0, 16 * MB, "RAM")])
def test_loras_are_counted_in_the_compute_dtype_beside_the_transformer_and_named_in_the_first_note(
        vram_gb, lora_bytes, memory):
    # 3 M + 1 M elements: 2 bytes each in bf16 on the GPU, 4 in float32 on the CPU
    lora = LoraCost(params=3_000_000, largest_layer_params=1_000_000, layers=12)
    plan = make_plan(Machine.supposed(128, vram_gb), REAL, PlanOverrides(lora=lora, resolution=320))
    assert plan.components["transformer"].lora_bytes == lora_bytes
    assert plan.notes[0] == (f"LoRA on 12 layers: {gb_text(lora_bytes)} beside the transformer ({memory}), "
                             f"applied as each layer runs (no weights rewritten)")
    assert plan.resolution == 320


# --- the VAE's tiles --------------------------------------------------------------------------------------------------

def test_on_the_gpu_the_vae_decodes_untiled_where_it_the_whole_transformer_its_loras_and_the_decode_fill_the_budget():
    # VAE and transformer in float16/bf16, the LoRAs (in bf16) and the larger of sampling and the untiled decode
    lora = LoraCost(params=3_000_000, largest_layer_params=1_000_000, layers=12)  # 8 MB
    t, vae = REAL["transformer"], REAL["vae"]
    untiled = decode_activations(vae, 640, None, 2)
    sampling = sampling_activations(t, REAL["image_encoder"], 640, itemsize=2)
    budget = vae.params * 2 + t.params * 2 + 8 * MB + max(sampling, untiled)
    exact = make_plan(gpu_machine(budget, 128 * GB), REAL, PlanOverrides(lora=lora))
    assert exact.components["vae"] == place("vae", vae, Where.GPU)
    # the transformer fills the room left beside the VAE, its LoRAs and the decode to the byte: resident
    assert exact.components["transformer"].where == Where.GPU
    short = make_plan(gpu_machine(budget - 1, 128 * GB), REAL, PlanOverrides(lora=lora))
    assert short.components["vae"].vae_tiling


def test_a_picture_smaller_than_a_tile_is_decoded_untiled_even_where_the_untiled_decode_does_not_fit():
    # at 64 px the untiled decode (0.23 GB) costs what any tile would: tiling would gain nothing
    plan = make_plan(Machine.supposed(64, 8), REAL, PlanOverrides(resolution=64))
    assert (plan.components["vae"].vae_tiling, plan.components["vae"].note) == (False, "")


def test_a_forced_tiling_is_honoured_where_the_untiled_decode_would_fit():
    gpu = make_plan(Machine.supposed(128, 80), REAL, PlanOverrides(vae_tiling=True))
    assert (gpu.components["vae"].vae_tiling, gpu.components["vae"].note) == (True, "tiled decode, 384 px tiles")
    cpu = make_plan(Machine.supposed(256, 0), REAL, PlanOverrides(vae_tiling=True))
    assert cpu.components["vae"] == place("vae", REAL["vae"], Where.CPU, vae_tiling=True, note="tiled decode")


def test_on_the_cpu_the_vae_tiles_only_where_its_untiled_decode_exceeds_half_the_ram_budget():
    untiled = decode_activations(REAL["vae"], 640, None, 4)  # float32: 45.9 GB at 640 px
    exact = make_plan(cpu_machine(2 * untiled), REAL)
    assert exact.components["vae"] == place("vae", REAL["vae"], Where.CPU)  # not tiled, no note
    short = make_plan(cpu_machine(2 * untiled - 2), REAL)
    assert short.components["vae"] == place("vae", REAL["vae"], Where.CPU, vae_tiling=True, note="tiled decode")


def test_the_gpu_decode_takes_the_largest_tile_that_exactly_fits_beside_the_resident_transformer(activations):
    tiles = {384: 4 * GB, 352: 3 * GB, 320: 2 * GB, 256: GB}
    activations(sampling=GB, untiled=8 * GB, tiles=tiles)
    # the VAE (0.5 GB) and the resident transformer (10 GB) leave exactly the 320 px tile's 2 GB
    plan = small_plan(GB // 2 + 10 * GB + 2 * GB)
    assert plan.components["transformer"].where == Where.GPU
    vae = plan.components["vae"]
    assert (vae.vae_tiling, vae.vae_tile_px, vae.note) == (True, 320, "tiled decode, 320 px tiles")


def test_where_not_even_the_smallest_tile_fits_beside_the_parked_transformer_its_shortfall_is_named(activations):
    activations(sampling=GB, untiled=9 * GB, tiles={384: 8 * GB, 352: 8 * GB, 320: 8 * GB, 256: 8 * GB})
    # sampling fits (0.5 + 9 all streamed + 1 = 10.5 GB of 11); the decode beside the 3 GB parked does not:
    # 0.5 + 3 + 8 (the smallest tile) = 11.5 GB
    with pytest.raises(DoesNotFit) as refused:
        small_plan(11 * GB)
    assert message(refused) == ("no plan fits the GPU: the decode phase needs 11.5G of VRAM and 11.0G is free: "
                                "0.5 GB short; lower --resolution, close programs using the GPU, or use --plan mmap "
                                "(CPU, slow)")


# --- the VAE decoder compiled only where it decodes at least 25 % faster ----------------------------------------------

def test_the_vae_decoder_is_compiled_where_its_decode_is_exactly_25_percent_faster(monkeypatch):
    # 8 GB: eager in 256 px tiles, compiled in 352 px tiles; the seconds fixed at 4 and 3 (exactly 25 % less)
    monkeypatch.setattr(placement, "decode_seconds", lambda plan: 3.0 if plan.components["vae"].compile else 4.0)
    plan = make_plan(replace(Machine.supposed(64, 8), compile_supported=True), REAL)
    assert plan.components["vae"].compile
    assert plan.notes[-1] == ("VAE decoder compiled: a third less VRAM, so it decodes in 352 px tiles instead of in "
                              "256 px tiles (about 1.3x faster; the first decode after the app starts compiles it: "
                              "a minute or more)")


def test_a_compiled_vae_decoder_picks_from_its_own_tiles_448_px_among_them():
    # at 384 px on an 8 GB card the eager decoder fits only 256 px tiles; the compiled one's 448 px tile (no larger
    # than its 5.87 GB untiled decode at 384 px) fits, a size the eager table does not offer
    plan = make_plan(replace(Machine.supposed(16, 8), compile_supported=True), REAL, PlanOverrides(resolution=384))
    vae = plan.components["vae"]
    assert (vae.compile, vae.vae_tile_px, vae.note) == (True, 448, "tiled decode, 448 px tiles")
    assert plan.notes[-1] == ("VAE decoder compiled: a third less VRAM, so it decodes in 448 px tiles instead of in "
                              "256 px tiles (about 1.7x faster; the first decode after the app starts compiles it: "
                              "a minute or more)")


# --- a short job decodes eagerly while the decoder is not compiled in this process --------------------------------

@pytest.mark.parametrize("state, sections, now, later", [
    ("cold", None, True, False),  # sections unknown (the plan shown before a job): as for a long job
    ("cold", 4, False, True),  # a 5 s job saves 4 x 1 s against a minute of compiling
    ("cold", 62, True, False), ("cold", 61, False, True),  # 62 s of compile, 1 s saved per section
    ("cached", 14, True, False), ("cached", 13, False, True),  # 14 s loading it from the compile cache
    ("ready", 1, True, False),  # compiled earlier in this process: nothing to pay
    ("failed", 62, False, False),  # the compiler failed here: eager tiles, nothing to compile later
])
def test_a_decoder_compile_the_jobs_decodes_would_not_pay_back_waits_for_the_idle_time_after_it(
        monkeypatch, state, sections, now, later):
    # 8 GB: eager in 256 px tiles, compiled in 352 px tiles; the seconds fixed at 4 and 3 a section
    monkeypatch.setattr(placement, "decode_seconds", lambda plan: 3.0 if plan.components["vae"].compile else 4.0)
    machine = replace(Machine.supposed(64, 8), compile_supported=True, decoder_compile=state)
    plan = make_plan(machine, REAL, PlanOverrides(sections=sections))
    vae = plan.components["vae"]
    assert (vae.compile, vae.compile_later, vae.vae_tile_px) == (now, later, 352 if now else 256)
    assert plan.components["transformer"].compile  # the blocks compile either way
    if later:
        assert plan.notes[-1] == (
            f"VAE decoder not compiled for this job: {sections} sections to make (this job's and any queued after "
            f"it) would not pay back the compile "
            f"({'a minute or more' if state == 'cold' else 'seconds, from the compile cache'}), so it decodes in "
            "256 px tiles; the web app compiles the decoder while idle after the job, and its later jobs decode in "
            "352 px tiles (about 1.3x faster)")
    if now and state == "ready":
        assert plan.notes[-1].endswith("(about 1.3x faster)")  # no compile to warn of


# --- the text encoders ------------------------------------------------------------------------------------------------

def test_the_text_encoders_go_on_the_gpu_where_they_and_their_activations_fill_the_budget_exactly():
    assert small_plan(32 * GB + TEXT_ACT).components["text_encoders"].where == Where.GPU
    # a byte less: their layers streamed, as many resident as fit in 32 GB - 1: one (27 GB)
    streamed = small_plan(32 * GB + TEXT_ACT - 1).components["text_encoders"]
    assert (streamed.where, streamed.resident_blocks) == (Where.GPU_STREAMED, 1)


@pytest.mark.parametrize("room, resident", [(22 * GB, 0), (27 * GB - 1, 0), (27 * GB, 1)])
def test_the_text_encoders_keep_as_many_layers_resident_as_exactly_fit(room, resident):
    te = small_plan(room + TEXT_ACT).components["text_encoders"]
    assert (te.where, te.resident_blocks, te.total_blocks, te.note) == (
        Where.GPU_STREAMED, resident, 4, "decoder layers streamed from the file map (once per prompt)")


def test_text_encoders_without_room_for_their_embeddings_and_two_streamed_layers_run_from_the_map():
    te = small_plan(22 * GB + TEXT_ACT - 1).components["text_encoders"]
    assert (te.where, te.note) == (Where.MMAP, "read-only file map, CPU (once per prompt)")
    no_gpu = make_plan(Machine.supposed(64, 0), REAL).components["text_encoders"]
    assert (no_gpu.where, no_gpu.note) == (Where.MMAP, "read-only file map, CPU (once per prompt)")


def test_the_real_text_encoders_streamed_to_an_8gb_card_say_so():
    te = make_plan(Machine.supposed(32, 8), REAL).components["text_encoders"]
    assert (te.where, te.note) == (Where.GPU_STREAMED, "decoder layers streamed from the file map (once per prompt)")


# --- the transformer: resident, streamed, parked ----------------------------------------------------------------------

@pytest.mark.parametrize("sampling, untiled", [(2 * GB, GB), (GB, 2 * GB)], ids=["sampling-larger", "decode-larger"])
def test_the_transformer_is_resident_where_it_fills_what_the_vae_its_loras_and_the_larger_activation_leave(
        activations, sampling, untiled):
    activations(sampling=sampling, untiled=untiled)
    budget = GB // 2 + 10 * GB + 200 * MB + 2 * GB  # the VAE, the transformer, its LoRAs (200 MB), the larger
    exact = small_plan(budget, lora=LORA, vae_tiling=False)
    assert exact.components["transformer"].where == Where.GPU
    assert exact.components["transformer"].lora_bytes == 200 * MB
    assert small_plan(budget - 1, lora=LORA, vae_tiling=False).components["transformer"].where == Where.GPU_STREAMED


def test_plan_gpu_that_does_not_take_the_resident_transformer_names_the_vram_it_lacks(activations):
    activations(sampling=GB, untiled=2 * GB)
    # room beside the VAE and the 2 GB decode: 12.2 - 0.5 - 2 = 9.7 GB for the 10 GB transformer
    with pytest.raises(DoesNotFit) as refused:
        small_plan(12 * GB + 200 * MB, plan="gpu", vae_tiling=False)
    assert message(refused) == ("the transformer resident in VRAM needs 0.3 GB more VRAM than this machine has to "
                                "spare: use --plan streamed or auto")


def test_a_transformer_with_room_for_none_of_its_blocks_streams_them_all(activations):
    activations(sampling=2 * GB, untiled=GB)
    # sampling leaves 11.5 - 0.5 - 2 = 9 GB: all streamed (9 GB) fits, one block resident (10 GB) does not
    t = small_plan(11 * GB + GB // 2, vae_tiling=False).components["transformer"]
    assert (t.where, t.resident_blocks, t.park_for_decode, t.vram_bytes) == (Where.GPU_STREAMED, 0, False, 9 * GB)


def test_a_transformer_that_exactly_fits_beside_the_decode_all_streamed_keeps_the_blocks_sampling_allows_parked(
        activations):
    activations(sampling=GB, untiled=2 * GB)
    # sampling leaves 10 GB (all four blocks resident), the decode 9 GB: all streamed fits it exactly, so the
    # resident blocks are parked while the VAE decodes and come back from the page cache after
    t = small_plan(11 * GB + GB // 2, vae_tiling=False).components["transformer"]
    assert (t.where, t.resident_blocks, t.vram_bytes, t.park_for_decode, t.parked_vram_bytes, t.page_cache_bytes) == (
        Where.GPU_STREAMED, 4, 10 * GB, True, 3 * GB, 7 * GB)


def test_a_streamed_transformer_that_exactly_fits_beside_the_decode_is_not_parked(activations):
    activations(sampling=GB, untiled=2 * GB)
    # --plan streamed: sampling leaves 11 GB, the decode 10 GB: all four blocks resident (10 GB) fit both
    t = small_plan(12 * GB + GB // 2, plan="streamed", vae_tiling=False).components["transformer"]
    assert (t.where, t.resident_blocks, t.vram_bytes, t.park_for_decode) == (Where.GPU_STREAMED, 4, 10 * GB, False)


# --- pinning: only where PIN_HEADROOM_BYTES stays free beside the largest phase ---------------------------------------

def zero_resident(ram_budget: int, **changes):
    """The all-streamed transformer of test_a_transformer_with_room_for_none_of_its_blocks_streams_them_all."""
    machine = gpu_machine(11 * GB + GB // 2, ram_budget, **changes)
    return make_plan(machine, SMALL, PlanOverrides(fp8=False, vae_tiling=False))


def test_the_streamed_blocks_are_pinned_where_exactly_the_headroom_stays_free_in_ram(activations):
    activations(sampling=2 * GB, untiled=GB)
    pinned_peak = make_plan(gpu_machine(11 * GB + GB // 2), SMALL,
                            PlanOverrides(fp8=False, vae_tiling=False, pin_streamed=True)).peak_ram_bytes
    assert zero_resident(pinned_peak + PIN_HEADROOM_BYTES).components["transformer"].pinned_sources
    assert not zero_resident(pinned_peak + PIN_HEADROOM_BYTES - 1).components["transformer"].pinned_sources


def test_the_streamed_blocks_are_pinned_where_exactly_the_headroom_stays_free_in_an_enforced_commit(activations):
    activations(sampling=2 * GB, untiled=GB)
    pinned_peak = make_plan(gpu_machine(11 * GB + GB // 2), SMALL,
                            PlanOverrides(fp8=False, vae_tiling=False, pin_streamed=True)).peak_commit_bytes

    def pinned(commit_budget):
        plan = zero_resident(400 * GB, commit_enforced=True,
                             commit_available_bytes=commit_budget + COMMIT_MARGIN_BYTES)
        return plan.components["transformer"].pinned_sources

    assert pinned(pinned_peak + PIN_HEADROOM_BYTES)
    assert not pinned(pinned_peak + PIN_HEADROOM_BYTES - 1)


# --- the transformer's storage, chosen automatically ------------------------------------------------------------------

# An 8 GB card with 3.4 GB of RAM to use: bf16's two 0.68 GB staging buffers take the decode to 3.76 GB, fp8's to 3.08
SHORT_OF_RAM = replace(Machine.supposed(64, 8), ram_available_bytes=int(3.4 * GB))


def test_fp8_is_taken_where_bf16_fits_nowhere_and_the_note_quotes_bf16s_refusal():
    with pytest.raises(DoesNotFit) as bf16:
        make_plan(SHORT_OF_RAM, REAL, PlanOverrides(fp8=False))
    plan = make_plan(SHORT_OF_RAM, REAL)
    assert plan.components["transformer"].storage == Storage.FP8
    assert plan.notes[0] == f"transformer stored as fp8 (chosen automatically): bf16 does not fit ({message(bf16)})"


def test_where_bf16_fits_nowhere_and_fp8_has_no_disk_to_convert_both_reasons_are_given():
    with pytest.raises(DoesNotFit) as bf16:
        make_plan(SHORT_OF_RAM, REAL, PlanOverrides(fp8=False))
    need = gb_text(fp8_weights(REAL["transformer"]).file_bytes + FP8_CONVERSION_MARGIN_BYTES)
    with pytest.raises(MemoryPlanError) as refused:
        make_plan(replace(SHORT_OF_RAM, disk_free_bytes=5 * GB), REAL)
    assert message(refused) == (f"{message(bf16)}; fp8 storage would fit, but converting the transformer to fp8 once "
                                f"needs {need} of free disk beside the models and 5.00G is free")


def laptop(available_bytes: int) -> Machine:
    """The 32 GB laptop of test_memory_plan.py with an 8 GB card (32 GiB of RAM, 30.4 GB usable at most)."""
    return replace(Machine.supposed(32, 8), ram_total_bytes=32 * 1024 ** 3, ram_available_bytes=available_bytes)


@pytest.mark.parametrize("available_gb, fp8_spills", [(19, False), (12, True)])
def test_the_automatic_fp8_note_gives_what_bf16_would_stream_the_room_and_what_fp8_reads(available_gb, fp8_spills):
    machine = laptop(available_gb * GB)
    bf16 = make_plan(machine, REAL, PlanOverrides(fp8=False))
    fp8 = make_plan(machine, REAL, PlanOverrides(fp8=True))
    plan = make_plan(machine, REAL)
    t_bf16, t_fp8 = bf16.components["transformer"], fp8.components["transformer"]
    why = (f"the bf16 blocks streamed each step ({gb_text(t_bf16.page_cache_bytes)}) would not stay in the page cache "
           f"beside the largest phase (about {gb_text(page_cache_room(bf16))} of room) and every step would read the "
           f"rest from disk; ")
    if fp8_spills:
        keep = t_fp8.page_cache_bytes - page_cache_room(fp8)
        why += (f"the fp8 ones ({gb_text(t_fp8.page_cache_bytes)}) read less; about {gb_text(keep)} more free RAM or a "
                f"lower --resolution would keep them all cached")
    else:
        why += f"the fp8 ones ({gb_text(t_fp8.page_cache_bytes)}) stay cached"
    assert plan.notes[0] == f"transformer stored as fp8 (chosen automatically): {why}"


def test_bf16_is_kept_where_its_streamed_blocks_exactly_fill_the_page_cache_room():
    # the RAM budget at which the room beside the larger of sampling and decode is exactly the blocks streamed
    bf16 = make_plan(laptop(30 * GB), REAL, PlanOverrides(fp8=False))
    exactly = bf16.components["transformer"].page_cache_bytes + bf16.ram_budget_bytes - page_cache_room(bf16)
    assert make_plan(laptop(exactly), REAL).components["transformer"].storage == Storage.MAP
    assert make_plan(laptop(exactly - 1), REAL).components["transformer"].storage == Storage.FP8


# --- the one-time fp8 conversion's disk -------------------------------------------------------------------------------

def test_forced_fp8_converts_where_the_free_disk_is_exactly_what_the_conversion_needs():
    need = fp8_weights(REAL["transformer"]).file_bytes + FP8_CONVERSION_MARGIN_BYTES
    machine = Machine.supposed(64, 24)
    assert make_plan(replace(machine, disk_free_bytes=need), REAL, PlanOverrides(fp8=True)).components[
        "transformer"].storage == Storage.FP8
    with pytest.raises(MemoryPlanError) as refused:
        make_plan(replace(machine, disk_free_bytes=need - 1), REAL, PlanOverrides(fp8=True))
    assert message(refused) == (f"--fp8: converting the transformer to fp8 once needs {gb_text(need)} of free disk "
                                f"beside the models and {gb_text(need - 1)} is free; free some space, or use bf16 "
                                f"(--no-fp8)")


def test_a_transformer_already_stored_as_fp8_needs_no_disk_to_convert():
    stored_fp8 = {**REAL, "transformer": fp8_weights(REAL["transformer"])}
    plan = make_plan(replace(Machine.supposed(64, 24), disk_free_bytes=0), stored_fp8, PlanOverrides(fp8=True))
    assert plan.components["transformer"].storage == Storage.FP8
