"""Compiled forwards: the transformer's blocks and the VAE decoder, each behind a named, removable diffusers hook.

Measured (docs/benchmarks.md, "Compiled block forwards"): compiling each block's forward took a step from 1.145
to 0.872 s on an H100 (it fuses the RoPE, norm and cast element-wise work that was 35 % of GPU time). Only each
block's own forward is compiled, inside the hook, never `Module.compile()`: that traces the hooks around the block
too, and the streamer's weight swap breaks the graph. The hook itself runs eagerly, so hooks registered after it
(TeaCache's) wrap the compiled forward without entering the graph.

Whether a model is compiled is read from its hooks (`blocks_compiled`, `decoder_compiled`): no flag is hung on
the model.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook

log = logging.getLogger(__name__)

BLOCK_HOOK = "framepack_compiled_block"
DECODER_HOOK = "framepack_compiled_decoder"
DECODER_REGION_HOOK = "framepack_compiled_decoder_region"

# Versions of a block's compiled graph dynamo keeps (its default is 8, past which a block silently runs eagerly): each
# LoRA layout a job puts on the blocks (compute/lora.py; fp8 or bf16 Linears, none, another set or rank) is another.
BLOCK_GRAPH_VERSIONS = 64

# The compilers' caches live with the models, not in the temp folder (inductor's default), which Windows' disk cleanup
# and many Linux boots empty: a later start compiles from the cache, in a fraction of the time (docs/benchmarks.md,
# "First-job compile costs").
CACHE_SUBDIR = Path(".cache") / "compile"  # under the models folder
CACHE_VARIABLES = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}
_set_here: dict[str, str] = {}  # the variables keep_caches_in set, and to what


# Windows paths past 260 characters fail unless long paths are enabled, and the compilers' own file names inside
# their caches are long: a deep models folder leaves the caches where torch puts them (untested on Windows).
WINDOWS_CACHE_PATH_MAX = 80


def keep_caches_in(folder: Path) -> None:
    """Point inductor's and Triton's caches into `folder` before the first compile; a folder the user (or a bench)
    set in the environment is theirs and stays."""
    for variable in CACHE_VARIABLES:
        path = _cache_path_in(folder, variable)
        if path is not None and _ours_to_set(variable):
            os.environ[variable] = _set_here[variable] = path


def _ours_to_set(variable: str) -> bool:
    """Whether the cache folder in `variable` is not the user's: unset, set by keep_caches_in, or inductor's own
    default, which importing torch._dynamo (diffusers does) writes into the variable (torch 2.13: its
    package.py calls cache_dir() at import)."""
    current = os.environ.get(variable)
    if not current or current == _set_here.get(variable):
        return True
    if variable != "TORCHINDUCTOR_CACHE_DIR":
        return False
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(current) == os.path.abspath(default_cache_dir())


def _cache_path_in(folder: Path, variable: str) -> str | None:
    """The cache folder `keep_caches_in(folder)` gives `variable`; None where the path would be too long."""
    path = os.path.abspath(os.path.join(folder, CACHE_VARIABLES[variable]))  # as inductor writes it back
    return None if sys.platform == "win32" and len(path) > WINDOWS_CACHE_PATH_MAX else path


# Frame windows shorter than this run the eager decoder. diffusers' windows are 5 latents (4 or fewer at the end of
# a decode); traced, 5 and 4 share one compiled graph and 3 needs another (tests/test_vae_tiles.py), minutes on a
# GPU. Eager, a 3-latent window (9 frames against 17) peaks below a compiled full one (1.5x the memory, 9/17 the
# frames), so it fits the compiled plan's budget.
VAE_COMPILED_MIN_LATENTS = 4


def _hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    registry = getattr(module, "_diffusers_hook", None)  # diffusers' own registry attribute
    return registry.get_hook(name) if registry is not None else None


def _register(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)


def _remove(module: torch.nn.Module, name: str) -> None:
    if _hook(module, name) is not None:
        module._diffusers_hook.remove_hook(name, recurse=False)


def _first_line(exc: Exception) -> str:
    """A compiler error in one line for the log: its message's first line, or its type where it has none."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# --- transformer blocks --------------------------------------------------------------------------------------------

class _CompilerState:
    """Shared by the blocks of one transformer: after the compiler fails once, every block runs eagerly, rather than
    each of the 60 trying (and failing) in turn."""
    failed = False


