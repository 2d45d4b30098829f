"""Fixtures shared by the test files."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from framepack_ui.weights.tiny import make_tiny_models


# --- the compilers' cache folders: a compiled plan's load points them at its models folder (compute/compile.py);
# each test gets the environment it started with back, so no later test compiles into a deleted temporary folder

@pytest.fixture(autouse=True)
def _compiler_cache_variables():
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    before = {name: os.environ.get(name) for name in names}
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    compiled = sys.modules.get("framepack_ui.compute.compile")
    if compiled is not None:
        compiled._set_here.clear()
        compiled._decoder_outcome.clear()  # what this process compiled: each test starts as a fresh process


@pytest.fixture
def count_graphs(monkeypatch, tmp_path):
    """torch.compile with a backend that only records dynamo's graphs, from a reset dynamo: the guards, and so the
    recompiles, are dynamo's on any backend (a GPU's convolution choice may add its own), and counting is quick on
    the CPU, where inductor's own compile takes minutes. Yields the list the graphs go to. Inductor's cache folder
    (where a compiled decoder leaves its marker) is the test's."""
    import torch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, **{**kw, "backend": counting_backend}))
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def _import_triton_afresh() -> None:
    """Drop Triton's Python modules (its compiled extension stays: it cannot be loaded twice) so the next import reads
    TRITON_INTERPRET again: the interpreter only runs kernels whose library functions (tl.max, ...) were defined
    while it was on."""
    for name in [n for n in sys.modules if n == "triton" or n.startswith("triton.") and not n.startswith("triton._C")]:
        del sys.modules[name]


@pytest.fixture
def interpreted_kernel():
    """compute/fp8_lora_kernel.py with its Triton kernel run by Triton's interpreter on the CPU (no GPU here), as
    fp8_linear_low_rank takes it on a GPU. Two faults of the interpreter (triton 3.7.1) are mended in its own builder
    for the test: its float32-to-fp8 conversion drops the carry where rounding up reaches the next power of two
    (127.7 became 64) and rounds ties away from even, and its dot multiplies bfloat16 operands as their integer bit
    patterns. torch's conversion stands in, rounding to nearest even as the GPU's `cvt.rn.satfinite` does. Yields
    the module, reloaded under the interpreter; afterwards Triton and the module are loaded again for the GPU's path.
    A test names it before `monkeypatch`, so that what the test patches is undone before this reload."""
    import importlib

    import torch

    from framepack_ui.compute import fp8_linear, fp8_lora_kernel

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        _import_triton_afresh()
        import triton.language as tl
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        real_fp_to_fp, real_dot = builder.create_fp_to_fp, builder.create_dot

        def fp_to_fp(self, src, dst_type, rounding_mode):
            if dst_type.scalar == tl.float8e4nv and src.dtype.scalar == tl.float32:
                as_fp8 = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.float8_e4m3fn)
                return interpreter.TensorHandle(as_fp8.view(torch.uint8).numpy(), dst_type.scalar)
            return real_fp_to_fp(self, src, dst_type, rounding_mode)

        def as_float32(handle):
            if handle.dtype.scalar != tl.bfloat16:
                return handle
            return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

        def dot(self, a, b, d, input_precision, max_num_imprecise_acc):
            return real_dot(self, as_float32(a), as_float32(b), d, input_precision, max_num_imprecise_acc)

        patch.setattr(builder, "create_fp_to_fp", fp_to_fp)
        patch.setattr(builder, "create_dot", dot)
        patch.setattr(fp8_linear, "FUSED_LEFT_OPERAND", True)  # the kernel's way, whatever the default
        importlib.reload(fp8_lora_kernel)
        assert fp8_lora_kernel.INTERPRETED
        yield fp8_lora_kernel
    _import_triton_afresh()
    importlib.reload(fp8_lora_kernel)


def record_calls(monkeypatch, module, names) -> list:
    """Each function of `names` in `module` still runs, and appends its name to the list returned."""
    taken = []
    for name in names:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _r=real: taken.append(_n) or _r(*a))
    return taken


