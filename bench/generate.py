"""
Generation throughput: minidpo's `generate` with and without the KV cache, and transformers' `generate` on the same
weights when transformers is installed (bench/requirements.txt). gpt2-shaped model with random weights.

    python bench/generate.py                      # batch 1 and 32, 16 prompt + 64 new tokens, greedy
    python bench/generate.py --batch-sizes 1 --new-tokens 32 --device cuda

Tokens/s counts generated tokens only (batch * new tokens), median of --repeats timed runs after one warm-up.
Both sides decode greedily for exactly --new-tokens tokens (no early stop at end-of-text).
"""

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from minidpo.model import GPT, GPTConfig  # noqa: E402
from minidpo.resolve import timed  # noqa: E402


def hf_model_from(model: GPT, device: torch.device):
    """transformers' GPT2LMHeadModel with the same weights, via minidpo's HF-layout export."""
    from transformers import GPT2LMHeadModel
    from minidpo.weights import save_hf
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
    return hf.to(device).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-uncached", action="store_true", help="skip the slow no-cache baseline")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("gpt2")).to(device=device, dtype=dtype).eval()
    try:
        hf = hf_model_from(model.float(), device).to(dtype)
        model.to(dtype)
    except ImportError:
        hf = None
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}, {args.dtype}")
    if hf is None:
        print("transformers not installed: `pip install -r bench/requirements.txt` for the side-by-side column")
    print(f"{'batch':>5} | {'minidpo cached':>15} | {'minidpo no cache':>16} | {'transformers':>13} | ratio")
    n = args.new_tokens
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        idx = torch.randint(0, 50257, (B, args.prompt_tokens), device=device)
        with torch.inference_mode():
            ours = timed(lambda: model.generate(idx, n, temperature=0, eos_id=None), device, args.repeats)
            plain = float("nan") if args.no_uncached else timed(
                lambda: model.generate(idx, n, temperature=0, eos_id=None, use_cache=False), device, args.repeats)
            theirs = float("nan")
            if hf is not None:
                mask = torch.ones_like(idx)
                theirs = timed(lambda: hf.generate(idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                                   do_sample=False, pad_token_id=50256), device, args.repeats)
        tps = [B * n / t for t in (ours, plain, theirs)]
        ratio = tps[0] / tps[2] if hf is not None else float("nan")
        print(f"{B:>5} | {tps[0]:>11,.0f} t/s | {tps[1]:>12,.0f} t/s | {tps[2]:>9,.0f} t/s | {ratio:.2f}x")


if __name__ == "__main__":
    main()
