"""
One DPO optimizer step, side by side: minidpo vs Hugging Face TRL's DPOTrainer + PEFT LoRA, at the same settings.

Same weights (one seeded GPT-2 124M-shaped minidpo GPT, exported with minidpo.weights.save_hf, loaded by both sides),
same tokens (pairs of P prompt + C completion tokens ending in <|endoftext|>), LoRA r=8 alpha=16 dropout 0 on c_attn,
sigmoid loss, beta 0.1, reference = adapter disabled, AdamW (0.9, 0.95) same lr, grad clip 1.0. CPU: fp32, 4 pairs of
8 + 32. CUDA: bf16 autocast over fp32 weights, 16 pairs of 8 + 248. Each variant runs in a fresh subprocess.

Timed step (CUDA: synchronized at both ends); tokens/s = 2 * pairs * (P + C) / median step time after warm-up:
  minidpo  minidpo.trainer.train_loop with train.py's run_dpo step_fn, from get_batch(step) (pre-collated with
           collate_pairs, moved to the device) to on_step_end(step): forward, reference forward, loss, backward,
           finite-loss check, clip, AdamW, scheduler.
  TRL      trainer.train() with a TrainerCallback, from on_step_begin to on_step_end: training_step (its own collated
           batch to the device, loss + metrics, backward), clip, optimizer and scheduler step, zero_grad.
Peak memory: CPU: VmRSS right before the first step, then the high-water mark is reset (/proc/self/clear_refs) and
VmHWM read after the steps; CUDA: memory_allocated() before the first step, max_memory_allocated() after.
"step mem" = peak - that baseline. MFU (CUDA only): see flops_per_token. Details: bench/README.md.

Usage:  /work/devenv/bin/python bench/dpo_step.py                      # every variant, CPU or CUDA defaults
        /work/devenv/bin/python bench/dpo_step.py --variants minidpo,trl --warmup 1 --steps 2
        /work/devenv/bin/python bench/dpo_step.py --compile               # adds the torch.compile row
Needs bench/requirements.txt (trl, peft, transformers); minidpo itself never imports them.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from minidpo.model import GPT, GPTConfig  # noqa: E402

EOT = 50256
MB = 2 ** 20
LORA = dict(rank=8, alpha=16.0, dropout=0.0, targets=("attn.c_attn",))
# side, reference ("forward": adapter disabled every step; "cached": log-probs computed once before training), extras
VARIANTS = {
    "minidpo": dict(side="minidpo", ref="forward"),
    "minidpo-cached-ref": dict(side="minidpo", ref="cached"),
    "minidpo-fused": dict(side="minidpo", ref="forward", fused_linear=True),
    "minidpo-compile": dict(side="minidpo", ref="forward", compile=True),
    "trl": dict(side="trl", ref="forward"),
    "trl-cached-ref": dict(side="trl", ref="cached"),
    "trl-grad-ckpt": dict(side="trl", ref="forward", gradient_checkpointing=True),  # TRL's default setting
}
DEFAULT_VARIANTS = "minidpo,minidpo-cached-ref,minidpo-fused,trl,trl-cached-ref,trl-grad-ckpt"
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, first match wins


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--pairs", type=int, help="pairs per step (default: 4 on CPU, 16 on CUDA)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--completion-len", type=int, help="completion tokens incl. <|endoftext|> (32 CPU, 248 CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 2 CPU, 3 CUDA)")
    p.add_argument("--steps", type=int, help="timed steps; the median is reported (default: 5 CPU, 10 CUDA)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-layer", type=int, default=12, help="model shape (default GPT-2 124M); smaller for debugging")
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="also run minidpo-compile (torch.compile forward)")
    p.add_argument("--peak-tflops", type=float, help="device bf16 dense peak for MFU (default: by GPU name)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    cuda = a.device == "cuda"
    a.pairs = a.pairs or (16 if cuda else 4)
    a.completion_len = a.completion_len or (248 if cuda else 32)
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 2)
    a.steps = a.steps or (10 if cuda else 5)
    names = [v for v in a.variants.split(",") if v] + (["minidpo-compile"] if a.compile else [])
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; expected names from {list(VARIANTS)}")
    a.variant_list = list(dict.fromkeys(names))
    if a.prompt_len < 1 or a.completion_len < 2 or a.pairs < 1 or a.steps < 1 or a.warmup < 0:
        p.error("need --prompt-len >= 1, --completion-len >= 2, --pairs >= 1, --steps >= 1, --warmup >= 0")
    return a


# ----------------------------------------------------------------------------- memory and timing helpers

def _proc_status_kb(key: str) -> int | None:
    try:
        return next((int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key + ":")), None)
    except OSError:
        return None


def mem_mark(device: str) -> float:
    """Memory in use right before the first step (MB); resets the peak counter so only the steps count."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / MB
    rss = _proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (and ru_maxrss) to the current RSS, Linux >= 4.0
    except OSError:
        print("warning: cannot reset the RSS high-water mark; the CPU peak may include the imports", file=sys.stderr)
    return (rss or 0) / 1024


