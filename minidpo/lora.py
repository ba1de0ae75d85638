"""
Low-rank adapters (LoRA) for the GPT in model.py, written by hand.

References:
1) Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": freeze W and learn dW = B @ A * (alpha / r)
   with A (r, in) random and B (out, r) zero, so training starts exactly at the base model (Sec. 4.1).
2) microsoft/loralib for the API: LoRALinear, mark_only_lora_as_trainable, lora_state_dict.
3) huggingface/peft for the exported adapter layout (adapter_model.safetensors + adapter_config.json), so a
   minidpo adapter loads with `PeftModel.from_pretrained` on Hugging Face's GPT2LMHeadModel.

Which reference does DPO use? `lora_disabled(model)` switches every adapter off, so the model computes its *base
weights*, i.e. the pretrained weights plus anything already merged into them. That is the right DPO reference only
if the adapter starts at zero (B = 0), because then policy == reference at step 0; see TRL issues #4723 and #6591
for what goes wrong otherwise. Hence the workflow: SFT adapter -> `merge_and_unwrap` (folds it into plain
nn.Linear weights, which become the reference) -> fresh `apply_lora` for DPO. `apply_lora` refuses a model that
still has LoRA layers, and `lora_disabled` refuses a merged model (disabling cannot un-add a merged delta exactly).

On disk (`save_lora`): a directory holding `adapter.safetensors` (the `lora_state_dict` keys, e.g.
`transformer.h.0.attn.c_attn.lora_A`) and `adapter_config.json` (format, rank, alpha, dropout, targets).
"""

import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minidpo.safetensors import load_file, save_file

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "minidpo-lora-v1"
# Every projection that model.py writes as nn.Linear is a Conv1D ([in, out]) in Hugging Face's GPT-2.
HF_CONV1D_SUFFIXES = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.c_attn",)


