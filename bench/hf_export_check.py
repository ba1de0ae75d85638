"""
Dev check (not run by CI): minidpo.model.export.save_hf writes a checkpoint that transformers' GPT2LMHeadModel loads
with no missing/unexpected keys and whose logits match minidpo's GPT. Needs transformers:

    .venv-bench/bin/python bench/hf_export_check.py [source]    # source: anything load_gpt2 takes (default: a tiny
                                                                 # random GPT and the test fixture)
"""

import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minidpo.model.export import save_hf
from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402
from minidpo.model.weights import load_gpt2  # noqa: E402


def check(model: GPT, label: str, dtype: torch.dtype | None = None) -> None:
    from transformers import GPT2LMHeadModel

    idx = torch.randint(0, model.config.vocab_size, (2, min(24, model.config.block_size)),
                        generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d, dtype=dtype)
        hf, info = GPT2LMHeadModel.from_pretrained(d, output_loading_info=True, dtype=torch.float32)
        hf.eval()
        bad = {k: v for k, v in info.items() if v}
        assert not bad, f"transformers reported loading problems: {bad}"
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr(), "HF head not tied"
        ref = model if dtype is None else load_gpt2(d)  # fp16 export: compare against the rounded weights
        with torch.no_grad():
            ours, theirs = ref(idx), hf(idx).logits
        err = (ours - theirs).abs().max().item()
        print(f"{label:40s} max |logits diff| = {err:.2e}  files: "
              + ", ".join(f"{p.name} {p.stat().st_size:,} B" for p in sorted(Path(d).iterdir())))
        assert err < 1e-4, err


def main() -> None:
    import transformers

    print(f"{platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    torch.manual_seed(0)
    random = GPT(GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=64)).eval()
    check(random, "random tiny GPT, fp32")
    check(random, "random tiny GPT, fp16 export", dtype=torch.float16)
    fixture = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gpt2-tiny-openai"
    check(load_gpt2(sys.argv[1] if len(sys.argv) > 1 else fixture), "loaded checkpoint, fp32")
    print("ok")


if __name__ == "__main__":
    main()
