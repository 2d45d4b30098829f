"""LoRA at run time: each targeted Linear of the transformer adds its low-rank update `up @ down` (strength and
alpha folded into `up`) when it runs; the stored weights are never changed.

Why at run time and not merged into the weights: the weights are a read-only file map, an fp8 cache (13 GB) or
streamed block by block from either; merging would mean writing a second copy of what it merges into (a merged
cache on disk, rewritten at every change of a strength), and an fp8 merge would round most of the update away.
Here a LoRA costs its own tensors (kept on the compute device beside the model: 0.36 GB for rank 32 on every Linear of
the 60 blocks, the plan counts them) and a change of strength or of LoRA set between jobs uploads only those.

How each call adds it, by what moves the fewest bytes (a low-rank matmul is memory-bound; FLOPs hardly matter):
- merged per call: `W' = W + up @ down` in a transient weight, then one matmul. Extra traffic: read W, write W'
  (2 in x out). Where the Linear already makes a transient weight (fp8 dequantized to bf16, or a mapped weight
  upcast to float32 on the CPU), the update goes into that one in place.
- beside the matmul: `y + (x @ down.T) @ up.T`. Extra traffic: read x, read and write y (tokens x (in + 2 out)).
The cheaper one is taken per call from the shapes (`merges_per_call`): at 640 px the ~19k image tokens of a
3072-wide Linear make the merge move about 10x fewer bytes (2 x 9.4 M against 19k x 9.2 k elements: arithmetic, not
a measurement; bench/bench_lora.py measures the step, `--way` either choice alone); the 1-token
modulation Linears and the text-stream Linears (~1k tokens) add beside.

An fp8 matmul (`Fp8Linear.fp8_matmul`) multiplies the fp8 weight itself, so there is no transient weight to merge
into: merged into the stored weight, the update would be rounded onto fp8's steps, which keeps a third of one that
changes the weights by 1 % (a float32 simulation of a random 1024 x 1024 layer, rank 32). Where a merge would be
taken, the update goes inside the fp8 product instead, as R more inner columns (`fp8_linear.fp8_linear_low_rank`).
Torch makes its left operand `[x, h]` in three more passes over x, which costs more than beside's read and write
of y where x is the wider (the 12288- and 15360-wide inputs), so there a narrowing layer adds beside
(docs/benchmarks.md "LoRA", per layer and per step on an H100). Two other ways are written and off until measured
in the compiled step: the operand made in one Triton kernel (compute/fp8_lora_kernel.py, `FUSED_LEFT_OPERAND`),
with which narrowing layers join the product too, and h as output columns of the product (`FP8_WAYS`).

A class swap, as `Fp8Linear` (fp8_linear.py says why: per-module hooks made torch.compile recompile every block):
`LoraLinear` for nn.Linear, `LoraFp8Linear` for Fp8Linear, undone by `remove_loras`. The update lives in two
non-persistent buffers of the Linear (`lora_down` (R, in), `lora_up` (out, R)): buffers, not parameters, so the
block streamer (which moves a block's parameters) leaves them resident, and compiled blocks take them as inputs.
Several LoRAs on one Linear are concatenated along the rank: `[up1*s1, up2*s2] @ [down1; down2]` is their sum.

Why not peft: its LoraLayer wraps each Linear in a new module whose weight becomes `base_layer.weight` (the
streamer and the fp8 cache address weights by their names), it cannot wrap Fp8Linear, and its per-module forward
would give every block its own compiled graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry

from .fp8_linear import Fp8Linear, dequantize, fp8_linear_low_rank, fp8_linear_rank_outputs, fused_left_operand

DOWN, UP = "lora_down", "lora_up"  # the buffers a LoRA Linear holds


@dataclass(frozen=True)
class LoraPart:
    """One LoRA's update of one Linear: `factor * up @ down` (factor = strength x the file's alpha / rank)."""
    down: torch.Tensor  # (r, in), any float dtype and device (a read-only map is fine: only read)
    up: torch.Tensor  # (out, r)
    factor: float


def merges_per_call(tokens: int, in_features: int, out_features: int) -> bool:
    """Whether merging the update into a transient weight moves fewer bytes than adding it beside the matmul (see the
    module docstring): 2 x in x out elements against tokens x (in + 2 out)."""
    return tokens * (in_features + 2 * out_features) > 2 * in_features * out_features


def _add_beside(y: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """y + (x @ down.T) @ up.T, the second matmul accumulating into y in place (one read and one write of y, and in
    eager no second tokens x out tensor; compiled, the graph picks its own buffers: the same peak either way on the
    H100, docs/benchmarks.md "LoRA"). `y` is the Linear's own fresh output."""
    low = x.reshape(-1, x.shape[-1]).to(down.dtype) @ down.t()  # (tokens, R)
    y.view(-1, y.shape[-1]).addmm_(low.to(y.dtype), up.t().to(y.dtype))
    return y


