"""
Parity check: a LoRA adapter trained in minidpo loads in Hugging Face PEFT and gives the same logits.

Builds a random tiny GPT2LMHeadModel, copies its weights into a minidpo GPT (Conv1D [in, out] -> nn.Linear
[out, in]), applies minidpo LoRA with random non-zero B, writes it with export_peft, loads it with
PeftModel.from_pretrained and prints the max abs logits difference: unmerged, and after PEFT's merge_and_unload
(which exercises fan_in_fan_out=True). Expect ~1e-6..1e-5 in float32.

Dev-only (needs transformers + peft): .venv-bench/bin/python bench/peft_parity.py
"""

import os
import platform
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from minidpo.model.export import export_peft  # noqa: E402
from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402
from minidpo.model.lora import apply_lora, lora_parameters  # noqa: E402

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_to_minidpo(hf_state: dict[str, torch.Tensor], model: GPT) -> None:
    """Copy HF GPT-2 weights into a minidpo GPT: same names, Conv1D weights transposed to nn.Linear layout."""
    ours = model.state_dict()
    with torch.no_grad():
        for name, t in ours.items():
            src = hf_state[name]
            if name.endswith(CONV1D):
                src = src.t()  # (in, out) -> (out, in)
            if src.shape != t.shape:
                raise ValueError(f"{name}: HF shape {tuple(src.shape)} vs minidpo {tuple(t.shape)}")
            t.copy_(src)


def run(targets: tuple[str, ...], rank: int, alpha: float, cfg: dict, idx: torch.Tensor) -> tuple[float, float]:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                                    vocab_size=cfg["vocab_size"], n_positions=cfg["block_size"],
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=0, eos_token_id=0)).eval()
    ours = GPT(GPTConfig(**cfg)).eval()
    hf_to_minidpo(hf.state_dict(), ours)
    with torch.no_grad():
        base_diff = (ours(idx) - hf(idx).logits).abs().max().item()
    print(f"  base models (no adapter):         max |logits diff| = {base_diff:.2e}")

    apply_lora(ours, rank=rank, alpha=alpha, targets=targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(ours):
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)  # B != 0, so the adapter really changes the output
        y_ours = ours(idx)
        y_base = hf(idx).logits.clone()
    with tempfile.TemporaryDirectory() as d:
        export_peft(ours, d, base_model_name_or_path="gpt2")
        peft_model = PeftModel.from_pretrained(hf, d).eval()
        with torch.no_grad():
            y_peft = peft_model(idx).logits
            merged = peft_model.merge_and_unload()
            y_merged = merged(idx).logits
    print(f"  adapter effect (minidpo vs base): max |logits diff| = {(y_ours - y_base).abs().max().item():.2e}")
    unmerged = (y_ours - y_peft).abs().max().item()
    merged_diff = (y_ours - y_merged).abs().max().item()
    print(f"  minidpo vs PEFT (unmerged):       max |logits diff| = {unmerged:.2e}")
    print(f"  minidpo vs PEFT merge_and_unload: max |logits diff| = {merged_diff:.2e}")
    return unmerged, merged_diff


def main() -> None:
    import peft
    import transformers
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, cpus={os.cpu_count()}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    cfg = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)
    idx = torch.randint(0, cfg["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(2))
    worst = 0.0
    for targets in [("attn.c_attn",), ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]:
        print(f"targets={list(targets)} rank=4 alpha=8 model={cfg}")
        worst = max(worst, *run(targets, rank=4, alpha=8.0, cfg=cfg, idx=idx))
    ok = worst < 1e-4
    print(f"worst max |logits diff| = {worst:.2e} -> {'PASS' if ok else 'FAIL'} (threshold 1e-4)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