class _CompiledForward(ModelHook):
    """A module's own forward through torch.compile, compiled at its first call. An out-of-memory error is a real
    shortage and propagates (the plan and the job's error handling deal with it); any other error from the compiled
    call is taken for a compiler failure (a GPU Triton does not support, a Windows toolchain problem): the subclass's
    `compiler_failed` hears of it and the forward runs eagerly (a fault of the module itself raises again from
    there)."""

    def __init__(self, **compile_options):
        super().__init__()
        self.compile_options = compile_options
        self._compiled = None

    def run_compiled(self, *args, **kwargs):
        eager = self.fn_ref.original_forward
        if self._compiled is None:
            self._compiled = torch.compile(eager, **self.compile_options)
        try:
            return self._compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - see the class's docstring
            self.compiler_failed(exc)
            return eager(*args, **kwargs)

    def compiler_failed(self, exc: Exception) -> None:
        raise NotImplementedError


class CompiledBlockForward(_CompiledForward):
    """A transformer block's forward, compiled; after a compiler failure every block of the model runs eagerly."""

    def __init__(self, mode: str | None, state: _CompilerState | None = None):
        # dynamic=False: the token count is the same for every call of a job (F1's context is fixed-size), and a
        # new resolution only recompiles (once per shape)
        super().__init__(dynamic=False, mode=mode)
        self.state = state or _CompilerState()

    @property
    def mode(self) -> str | None:
        return self.compile_options["mode"]

    def new_forward(self, module, *args, **kwargs):
        if self.state.failed:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.run_compiled(*args, **kwargs)

    def compiler_failed(self, exc: Exception) -> None:
        log.warning("compiling the transformer's blocks failed (%s): running them without compiling from now on",
                    _first_line(exc))
        self.state.failed = True


def transformer_blocks(transformer) -> list[torch.nn.Module]:
    """The F1 transformer's blocks in execution order: 20 dual-stream, then 40 single-stream."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def compile_blocks(transformer, mode: str | None = None) -> bool:
    """Compile each block's forward (idempotent per `mode`, torch.compile's). Returns whether they are compiled now.
    Call it before any per-job hooks (TeaCache) are registered on the blocks: replacing the hook re-links diffusers'
    hook chain around it."""
    blocks = transformer_blocks(transformer)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_GRAPH_VERSIONS)
    if all(getattr(_hook(b, BLOCK_HOOK), "mode", False) == mode for b in blocks):
        return True
    state = _CompilerState()
    for block in blocks:
        _remove(block, BLOCK_HOOK)
        _register(block, CompiledBlockForward(mode, state), BLOCK_HOOK)
    log.info("transformer blocks compiled (the first step of a new resolution takes longer)")
    return True


def blocks_compiled(transformer) -> bool:
    """Whether the blocks run compiled: hooked, and their compiler has not failed."""
    return any(h is not None and not h.state.failed for h in (_hook(b, BLOCK_HOOK) for b in
                                                                 transformer_blocks(transformer)))


# --- VAE decoder ---------------------------------------------------------------------------------------------------

# What this process's compiled decoder did on each device ("cuda:0"): READY once a full frame window decoded
# compiled (dynamo keeps the graphs for the life of the process, for every later load of the VAE), FAILED once its
# compiler failed. Read by the probe (`decoder_compile_state`), so that a plan only counts on a compiled decode
# that costs no compile.
READY, FAILED = "ready", "failed"
_decoder_outcome: dict[str, str] = {}
# The states `decoder_compile_state` adds for a decoder not compiled in this process: its graphs in the compilers'
# on-disk caches (an earlier process compiled them; a marker beside inductor's cache says so, and goes when that
# cache is emptied), or not.
CACHED, COLD = "cached", "cold"
_MARKER_PREFIX = "framepack-vae-decoder-"


def _device_key(device: str | torch.device) -> str:
    """"cuda:0" for "cuda", cuda:0 and "cuda:0": the outcomes' key."""
    place = torch.device(device)
    if place.type == "cuda" and place.index is None:
        place = torch.device("cuda", torch.cuda.current_device())
    return str(place)


def _decoder_ready(device: str) -> None:
    if _decoder_outcome.get(device) == READY:
        return
    _decoder_outcome[device] = READY
    try:
        cache = _inductor_cache_now()  # where inductor wrote
        cache.mkdir(parents=True, exist_ok=True)
        _compile_marker(cache, device).touch()
    except Exception as exc:  # noqa: BLE001 - the decode went well; only a later start's estimate misses it
        log.info("no marker for the compiled VAE decoder in the compile cache: %s", exc)


def _compile_marker(inductor_cache: Path, device: str) -> Path:
    """The marker of a compiled decoder in inductor's cache: per torch version and GPU model, as the cached code
    is."""
    place = torch.device(device)
    gpu = torch.cuda.get_device_name(place) if place.type == "cuda" else place.type
    tag = "".join(c if c.isalnum() or c in ".+-" else "_" for c in f"{torch.__version__}-{gpu}")
    return inductor_cache / f"{_MARKER_PREFIX}{tag}"


