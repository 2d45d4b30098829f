"""The plan in words (memory/plan/explain.py): the table the CLI and the page show, the one-line summary, sizes,
and the leaner choices offered after running out of GPU memory, on a hand-made plan (no cost model involved), so
each figure and word in the text is the plan's own."""
from __future__ import annotations

from dataclasses import replace

import pytest

from framepack_ui.memory.plan.explain import decode_name, gb_text, leaner_choices
from framepack_ui.memory.plan.types import ComponentPlan, LoadPlan, PhaseCost
from framepack_ui.memory.plan.vocabulary import Storage, Where
from framepack_ui.memory.probe import Machine
from framepack_ui.units import GB, MB

LAPTOP = Machine(ram_total_bytes=32 * GB, ram_available_bytes=20 * GB, commit_limit_bytes=40 * GB,
                  commit_available_bytes=30 * GB, commit_enforced=True, vram_total_bytes=8 * GB,
                  vram_free_bytes=7_500 * MB, gpu_name="RTX 4060 Laptop GPU", description="a laptop")
COMPONENTS = {
    "text_encoders": ComponentPlan("text_encoders", Where.GPU_STREAMED, Storage.MAP, "float16", "float16", False,
                                   1_360 * MB, 1_360 * MB, 6_100 * MB, 8_500 * MB, resident_blocks=11, total_blocks=32,
                                   file_bytes=16_300 * MB, note="decoder layers streamed from the file map"),
    "image_encoder": ComponentPlan("image_encoder", Where.GPU, Storage.RAM, "bfloat16", "float16", False, 0, 0,
                                   860 * MB, 0, file_bytes=860 * MB),
    "vae": ComponentPlan("vae", Where.GPU, Storage.RAM, "float32", "float16", True, 0, 0, 490 * MB, 0,
                         file_bytes=980 * MB, vae_tiling=True, vae_tile_px=352, note="tiled decode, 352 px tiles",
                         compile=True),
    "transformer": ComponentPlan("transformer", Where.GPU_STREAMED, Storage.FP8, "float8_e4m3fn", "bfloat16", True,
                                 12_500 * MB, 12_500 * MB, 5_200 * MB, 0, resident_blocks=10, total_blocks=60,
                                 file_bytes=13_200 * MB, note="12.5G streamed per step from page-locked RAM",
                                 parked_vram_bytes=1_200 * MB, park_for_decode=True, pinned_sources=True,
                                 compile=True, attention="sage", fp8_matmul=False),
}
PHASES = (PhaseCost("text", ("text_encoders",), 2_000 * MB, 2_500 * MB, 7_000 * MB, 8_500 * MB, 0, 900 * MB),
          PhaseCost("image", ("image_encoder", "vae"), 1_500 * MB, 2_000 * MB, 1_350 * MB, 0, 0, 0),
          PhaseCost("sampling", ("vae", "transformer"), 13_900 * MB, 14_400 * MB, 7_100 * MB, 0, 0, 1_400 * MB),
          PhaseCost("decode", ("vae", "transformer"), 13_800 * MB, 14_300 * MB, 6_500 * MB, 0, 0, 4_840 * MB))
PLAN = LoadPlan(LAPTOP, "cuda", COMPONENTS, PHASES, 18 * GB, 7_200 * MB, 28 * GB, 640,
                notes=("transformer stored as fp8 (chosen automatically)", "VAE decoder compiled"))

# Read by eye against the plan above, once; any change in the table's words, columns or figures shows here.
EXPLAINED = """\
Plan for a laptop: RAM 32.0G (20.0G free), VRAM 8.00G (7.50G free, RTX 4060 Laptop GPU), commit 30.0G free of 40.0G; resolution 640
Budgets: RAM 18.0G, VRAM 7.20G, commit 28.0G

model         where               storage         compute     on disk      RAM   commit     VRAM    cache  notes
text_encoders gpu-streamed 11/32  float16 map     float16       16.3G    1.36G    1.36G    6.10G    8.50G  decoder layers streamed from the file map
image_encoder gpu                 bfloat16 copy   float16        860M       0M       0M     860M       0M  
vae           gpu                 float32 copy    float16        980M       0M       0M     490M       0M  tiled decode, 352 px tiles; compiled decoder
transformer   gpu-streamed 10/60  fp8 e4m3 map    bfloat16      13.2G    12.5G    12.5G    5.20G       0M  12.5G streamed per step from page-locked RAM; resident blocks parked while the VAE decodes (1.20G VRAM then); compiled; attention sage; no fp8 matmul (dequantized to bf16)

phase         models                                  RAM   commit     VRAM    cache
text          text_encoders                         2.00G    2.50G    7.00G    8.50G
image         image_encoder, vae                    1.50G    2.00G    1.35G       0M
sampling      vae, transformer                      13.9G    14.4G    7.10G       0M
decode        vae, transformer                      13.8G    14.3G    6.50G       0M
peak                                                13.9G    14.4G    7.10G
- transformer stored as fp8 (chosen automatically)
- VAE decoder compiled"""


def test_the_plan_table_shows_each_model_each_phase_the_peaks_and_the_notes():
    assert PLAN.explain() == EXPLAINED