def mem_peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / MB
    hwm = _proc_status_kb("VmHWM")
    if hwm is None:  # not Linux: ru_maxrss is in bytes on macOS, KB elsewhere
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r / MB if sys.platform == "darwin" else r / 1024
    return hwm / 1024


def sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------- minidpo side

def run_minidpo(a: argparse.Namespace, v: dict, work: Path) -> dict:
    """train.py's run_dpo step_fn inside minidpo.trainer.train_loop, timed from get_batch to on_step_end."""
    from minidpo.dpo import concatenated_forward, dpo_batch_loss
    from minidpo.lora import apply_lora
    from minidpo.pairs import Pair, collate_pairs
    from minidpo.trainer import LoopConfig, train_loop
    from minidpo.weights import load_gpt2

    device = torch.device(a.device)
    amp = torch.bfloat16 if a.device == "cuda" else None  # minidpo.resolve.autocast_dtype
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    model = load_gpt2(work / "model", device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = json.loads((work / "batch.json").read_text())
    pairs = [Pair("", "", "", *seqs, 1.0, 0.0) for seqs in zip(ids["prompt"], ids["chosen"], ids["rejected"])]
    cpu_batch = collate_pairs(pairs, max_length=a.prompt_len + a.completion_len)
    idx = torch.arange(len(pairs), device=device)
    forward = concatenated_forward
    if v.get("fused_linear") is not None:  # default None: concatenated_forward picks by logits size
        forward = lambda m, b: concatenated_forward(m, b, fused_linear=v["fused_linear"])  # noqa: E731
    if v.get("compile"):
        forward = torch.compile(forward)
    ref_cache = None
    if v["ref"] == "cached":  # like pipeline.precompute_reference: one pass before the adapter exists
        with torch.no_grad(), autocast:
            out = concatenated_forward(model, {k: t.to(device) for k, t in cpu_batch.items()})
        ref_cache = {k: out[k].float() for k in ("chosen_logps", "rejected_logps", "chosen_logps_mean",
                                                 "rejected_logps_mean")}  # pipeline.REF_KEYS
    torch.manual_seed(a.seed)
    apply_lora(model, **LORA)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    n_tokens = 2 * a.pairs * (a.prompt_len + a.completion_len)
    starts, ends, first = [], [], {}

    def get_batch(step: int, micro: int):
        if step == 0:
            first["base"] = mem_mark(a.device)
        starts.append(sync(a.device))
        return idx, {k: t.to(device, non_blocking=True) for k, t in cpu_batch.items()}, n_tokens

    def step_fn(batch):  # train.py run_dpo.step_fn
        idx, tensors, n_tokens = batch
        with autocast:
            loss, metrics = dpo_batch_loss(model, tensors, a.beta, "sigmoid", 0.0, ref_cache, idx, forward)
        if "logps" not in first:  # parity check against TRL's metric of the same name (warm-up step only)
            first["logps"] = [metrics["logps/chosen"].item(), metrics["logps/rejected"].item()]
        return loss, metrics, n_tokens

    loop = LoopConfig(steps=a.warmup + a.steps, lr=a.lr, warmup_steps=0, weight_decay=0.0, grad_accum=1,
                      grad_clip=1.0, log_every=10 ** 9, checkpoint_every=0, label=f"bench {a.child}")
    train_loop(loop, params, get_batch, step_fn, on_step_end=lambda step: ends.append(sync(a.device)))
    return dict(times=[e - s for s, e in zip(starts, ends)], base_mb=first["base"], peak_mb=mem_peak(a.device),
                logps=first["logps"])


# ----------------------------------------------------------------------------- TRL side

def word_tokenizer():
    """A tokenizer where token i is the word f"w{i}" and 50256 is <|endoftext|>: TRL re-tokenizes text, and this
    gives back exactly our ids (GPT-2's BPE would merge random tokens across their boundaries)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(EOT)} | {"<|endoftext|>": EOT}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def run_trl(a: argparse.Namespace, v: dict, work: Path) -> dict:
    """DPOTrainer.train() for warmup + steps steps; a callback times on_step_begin -> on_step_end."""
    import transformers
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import GPT2LMHeadModel, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    transformers.logging.set_verbosity_error()
    cuda = a.device == "cuda"
    ids = json.loads((work / "batch.json").read_text())
    words = lambda seq: " ".join("<|endoftext|>" if t == EOT else f"w{t}" for t in seq)  # noqa: E731
    data = Dataset.from_dict({"prompt": [words(s) for s in ids["prompt"]],
                              "chosen": [" " + words(s) for s in ids["chosen"]],
                              "rejected": [" " + words(s) for s in ids["rejected"]]})
    model = GPT2LMHeadModel.from_pretrained(work / "model", dtype=torch.float32)
    with torch.no_grad():  # from_pretrained memory-maps the file: fault the weights in now, or step 1's CPU peak
        for t in [*model.parameters(), *model.buffers()]:  # would count ~0.5 GB of them paging in (minidpo copies)
            t.sum()
    config = DPOConfig(
        output_dir=str(work / f"out-{a.child}"), max_steps=a.warmup + a.steps, per_device_train_batch_size=a.pairs,
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, beta=a.beta, loss_type=["sigmoid"],
        max_length=a.prompt_len + a.completion_len, precompute_ref_log_probs=v["ref"] == "cached",
        gradient_checkpointing=v.get("gradient_checkpointing", False), bf16=cuda, fp16=False, use_cpu=not cuda,
        logging_steps=10 ** 6, save_strategy="no", report_to="none", disable_tqdm=True, seed=a.seed,
        dataloader_num_workers=0)
    lora = LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], bias="none",
                      target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM")
    starts, ends, first = [], [], {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 0:
                first["base"] = mem_mark(a.device)
            starts.append(sync(a.device))

        def on_step_end(self, args, state, control, **kw):
            ends.append(sync(a.device))
            if state.global_step == 1:  # TRL appends these every step and clears them only when it logs
                m = trainer._metrics["train"]
                first["logps"] = [m["logps/chosen"][0], m["logps/rejected"][0]]

    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=word_tokenizer(),
                         peft_config=lora, callbacks=[StepTimer()])
    for row, pr, ch, rj in zip(trainer.train_dataset, ids["prompt"], ids["chosen"], ids["rejected"]):
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != (pr, ch, rj):
            raise RuntimeError("TRL's tokenized dataset differs from the benchmark's token ids")
    trainer.train()
    return dict(times=[e - s for s, e in zip(starts, ends)], base_mb=first["base"], peak_mb=mem_peak(a.device),
                logps=first["logps"], attn=model.config._attn_implementation,
                versions={m: __import__(m).__version__ for m in ("trl", "peft", "transformers", "accelerate")})


# ----------------------------------------------------------------------------- parent: setup, children, table

def write_inputs(a: argparse.Namespace, work: Path) -> tuple[GPTConfig, int]:
    """One seeded minidpo GPT exported with save_hf (both sides load it) and one batch of token ids."""
    from minidpo.weights import save_hf

    torch.manual_seed(a.seed)
    cfg = GPTConfig(block_size=max(1024, a.prompt_len + a.completion_len), n_layer=a.n_layer, n_head=a.n_head,
                    n_embd=a.n_embd)
    model = GPT(cfg)
    save_hf(model, work / "model")
    g = torch.Generator().manual_seed(a.seed + 1)
    rand = lambda n: torch.randint(0, EOT, (a.pairs, n), generator=g).tolist()  # noqa: E731, never <|endoftext|>
    batch = {"prompt": rand(a.prompt_len), "chosen": [s + [EOT] for s in rand(a.completion_len - 1)],
             "rejected": [s + [EOT] for s in rand(a.completion_len - 1)]}
    (work / "batch.json").write_text(json.dumps(batch))
    return cfg, model.num_params()


def run_child(name: str, argv: list[str], work: Path) -> dict | None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HOME": str(work / "hf_home"), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", name, "--work", str(work)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"[{name}] FAILED (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}", file=sys.stderr)
        return None
    r = json.loads(lines[-1][len("RESULT "):])
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return r


def flops_per_token(cfg: GPTConfig, T: int, cached_ref: bool) -> float:
    """Useful FLOPs per token. N = 12 L C^2 + V C matmul weights (tied head once). Frozen weights need activation
    gradients but no weight gradients: policy forward 2N + backward 2N, reference forward 2N (6N; 4N when cached).
    Attention has no weights, so its backward is 2x its forward of 4 L T C (PaLM, no causal halving): 12 L T C for
    the policy + 4 L T C for the reference. Recomputation (minidpo's lm_head backward, checkpointing) is not counted."""
    N = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    attn = 4 * cfg.n_layer * T * cfg.n_embd  # one forward
    return (4 * N + 3 * attn) if cached_ref else (6 * N + 4 * attn)


def peak_tflops(a: argparse.Namespace) -> float | None:
    if a.peak_tflops:
        return a.peak_tflops
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def summarize(a: argparse.Namespace, r: dict) -> None:
    timed = r["times"][a.warmup:]
    r["ms"] = 1000 * statistics.median(timed)
    r["tok_s"] = 2 * a.pairs * (a.prompt_len + a.completion_len) / (r["ms"] / 1000)
    r["delta"] = r["peak_mb"] - r["base_mb"]
    r["spread"] = f"{1000 * min(timed):.0f}-{1000 * max(timed):.0f}"


def baseline(name: str, results: dict[str, dict | None]) -> dict | None:
    """The TRL row a row is compared with: trl-cached-ref for minidpo-cached-ref when it ran, else trl."""
    v = VARIANTS[name]
    if v["side"] == "minidpo" and v["ref"] == "cached" and results.get("trl-cached-ref"):
        return results["trl-cached-ref"]
    return results.get("trl")


def print_table(a: argparse.Namespace, cfg: GPTConfig, results: dict[str, dict | None]) -> None:
    cuda = a.device == "cuda"
    peak = peak_tflops(a) if cuda else None
    cols = ["variant", "ms/step", "min-max ms", "tokens/s", "x TRL", "step mem MB", "x TRL", "peak MB",
            "logps/chosen@1"] + (["MFU"] if cuda else [])
    ok = {n: r for n, r in results.items() if r is not None}
    for r in ok.values():
        summarize(a, r)
    rows = []
    for name, r in results.items():
        if r is None:
            rows.append([name, "failed"] + [""] * (len(cols) - 2))
            continue
        b = baseline(name, ok)
        ratio = lambda key: f"{r[key] / b[key]:.2f}" if b and b[key] > 0 else "-"  # noqa: E731
        rows.append([name, f"{r['ms']:.0f}", r["spread"], f"{r['tok_s']:,.0f}", ratio("tok_s"), f"{r['delta']:,.0f}",
                     ratio("delta"), f"{r['peak_mb']:,.0f}", f"{r['logps'][0]:.4f}"])
        if cuda:
            flops = flops_per_token(cfg, a.prompt_len + a.completion_len, VARIANTS[name]["ref"] == "cached")
            rows[-1].append(f"{100 * r['tok_s'] * flops / (peak * 1e12):.1f}%" if peak else "n/a")
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    for line in [cols, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths))))
    logps = [r["logps"][0] for r in ok.values()]
    if logps:
        print(f"parity: logps/chosen of step 1 (same weights, same tokens) spans {max(logps) - min(logps):.2e} "
              "across rows")
    print("x TRL: vs the `trl` row (minidpo-cached-ref: vs `trl-cached-ref`); tokens/s higher is better, memory "
          "lower is better. step mem = peak - memory in use right before the first step.")


