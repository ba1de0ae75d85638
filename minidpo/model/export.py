"""
The two ways to hand a minidpo model to Hugging Face: the whole model (`save_hf`) or only its LoRA adapter
(`export_peft`).

References:
1) transformers' GPT2LMHeadModel: state-dict names (`transformer.h.0.attn.c_attn.weight`, ...), config.json keys,
   and its Conv1D projections, which store their weight as [in, out] where nn.Linear stores [out, in].
2) huggingface/peft's adapter layout: `adapter_model.safetensors` with keys
   `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`, and `adapter_config.json` (LoraConfig's fields),
   so `PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base), out_dir)` loads the adapter.
Every file is written atomically (minidpo.fileio).
"""

import os
from pathlib import Path

import torch
import torch.nn as nn

from minidpo.fileio import atomic_path, atomic_write_json
from minidpo.formats.safetensors import save_file
from minidpo.model.gpt import GPT
from minidpo.model.lora import GPT2_TARGETS, lora_config_of, lora_layers
from minidpo.model.tokenizer import EOT_ID

# minidpo's nn.Linear projection weights, stored as Conv1D ([in, out]) in Hugging Face's GPT-2
LINEAR = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
MODEL_FILE = "model.safetensors"
PEFT_ADAPTER_FILE = "adapter_model.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"


def hf_state_dict(model: GPT, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors: projection weights transposed to Conv1D [in, out], lm_head.weight left out (it is
    tied to wte; transformers re-ties it on load), floating tensors cast to `dtype` if given."""
    tensors = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight":
            continue
        t = t.detach()
        if key.endswith(LINEAR):
            t = t.t()  # nn.Linear [out, in] -> Conv1D [in, out]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[key] = t.contiguous()
    return tensors


def hf_config(model: GPT, dtype: torch.dtype | None = None) -> dict:
    """config.json of a GPT2LMHeadModel with the model's sizes (GPT-2's fixed choices: gelu_new, eps 1e-5, tied)."""
    c = model.config
    stored = str(dtype or model.transformer.wte.weight.dtype).removeprefix("torch.")
    eot = EOT_ID if c.vocab_size > EOT_ID else None  # GPT-2's <|endoftext|>; a toy vocabulary has no such token
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "n_positions": c.block_size,
            "n_ctx": c.block_size, "vocab_size": c.vocab_size, "n_inner": None, "layer_norm_epsilon": 1e-5,
            "attn_pdrop": c.dropout, "embd_pdrop": c.dropout, "resid_pdrop": c.dropout,
            "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True,
            "torch_dtype": stored, "bos_token_id": eot, "eos_token_id": eot}


def save_hf(model: GPT, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write `model.safetensors` + `config.json` that transformers' GPT2LMHeadModel.from_pretrained loads (and
    minidpo.model.weights.load_gpt2 reads back). `dtype` (e.g. torch.float16 for a small shipped model) casts floating
    tensors; default: as they are. Returns out_dir."""
    wrapped = sorted(lora_layers(model))
    if wrapped:
        raise ValueError(f"save_hf: {len(wrapped)} layers still carry LoRA adapters (e.g. {wrapped[0]}); fold them "
                         "into the weights first with minidpo.model.lora.remove_lora(model, merge=True), or write only "
                         "the adapter with minidpo.model.export.export_peft")
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / MODEL_FILE) as tmp:
        save_file(hf_state_dict(model, dtype), tmp, metadata={"format": "pt"})  # transformers wants format=pt
    atomic_write_json(out / "config.json", hf_config(model, dtype))
    return out


def peft_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors: `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r).

    The same matrices as ours, unchanged: PEFT's lora_A / lora_B are nn.Linear whichever base layer they wrap, so
    they are stored [out, in] like ours even around a Conv1D.
    """
    return {f"base_model.model.{name}.lora_{ab}.weight": getattr(layer, f"lora_{ab}").detach()
            for name, layer in lora_layers(model).items() for ab in ("A", "B")}


def peft_config(model: nn.Module, base_model_name_or_path: str) -> dict:
    """adapter_config.json for PEFT's LoraConfig. Hugging Face's GPT-2 projections are Conv1D with weight
    [in, out], so `fan_in_fan_out` is true: PEFT transposes dW when it merges."""
    config = lora_config_of(model)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        # exact module names, so PEFT wraps precisely the layers we trained
        "target_modules": sorted(lora_layers(model)), "fan_in_fan_out": True, "bias": "none",
        "modules_to_save": None, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }


def export_peft(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str = "gpt2") -> Path:
    """Write the model's adapter in PEFT's layout for Hugging Face's GPT2LMHeadModel; returns out_dir."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("export_peft: the model has no LoRA layers; call apply_lora(model) first")
    not_conv1d = [n for n in layers if not any(n == t or n.endswith("." + t) for t in GPT2_TARGETS)]
    if not_conv1d:
        raise ValueError(f"export_peft: layers {not_conv1d[:4]} are not Conv1D in Hugging Face's GPT-2; "
                         f"exportable targets end with one of {list(GPT2_TARGETS)}")
    config = peft_config(model, base_model_name_or_path)  # checks the layers share one setting, before any write
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / PEFT_ADAPTER_FILE) as tmp:
        save_file(peft_state_dict(model), tmp, metadata={"format": "pt"})
    atomic_write_json(out / PEFT_CONFIG_FILE, config)
    return out
