"""
Low-rank adapters (LoRA) for the GPT of model/gpt.py, written by hand.

References: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models": freeze W and learn
dW = B @ A * (alpha / r) with A (r, in) random and B (out, r) zero, so training starts exactly at the base model
(Sec. 4.1); microsoft/loralib for the API (LoRALinear, mark_only_lora_as_trainable, lora_state_dict, merging).

Which reference does DPO use? `lora_disabled(model)` switches every adapter off, so the model computes its *base
weights*: the pretrained weights plus anything already folded into them. That is the right DPO reference only if the
adapter starts at zero (B = 0; `adapters_are_zero` checks it where training starts), because then policy ==
reference at step 0; see TRL issues #4723 and #6591 for what goes wrong otherwise. Hence the workflow: SFT adapter ->
`remove_lora(model, merge=True)` (plain nn.Linear weights that now contain it: the reference) -> fresh `apply_lora`.
`lora_disabled` refuses a merged model (disabling cannot un-add a merged delta exactly).
"""

import json
import math
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minidpo.config import ConfigError, require
from minidpo.fileio import atomic_path, atomic_write_json
from minidpo.formats.safetensors import SafetensorsError, load_file, save_file

ADAPTER_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "minidpo-lora-v1"
# The projections of GPT-2 that model/gpt.py writes as nn.Linear (Conv1D in Hugging Face's GPT-2).
GPT2_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRAFileError(ValueError):
    """A saved adapter (adapter_config.json or its tensors) that is truncated, corrupt or does not fit the model."""


def check_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    """Raise ConfigError (a ValueError naming the field) for a rank, alpha or dropout no adapter can have."""
    require(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1, "rank",
            f"must be an integer >= 1, got {rank!r}")
    require(isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0, "alpha",
            f"must be a finite number > 0 (the update is alpha / rank * B A), got {alpha!r}")
    require(isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0, "dropout",
            f"must be in [0, 1), got {dropout!r}")


@dataclass(frozen=True)
class LoRAConfig:
    """Adapter settings. targets: module-name suffixes among GPT2_TARGETS (or full names ending in one of them)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("attn.c_attn",)

    def __post_init__(self) -> None:
        check_hyperparameters(self.rank, self.alpha, self.dropout)
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        bad = [t for t in targets if not _matches(str(t), GPT2_TARGETS)]
        require(bool(targets) and not bad, "targets", f"must be a non-empty subset of {', '.join(GPT2_TARGETS)}, "
                f"got {', '.join(map(repr, bad or targets)) or 'none'}")
        object.__setattr__(self, "targets", tuple(dict.fromkeys(targets)))  # a tuple, each target once


class LoRALinear(nn.Module):
    """y = base(x) + dropout(x) @ A.T @ B.T * (alpha / rank), with the base nn.Linear kept as `.base`; a drop-in
    for the nn.Linear it wraps (weight, bias, in_features, out_features read through to it)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        check_hyperparameters(rank, alpha, dropout)
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

    weight, bias = property(lambda self: self.base.weight), property(lambda self: self.base.bias)
    in_features = property(lambda self: self.base.in_features)
    out_features = property(lambda self: self.base.out_features)

    def delta_weight(self) -> Tensor:
        """Weight update (out, in). Naive: delta[o, i] = scaling * sum_r B[o, r] * A[r, i]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.disabled or self.merged:  # merged: the delta already lives in base.weight
            return self.base(x)
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


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # whole dotted components only: "attn.c_attn" matches "transformer.h.0.attn.c_attn", not "...xattn.c_attn"
    return any(name == t or name.endswith("." + t) for t in targets)


def _require_lora(model: nn.Module, who: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{who}: the model has no LoRA layers; call apply_lora(model) first")
    return layers


def apply_lora(model: nn.Module, config: LoRAConfig | None = None, **settings: Any) -> nn.Module:
    """Wrap every nn.Linear whose name ends with a target in a LoRALinear (in place) and freeze everything else.

    Pass a LoRAConfig, or its fields by name: `apply_lora(model, rank=4, alpha=8, targets=("attn.c_attn",))`.
    """
    if config is None:
        config = LoRAConfig(**settings)
    elif settings:
        raise TypeError(f"apply_lora: pass a LoRAConfig or keyword settings, not both (got {sorted(settings)})")
    existing = lora_layers(model)
    if existing:
        raise RuntimeError(f"apply_lora: the model already has {len(existing)} LoRA layers (e.g. "
                           f"{next(iter(existing))!r}); call remove_lora(model, merge=True) first so the new adapter "
                           "starts at zero on top of the old one and lora_disabled() gives the right reference")
    matched = [(n, m) for n, m in model.named_modules() if n and _matches(n, config.targets)]
    if not matched:
        available = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(f"apply_lora: no module name ends with any of targets={list(config.targets)}; "
                         f"some nn.Linear modules are: {available[:8]}")
    ids = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    for name, module in matched:
        if not isinstance(module, nn.Linear):
            raise TypeError(f"apply_lora: target {name!r} is a {type(module).__name__}, expected nn.Linear")
        if ids.count(id(module.weight)) > 1:
            raise ValueError(f"apply_lora: {name}.weight is tied to another parameter (e.g. lm_head and wte); "
                             "merging would silently change both, so it cannot be a LoRA target")
    for name, module in matched:
        _replace(model, name, LoRALinear(module, config.rank, config.alpha, config.dropout))
    model.lora_config = config
    mark_only_lora_as_trainable(model)
    return model


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)  # get_submodule("") is the model itself


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
    """Fold every adapter into its base weight (W += B @ A * scaling), keeping the layers; a second call is a no-op.
    Merge after training: an optimizer step on A, B while merged would make unmerge subtract the wrong delta."""
    for layer in _require_lora(model, "merge_lora").values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Undo merge_lora (W -= B @ A * scaling); exact up to float rounding."""
    for layer in _require_lora(model, "unmerge_lora").values():
        layer.unmerge()
    return model