def main(argv: list[str]) -> None:
    a = parse_args(argv)
    if a.child:
        work, v = Path(a.work), VARIANTS[a.child]
        r = (run_minidpo if v["side"] == "minidpo" else run_trl)(a, v, work)
        print("RESULT " + json.dumps({**r, "threads": torch.get_num_threads()}), flush=True)
        return
    tokens = 2 * a.pairs * (a.prompt_len + a.completion_len)
    dev = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}, device "
          f"{a.device} ({dev}), python {platform.python_version()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="dpo_step_") as d:
        work = Path(d)
        cfg, n_params = write_inputs(a, work)
        print(f"model: {cfg.n_layer}x{cfg.n_embd} ({n_params / 1e6:.0f}M params) "
              f"{'bf16 autocast' if a.device == 'cuda' else 'fp32'}; {a.pairs} pairs x ({a.prompt_len} + "
              f"{a.completion_len}) tokens = {tokens} tokens/step; median of {a.steps} steps after {a.warmup} "
              f"warm-up; LoRA r={LORA['rank']} alpha={LORA['alpha']:g} on c_attn; beta {a.beta}, lr {a.lr}",
              flush=True)
        results = {name: run_child(name, argv, work) for name in a.variant_list}
    trl = next((r for n, r in results.items() if r and VARIANTS[n]["side"] == "trl"), None)
    if trl:
        print(f"TRL side: {', '.join(f'{k} {v}' for k, v in trl['versions'].items())}, attention {trl['attn']}")
    threads = {r["threads"] for r in results.values() if r}
    print(f"torch threads per process: {sorted(threads)}; load avg now {os.getloadavg()[0]:.1f}\n")
    print_table(a, cfg, results)


if __name__ == "__main__":
    main(sys.argv[1:])