def lora_delta(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Weight update (out, in) of one adapter. Naive: delta[o, i] = scaling * sum_r B[o, r] * A[r, i]."""
    return (B @ A) * scaling


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A.T @ B.T * (alpha / rank), with the base nn.Linear kept as `.base`."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1], got {dropout!r}")
        self.base = base
        self.rank, self.alpha, self.dropout_p = rank, float(alpha), float(dropout)
        self.scaling = self.alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        # same init as nn.Linear's weight (and loralib/PEFT): A random, B zero, so dW = 0 at the start
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False    # True while dW is folded into base.weight
        self.disabled = False  # True inside lora_disabled(): compute the base layer only

    # read-only conveniences so code written for nn.Linear keeps working on a wrapped layer
    weight = property(lambda self: self.base.weight)
    bias = property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def delta_weight(self) -> Tensor:
        return lora_delta(self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled:
            if self.merged:
                raise RuntimeError("LoRALinear is disabled but merged: its base weight still contains the adapter; "
                                   "call unmerge_lora(model) before lora_disabled(model)")
            return self.base(x)
        if self.merged:
            return self.base(x)  # the delta already lives in base.weight
        lora = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., in) -> (..., r) -> (..., out)
        return self.base(x) + lora * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout_p:g}, merged={self.merged}"


# ---------------------------------------------------------------------------------------------- model-level API

def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # whole dotted components only: "attn.c_attn" matches "transformer.h.0.attn.c_attn", not "...xattn.c_attn"
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               targets: tuple[str, ...] | list[str] = ("attn.c_attn",)) -> nn.Module:
    """Wrap every nn.Linear whose name ends with a target in a LoRALinear (in place) and freeze everything else."""
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    existing = lora_layers(model)
    if existing:
        raise RuntimeError(f"apply_lora: the model already has {len(existing)} LoRA layers (e.g. "
                           f"{next(iter(existing))!r}); call merge_and_unwrap(model) first so the new adapter starts "
                           "at zero on top of the old one and lora_disabled() gives the right reference")
    matched = [(n, m) for n, m in model.named_modules() if n and _matches(n, targets)]
    if not matched:
        available = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"apply_lora: no module name ends with any of targets={list(targets)}; "
                         f"some nn.Linear modules are: {available[:8]}")
    shared = _shared_parameter_ids(model)
    for name, module in matched:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"apply_lora: target {name!r} is a {type(module).__name__}, expected nn.Linear")
        if id(module.weight) in shared:
            raise ValueError(f"apply_lora: {name}.weight is tied to another parameter (e.g. lm_head and wte); "
                             "merging would silently change both, so it cannot be a LoRA target")
    for name, module in matched:
        _replace(model, name, LoRALinear(module, rank, alpha, dropout))
    model.lora_config = LoRAConfig(rank, float(alpha), float(dropout), targets)
    mark_only_lora_as_trainable(model)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)  # get_submodule("") is the model itself


def _shared_parameter_ids(model: nn.Module) -> set[int]:
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    return {i for i in ids if ids.count(i) > 1}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The A and B matrices of every adapter (what the optimizer should see)."""
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors, e.g. {'transformer.h.0.attn.c_attn.lora_A': (r, in), '...lora_B': (out, r)}."""
    return {f"{name}.{k}": getattr(layer, k).detach() for name, layer in lora_layers(model).items()
            for k in ("lora_A", "lora_B")}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W += B @ A * scaling); forward then costs nothing extra.
    Merge after training: an optimizer step on A, B while merged would make unmerge subtract the wrong delta."""
    for layer in _require_lora(model, "merge_lora").values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (W -= B @ A * scaling); exact up to float rounding."""
    for layer in _require_lora(model, "unmerge_lora").values():
        layer.unmerge()
    return model


def _require_lora(model: nn.Module, who: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{who}: the model has no LoRA layers; call apply_lora(model) first")
    return layers


def remove_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every LoRALinear by its plain nn.Linear: with merge=True the adapter is folded in, else dropped.

    The base parameters stay frozen (as apply_lora left them); a later apply_lora freezes them anyway.
    """
    for name, layer in _require_lora(model, "remove_lora").items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _replace(model, name, layer.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merge_and_unwrap(model: nn.Module) -> nn.Module:
    """remove_lora(model, merge=True): the adapter becomes part of the base (e.g. SFT before a DPO adapter)."""
    return remove_lora(model, merge=True)


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model computes exactly its base weights (adapters off): the DPO reference.

    The reference is the base weights, which equals the policy at step 0 only when every adapter started at
    B = 0 (see the module docstring). A merged model is refused rather than unmerged temporarily, because
    W + dW - dW is not bit-exact W.
    """
    layers = _require_lora(model, "lora_disabled")
    merged = [n for n, layer in layers.items() if layer.merged]
    if merged:
        raise RuntimeError(f"lora_disabled: {len(merged)} LoRA layers are merged (e.g. {merged[0]!r}), so the base "
                           "weights contain the adapter; call unmerge_lora(model) first")
    previous = {n: layer.disabled for n, layer in layers.items()}
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for n, layer in layers.items():
            layer.disabled = previous[n]


def adapters_are_zero(model: nn.Module) -> bool:
    """True when every lora_B is zero, i.e. policy == lora_disabled reference (check this before DPO starts)."""
    return all(bool((layer.lora_B == 0).all()) for layer in _require_lora(model, "adapters_are_zero").values())


# ---------------------------------------------------------------------------------------------- save / load

def _current_config(model: nn.Module, layers: dict[str, LoRALinear]) -> LoRAConfig:
    settings = {(layer.rank, layer.alpha, layer.dropout_p) for layer in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"LoRA layers have different (rank, alpha, dropout) settings {sorted(settings)}; "
                         "one adapter file stores one setting")
    rank, alpha, dropout = settings.pop()
    config = getattr(model, "lora_config", None)
    # without the apply_lora record, the full module names are targets that match exactly these layers
    targets = config.targets if config is not None else tuple(layers)
    return LoRAConfig(rank, alpha, dropout, tuple(targets))


def _write_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)  # atomic, like save_file


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write `path/adapter.safetensors` and `path/adapter_config.json`; returns the directory."""
    layers = _require_lora(model, "save_lora")
    config = _current_config(model, layers)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(lora_state_dict(model), path / ADAPTER_FILE, metadata={"format": FORMAT})
    _write_json({"format": FORMAT, **asdict(config), "targets": list(config.targets)}, path / CONFIG_FILE)
    return path


def read_lora_config(path: str | Path) -> LoRAConfig:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no LoRA config; expected a directory written by save_lora")
    raw = json.loads(file.read_text())
    if raw.get("format") != FORMAT:
        raise ValueError(f"{file}: format is {raw.get('format')!r}, expected {FORMAT!r}")
    try:
        return LoRAConfig(int(raw["rank"]), float(raw["alpha"]), float(raw["dropout"]), tuple(raw["targets"]))
    except KeyError as e:
        raise ValueError(f"{file}: missing key {e}; expected rank, alpha, dropout, targets") from None


def load_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter saved by save_lora; applies LoRA with the saved config first if the model has none."""
    path = Path(path)
    config = read_lora_config(path)
    layers = lora_layers(model)
    if not layers:
        apply_lora(model, config.rank, config.alpha, config.dropout, config.targets)
        layers = lora_layers(model)
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"load_lora: layer {name!r} is merged; call unmerge_lora(model) before loading")
        if (layer.rank, layer.alpha) != (config.rank, config.alpha):
            raise ValueError(f"load_lora: {path / CONFIG_FILE} has rank={config.rank}, alpha={config.alpha:g} but "
                             f"layer {name!r} has rank={layer.rank}, alpha={layer.alpha:g}")
    tensors = load_file(path / ADAPTER_FILE)
    expected = lora_state_dict(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise KeyError(f"load_lora: {path / ADAPTER_FILE} does not fit the model: missing keys {missing[:4]}"
                       f"{' ...' if len(missing) > 4 else ''}, unexpected keys {unexpected[:4]}"
                       f"{' ...' if len(unexpected) > 4 else ''}")
    for key, t in tensors.items():
        if t.shape != expected[key].shape:
            raise ValueError(f"load_lora: {path / ADAPTER_FILE} key {key!r} has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(expected[key].shape)}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
    return model


def export_peft(model: nn.Module, out_dir: str | Path, base_model_name_or_path: str = "gpt2") -> Path:
    """Write the adapter in PEFT's layout for Hugging Face's GPT2LMHeadModel.

    Keys are `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), the same layout as
    ours (PEFT's lora_A/lora_B are nn.Linear whichever base layer they wrap). Hugging Face's GPT-2 projections are
    Conv1D with weight (in, out), so `fan_in_fan_out` is true: PEFT transposes dW when it merges.
    """
    layers = _require_lora(model, "export_peft")
    config = _current_config(model, layers)
    not_conv1d = [n for n in layers if not _matches(n, HF_CONV1D_SUFFIXES)]
    if not_conv1d:
        raise ValueError(f"export_peft: layers {not_conv1d[:4]} are not Conv1D in Hugging Face's GPT-2; "
                         f"exportable targets end with one of {list(HF_CONV1D_SUFFIXES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"base_model.model.{name}.lora_{ab}.weight": getattr(layer, f"lora_{ab}").detach()
               for name, layer in layers.items() for ab in ("A", "B")}
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        # exact module names, so PEFT wraps precisely the layers we trained
        "target_modules": sorted(layers), "fan_in_fan_out": True, "bias": "none", "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    _write_json(peft_config, out_dir / "adapter_config.json")
    return out_dir
