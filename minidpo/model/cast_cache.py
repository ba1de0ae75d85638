"""
Frozen weights cast to the autocast dtype once, not at every forward.

torch.autocast casts an fp32 weight to bf16 each time a matmul reads it, and caches that cast only for leaf tensors
that require grad until the outermost autocast region exits. Frozen weights are never cached: under LoRA that is
every weight of GPT-2, so each forward (policy, reference) copied ~124M fp32 values to bf16, the largest op of the
bf16 DPO step at GPT-2 124M shape (bench/profile_dpo_step.py --shapes).

`autocast_weight(w)` returns w itself outside autocast or when w requires grad (autocast's own rules then apply),
else a copy in the autocast dtype kept beside w and reused while w is unchanged: the copy is keyed on the tensor's
storage, version counter (bumped by every in-place write: optimizer steps, LoRA merge/unmerge, load_state_dict) and
the dtype, so a changed weight is never read stale. The values are exactly autocast's own cast, so results do not
change, only the time.

Opt-in: model/gpt.py builds plain nn.Linear layers, and `cache_weight_casts(model)` turns them into `Linear` in
place where a run builds its model (experiment/stages.py, sample.py, the benchmarks). LoRA wraps either kind. Memory:
one half-precision copy of the frozen weights (250 MB for GPT-2 124M) while the model is used under autocast.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

# weight -> (storage pointer, version, dtype, copy); weak keys by identity, so a dropped weight takes its copy along
_CACHE = WeakIdKeyDictionary()


def autocast_weight(weight: Tensor) -> Tensor:
    """weight as autocast would hand it to a matmul, cached across calls while weight is frozen and unchanged.

    Naive equivalent: weight.to(torch.get_autocast_dtype(weight.device.type)) under autocast, else weight.
    """
    if torch.compiler.is_compiling():
        return weight  # a traced graph casts (and can hoist the cast) itself; a Python-side cache cannot be traced
    device = weight.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if dtype is None or weight.dtype != torch.float32 or weight.requires_grad:
        return weight  # not ours to cache: fp32 math, already half precision, or autocast's per-step cache applies
    key = (weight.data_ptr(), weight._version, dtype)
    hit = _CACHE.get(weight)
    if hit is not None and hit[:3] == key:
        return hit[3]
    copy = weight.detach().to(dtype)
    _CACHE[weight] = (*key, copy)
    return copy


class Linear(nn.Linear):
    """nn.Linear whose frozen weight is cast to the autocast dtype once (see the module docstring); same parameters,
    same state dict, same values as nn.Linear under autocast."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, autocast_weight(self.weight), self.bias)


def cache_weight_casts(model: nn.Module) -> nn.Module:
    """Every plain nn.Linear in `model` becomes a `Linear`, in place (the same module objects, parameters, hooks and
    state dict: only the class changes); returns the model. A layer added afterwards (the reward model's head)
    stays a plain nn.Linear."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = Linear
    return model