def run_fp8_matmul_lora(in_features: int, out_features: int, rank: int, factor: float):
    """One fp8-matmul Linear (a random layer's fp8 weights, float32 compute) on 200 tokens without, then with a random
    LoRA of `rank` at `factor` put on by compute/lora.py: (x, the output without, the output with, the LoRA)."""
    import torch

    from framepack_ui.compute import lora as lora_compute
    from framepack_ui.compute.fp8_linear import Fp8Linear, quantize

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(in_features, out_features, bias=False)
    q, scale = quantize(torch.randn(out_features, in_features, generator=g) * 0.02)
    layer.weight = torch.nn.Parameter(q, requires_grad=False)
    layer.register_parameter("weight_scale", torch.nn.Parameter(scale, requires_grad=False))
    layer.__class__ = Fp8Linear
    layer.compute_dtype = torch.float32
    layer.fp8_matmul = True
    part = lora_compute.LoraPart(torch.randn(rank, in_features, generator=g),
                                 torch.randn(out_features, rank, generator=g), factor)
    model = torch.nn.Sequential(layer)
    x = torch.randn(200, in_features, generator=g)
    with torch.no_grad():
        base = model(x)
        lora_compute.apply_loras(model, {"0": [part]}, "cpu", torch.float32)
        return x, base, model(x), part


# --- start images: PNG files made once per session; tests only read them ------------------------------------------
# The variants differ in size and pattern; each test keeps the one it was written with.

def _diagonal(x, y):
    return (x + y) % 255


def _gradient_png(tmp_path_factory, width: int, height: int, x_step: int, y_step: int, blue=_diagonal,
                 square=None) -> str:
    """A `width` x `height` RGB PNG: red x * x_step, green y * y_step, blue blue(x, y), and where `square`
    (a numpy index of rows and columns) is given, a red (250, 40, 40) rectangle there. Returns its path."""
    path = tmp_path_factory.mktemp("img") / "start.png"
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * x_step, y * y_step, blue(x, y)], axis=-1).clip(0, 255).astype(np.uint8)
    if square is not None:
        rgb[square] = (250, 40, 40)
    Image.fromarray(rgb).save(path)
    return str(path)


@pytest.fixture(scope="session")
def start_image(tmp_path_factory) -> str:
    """A 96x80 gradient with a square in it: not square, so the bucket and crop are exercised."""
    return _gradient_png(tmp_path_factory, 96, 80, 2, 3, square=np.s_[20:50, 30:60])


@pytest.fixture(scope="session")
def start_image_no_square(tmp_path_factory) -> str:
    """The 96x80 gradient of `start_image` without the red square."""
    return _gradient_png(tmp_path_factory, 96, 80, 2, 3)


@pytest.fixture(scope="session")
def start_image_64x64(tmp_path_factory) -> str:
    """A 64x64 gradient (a square image)."""
    return _gradient_png(tmp_path_factory, 64, 64, 3, 3)


@pytest.fixture(scope="session")
def start_image_80x64(tmp_path_factory) -> str:
    """An 80x64 gradient."""
    return _gradient_png(tmp_path_factory, 80, 64, 3, 4)


@pytest.fixture(scope="session")
def start_image_128x96(tmp_path_factory) -> str:
    """A 128x96 gradient with a red rectangle in it."""
    return _gradient_png(tmp_path_factory, 128, 96, 2, 2, square=np.s_[30:60, 40:80])


