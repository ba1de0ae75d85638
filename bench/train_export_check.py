"""
Dev check (not run by CI): the two exports of a train.py run load in the Hugging Face stack and compute the policy.

    python train.py --preset tiny --export-merged out/tiny-merged
    .venv-bench/bin/python bench/train_export_check.py out/tiny out/tiny-merged

Compares next-token logits on a few IMDB-like prompts between
  1. minidpo: the run's base model (run.json's policy_base) + its LoRA adapter (out_dir/adapter),
  2. transformers' GPT2LMHeadModel.from_pretrained(merged dir)  (--export-merged: model.safetensors + config.json),
  3. peft's PeftModel.from_pretrained(GPT2LMHeadModel(base), out_dir/adapter_peft)  (the PEFT-layout adapter).
"""

import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minidpo.experiment.resolve import load_model  # noqa: E402
from minidpo.model.export import save_hf  # noqa: E402
from minidpo.model.lora import load_lora  # noqa: E402
from minidpo.model.tokenizer import Tokenizer  # noqa: E402


def main(out_dir: Path, merged_dir: Path) -> None:
    import peft
    import transformers
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    print(f"{platform.platform()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}")
    run = json.loads((out_dir / "run.json").read_text())
    policy, base_desc = load_model(run["policy_base"], torch.device("cpu"))
    load_lora(policy, out_dir / run["adapter"])
    tok = Tokenizer()
    ids, mask = tok.batch_encode(["This movie was", "I have never seen such a", "The acting"], padding_side="right")
    with torch.no_grad():
        ours = policy(ids)
        merged = GPT2LMHeadModel.from_pretrained(merged_dir, dtype=torch.float32).eval()(ids).logits
        with tempfile.TemporaryDirectory() as d:
            base, _ = load_model(run["policy_base"], torch.device("cpu"))
            save_hf(base, d)  # the base in HF layout, fp32, for PeftModel to wrap
            hf_base = GPT2LMHeadModel.from_pretrained(d, dtype=torch.float32)
            with_adapter = PeftModel.from_pretrained(hf_base, out_dir / "adapter_peft").eval()(ids).logits
    real = mask.bool()
    for label, theirs in (("merged model (transformers)", merged), ("base + PEFT adapter (peft)", with_adapter)):
        err = (ours - theirs)[real].abs().max().item()
        print(f"{label:32s} max |logits diff| vs minidpo policy = {err:.2e}")
        assert err < 1e-3, err
    print(f"base: {base_desc}; adapter moved the logits by up to "
          f"{(ours - policy_base_logits(run, ids))[real].abs().max().item():.3f} (so the checks above are not vacuous)")
    print("ok")


def policy_base_logits(run: dict, ids: torch.Tensor) -> torch.Tensor:
    base, _ = load_model(run["policy_base"], torch.device("cpu"))
    with torch.no_grad():
        return base(ids)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
