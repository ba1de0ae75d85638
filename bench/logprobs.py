"""
Wall time and peak memory of forward + backward of per-token log-probs: the plain path (minidpo.methods.logprobs) vs the
fused kernels (minidpo.methods.fused_logprobs).

Variants (all end in `.sum().backward()`):
  naive         naive_token_logps: logits.float().log_softmax(-1).gather(-1, targets)   logits: a leaf [B, T, V]
  fused         fused_token_logps(logits, targets)                      the same leaf
  fused-inplace fused_token_logps(..., inplace_backward=True)           the same leaf, overwritten by its gradient
  naive-linear  naive on hidden @ weight.T                           hidden [B, T, C], weight [V, C]
  fused-linear  linear_token_logps(hidden, weight, targets)       the same hidden and weight

What is counted. Every variant runs in a fresh subprocess that first builds its inputs (the logits leaf, or hidden
and weight) and warms its kernels up on a tiny problem; those inputs are NOT counted. Peak = the most memory in use
at any moment of `repeats` forward+backward passes above that baseline, so it DOES include the gradients the pass
returns (torch.autograd.grad) (for naive/fused that is one [B, T, V] tensor in the logits' dtype, which no method can
avoid; the "peak - grads" column shows the working memory without it).
  CPU: baseline = VmRSS of the process just before the first pass (/proc/self/status); peak = ru_maxrss after the
  passes (the kernel's high-water mark of resident memory) minus that baseline. glibc gives blocks this large
  their own mmap and unmaps them on free, so resident memory follows tensor allocations closely. Linux only.
  CUDA: peak = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated() before the passes.
Time is the median of `repeats` passes (CUDA: synchronized).

Usage:  python bench/logprobs.py                          # [8, 512, 50257] fp32 CPU, plus bf16 CUDA if present
        python bench/logprobs.py --B 2 --T 64 --V 1000    # small
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from minidpo.methods.fused_logprobs import fused_token_logps, linear_token_logps  # noqa: E402
from minidpo.methods.logprobs import naive_token_logps  # noqa: E402

VARIANTS = ("naive", "fused", "fused-inplace", "naive-linear", "fused-linear")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MB = 2 ** 20


def make_inputs(variant: str, a: argparse.Namespace, B: int, T: int, V: int) -> dict:
    dev, dtype = torch.device(a.device), DTYPES[a.dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    targets = torch.randint(0, V, (B, T), device=dev, generator=g)
    if "linear" not in variant:
        logits = torch.randn(B, T, V, device=dev, dtype=dtype, generator=g).requires_grad_()  # written in place
        return dict(targets=targets, leaves=[logits], logits=logits)
    hidden = torch.randn(B, T, a.C, device=dev, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(V, a.C, device=dev, dtype=dtype, generator=g).mul_(0.02).requires_grad_(a.weight_grad)
    return dict(targets=targets, leaves=[hidden, weight], hidden=hidden, weight=weight)


def step(variant: str, x: dict, a: argparse.Namespace) -> None:
    t = x["targets"]
    if variant == "naive":
        out = naive_token_logps(x["logits"], t)
    elif variant == "fused":
        out = fused_token_logps(x["logits"], t, chunk_rows=a.chunk_rows)
    elif variant == "fused-inplace":  # the gradient overwrites the logits (Liger-Kernel's way)
        out = fused_token_logps(x["logits"], t, chunk_rows=a.chunk_rows, inplace_backward=True)
    elif variant == "naive-linear":
        out = naive_token_logps(x["hidden"] @ x["weight"].t(), t)
    else:
        out = linear_token_logps(x["hidden"], x["weight"], t, chunk_size=a.chunk_size)
    # autograd.grad returns the gradients as backward produced them; accumulating into a leaf's .grad may clone
    # (it does for fused-inplace, whose gradient is a view of the logits), which would count a copy no model makes
    x["grads"] = torch.autograd.grad(out.sum(), [leaf for leaf in x["leaves"] if leaf.requires_grad])


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("bench/logprobs.py: VmRSS not found in /proc/self/status (CPU memory needs Linux)")


def worker(a: argparse.Namespace) -> dict:
    """One variant, in this (fresh) process; returns its numbers."""
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    warm = make_inputs(a.worker, a, 2, 4, 64)  # load kernels and thread pools before the baseline
    step(a.worker, warm, a)
    del warm
    x = make_inputs(a.worker, a, a.B, a.T, a.V)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base, maxrss_before = current_rss_bytes(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(a.repeats):
        x["grads"] = ()  # free the previous pass's gradients first, as zero_grad(set_to_none=True) would
        t0 = time.perf_counter()
        step(a.worker, x, a)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak, exact = torch.cuda.max_memory_allocated() - base, True
    else:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # if the passes never rose above an older high-water mark, the delta is only an upper bound
        peak, exact = maxrss - base, maxrss > maxrss_before
    inputs = {leaf.untyped_storage().data_ptr() for leaf in x["leaves"]}
    # new memory only: fused-inplace's gradient lives in the logits' own storage
    grads = sum(g.numel() * g.element_size() for g in x["grads"] if g.untyped_storage().data_ptr() not in inputs)
    return dict(variant=a.worker, time_s=statistics.median(times), min_s=min(times), peak=peak, grads=grads,
                exact=exact)


def run_variant(variant: str, a: argparse.Namespace) -> dict:
    args = [sys.executable, __file__, "--worker", variant, "--device", a.device, "--dtype", a.dtype]
    for k in ("B", "T", "V", "C", "repeats", "chunk_size", "threads"):
        args += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.chunk_rows is not None:
        args += ["--chunk-rows", str(a.chunk_rows)]
    if a.weight_grad:
        args.append("--weight-grad")
    res = subprocess.run(args, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"bench/logprobs.py: variant {variant} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(rows: dict, a: argparse.Namespace) -> None:
    print(f"\n[B, T, V] = [{a.B}, {a.T}, {a.V}], C = {a.C}, {a.dtype} on {a.device}, {a.repeats} repeats, "
          f"weight requires grad: {a.weight_grad}")
    print(f"{'variant':<14}{'time ms':>10}{'peak MB':>10}{'grads MB':>10}{'peak-grads':>12}{'time/naive':>12}"
          f"{'peak/naive':>12}")
    ref = rows.get("naive")
    for name, r in rows.items():
        runtime = f"{r['time_s'] / ref['time_s']:.2f}x" if ref else "-"
        rp = f"{r['peak'] / ref['peak']:.3f}x" if ref else "-"
        flag = "" if r["exact"] else "  (upper bound)"
        print(f"{name:<14}{1e3 * r['time_s']:>10.1f}{r['peak'] / MB:>10.1f}{r['grads'] / MB:>10.1f}"
              f"{(r['peak'] - r['grads']) / MB:>12.1f}{runtime:>12}{rp:>12}{flag}")
    goals = [("fused", "naive", "peak", 0.25), ("fused", "naive", "time_s", 1.0),
             ("fused-inplace", "naive", "peak", 0.25), ("fused-inplace", "naive", "time_s", 1.0),
             ("fused-linear", "naive", "peak", 0.05), ("fused-linear", "naive-linear", "peak", 0.05)]
    for v, base, key, goal in goals:
        if v in rows and base in rows:
            ratio = rows[v][key] / rows[base][key]
            print(f"  {v} {key} / {base} = {ratio:.3f} (goal <= {goal}): {'met' if ratio <= goal else 'MISSED'}")
    if "fused" in rows and ref:
        f = rows["fused"]
        print(f"  note: the [B, T, V] gradient alone is {f['grads'] / ref['peak']:.3f} of naive's peak, a floor for "
              f"any method that returns one; working memory (peak - grads) fused / naive = "
              f"{(f['peak'] - f['grads']) / (ref['peak'] - ref['grads']):.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=8)
    p.add_argument("--T", type=int, default=512)
    p.add_argument("--V", type=int, default=50257)
    p.add_argument("--C", type=int, default=768, help="hidden size for the linear variants")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cpu, then cuda if there is one)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--chunk-rows", type=int, default=None, help="fused_token_logps rows per chunk (default: auto)")
    p.add_argument("--chunk-size", type=int, default=128, help="linear_token_logps tokens per chunk")
    p.add_argument("--weight-grad", action="store_true", help="the lm_head weight requires grad (LoRA: it doesn't)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
        print(json.dumps(worker(a)))
        return
    variants = a.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        raise SystemExit(f"bench/logprobs.py: --variants got {bad}; expected a subset of {VARIANTS}")
    devices = {"auto": ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])}.get(a.device, [a.device])
    print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    dtype_flag = a.dtype
    for dev in devices:
        a.device, a.dtype = dev, dtype_flag or ("bfloat16" if dev.startswith("cuda") else "float32")
        report({v: run_variant(v, a) for v in variants}, a)


if __name__ == "__main__":
    main()