@pytest.fixture(scope="session")
def start_image_128x128(tmp_path_factory) -> str:
    """A 128x128 gradient whose blue falls from the top-left corner (255 - x - y // 2)."""
    return _gradient_png(tmp_path_factory, 128, 128, 2, 2, blue=lambda x, y: 255 - x - y // 2)


# --- tiny models --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def fp8_models(tmp_path_factory) -> Path:
    """Tiny models with a ~20 MB transformer (1 dual, 2 single blocks at width 288). Tests may add the fp8
    cache to it (test_fp8.py); tests that break the cache, or need it absent, work on a copy (models_copy)."""
    models = tmp_path_factory.mktemp("fp8models")
    make_tiny_models(models, transformer_mb=20, seed=0)
    return models


@pytest.fixture
def models_copy(fp8_models, tmp_path) -> Path:
    """A private copy of `fp8_models` without its fp8 cache."""
    from framepack_ui.memory import fp8

    dest = tmp_path / "models"
    shutil.copytree(fp8_models, dest, ignore=shutil.ignore_patterns(fp8.CACHE_DIRNAME))
    return dest


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A complete tiny random model set in the real Hugging Face layout, made once per session (seed 0).

    Shared by every test: treat it as read-only, and copy it before changing anything.
    """
    models_dir = tmp_path_factory.mktemp("models")
    make_tiny_models(models_dir, seed=0)
    return models_dir


def cpu_plan(models_dir: Path):
    """The memory plan of a CPU machine with RAM to spare: every model computed in float32 on the CPU, the big
    ones from their read-only file maps."""
    from framepack_ui.memory.plan import PlanOverrides, make_plan
    from framepack_ui.memory.probe import Machine, weights_on_disk

    return make_plan(Machine.supposed(64, 0), weights_on_disk(models_dir), PlanOverrides(resolution=64))


def cpu_manager(models_dir: Path, plan=None, **kwargs):
    """A ModelManager applying `plan` (default: cpu_plan) with the CPU standing in for the GPU."""
    from framepack_ui.memory.manager import ModelManager

    return ModelManager(models_dir, plan if plan is not None else cpu_plan(models_dir), gpu="cpu", **kwargs)


def streamed_on_cpu(plan, resident_blocks: int, name: str = "transformer", **changes):
    """`plan` with `name` streamed block by block (run on the CPU standing in for the GPU, in float32)."""
    changes = {"storage": "map", "compute_dtype": "float32", **changes}
    return plan.with_component(name, where="gpu-streamed", resident_blocks=resident_blocks, **changes)


# The tiny transformer barely reads the text: its blocks' outputs are gated to almost nothing and the pooled text
# reaches the output only through a small modulation, so two prompts give latents 2.5e-6 apart (relative L2, 128 px,
# 2 steps) and videos apart only by x264's rounding. These factors make the text matter: the pooled-text projection
# and the output modulation that carries it, and the first dual block's text values, attention output and gates
# (so the Llama tokens reach the video too). Measured on that run: two prompts 31 % apart, two seeds 78 %.
TEXT_SENSITIVE_SCALES = {"time_text_embed.text_embedder.": 60, "norm_out.linear.": 30,
                         "transformer_blocks.0.attn.add_v_proj.": 50, "transformer_blocks.0.attn.to_out.": 20,
                         "transformer_blocks.0.norm1.linear.": 30}


def scale_transformer_weights(models_dir: Path, scales: dict[str, float]) -> None:
    """Multiply the tiny transformer's tensors whose names start with a key of `scales`, written back in place in
    the real layout (same shards, names, dtype and metadata)."""
    from safetensors.torch import load_file, save_file

    from framepack_ui.weights.layout import COMPONENTS

    folder = COMPONENTS["transformer"].folder(models_dir)
    touched = set()
    for shard in sorted(folder.glob("diffusion_pytorch_model-*.safetensors")):
        tensors = load_file(str(shard))
        for name, tensor in tensors.items():
            factor = next((f for prefix, f in scales.items() if name.startswith(prefix)), None)
            if factor is not None:
                tensors[name] = (tensor.float() * factor).to(tensor.dtype)
                touched.update(p for p in scales if name.startswith(p))
        save_file(tensors, str(shard), metadata={"format": "pt"})
    assert touched == set(scales), f"no tensor starts with {set(scales) - touched}"


@pytest.fixture(scope="session")
def text_sensitive_models(tiny_models_dir, tmp_path_factory) -> Path:
    """The tiny models with a transformer whose output follows the prompt (TEXT_SENSITIVE_SCALES). Read-only."""
    models_dir = tmp_path_factory.mktemp("text_models") / "models"
    shutil.copytree(tiny_models_dir, models_dir, ignore=shutil.ignore_patterns(".cache"))  # no cached prompts
    scale_transformer_weights(models_dir, TEXT_SENSITIVE_SCALES)
    return models_dir


@pytest.fixture
def make_worker(tiny_models_dir, tmp_path):
    """make(**Worker options): a Worker on the tiny models writing to tmp_path/outputs, on the CPU, shut down after
    the test."""
    from framepack_ui.engine import f1
    from framepack_ui.worker import Worker

    workers = []

    def make(run_job=f1.run, **kwargs):
        worker = Worker(kwargs.pop("models_dir", None) or tiny_models_dir, tmp_path / "outputs",
                        device=kwargs.pop("device", "cpu"), run_job=run_job, **kwargs)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.shutdown()


# --- the browser the UI tests drive: Debian's chromium through Playwright (never `playwright install`) --------------

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage"]


@pytest.fixture(scope="module")
def browser():
    """One browser per test module (CPU is shared); each page gets a context of its own (open_page)."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (`sudo apt-get install chromium`, or run "
                    "`python3 install.py --test` as root); the UI tests drive it with Playwright")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """open_page(url, width=, height=, init_script=, **context options) -> a loaded page in a browser context of its own
    (another user); closed after the test, so earlier tests' pages do not keep ticking."""
    contexts = []

    def open_(url, width: int = 1400, height: int = 1500, init_script: str | None = None, **options):
        context = browser.new_context(viewport={"width": width, "height": height}, **options)
        contexts.append(context)
        if init_script:  # runs in every page of the context before the page's own scripts
            context.add_init_script(init_script)
        page = context.new_page()
        page.goto(url)
        page.locator("#start_image input[type=file]").wait_for(state="attached", timeout=60_000)
        return page

    yield open_
    for context in contexts:
        context.close()