def test_the_summary_names_each_place_and_the_peaks():
    assert PLAN.summary() == ("text_encoders gpu-streamed 11/32, image_encoder gpu, vae gpu, transformer gpu-streamed "
                              "10/60 fp8; predicted peak RAM 13.9G, commit 14.4G, VRAM 7.10G")


def test_a_plan_without_a_gpu_says_so_and_shows_no_vram():
    machine = replace(PLAN.machine, vram_total_bytes=0, vram_free_bytes=0, gpu_name="", commit_limit_bytes=None,
                      commit_available_bytes=None)
    on_cpu = {name: replace(c, where=Where.MMAP if c.storage != Storage.RAM else Where.CPU, compile=False,
                            attention=None, park_for_decode=False, note="")
              for name, c in PLAN.components.items()}
    plan = replace(PLAN, machine=machine, device="cpu", components=on_cpu, commit_budget_bytes=None, notes=())
    lines = plan.explain().splitlines()
    assert lines[0] == "Plan for a laptop: RAM 32.0G (20.0G free), no CUDA GPU; resolution 640"
    assert lines[1] == "Budgets: RAM 18.0G, VRAM 7.20G"
    assert lines[7].startswith("transformer") and lines[7].endswith("0M  ")  # a CPU transformer: no speed notes
    assert plan.summary() == ("text_encoders mmap, image_encoder cpu, vae cpu, transformer mmap fp8; predicted peak "
                              "RAM 13.9G, commit 14.4G")


def test_a_commit_limit_not_enforced_says_so():
    plan = replace(PLAN, machine=replace(PLAN.machine, commit_enforced=False))
    assert ", commit 30.0G free of 40.0G (not enforced); resolution 640" in plan.explain().splitlines()[0]


@pytest.mark.parametrize("changes, notes", [
    ({}, "compiled; attention sage; no fp8 matmul (dequantized to bf16)"),
    ({"fp8_matmul": True, "compile": False, "attention": None}, "not compiled; attention default; fp8 matmul"),
    ({"storage": Storage.MAP, "storage_dtype": "bfloat16"}, "compiled; attention sage"),
    ({"storage": Storage.MAP, "compile": False, "attention": None}, "not compiled; attention default"),  # on the GPU
])
def test_the_transformers_speed_options_are_named(changes, notes):
    plan = PLAN.with_component("transformer", note="", park_for_decode=False, **changes)
    row = plan.explain().splitlines()[7]
    assert row.startswith("transformer") and row.endswith(f"  {notes}")


@pytest.mark.parametrize("changes, notes", [
    ({"compile": True}, "compiled; attention default; no fp8 matmul (dequantized to bf16)"),
    ({"attention": "sage"}, "not compiled; attention sage; no fp8 matmul (dequantized to bf16)"),
    ({"fp8_matmul": True}, "not compiled; attention default; fp8 matmul"),
])
def test_a_cpu_transformer_names_its_speed_options_only_where_one_is_set(changes, notes):
    on_cpu = PLAN.with_component("transformer", where=Where.MMAP, note="", park_for_decode=False, compile=False,
                                 attention=None, fp8_matmul=False)
    assert on_cpu.components["transformer"].device == "cpu"
    row = on_cpu.with_component("transformer", **changes).explain().splitlines()[7]
    assert row.startswith("transformer") and row.endswith(f"  {notes}")


def test_the_placement_words_format_as_their_text():
    assert f"{Where.GPU:>5}|{Storage.FP8:<4}|{Where.GPU_STREAMED}" == "  gpu|fp8 |gpu-streamed"
    assert str(Where.MMAP) == "mmap" and Where.CPU == "cpu"


@pytest.mark.parametrize("n, text", [(None, "-"), (0, "0M"), (749_600_000, "750M"), (GB - 1, "1000M"), (GB, "1.00G"),
                                     (7_254_000_000, "7.25G"), (10 * GB - 1, "10.00G"), (10 * GB, "10.0G"),
                                     (25_700_000_000, "25.7G")])
def test_sizes_read_in_megabytes_below_a_gigabyte_and_lose_a_digit_from_ten(n, text):
    assert gb_text(n) == text


def test_the_decode_is_named_by_its_tiles():
    assert decode_name(PLAN) == "in 352 px tiles"
    assert decode_name(PLAN.with_component("vae", vae_tiling=False)) == "untiled"


@pytest.mark.parametrize("resolution, changes, line", [
    (640, {"where": Where.GPU, "storage": Storage.MAP},
     "pick the 'streamed' memory profile (--plan streamed), or fp8 storage of the video model (--fp8), or resolution "
     "544 (this job ran at 640)"),
    (640, {"storage": Storage.MAP},
     "close other programs using the GPU, or pick fp8 storage of the video model (--fp8), or resolution 544 (this job "
     "ran at 640)"),
    (256, {}, "close other programs using the GPU"),
    (300, {"where": Where.MMAP}, "pick resolution 256 (this job ran at 300)"),
    (1000, {"where": Where.GPU},
     "pick the 'streamed' memory profile (--plan streamed), or resolution 640 (this job ran at 1000)"),
])
def test_after_running_out_of_gpu_memory_the_leaner_choices_come_leanest_first(resolution, changes, line):
    assert leaner_choices(replace(PLAN, resolution=resolution).with_component("transformer", **changes)) == line
