"""
Generation throughput: minidpo's `generate` with and without the KV cache, and transformers' `generate` on the same
weights when transformers is installed (bench/requirements.txt).

Greedy rows: a gpt2-shaped (124M) model with random weights. Sampled rows: the bundled model (data/tiny-imdb-gpt2,
7M parameters, 50,257-token vocabulary), where choosing the token is a large part of each step, so they measure
minidpo's inverse-CDF `sample` against transformers' softmax + torch.multinomial (do_sample=True), with the same
temperature / top-k / top-p on both sides.

    python bench/generate.py                      # greedy at batch 1 and 32, sampled at batch 64
    python bench/generate.py --batch-sizes 1 --new-tokens 32 --device cuda
    python bench/generate.py --batch-sizes none --sampled-batch 64 --threads 1   # only the sampled rows

Tokens/s counts generated tokens only (batch * new tokens), median of --repeats timed runs after one warm-up.
Both sides decode for exactly --new-tokens tokens (end-of-text is suppressed by min_new_tokens on both sides).
"""

import argparse
import platform
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from timing import timed  # noqa: E402  (bench/timing.py, beside this file)

from minidpo.experiment.resolve import BUNDLED_MODEL  # noqa: E402
from minidpo.model.cast_cache import cache_weight_casts  # noqa: E402
from minidpo.model.generate import generate  # noqa: E402
from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402
from minidpo.model.weights import load_gpt2  # noqa: E402

# (label, temperature, top_k, top_p): plain sampling as train.py's pairs use it, and sample.py's defaults
SAMPLED = [("T=1", 1.0, None, None), ("T=0.8 top-k 50", 0.8, 50, None), ("T=1 top-k 50 top-p 0.95", 1.0, 50, 0.95)]


def hf_model_from(model: GPT, device: torch.device):
    """transformers' GPT2LMHeadModel with the same weights, via minidpo's HF-layout export."""
    from transformers import GPT2LMHeadModel

    from minidpo.model.export import save_hf
    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        hf = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
    return hf.to(device).eval()


def sampled_rows(args: argparse.Namespace, device: torch.device) -> None:
    """Sampled generation of the bundled model at --sampled-batch, minidpo vs transformers on the same weights."""
    model = cache_weight_casts(load_gpt2(BUNDLED_MODEL, device=device).eval())  # as train.py builds it
    bf16 = args.dtype == "bfloat16"  # minidpo as train.py runs it (bf16 autocast, KV cache in bf16); HF in bf16
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    try:
        hf = hf_model_from(model, device).to(torch.bfloat16 if bf16 else torch.float32)
    except ImportError:
        hf = None
        print("transformers not installed: `pip install -r bench/requirements.txt` for the side-by-side column")
    B, n = args.sampled_batch, args.new_tokens
    idx = torch.randint(0, model.config.vocab_size, (B, args.prompt_tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    mask = torch.ones_like(idx)
    g = torch.Generator(device=device).manual_seed(0)
    print(f"sampled, bundled model ({model.num_params() / 1e6:.1f}M parameters), batch {B}, "
          f"{args.prompt_tokens} prompt + {n} new tokens, {'bf16 (minidpo: autocast)' if bf16 else 'fp32'}")
    print(f"{'sampling':>24} | {'minidpo cached':>15} | {'transformers':>13} | ratio")
    for label, temperature, top_k, top_p in SAMPLED:
        with torch.inference_mode():
            with amp:
                ours = timed(partial(generate, model, idx, n, min_new_tokens=n, temperature=temperature, top_k=top_k,
                                     top_p=top_p, generator=g), device, args.repeats)
            theirs = float("nan")
            if hf is not None:
                theirs = timed(partial(hf.generate, idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=True, temperature=temperature, top_k=top_k or 0,
                                       top_p=top_p or 1.0, pad_token_id=50256, eos_token_id=50256),
                               device, args.repeats)
        print(f"{label:>24} | {B * n / ours:>11,.0f} t/s | {B * n / theirs:>9,.0f} t/s | {theirs / ours:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", default="1,32", help="greedy rows (124M, random weights); none: skip them")
    ap.add_argument("--sampled-batch", type=int, default=64, help="sampled rows (bundled model); 0: skip them")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--no-uncached", action="store_true", help="skip the slow no-cache baseline")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {device}, {args.dtype}")
    if args.batch_sizes != "none":
        greedy_rows(args, device, dtype)
    if args.sampled_batch:
        sampled_rows(args, device)


def greedy_rows(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """Greedy decoding of a gpt2-shaped model: KV cache, no cache, transformers."""
    torch.manual_seed(0)
    model = cache_weight_casts(GPT(GPTConfig.from_name("gpt2")).to(device=device, dtype=dtype).eval())
    try:
        hf = hf_model_from(model.float(), device).to(dtype)
        model.to(dtype)
    except ImportError:
        hf = None
    if hf is None:
        print("transformers not installed: `pip install -r bench/requirements.txt` for the side-by-side column")
    print(f"{'batch':>5} | {'minidpo cached':>15} | {'minidpo no cache':>16} | {'transformers':>13} | ratio")
    n = args.new_tokens
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        idx = torch.randint(0, 50257, (B, args.prompt_tokens), device=device)
        with torch.inference_mode():
            ours = timed(partial(generate, model, idx, n, temperature=0, eos_id=None), device, args.repeats)
            plain = float("nan") if args.no_uncached else timed(
                partial(generate, model, idx, n, temperature=0, eos_id=None, use_cache=False), device, args.repeats)
            theirs = float("nan")
            if hf is not None:
                mask = torch.ones_like(idx)
                theirs = timed(partial(hf.generate, idx, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=50256), device, args.repeats)
        tps = [B * n / t for t in (ours, plain, theirs)]
        ratio = tps[0] / tps[2] if hf is not None else float("nan")
        print(f"{B:>5} | {tps[0]:>11,.0f} t/s | {tps[1]:>12,.0f} t/s | {tps[2]:>9,.0f} t/s | {ratio:.2f}x")


if __name__ == "__main__":
    main()