def inductor_cache_dir(models_dir: Path) -> Path:
    """Where inductor's cache is for a manager of `models_dir` (`keep_caches_in`), read without setting anything:
    torch's own `cache_dir()` sets the variable, and `keep_caches_in` would then leave it as the user's."""
    variable = "TORCHINDUCTOR_CACHE_DIR"
    ours = _cache_path_in(Path(models_dir) / CACHE_SUBDIR, variable) if _ours_to_set(variable) else None
    return Path(ours) if ours is not None else _inductor_cache_now()  # the user's, or a path too long for ours


def _inductor_cache_now() -> Path:
    """The folder inductor writes to now: its variable, or its default (torch's own `cache_dir()` would set the
    variable)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def decoder_compile_state(device: str | torch.device, models_dir: Path | None) -> str:
    """For the plan: the compiled VAE decoder on `device` ("cuda:0") is READY in this process, FAILED here, CACHED
    on disk (compiling it again loads the graphs: seconds) or COLD (minutes: docs/benchmarks.md, "First-job
    compile costs")."""
    device = _device_key(device)
    outcome = _decoder_outcome.get(device)
    if outcome is not None:
        return outcome
    if models_dir is None:
        return COLD
    try:
        return CACHED if _compile_marker(inductor_cache_dir(models_dir), device).exists() else COLD
    except OSError:
        return COLD


class _DecoderCompileState:
    """Shared by the decoder's hook and its regions' hooks: whether the decode running now is one to compile (a
    full frame window), and whether the compiler failed once (eager from then on). One thread decodes with a VAE
    at a time (each worker lane owns its models: worker/pool.py), so a plain attribute will do."""

    def __init__(self):
        self.failed = False
        self.compiling_now = False
        self.device: str | None = None  # the device of the decode running now, as "cuda:0"


class CompiledDecoderForward(_CompiledForward):
    """The VAE decoder's forward, compiled with dynamic shapes: in regions (each resnet block and upsampler on its
    own, `CompiledDecoderRegion`) or whole. Short frame windows and, after a compiler failure, every call run
    eagerly. A full frame window decoded compiled makes the decoder ready on its device for this process
    (`decoder_compile_state`)."""

    def __init__(self, whole: bool = False):
        super().__init__(dynamic=True)
        self.whole = whole
        self.state = _DecoderCompileState()

    @property
    def failed(self) -> bool:
        return self.state.failed

    @failed.setter
    def failed(self, value: bool) -> None:
        self.state.failed = value

    def new_forward(self, module, z, *args, **kwargs):
        eager = self.fn_ref.original_forward
        if self.failed or z.shape[2] < VAE_COMPILED_MIN_LATENTS:
            return eager(z, *args, **kwargs)
        self.state.device = _device_key(z.device)
        if self.whole:
            decoded = self.run_compiled(z, *args, **kwargs)
        else:  # the regions' hooks compile; the rest of the decoder runs as it is
            self.state.compiling_now = True
            try:
                decoded = eager(z, *args, **kwargs)
            finally:
                self.state.compiling_now = False
        if not self.failed:
            _decoder_ready(self.state.device)
        return decoded

    def compiler_failed(self, exc: Exception) -> None:
        _decoder_compile_failed(self.state, exc)


class CompiledDecoderRegion(_CompiledForward):
    """One resnet block's or upsampler's forward through torch.compile (dynamic shapes), while the decoder's hook
    says the decode is one to compile. Every instance of a class shares dynamo's compiled code (one code object),
    so the decoder's 14 resnet blocks and 3 upsamplers compile as 9 graphs, one per channel layout and
    upsampling (H100, docs/benchmarks.md "Compiled VAE decoder only where it buys larger tiles")."""

    def __init__(self, state: _DecoderCompileState):
        super().__init__(dynamic=True)
        self.state = state

    def new_forward(self, module, *args, **kwargs):
        if self.state.failed or not self.state.compiling_now:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.run_compiled(*args, **kwargs)

    def compiler_failed(self, exc: Exception) -> None:
        _decoder_compile_failed(self.state, exc)


def _decoder_compile_failed(state: _DecoderCompileState, exc: Exception) -> None:
    log.warning("the compiled VAE decoder failed (%s): decoding without compiling from now on", _first_line(exc))
    state.failed = True
    if state.device is not None:
        _decoder_outcome[state.device] = FAILED


def decoder_regions(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's pieces compiled on their own: every resnet block and upsampler. They hold the element-wise work
    at full resolution (GroupNorm, SiLU, nearest upsampling, the causal padding) whose fusing lowers the peak; the
    input convolution and the mid block's attention work at latent resolution."""
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import (
        HunyuanVideoResnetBlockCausal3D, HunyuanVideoUpsampleCausal3D)

    return [m for m in decoder.modules() if isinstance(m, (HunyuanVideoResnetBlockCausal3D,
                                                           HunyuanVideoUpsampleCausal3D))]


def compile_vae_decoder(vae, whole: bool = False) -> bool:
    """Compile the VAE decoder's forward (idempotent): by default region by region (`decoder_regions`), with
    `whole` as one graph. Returns whether it is compiled now.

    Measured (docs/benchmarks.md, "Compiled VAE decoder only where it buys larger tiles"): compiled, the decode
    peaks a third lower (5.75 GiB instead of 8.62 in 384 px tiles on an H200): the GroupNorm, SiLU and padding
    between the 3-D convolutions fuse instead of each writing a full-resolution tensor. It is hardly faster in the
    same tiles, so the plan compiles it only where that room buys larger tiles. Region by region the first decode
    compiles in 72 s instead of 120 s whole (18 s from the on-disk cache), decodes as fast, and peaks up to 9 %
    above the whole graph (5.17 against 4.79 GiB in 384 px tiles; the plan counts the 9 %): the regions hold all
    the full-resolution work, and the pieces between them (the input convolution, the mid block's attention at
    latent resolution, the output head) run as they are (H100, docs/benchmarks.md "Compiled VAE decoder only where
    it buys larger tiles", "First-job compile costs").
    `dynamic=True`: one compile instead of one per shape. Each new shape regime still recompiles, so the engine
    decodes a compiled decoder's latents in spatial tiles of one size (`decodes_in_even_tiles`; engine/vae.py),
    and the short last frame window runs eagerly (VAE_COMPILED_MIN_LATENTS). Should compiling fail (a compiler
    missing or broken on the user's machine), the decoder goes back to eager for good rather than failing the
    job."""
    hook = _hook(vae.decoder, DECODER_HOOK)
    if hook is not None and hook.whole != whole:
        uncompile_vae_decoder(vae)
        hook = None
    if hook is None:
        hook = CompiledDecoderForward(whole)
        _register(vae.decoder, hook, DECODER_HOOK)
        if not whole:
            # a resnet block class has one code object: its channel layouts are a few versions of one graph
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_GRAPH_VERSIONS)
            for region in decoder_regions(vae.decoder):
                _register(region, CompiledDecoderRegion(hook.state), DECODER_REGION_HOOK)
        log.info("VAE decoder compiled (the first decode takes longer)")
    return decoder_compiled(vae)


# The small decode the regions compile on ahead of a job's first real decode: (frames, height, width) in latents,
# a full frame window and sizes distinct from each other and above 1, so dynamo gives each its own symbol (equal
# sizes share one, and a decode whose sizes differ would compile again). Its largest tensor is a few tens of MB.
SMALL_DECODE_LATENTS = (VAE_COMPILED_MIN_LATENTS + 1, 6, 7)


def compile_on_a_small_decode(vae) -> bool:
    """Compile the decoder (set up by `compile_vae_decoder`) now, on a small decode of zeros on its device: its
    graphs then serve every later decode of this process at every size (dynamic shapes), with the VAE loaded again
    or not. The worker runs this while it is idle, where the compile competes with no job for VRAM
    (docs/benchmarks.md, "First-job compile costs"). Returns whether the decoder is ready; an out-of-memory
    error propagates."""
    hook = _hook(vae.decoder, DECODER_HOOK)
    if hook is None or hook.failed:
        return False
    weight = vae.decoder.conv_in.conv.weight
    zeros = torch.zeros(1, vae.decoder.conv_in.conv.in_channels, *SMALL_DECODE_LATENTS, device=weight.device,
                        dtype=weight.dtype)
    with torch.no_grad():
        vae.decoder(zeros)
    return decoder_compiled(vae)


def uncompile_vae_decoder(vae) -> None:
    _remove(vae.decoder, DECODER_HOOK)
    for region in decoder_regions(vae.decoder):
        _remove(region, DECODER_REGION_HOOK)


@contextmanager
def decoder_eager(vae):
    """Inside the block the decoder runs eagerly, in the same tiles (benchmarks compare with the compiled one)."""
    hook = _hook(vae.decoder, DECODER_HOOK)
    failed = hook.failed if hook is not None else None
    if hook is not None:
        hook.failed = True
    try:
        yield
    finally:
        if hook is not None:
            hook.failed = failed


def decoder_compiled(vae) -> bool:
    """The decoder runs compiled (not eager after a compiler failure)."""
    hook = _hook(vae.decoder, DECODER_HOOK)
    return hook is not None and not hook.failed


def decodes_in_even_tiles(vae) -> bool:
    """A decoder set up for compiling decodes in spatial tiles of one size, also after falling back to eager (the
    same tiles keep its output the same)."""
    return _hook(vae.decoder, DECODER_HOOK) is not None
