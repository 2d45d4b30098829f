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
    for variable, subfolder in CACHE_VARIABLES.items():
        path = os.path.abspath(os.path.join(folder, subfolder))  # as inductor writes it back (cache_dir_utils)
        if sys.platform == "win32" and len(path) > WINDOWS_CACHE_PATH_MAX:
            continue
        current = os.environ.get(variable)
        if not current or current == _set_here.get(variable):
            os.environ[variable] = _set_here[variable] = path


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


class CompiledBlockForward(ModelHook):
    """The block's own forward, run through torch.compile (compiled lazily, at its first call); after a compiler
    failure (a GPU Triton does not support, a Windows toolchain problem), eager, as the VAE decoder's hook does."""

    def __init__(self, mode: str | None, state: _CompilerState | None = None):
        super().__init__()
        self.mode = mode
        self.state = state or _CompilerState()
        self._compiled = None

    def new_forward(self, module, *args, **kwargs):
        eager = self.fn_ref.original_forward
        if self.state.failed:
            return eager(*args, **kwargs)
        if self._compiled is None:
            # dynamic=False: the token count is the same for every call of a job (F1's context is fixed-size), and
            # a new resolution only recompiles (once per shape)
            self._compiled = torch.compile(eager, dynamic=False, mode=self.mode)
        try:
            return self._compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # a real shortage: the plan and the job's error handling deal with it
        except Exception as exc:  # noqa: BLE001 - a compiler failure: the eager blocks still work (a fault of the
            # block itself raises again from the eager call)
            log.warning("compiling the transformer's blocks failed (%s): running them without compiling from now on",
                        _first_line(exc))
            self.state.failed = True
            return eager(*args, **kwargs)


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

class _DecoderCompileState:
    """Shared by the decoder's hook and its regions' hooks: whether the decode running now is one to compile (a
    full frame window), and whether the compiler failed once (eager from then on). One thread decodes with a VAE
    at a time (each worker lane owns its models: worker/pool.py), so a plain attribute will do."""

    def __init__(self):
        self.failed = False
        self.compiling_now = False


class CompiledDecoderForward(ModelHook):
    """The VAE decoder's forward, compiled with dynamic shapes: in regions (each resnet block and upsampler on its
    own, `CompiledDecoderRegion`) or whole. Short frame windows and, after a compiler failure, every call run
    eagerly."""

    def __init__(self, whole: bool = False):
        super().__init__()
        self.whole = whole
        self.state = _DecoderCompileState()
        self._compiled = None

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
        if not self.whole:  # the regions' hooks compile; the rest of the decoder runs as it is
            self.state.compiling_now = True
            try:
                return eager(z, *args, **kwargs)
            finally:
                self.state.compiling_now = False
        if self._compiled is None:
            self._compiled = torch.compile(eager, dynamic=True)
        try:
            return self._compiled(z, *args, **kwargs)
        except torch.OutOfMemoryError:
            raise  # a real shortage: the plan and the job's error handling deal with it
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager decoder still works
            _decoder_compile_failed(self.state, exc)
            return eager(z, *args, **kwargs)


class CompiledDecoderRegion(ModelHook):
    """One resnet block's or upsampler's forward through torch.compile (dynamic shapes), while the decoder's hook
    says the decode is one to compile. Every instance of a class shares dynamo's compiled code (one code object),
    so the decoder's 14 resnet blocks and 3 upsamplers compile as 9 graphs, one per channel layout and
    upsampling (H100, docs/benchmarks.md "Compiled VAE decoder only where it buys larger tiles")."""

    def __init__(self, state: _DecoderCompileState):
        super().__init__()
        self.state = state
        self._compiled = None

    def new_forward(self, module, *args, **kwargs):
        eager = self.fn_ref.original_forward
        if self.state.failed or not self.state.compiling_now:
            return eager(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(eager, dynamic=True)
        try:
            return self._compiled(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - as the whole decoder's hook
            _decoder_compile_failed(self.state, exc)
            return eager(*args, **kwargs)


def _decoder_compile_failed(state: _DecoderCompileState, exc: Exception) -> None:
    log.warning("the compiled VAE decoder failed (%s): decoding without compiling from now on", _first_line(exc))
    state.failed = True


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