def remove_lora(model: nn.Module, merge: bool) -> nn.Module:
    """Replace every LoRALinear by its plain nn.Linear: with merge=True the adapter is folded in (e.g. SFT before
    a DPO adapter, or a merged export), with merge=False it is dropped (back to the reference)."""
    for name, layer in _require_lora(model, "remove_lora").items():
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        _replace(model, name, layer.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside this block the model computes exactly its base weights (adapters off): the DPO reference. A merged
    model is refused rather than unmerged temporarily, because W + dW - dW is not bit-exact W."""
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


def reference_of(model: nn.Module) -> AbstractContextManager:
    """The reference: the model with its adapter disabled; a model without one is its own reference."""
    return lora_disabled(model) if lora_layers(model) else nullcontext(model)


def adapters_are_zero(model: nn.Module) -> bool:
    """True when every lora_B is zero, i.e. policy == lora_disabled reference (check this before DPO starts)."""
    return all(bool((layer.lora_B == 0).all()) for layer in _require_lora(model, "adapters_are_zero").values())


def lora_config_of(model: nn.Module) -> LoRAConfig:
    """The model's adapter settings; targets: apply_lora's, else the layers' full names (they match just those)."""
    layers = _require_lora(model, "lora_config_of")
    settings = {(layer.rank, layer.alpha, layer.dropout_p) for layer in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"LoRA layers have different (rank, alpha, dropout) settings {sorted(settings)}; "
                         "one adapter file stores one setting")
    rank, alpha, dropout = settings.pop()
    config = getattr(model, "lora_config", None)
    return LoRAConfig(rank, alpha, dropout, config.targets if config is not None else tuple(layers))


def save_lora(model: nn.Module, path: str | Path) -> Path:
    """Write `path/adapter.safetensors` and `path/adapter_config.json` (each atomically); returns the directory."""
    config = lora_config_of(model)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / ADAPTER_FILE) as tmp:
        save_file(lora_state_dict(model), tmp, metadata={"format": FORMAT})
    atomic_write_json(path / CONFIG_FILE, {"format": FORMAT, **asdict(config), "targets": list(config.targets)})
    return path


def read_lora_config(path: str | Path) -> LoRAConfig:
    """The LoRAConfig in `path/adapter_config.json`; LoRAFileError naming the file if it is not one save_lora wrote."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no LoRA config; expected a directory written by save_lora")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoRAFileError(f"{file}: not valid JSON ({e}); the file is truncated or corrupt") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise LoRAFileError(f"{file}: format is {found!r}, expected {FORMAT!r} (a directory written by save_lora)")
    missing = [k for k in ("rank", "alpha", "dropout", "targets") if k not in raw]
    if missing or not isinstance(raw["targets"], list):
        raise LoRAFileError(f"{file}: missing keys {missing}" if missing else f"{file}: targets must be a list")
    try:
        return LoRAConfig(raw["rank"], raw["alpha"], raw["dropout"], tuple(raw["targets"]))
    except ConfigError as e:
        raise LoRAFileError(f"{file}: {e}") from None


def load_lora(model: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter saved by save_lora; applies LoRA with the saved config first if the model has none."""
    path = Path(path)
    config, file = read_lora_config(path), path / ADAPTER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter tensors; expected a directory written by save_lora")
    try:
        tensors = load_file(file)
    except SafetensorsError as e:
        raise LoRAFileError(f"{file}: not a readable adapter file ({e})") from None
    if not lora_layers(model):
        apply_lora(model, config)
    layers = lora_layers(model)
    for name, layer in layers.items():
        if layer.merged:
            raise RuntimeError(f"load_lora: layer {name!r} is merged; call unmerge_lora(model) before loading")
        if (layer.rank, layer.alpha) != (config.rank, config.alpha):
            raise LoRAFileError(f"{path / CONFIG_FILE} has rank={config.rank}, alpha={config.alpha:g} but the "
                                f"model's layer {name!r} has rank={layer.rank}, alpha={layer.alpha:g}")
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LoRAFileError(f"{file} does not fit the model: missing keys {missing[:4]}"
                            f"{' ...' if len(missing) > 4 else ''}, unexpected keys {unexpected[:4]}"
                            f"{' ...' if len(unexpected) > 4 else ''}")
    for key, t in tensors.items():
        if t.shape != expected[key].shape or not t.is_floating_point():
            raise LoRAFileError(f"{file}: key {key!r} is {t.dtype} of shape {tuple(t.shape)}, the model expects a "
                                f"floating tensor of shape {tuple(expected[key].shape)}")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
    return model
