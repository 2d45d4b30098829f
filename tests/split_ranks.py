"""What each process of the CPU sequence-split tests runs (test_split.py); module-level, so spawned processes
can import it."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from framepack_ui.engine import sections

# Token counts chosen not to divide by 2 (the plan's uneven shares): 6x6 latents are 3x3 patches, so the latent
# tokens are 9 x 9 new + 2 x 9 clean + 4 (2x, padded) + 4 (4x) = 107; the text 4 image + 7 prompt tokens = 11.
LATENT_SIZE = 6
TEXT_TOKENS, IMAGE_TOKENS = 7, 4


def uneven_inputs(transformer, seed: int = 0) -> dict:
    """One forward's inputs in the F1 layout (a mid-video history) whose token counts are odd."""
    cfg, size = transformer.config, LATENT_SIZE
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(1, 16, 1, size, size, generator=g)
    history = sections.History.start(start)
    history.append(torch.randn(1, 16, 9, size, size, generator=g))
    return dict(hidden_states=torch.randn(1, 16, 9, size, size, generator=g), timestep=torch.tensor([700.0]),
                encoder_hidden_states=torch.randn(1, TEXT_TOKENS, cfg.text_embed_dim, generator=g),
                encoder_attention_mask=torch.ones(1, TEXT_TOKENS, dtype=torch.long),
                pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                image_embeds=torch.randn(1, IMAGE_TOKENS, cfg.image_proj_dim, generator=g),
                guidance=torch.tensor([10000.0]), return_dict=False, **history.conditioning(start))


def load_sensitive_transformer(models_dir: Path):
    """The tiny transformer with its attention made to matter (test_parity_diffusers.conditioning_sensitive)."""
    from conftest import cpu_plan
    from test_parity_diffusers import conditioning_sensitive

    plan = cpu_plan(Path(models_dir)).components["transformer"]
    return conditioning_sensitive(Path(models_dir), plan, torch.device("cpu"))


def forward_rank(rank: int, world_size: int, init_file: str, models_dir: str, out_dir: str) -> None:
    """One rank of the split forward: the whole output, and the output with attention kept to this rank's own
    tokens (what a split without Ulysses' exchange would give), saved for the test to compare."""
    from framepack_ui.compute.context_parallel import apply_sequence_split
    from framepack_ui.worker.split import LOOPBACK_ENV

    os.environ.update(LOOPBACK_ENV)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        transformer = load_sensitive_transformer(Path(models_dir))
        apply_sequence_split(transformer)
        with torch.no_grad():
            split = transformer(**uneven_inputs(transformer))[0]
            processors = [m.processor for m in transformer.modules() if hasattr(m, "processor")
                          and getattr(m.processor, "_parallel_config", None) is not None]
            config = processors[0]._parallel_config
            for processor in processors:
                processor._parallel_config = None
            local_only = transformer(**uneven_inputs(transformer))[0]
            for processor in processors:
                processor._parallel_config = config
        blocks = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
        torch.save({"split": split, "local_only": local_only, "split_attention": len(processors), "blocks": blocks},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


ATTENTION_SCALES = {"transformer_blocks.0.attn.to_v.": 10, "transformer_blocks.0.attn.to_out.0.": 10,
                    "transformer_blocks.0.attn.norm_q.": 4, "transformer_blocks.0.attn.norm_k.": 4,
                    "single_transformer_blocks.0.attn.to_v.": 10, "single_transformer_blocks.0.proj_out.": 10,
                    "single_transformer_blocks.0.attn.norm_q.": 4, "single_transformer_blocks.0.attn.norm_k.": 4}


def record_environment(path: str, transformer) -> None:
    """A rank hook (run_split_job): what this process's environment holds, for the test to read."""
    from framepack_ui.worker.split import LOOPBACK_ENV, SPLIT_ENV

    Path(path, f"env-{dist.get_rank()}.txt").write_text(
        "\n".join(f"{k}={os.environ.get(k)}" for k in (*SPLIT_ENV, *LOOPBACK_ENV)))


def fail_here(transformer) -> None:
    """A rank hook: this rank fails once its transformer is split (the others are left waiting)."""
    raise RuntimeError("injected failure")
