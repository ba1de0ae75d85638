"""
Language-model training speed on this CPU: tokens/s of one SFT step (forward, backward, clip, AdamW) in fp32 and in
bf16, at the bundled model's shape, and the fraction of this CPU's bf16 matmul peak that the bf16 step reaches.

Variants, all on the same randomly initialised GPT and the same random batch, in one process:
  fp32-ce        the loop before this change: fp32 weights and activations, F.cross_entropy on fp32 [B, T, V] logits
  bf16-ce        bf16 autocast, logits cast to fp32 for F.cross_entropy (what autocast alone gives)
  bf16-fused     bf16 autocast, minidpo.sft.lm_loss: fused_token_logps on the bf16 logits with the gradient written in
                 place (never an fp32 or second [B, T, V] buffer): what run_sft does now
  bf16-linear    bf16 autocast, linear_token_logps (lm_head fused, logits recomputed chunk by chunk in backward)
Each variant: `warmup` steps, then the median of `steps` timed steps. The step's matmul FLOPs are counted exactly
(6 x tokens x every Linear's in x out, lm_head included, plus attention's 12 x B x nh x T^2 x hs) and divided by the
step time; the peak is a bf16 matmul of the lm_head shape and of a square 2048 x d x 4d, measured in the same run.

Usage:  python bench/sft_speed.py                       # the bundled shape: 6 layers x 256, B=16, T=128
        python bench/sft_speed.py --n-layer 4 --n-embd 128
"""

import argparse
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from minidpo.experiment.resolve import cpu_flags  # noqa: E402
from minidpo.methods.fused_logprobs import linear_token_logps  # noqa: E402
from minidpo.methods.sft import lm_loss  # noqa: E402
from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402

VARIANTS = ("fp32-ce", "bf16-ce", "bf16-fused", "bf16-linear")


def step_flops(cfg: GPTConfig, B: int, T: int) -> float:
    """Matmul FLOPs of one forward + backward (backward = 2x forward)."""
    d, L, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    linear = L * (d * 3 * d + d * d + d * 4 * d + 4 * d * d) + d * V  # weights of every Linear, lm_head included
    attention = L * 2 * 2 * T * T * d  # q k^T and att v: 2 FLOPs per multiply-add, causal not discounted
    return 3 * (2 * B * T * linear + B * attention)


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * m * k * n / statistics.median(times) / 1e12


def loss_of(variant: str, model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if variant.endswith("-ce"):
        return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    if variant == "bf16-linear":
        return -linear_token_logps(model.hidden_states(x), model.lm_head.weight, y).mean()
    return lm_loss(model, x, y)


def time_variant(variant: str, cfg: GPTConfig, a: argparse.Namespace) -> float:
    torch.manual_seed(0)
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    x = torch.randint(0, cfg.vocab_size, (a.batch_size, a.block_size))
    y = torch.randint(0, cfg.vocab_size, (a.batch_size, a.block_size))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if variant.startswith("bf16") else nullcontext()
    times = []
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        with amp:  # entered per step, as run_sft does (a region around the loop would freeze the weight casts)
            loss = loss_of(variant, model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default=",".join(VARIANTS))
    a = p.parse_args()
    cfg = GPTConfig(block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd)
    flags = cpu_flags()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
          f" ({torch.get_num_threads()} threads), bf16 flags: "
          f"{' '.join(f for f in ('amx_bf16', 'avx512_bf16') if f in flags) or 'none'}, "
          f"load average {os.getloadavg()[0]:.2f}")
    d = a.n_embd
    peak = {"lm_head": matmul_tflops(a.batch_size * a.block_size, d, cfg.vocab_size, torch.bfloat16),
            "mlp": matmul_tflops(2048, d, 4 * d, torch.bfloat16)}
    fp32_peak = matmul_tflops(a.batch_size * a.block_size, d, cfg.vocab_size, torch.float32)
    print(f"bf16 matmul: lm_head shape {a.batch_size * a.block_size}x{d}x{cfg.vocab_size} {peak['lm_head']:.2f} "
          f"TFLOP/s (fp32 {fp32_peak:.2f}), 2048x{d}x{4 * d} {peak['mlp']:.2f} TFLOP/s")
    flops = step_flops(cfg, a.batch_size, a.block_size)
    tokens = a.batch_size * a.block_size
    print(f"model: {a.n_layer} layers x {d}, {sum(p.numel() for p in GPT(cfg).parameters()):,} parameters; "
          f"batch {a.batch_size} x {a.block_size} tokens; {flops / 1e9:.1f} GFLOP of matmuls per step")
    base = None
    for variant in a.variants.split(","):
        s = time_variant(variant, cfg, a)
        base = base or s
        print(f"{variant:12s} {s * 1e3:8.0f} ms/step {tokens / s:8.0f} tokens/s  {base / s:5.2f}x {VARIANTS[0]}  "
              f"{flops / s / 1e12:5.2f} TFLOP/s = {flops / s / 1e12 / peak['lm_head']:.0%} of the bf16 lm_head "
              f"matmul peak", flush=True)


if __name__ == "__main__":
    main()
