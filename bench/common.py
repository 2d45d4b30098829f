"""What the benchmarks share.

- Models: the F1 transformer, the HunyuanVideo VAE and SigLIP at their real configs with random weights (random
  weights cost the same compute as real ones), built directly on the target device in the final dtype, and the
  tiny configs of `--tiny` (a smoke test of a script on any machine, never a figure).
- `bench_manager`: the app's own `ModelManager` applying a real memory plan (`bench_plan`: `make_plan` on the probed
  machine, or on it with an 8 GB card supposed), whose builders make those random models instead of reading
  files, with the prompt cache pre-filled so that the text encoders never load. Whatever the manager does after
  the build (streaming, parking and restoring, compile, attention, fp8 matmul) is the app's code.
- Inputs of the real shapes, timing (`now` synchronises CUDA), PSNR and relative error, GPU utilisation (NVML),
  the process's memory (/proc/self/status), and the JSON + table writer.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import json
import math
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from framepack_ui.engine import text
from framepack_ui.engine.lending import IMAGE_ENCODER, TEXT_ENCODERS, TRANSFORMER, VAE
from framepack_ui.memory.manager import ModelManager, compute_dtype
from framepack_ui.memory.plan import VAE_TILE_OVERLAP_PX, LoadPlan, PlanOverrides, make_plan, real_weights
from framepack_ui.memory.probe import Machine, probe_machine
from framepack_ui.spec import FRAMES_PER_SECTION

GiB = 2**30
STEPS = 25  # the app's default steps per section: sampling s/frame = s/step * STEPS / FRAMES_PER_SECTION
TYPICAL_PROMPT_TOKENS = 64  # a typical prompt's Llama tokens after cropping
SIGLIP_TOKENS = 729
LATENT_HW = (80, 76)  # 640x608 (height x width), the bucket of every full-size figure
TINY_LATENT_HW = (8, 8)
BENCH_PROMPT = "bench"
TINY_PLAN_RAM_GB = 64  # the RAM a --tiny run's plan supposes (bench_plan)

# --- configs ------------------------------------------------------------------------------------------------------

REAL_TRANSFORMER = dict(in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
                        num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2,
                        patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096,
                        pooled_projection_dim=768, rope_theta=256.0, rope_axes_dim=(16, 56, 56),
                        has_image_proj=True, image_proj_dim=1152, has_clean_x_embedder=True)
TINY_TRANSFORMER = {**REAL_TRANSFORMER, "num_attention_heads": 2, "attention_head_dim": 8, "num_layers": 1,
                    "num_single_layers": 1, "num_refiner_layers": 1, "rope_axes_dim": (2, 2, 4),
                    "text_embed_dim": 32, "pooled_projection_dim": 32, "image_proj_dim": 32}
REAL_VAE: dict = {}  # diffusers' defaults for AutoencoderKLHunyuanVideo are HunyuanVideo's VAE
TINY_VAE = dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4)
REAL_SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                   image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
TINY_SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   image_size=28, patch_size=14)


def transformer_config(tiny: bool) -> dict:
    return TINY_TRANSFORMER if tiny else REAL_TRANSFORMER


# --- building models with random weights --------------------------------------------------------------------------

def build(cls, config: dict, device, dtype):
    """`cls(**config)` made directly on `device` in `dtype` (12.9 B params in fp32 on the CPU would need 52 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def quantize_in_place(model) -> int:
    """The block Linears that memory/fp8.py stores as fp8 (`fp8.quantizable`), quantized in place to e4m3 with
    per-row scales (the fp8 cache's format, as parameters: the streamer moves a block's parameters). Returns how
    many. Then `fp8.apply_fp8_compute` makes them compute as the app's fp8 transformer does."""
    from framepack_ui.compute import fp8_linear
    from framepack_ui.memory import fp8

    count = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and fp8.quantizable(f"{name}.weight", tuple(module.weight.shape),
                                                                    "BF16"):
            q, scale = fp8_linear.quantize(module.weight.data)
            module.weight = torch.nn.Parameter(q, requires_grad=False)
            module.register_parameter(fp8_linear.SCALE_PARAM, torch.nn.Parameter(scale, requires_grad=False))
            count += 1
    return count


def build_transformer(tiny: bool, device, dtype, fp8: bool = False):
    """The F1 transformer; with `fp8` its block Linears stored as fp8 and computed as the app computes them."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = build(HunyuanVideoFramepackTransformer3DModel, transformer_config(tiny), device, dtype)
    if fp8:
        from framepack_ui.memory import fp8 as fp8_storage

        quantize_in_place(model)
        fp8_storage.apply_fp8_compute(model, dtype)
        empty_cache()
    return model


def build_vae(tiny: bool, device, dtype, tiling: bool = False, tile_px: int = 256):
    """The HunyuanVideo VAE; tiled as memory/loading.py `load_vae` tiles it (the plan's tile, 64 px overlap, frame
    tiles left at diffusers' 16/12)."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae = build(AutoencoderKLHunyuanVideo, TINY_VAE if tiny else REAL_VAE, device, dtype)
    if tiling:
        stride = tile_px - VAE_TILE_OVERLAP_PX
        vae.enable_tiling(tile_sample_min_height=tile_px, tile_sample_min_width=tile_px,
                          tile_sample_stride_height=stride, tile_sample_stride_width=stride)
    return vae


def build_image_encoder(tiny: bool, device, dtype):
    """(processor, SigLIP vision model), as memory/loading.py `load_image_encoder` returns them."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    try:  # the PIL processor where transformers has it (no torchvision needed), as loading.py
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    cfg = TINY_SIGLIP if tiny else REAL_SIGLIP
    model = build(lambda **k: SiglipVisionModel(SiglipVisionConfig(**k)), cfg, device, dtype)
    size = cfg["image_size"]
    return SiglipImageProcessor(size={"height": size, "width": size}), model


def random_prompt(cfg: dict, seed: int = 1) -> dict[str, torch.Tensor]:
    """A prompt's embeddings as the prompt cache keeps them (engine/lending.py PromptTensors), random, real shapes."""
    g = torch.Generator().manual_seed(seed)
    return {"llama": torch.randn(1, TYPICAL_PROMPT_TOKENS, cfg["text_embed_dim"], generator=g),
            "llama_mask": torch.ones(1, TYPICAL_PROMPT_TOKENS, dtype=torch.long),
            "clip_pooled": torch.randn(1, cfg["pooled_projection_dim"], generator=g)}


# --- the app's plan and manager -----------------------------------------------------------------------------------

def bench_machine(vram_gb: float | None = None, ram_gb: float | None = None) -> Machine:
    """This machine as the app probes it; with `vram_gb`, its GPU supposed to have that many GiB, all free (the
    simulated card); with `ram_gb`, that many GiB of RAM, all available."""
    machine = probe_machine(cuda=torch.cuda.is_available())
    if vram_gb:
        vram = int(vram_gb * GiB)
        machine = replace(machine, vram_total_bytes=vram, vram_free_bytes=vram,
                          gpu_name=f"{machine.gpu_name or 'no GPU'}, supposed {vram_gb:g} GiB card",
                          description=f"this machine, its GPU supposed to have {vram_gb:g} GiB")
    if ram_gb:
        ram = int(ram_gb * GiB)
        machine = replace(machine, ram_total_bytes=ram, ram_available_bytes=ram)
    return machine


def bench_plan(overrides: PlanOverrides | None = None, *, vram_gb: float | None = None,
               ram_gb: float | None = None, tiny: bool = False) -> LoadPlan:
    """The app's plan (`make_plan`) for the real weights at their real size on this machine (or on it with a
    supposed card). `tiny`: the same plan, for TINY_PLAN_RAM_GB of RAM unless `ram_gb` (only the models of a
    `--tiny` run are tiny, and its smoke test must not depend on the RAM of the machine it runs on)."""
    if tiny and ram_gb is None:
        ram_gb = TINY_PLAN_RAM_GB
    return make_plan(bench_machine(vram_gb, ram_gb), real_weights(), overrides or PlanOverrides())


def cpu_stand_in(plan: LoadPlan, tiny: bool) -> LoadPlan:
    """A plan made for a GPU, run on the CPU standing in for it (`--tiny` without CUDA, as the tests do): every
    component computes in float32 (half-precision CPU kernels are slow or missing), and a streamed tiny
    transformer keeps one of its two blocks resident so that the other is streamed."""
    for name, c in plan.components.items():
        plan = plan.with_component(name, compute_dtype="float32")
    t = plan.components[TRANSFORMER]
    if tiny and t.where == "gpu-streamed":
        plan = plan.with_component(TRANSFORMER, resident_blocks=1)
    return plan


def plan_decisions(plan: LoadPlan) -> dict:
    """What the manager applies of each component, for the JSON."""
    keys = ("where", "storage", "compute_dtype", "keep", "resident_blocks", "total_blocks", "vae_tiling",
            "vae_tile_px", "park_for_decode", "pinned_sources", "compile", "attention", "fp8_matmul")
    return {name: {k: getattr(c, k) for k in keys} for name, c in plan.components.items()}


class BenchManager(ModelManager):
    """The app's ModelManager, observed and nothing else: every `use` is timed (entering: the load on first use,
    and the parking of the transformer's resident blocks where the plan parks them for the VAE; leaving: the free
    or the restore), and with `fill_to_vram_gb` the VRAM beyond that budget is taken by a filler allocation as
    soon as the transformer is placed (`vram_filler`)."""

    def __init__(self, *args, fill_to_vram_gb: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fill_to_vram_gb = fill_to_vram_gb
        self.filler: torch.Tensor | None = None
        self.filler_info: dict = {}
        self.build_s: dict[str, float] = {}  # seconds each builder took (the random weights), by model
        self.uses: list[dict] = []  # per use: name, enter_s (load, park), use_s, exit_s (free, restore)
        self.loads_s: dict[str, float] = {}  # seconds the last load of each model took (build, stream, set up)
        self.transformer_ready_at: float | None = None  # perf_counter when the transformer was placed

    @contextmanager
    def use(self, name: str):
        was_loaded = self.is_loaded(name)
        t0 = time.perf_counter()
        with super().use(name) as model:
            t1 = time.perf_counter()
            if not was_loaded:
                self.loads_s[name] = t1 - t0
                if name == TRANSFORMER:
                    self._transformer_placed()
                    t1 = time.perf_counter()
            try:
                yield model
            finally:
                t2 = time.perf_counter()
        self.uses.append({"name": name, "loaded": not was_loaded, "enter_s": t1 - t0, "use_s": t2 - t1,
                          "exit_s": time.perf_counter() - t2})

    def _transformer_placed(self) -> None:
        """The transformer is loaded, streamed and set up as the plan says: the streamed blocks have left the GPU
        (BlockStreamer moved them to host memory) and what the process holds now is what the app holds at this
        point on the real card (the VAE, the transformer's resident part and streaming slots; SigLIP was freed
        after the image phase). So the filler leaves the process exactly the budget from here on; the earlier
        phases (SigLIP and one VAE encode, which peak below sampling in the plan) ran unconstrained. Peak VRAM is
        counted from here (the random build put the whole model on the GPU for a moment, which the app never
        does)."""
        if self.gpu.type == "cuda":
            if self.fill_to_vram_gb:
                self.filler, self.filler_info = vram_filler(self.fill_to_vram_gb, self.gpu)
            torch.cuda.reset_peak_memory_stats(self.gpu)
        self.transformer_ready_at = time.perf_counter()

    def free(self, name: str | None = None) -> None:
        """As the manager's; freeing everything drops the filler too."""
        if name is None:
            self.filler = None
        super().free(name)

    def peak_vram_excluding_filler_gib(self) -> float | None:
        if self.gpu.type != "cuda":
            return None
        filler = self.filler.numel() if self.filler is not None else 0
        return (torch.cuda.max_memory_allocated(self.gpu) - filler) / GiB

    def load_s(self, name: str) -> float | None:
        """Seconds the last load of `name` took: the build, then streaming and setup per the plan."""
        return self.loads_s.get(name)


def _refuse_text_encoders(models_dir, c, device):
    raise RuntimeError("the benchmark pre-filled the prompt cache for its prompt: the text encoders must not load "
                       "(they run once per new prompt; their cost is the whole-app benchmark's)")


def random_builders(tiny: bool, build_s: dict, models: dict | None = None) -> dict:
    """Builders for ModelManager (manager.Builder) making random models where the app reads files: on `device`,
    in the plan's compute dtype, with the plan's VAE tiling and, where the plan stores the transformer as fp8, its
    block Linears quantized on the device (bf16 built, then fp8 in place). `models`: already-built models to lend
    instead (a lever bench that measures one model under several plans). A streamed transformer is returned on the
    device, where the app's builder returns it on the CPU (mapped): the manager's streamer moves the streamed
    blocks to host memory either way (`streaming.BlockStreamer` gives blocks found on the device a RAM source), so
    what the plan streams comes from anonymous RAM here, from the page cache in the app (both pageable memcpy;
    page-locked where the plan pins)."""
    models = models or {}

    def timed(name, make):
        def builder(models_dir, c, device):
            if name in models:
                return models[name]
            t = now()
            model = make(c, device)
            build_s[name] = now() - t
            return model
        return builder

    return {
        TEXT_ENCODERS: _refuse_text_encoders,
        IMAGE_ENCODER: timed(IMAGE_ENCODER, lambda c, d: build_image_encoder(tiny, d, compute_dtype(c))),
        VAE: timed(VAE, lambda c, d: build_vae(tiny, d, compute_dtype(c), c.vae_tiling, c.vae_tile_px)),
        TRANSFORMER: timed(TRANSFORMER, lambda c, d: build_transformer(tiny, d, compute_dtype(c),
                                                                       fp8=c.storage == "fp8")),
    }


def bench_manager(plan: LoadPlan, *, tiny: bool, device, fill_to_vram_gb: float | None = None,
                  models: dict | None = None, prompt: str = BENCH_PROMPT) -> BenchManager:
    """The app's ModelManager applying `plan`, lending random models (`random_builders`), with `prompt`'s
    embeddings (random, real shape) already in its prompt cache under the variant the engine will ask for
    (`text.cache_variant` of where the text encoders compute). fp8 follows the plan (`PlanOverrides(fp8=True)`
    stores the transformer as fp8). `fill_to_vram_gb`: the simulated card's budget (see
    BenchManager._transformer_placed). No models folder is read and nothing is written to disk."""
    device = torch.device(device)
    build_s: dict[str, float] = {}
    manager = BenchManager(Path("bench-random-weights"), plan, gpu=device,
                           builders=random_builders(tiny, build_s, models), prompt_cache_dir=None,
                           commit_allocator=None, fill_to_vram_gb=fill_to_vram_gb)
    manager.build_s = build_s
    variant = text.cache_variant(*manager.compute_place(TEXT_ENCODERS))
    manager.cache_prompt(prompt, variant, random_prompt(transformer_config(tiny)), [])
    return manager


@contextmanager
def placed_as_planned(transformer, plan: LoadPlan, *, tiny: bool, device, vram_gb: float | None):
    """`transformer` (built by the caller, on `device`) placed as `plan` places it, by the app's manager: streamed
    with the plan's resident blocks, page-locked where it pins, compiled, attention and fp8 matmul as it says; with
    `vram_gb` a filler leaves the process that budget. Yields the manager (`manager.streamer(TRANSFORMER)`: the
    streamer's counters). On exit the manager frees it (the streamer closed, its hooks removed) and every block
    goes back to `device`, so a lever bench can measure the same weights resident again."""
    if torch.device(device).type != "cuda":
        plan = cpu_stand_in(plan, tiny)
    manager = bench_manager(plan, tiny=tiny, device=device, fill_to_vram_gb=vram_gb,
                            models={TRANSFORMER: transformer})
    try:
        with manager.use(TRANSFORMER):
            yield manager
    finally:
        manager.free()
        from framepack_ui.compute.compile import transformer_blocks

        for block in transformer_blocks(transformer):
            block.to(device)
        empty_cache()


def vram_filler(vram_gb: float, device) -> tuple[torch.Tensor, dict]:
    """Take the GPU's free memory but what leaves this process `vram_gb` GiB in all, counting what it holds now
    (torch's reserved memory, after handing the cache back): the simulated card. If it already holds more, nothing
    is left free (the job then fails as it would on that card) and `over_budget_GiB` says by how much."""
    gc.collect()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    held = torch.cuda.memory_reserved(device)
    leave = int(vram_gb * GiB) - held
    info = {"allocated_GiB": torch.cuda.memory_allocated(device) / GiB, "reserved_GiB": held / GiB,
            "left_free_GiB": max(leave, 0) / GiB}
    if leave < 0:
        info["over_budget_GiB"] = -leave / GiB
        print(f"warning: the process holds {held / GiB:.2f} GiB, over the {vram_gb:g} GiB budget", flush=True)
    filler = torch.empty(max(0, int(free - max(leave, 0))), dtype=torch.uint8, device=device)
    info["filler_GiB"] = filler.numel() / GiB
    return filler, info


def empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- inputs and timing --------------------------------------------------------------------------------------------

def model_dtype(device) -> torch.dtype:
    """The transformer's compute dtype: bf16 on the GPU, float32 on the CPU (as the plan decides)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def latent_hw(tiny: bool) -> tuple[int, int]:
    return TINY_LATENT_HW if tiny else LATENT_HW


def inputs(cfg: dict, lh: int, lw: int, device, dtype, generator):
    """The transformer's conditioning (random text and image embeddings of the real shapes), a start latent and a
    mid-video history (start + 18 latents)."""
    from framepack_ui.engine import sections

    def rnd(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    embeds = dict(encoder_hidden_states=rnd(1, TYPICAL_PROMPT_TOKENS, cfg["text_embed_dim"]),
                  encoder_attention_mask=torch.ones(1, TYPICAL_PROMPT_TOKENS, dtype=torch.long, device=device),
                  pooled_projections=rnd(1, cfg["pooled_projection_dim"]),
                  image_embeds=rnd(1, SIGLIP_TOKENS, cfg["image_proj_dim"]),
                  guidance=torch.tensor([10_000.0], device=device, dtype=dtype))
    start_latent = torch.randn(1, 16, 1, lh, lw, generator=generator)
    history = sections.History.start(start_latent)
    history.append(torch.randn(1, 16, 18, lh, lw, generator=generator))
    return embeds, start_latent, history


def one_step_setup(tiny: bool):
    """What a benchmark that times the transformer's steps alone starts from: (device, model, embeds, noise,
    conditioning). The model is built on the GPU where there is one, in its compute dtype; the noise is one
    section's, and the conditioning a mid-video history's."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = model_dtype(device)
    lh, lw = latent_hw(tiny)
    model = build_transformer(tiny, device, dtype)
    g = torch.Generator("cpu").manual_seed(0)
    embeds, start_latent, history = inputs(transformer_config(tiny), lh, lw, device, dtype, g)
    noise = torch.randn(1, 16, 9, lh, lw, generator=g)
    return device, model, embeds, noise, history.conditioning(start_latent)


def now() -> float:
    """perf_counter after the GPU has finished what was queued."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def time_steps(denoise, noise, n: int) -> list[float]:
    """One warm-up call (kernels, caches, compile), then `n` timed calls at falling sigmas."""
    sigmas = torch.linspace(1, 0.1, n + 1)
    denoise(noise, sigmas[0])
    times = []
    for s in sigmas[1:]:
        t = now()
        denoise(noise, s)
        times.append(now() - t)
    return times


def sampling_s_per_frame(s_per_step: float, steps: int = STEPS) -> float:
    return s_per_step * steps / FRAMES_PER_SECTION


# --- measurements -------------------------------------------------------------------------------------------------

def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """dB over clamped [-1, 1] pixels (peak-to-peak 2); inf when identical."""
    mse = ((a.float().clamp(-1, 1) - b.float().clamp(-1, 1)) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


class Utilisation:
    """Mean GPU utilisation (NVML, sampled every 20 ms) while the `with` block runs; None without NVML."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        except Exception:
            self._nvml = None
        self.mean = None

    @contextlib.contextmanager
    def measure(self):
        if self._nvml is None:
            yield self
            return
        samples, stop = [], threading.Event()

        def sample():
            while not stop.wait(0.02):
                samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.mean = statistics.mean(samples) if samples else None


def proc_status_mib() -> dict:
    """VmHWM (peak resident), RssAnon and RssFile of this process in MiB (Linux; {} elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f
                    if line.startswith(("VmHWM", "RssAnon", "RssFile"))}
    except OSError:
        return {}


def live_cuda_tensors(top: int = 8) -> dict:
    """GiB of live CUDA tensors reachable by the garbage collector, by shape and dtype (the largest groups)."""
    groups: dict[str, float] = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.is_cuda:
                key = f"{tuple(obj.shape)} {obj.dtype}"
                groups[key] = groups.get(key, 0.0) + obj.numel() * obj.element_size() / GiB
        except Exception:
            continue
    return dict(sorted(groups.items(), key=lambda kv: -kv[1])[:top])


# --- results ------------------------------------------------------------------------------------------------------

def command_line() -> str:
    """How this process was started, as one would type it again (`python -m bench.NAME ...` or the file)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *sys.argv[1:]])


def header(tiny: bool = False, **extra) -> dict:
    """The fields every result starts with: date, card, versions, command."""
    cuda = torch.cuda.is_available()
    R = {"date": datetime.date.today().isoformat(), "card": torch.cuda.get_device_name() if cuda else "cpu",
         "torch": torch.__version__, "command": command_line(), "tiny": tiny}
    try:
        import diffusers

        R["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    R.update(extra)
    return R


def write_json(path, R: dict) -> None:
    Path(path).write_text(json.dumps(R, indent=1, default=str))


def table(R: dict, keys=None) -> str:
    """A markdown table of `R`'s scalar values (or of `keys`)."""
    lines = ["| what | value |", "|---|---|"]
    for key in keys or R:
        value = R.get(key)
        if isinstance(value, (list, dict)):
            continue
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return "\n".join(lines)


def write_result(path, R: dict, keys=None) -> None:
    """Print the table of `R` and write it as JSON to `path`."""
    print("\n" + table(R, keys), flush=True)
    write_json(path, R)
    print(f"\nwrote {path}", flush=True)
