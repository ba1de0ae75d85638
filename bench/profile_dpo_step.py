"""
torch.profiler over one DPO optimizer step at GPT-2 124M shape (randomly initialised, no download): 4 pairs x (8 + 64)
tokens, pairwise layout (each pair's two sequences forwarded), LoRA r=8 alpha=16 on c_attn, reference forward every
step, fused log-probs, AdamW, grad clip 1.0 — bench/dpo_step.py's layout, minidpo side only.

Usage:  python bench/profile_dpo_step.py --dtype bf16            # top ops by self CPU time
        python bench/profile_dpo_step.py --dtype bf16 --shapes   # copy_/add/cat/fill_ grouped by input shape
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from minidpo.dataset.batching import collate_pairs  # noqa: E402
from minidpo.dataset.pairs import Pair  # noqa: E402
from minidpo.methods.dpo import DPOConfig, concatenated_forward, dpo_step_loss, reference_forward  # noqa: E402
from minidpo.model.cast_cache import cache_weight_casts  # noqa: E402
from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402
from minidpo.model.lora import apply_lora  # noqa: E402

EOT = 50256


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--steps", type=int, default=2, help="timed steps before the profiled one")
    ap.add_argument("--shapes", action="store_true", help="group the copy/elementwise ops by input shape")
    a = ap.parse_args()
    torch.manual_seed(0)
    model = cache_weight_casts(GPT(GPTConfig()))  # as train.py builds it
    for p in model.parameters():
        p.requires_grad_(False)
    apply_lora(model, rank=8, alpha=16.0, dropout=0.0, targets=("attn.c_attn",))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.randint(0, EOT, (n,), generator=g).tolist()  # noqa: E731
    pairs = [Pair("", "", "", rand(8), rand(63) + [EOT], rand(63) + [EOT], 1.0, 0.0) for _ in range(4)]
    batch = collate_pairs(pairs, 72, pad_id=EOT)
    dpo = DPOConfig(beta=0.1)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16")

    def step() -> None:  # minidpo.dpo_train.dpo_step + train_loop's update; autocast entered per step
        with amp:
            loss, _ = dpo_step_loss(concatenated_forward(model, batch), reference_forward(model, batch), dpo)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, oneDNN primitives, the frozen-weight cast cache
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(f"{a.dtype} step ms {[round(1000 * t) for t in times]}; load avg {os.getloadavg()[0]:.1f}")
    with profile(activities=[ProfilerActivity.CPU], record_shapes=a.shapes) as prof:
        step()
    if not a.shapes:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        return
    rows = sorted((e for e in prof.key_averages(group_by_input_shape=True)
                   if e.key in ("aten::copy_", "aten::add", "aten::add_", "aten::cat", "aten::fill_", "aten::mul")),
                  key=lambda e: -e.self_cpu_time_total)
    for e in rows[:25]:
        print(f"{e.key:14} x{e.count:<4} {e.self_cpu_time_total / 1e3:8.0f} ms  {str(e.input_shapes)[:100]}")


if __name__ == "__main__":
    main()