class LoraLinear(torch.nn.Linear):
    """nn.Linear plus its LoRA update (buffers `lora_down`, `lora_up`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.lora_down, self.lora_up
        if merges_per_call(x.numel() // self.in_features, self.in_features, self.out_features):
            return F.linear(x, torch.addmm(self.weight, up.to(self.weight.dtype), down.to(self.weight.dtype)),
                            self.bias)
        return _add_beside(F.linear(x, self.weight, self.bias), x, down, up)


# How a many-token fp8-matmul Linear adds its update, by the layer's shape: "inner" (the rank as inner columns of the
# product: fp8_linear_low_rank), "outputs" (h as output columns of the product, up beside: fp8_linear_rank_outputs) or
# "beside" (`_add_beside`). Without the Triton kernel a narrowing layer's "inner" goes beside.
FP8_WAYS = {"widening": "inner", "square": "inner", "narrowing": "inner"}


def fp8_way(in_features: int, out_features: int, x: torch.Tensor, rank: int) -> str:
    kind = "widening" if in_features < out_features else "square" if in_features == out_features else "narrowing"
    way = FP8_WAYS[kind]
    return "beside" if way == "inner" and kind == "narrowing" and not fused_left_operand(x, rank) else way


class LoraFp8Linear(Fp8Linear):
    """Fp8Linear plus its LoRA update: merged into the dequantized transient weight, inside an fp8 product, or added
    beside the product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.lora_down, self.lora_up
        many = merges_per_call(x.numel() // self.in_features, self.in_features, self.out_features)
        way = fp8_way(self.in_features, self.out_features, x, down.shape[0]) if many and self.fp8_matmul else None
        if not many or way == "beside":
            return _add_beside(super().forward(x), x.to(self.compute_dtype), down, up)
        bias = self.bias
        if bias is not None and bias.dtype != self.compute_dtype:
            bias = bias.to(self.compute_dtype)
        if way == "outputs":
            return fp8_linear_rank_outputs(x.to(self.compute_dtype), self.weight, self.weight_scale, bias, down, up)
        if way == "inner":
            return fp8_linear_low_rank(x.to(self.compute_dtype), self.weight, self.weight_scale, bias, down, up)
        weight = dequantize(self.weight, self.weight_scale, self.compute_dtype)  # transient: merged in place
        weight.addmm_(up.to(self.compute_dtype), down.to(self.compute_dtype))
        return F.linear(x, weight, bias)


# the class a LoRA makes of each Linear class, and back
LORA_CLASS = {torch.nn.Linear: LoraLinear, Fp8Linear: LoraFp8Linear}
BASE_CLASS = {lora: base for base, lora in LORA_CLASS.items()}


def lora_target_problem(module: torch.nn.Module) -> str | None:
    """Why `module` cannot take a LoRA here (None: it can)."""
    if type(module) in LORA_CLASS or type(module) in BASE_CLASS:
        return None
    return f"is a {type(module).__name__}, not a Linear layer this app adds LoRAs to"


def apply_loras(model: torch.nn.Module, parts: dict[str, list[LoraPart]], device: torch.device | str,
                dtype: torch.dtype) -> int:
    """Give each Linear named in `parts` (module names of `model`) the sum of its LoRA updates, as `dtype` tensors on
    `device`; every other Linear that had one loses it. Returns how many Linears carry a LoRA now. Nothing of the
    model's own weights is touched; the parts are only read."""
    device = torch.device(device)
    wanted = {name: ps for name, ps in parts.items() if any(p.factor != 0 for p in ps)}
    for name, module in model.named_modules():
        if name not in wanted and type(module) in BASE_CLASS:
            _detach(module)
    for name, ps in wanted.items():
        module = model.get_submodule(name)
        problem = lora_target_problem(module)
        if problem:
            raise ValueError(f"'{name}' {problem}")
        ps = [p for p in ps if p.factor != 0]
        down = torch.cat([p.down.to(device, dtype) for p in ps])  # (R, in)
        # the factor applied in float32 (alpha / rank is often not a power of two), then rounded once to `dtype`
        up = torch.cat([(p.up.to(device, torch.float32) * p.factor).to(dtype) for p in ps], dim=1)  # (out, R)
        if down.shape[1] != module.in_features or up.shape[0] != module.out_features:
            raise ValueError(f"'{name}' is {module.out_features}x{module.in_features}, the LoRA "
                             f"{up.shape[0]}x{down.shape[1]}")
        if type(module) not in BASE_CLASS:
            _swap_class(module, LORA_CLASS[type(module)])
        module.register_buffer(DOWN, down, persistent=False)
        module.register_buffer(UP, up, persistent=False)
    return len(wanted)


def remove_loras(model: torch.nn.Module) -> int:
    """Every LoRA off `model` (the Linears as they were); returns how many there were."""
    count = 0
    for module in model.modules():
        if type(module) in BASE_CLASS:
            _detach(module)
            count += 1
    return count


def lora_layers(model: torch.nn.Module) -> dict[str, int]:
    """The Linears carrying a LoRA, with the rank they add (all LoRAs on it together)."""
    return {name: module.lora_down.shape[0] for name, module in model.named_modules() if type(module) in BASE_CLASS}


def _detach(module: torch.nn.Module) -> None:
    _swap_class(module, BASE_CLASS[type(module)])
    for buffer in (DOWN, UP):
        module._buffers.pop(buffer, None)


def _swap_class(module: torch.nn.Module, cls: type) -> None:
    """module.__class__ = cls, with the diffusers hooks on the module itself (e.g. the upcast of a mapped weight)
    kept around the new class's forward. A hook keeps the forward it wrapped as a bound method of the old class,
    and removing every hook leaves that bound method as an instance attribute: so the hooks are taken off, that
    attribute dropped, the class swapped, and the same hooks put back in their order."""
    registry = getattr(module, "_diffusers_hook", None)
    hooks = list(registry.hooks.items()) if registry is not None else []
    for name, _ in reversed(hooks):
        registry.remove_hook(name, recurse=False)
    if hooks:
        module.__dict__.pop("forward", None)
    module.__class__ = cls
    for name, hook in hooks:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
