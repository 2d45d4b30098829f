"""One transformer forward over several processes: its token sequence split across them (Ulysses context
parallelism), through diffusers' own machinery (`ContextParallelConfig`, `enable_parallelism`, the dispatcher's
Ulysses attention). diffusers' FramePack transformer declares no `_cp_plan`; `framepack_cp_plan` is the one it
lacks.

Where the sequence is split. The FramePack forward builds its sequence inside `forward` (not in a submodule whose
output a plan could split): the clean-latent history (4x, 2x, then start + 1x) is concatenated in front of the
noisy latents' tokens, with their rotary embeddings concatenated the same way, and the text (the image
projection's tokens, then the prompt's, cut at the mask) is kept apart as `encoder_hidden_states` and joins only
inside attention. So the plan splits the first block's inputs, where both are final, and every block's rotary
table along the latent tokens' axis (each token keeps its own rotation); the text tokens are split too (each
rank holds a share of both; attention sees every rank's shares after Ulysses' all-to-all, in rank order, which
attention does not mind: it is the same set of keys). Every block after the first works per token except
attention, so nothing else needs splitting. The last block's outputs are gathered, before `forward` keeps the
noisy latents' tokens (`hidden_states[:, -original_context_length:]`) and projects them out.

Uneven counts. The token counts rarely divide by the world size (the text's length follows the prompt; the 2x and
4x history grids round up), so the plan runs diffusers' "Ulysses anything" mode: shares differ by at most one token
(`tensor_split`), and the all-to-all carries each rank's own count. No padding tokens, hence no key mask, which
would keep SDPA off its flash kernels. The heads must divide by the world size (24 heads: 2, 3, 4, 6 or 8 GPUs), so
that every rank gets whole heads and no padded head is computed for nothing.

Batch 1 only, as the engine calls it (real CFG runs two passes): with a larger batch the forward builds a key mask
over [latents, text] that this split would need to cut the same way.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.models._modeling_parallel import (ContextParallelConfig, ContextParallelInput,
                                                 ContextParallelOutput, ParallelConfig)

from .backends import split_heads_problem

SPLIT_AXIS = 1  # (B, S, C): the token axis of hidden and text states
ROPE_AXIS = 0   # (S, D): the token axis of the rotary cos/sin tables


def framepack_cp_plan(transformer) -> dict:
    """The context-parallel plan for `transformer` (diffusers' HunyuanVideoFramepackTransformer3DModel): split the
    first block's inputs, gather the last block's outputs (see the module's notes)."""
    dual, single = len(transformer.transformer_blocks), len(transformer.single_transformer_blocks)
    if dual + single == 0:
        raise ValueError("a transformer without blocks has no sequence to split")
    first = "transformer_blocks.0" if dual else "single_transformer_blocks.0"
    last = f"single_transformer_blocks.{single - 1}" if single else f"transformer_blocks.{dual - 1}"
    tokens = ContextParallelInput(split_dim=SPLIT_AXIS, expected_dims=3)
    rope = ContextParallelInput(split_dim=ROPE_AXIS, expected_dims=2)
    gathered = ContextParallelOutput(gather_dim=SPLIT_AXIS, expected_dims=3)
    plan = {first: {"hidden_states": tokens, "encoder_hidden_states": tokens}}
    # `forward` hands every block the whole rotary table (the states come from the block before, already split),
    # so every block takes its share of it; the dual-stream block names it freqs_cis, the single-stream one
    # image_rotary_emb
    if dual:
        plan["transformer_blocks.*"] = {"freqs_cis": (rope, rope)}
    if single:
        plan["single_transformer_blocks.*"] = {"image_rotary_emb": (rope, rope)}
    # both outputs: diffusers' gather hook takes no "leave this one" entry; the text's gather is ~1k tokens
    plan[last] = [gathered, gathered]
    return plan


def apply_sequence_split(transformer, process_group_size: int | None = None) -> ContextParallelConfig:
    """Split `transformer`'s sequence across the default process group (torch.distributed, initialised by the
    caller) with the FramePack plan. Every rank then calls the transformer with the same full inputs and gets the
    same full output. Hooks: diffusers' named `cp_input---*` / `cp_output---*` on the two planned blocks, and the
    parallel config on every attention processor."""
    world_size = process_group_size or dist.get_world_size()
    problem = split_heads_problem(transformer.config.num_attention_heads, world_size)
    if problem:
        raise ValueError(problem)
    config = ContextParallelConfig(ulysses_degree=world_size, ulysses_anything=True)
    plan = framepack_cp_plan(transformer)
    splits = {name: entry for name, entry in plan.items() if isinstance(entry, dict)}
    if torch.accelerator.device_count() > 0:
        transformer.enable_parallelism(config=config, cp_plan=splits)
    else:
        _enable_parallelism_without_accelerator(transformer, config, splits)
    for name, entry in plan.items():
        if not isinstance(entry, dict):
            _gather_evenly_padded(transformer, name, entry, config)
    return config


def _gather_evenly_padded(transformer, name: str, outputs: list, config: ContextParallelConfig) -> None:
    """The plan's gathers, with every rank's share padded to the longest for the all-gather. diffusers' uneven
    gather (`_all_gather_anything`) hands `dist.all_gather` tensors of different lengths, which gloo refuses
    ("ProcessGroupGloo::allgather: invalid tensor size"); padded, the gather is the same one collective on every
    backend, at the cost of at most one token per rank. Registered under diffusers' own hook name for a gather."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.context_parallel import _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE, ContextParallelGatherHook

    class PaddedGatherHook(ContextParallelGatherHook):
        def post_forward(self, module, output):
            group = self.parallel_config._flattened_mesh.get_group()
            return tuple(gather_uneven(x, cpm.gather_dim, group) for x, cpm in zip(output, self.metadata))

    module = transformer.get_submodule(name)
    HookRegistry.check_if_exists_or_initialize(module).register_hook(
        PaddedGatherHook(list(outputs), config), _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE.format(name))


def gather_uneven(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's `x` (lengths along `dim` differing by rank) concatenated in rank order, on every rank."""
    from diffusers.models._modeling_parallel import gather_size_by_comm

    lengths = gather_size_by_comm(x.shape[dim], group)
    longest = max(lengths)
    if x.shape[dim] < longest:
        pad_shape = list(x.shape)
        pad_shape[dim] = longest - x.shape[dim]
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim)
    parts = [torch.empty_like(x) for _ in lengths]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat([part.narrow(dim, 0, length) for part, length in zip(parts, lengths)], dim=dim)


def _enable_parallelism_without_accelerator(transformer, config: ContextParallelConfig, plan: dict) -> None:
    """What `enable_parallelism` does, on a machine without an accelerator (the CPU processes of the tests, over
    gloo). diffusers 0.42.1 cannot do it there: its `_resolve_parallel_config` picks the device as
    `rank % torch.accelerator.device_count()`, and that count is 0 without one (ZeroDivisionError). The same steps
    on a CPU mesh: the config set up and recorded on the model and on every attention processor, then diffusers'
    own `apply_context_parallel` with the plan."""
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention
    from torch.distributed.device_mesh import init_device_mesh

    if transformer._parallel_config is not None:
        raise RuntimeError("the sequence split is already applied to this transformer")
    mesh = init_device_mesh("cpu", config.mesh_shape, mesh_dim_names=config.mesh_dim_names)
    parallel = ParallelConfig(context_parallel_config=config)
    parallel.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=mesh)
    transformer._parallel_config = parallel
    for module in transformer.modules():
        if not isinstance(module, (Attention, AttentionModuleMixin)):
            continue
        processor = getattr(module, "processor", None)
        if processor is not None and hasattr(processor, "_parallel_config"):
            processor._parallel_config = parallel
    apply_context_parallel(transformer, config, plan)


def is_sequence_split(transformer) -> bool:
    config = getattr(transformer, "_parallel_config", None)
    return config is not None and config.context_parallel_config is not None
