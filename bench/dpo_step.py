"""
One DPO optimizer step, side by side: minidpo vs Hugging Face TRL's DPOTrainer + PEFT LoRA, at the same settings.

Same weights (a seeded GPT-2 124M-shaped minidpo GPT, saved with save_hf, loaded by both sides), same tokens (P prompt
+ C completion tokens ending in <|endoftext|>), LoRA r=8 alpha=16 on c_attn, sigmoid loss, beta 0.1, reference =
adapter disabled, AdamW (0.9, 0.95), grad clip 1.0. CPU: C = 32; CUDA: C = 248. --dtype auto (default): bf16
autocast (TRL: bf16=True) on CUDA and on a CPU with AMX-BF16/AVX512-BF16, else fp32; --dtype fp32|bf16 forces it.
Two layouts:
  pairs  `--pairs` independent pairs (CPU 4, CUDA 16): each pair's two sequences are forwarded.
  paper  the DPO paper's IMDb layout: `--prompts` prompts (CPU 1, CUDA 4) x 4 completions, all 6 pairs per prompt.
         minidpo-unique forwards each distinct (prompt, completion) once (4 per prompt,
         minidpo.methods.dpo.sequence_forward); trl-paper and minidpo-paper forward each pair's two sequences (12 per
         prompt), as TRL does.
Each variant runs in a fresh subprocess; the step is timed from train_loop's get_batch to on_step_end (minidpo), from
on_step_begin to on_step_end of trainer.train() (TRL), CUDA-synchronized. step mem = peak - memory in use before the
first step (CPU: RSS high-water mark reset via /proc/self/clear_refs; CUDA: max_memory_allocated). Details and
results: bench/README.md. MFU (CUDA only): see flops_per_token.

Usage:  python bench/dpo_step.py                      # every default variant, CPU or CUDA defaults
        python bench/dpo_step.py --variants minidpo-unique,trl-paper --warmup 1 --steps 2
        python bench/dpo_step.py --compile               # adds the torch.compile row
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
from minidpo.model.gpt import GPT, GPTConfig  # noqa: E402

EOT = 50256
MB = 2 ** 20
K = 4  # completions per prompt in the paper layout: K (K - 1) / 2 = 6 pairs
LORA = dict(rank=8, alpha=16.0, dropout=0.0, targets=("attn.c_attn",))
# side; layout; reference ("forward": adapter disabled every step, "cached": computed once before training); extras
VARIANTS = {
    "minidpo": dict(side="minidpo", layout="pairs", ref="forward"),
    "minidpo-cached-ref": dict(side="minidpo", layout="pairs", ref="cached"),
    "minidpo-naive": dict(side="minidpo", layout="pairs", ref="forward", logprobs="naive"),
    "minidpo-compile": dict(side="minidpo", layout="pairs", ref="forward", compile=True),
    "trl": dict(side="trl", layout="pairs", ref="forward"),
    "trl-cached-ref": dict(side="trl", layout="pairs", ref="cached"),
    "trl-grad-ckpt": dict(side="trl", layout="pairs", ref="forward", gradient_checkpointing=True),  # TRL's default
    "minidpo-unique": dict(side="minidpo", layout="paper", ref="forward", unique=True),
    "minidpo-unique-cached-ref": dict(side="minidpo", layout="paper", ref="cached", unique=True),
    "minidpo-paper": dict(side="minidpo", layout="paper", ref="forward"),
    "trl-paper": dict(side="trl", layout="paper", ref="forward"),
}
DEFAULT_VARIANTS = ("minidpo,minidpo-cached-ref,minidpo-naive,trl,trl-cached-ref,trl-grad-ckpt,"
                    "minidpo-unique,minidpo-paper,trl-paper")
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, first match wins


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--pairs", type=int, help="pairs per step, pairs layout (default: 4 on CPU, 16 on CUDA)")
    p.add_argument("--prompts", type=int, help=f"prompts per step, paper layout ({K} completions, "
                                               f"{K * (K - 1) // 2} pairs each; default: 1 on CPU, 4 on CUDA)")
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--completion-len", type=int, help="completion tokens incl. <|endoftext|> (32 CPU, 248 CUDA)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 2 CPU, 3 CUDA)")
    p.add_argument("--steps", type=int, help="timed steps; the median is reported (default: 5 CPU, 10 CUDA)")
    for flag, default in (("--lr", 5e-4), ("--beta", 0.1), ("--seed", 0), ("--n-layer", 12), ("--n-head", 12),
                          ("--n-embd", 768)):  # model shape: GPT-2 124M by default, smaller for debugging
        p.add_argument(flag, type=type(default), default=default)
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--compile", action="store_true", help="also run minidpo-compile (torch.compile forward)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: minidpo.resolve.choose_dtype (bf16 on CUDA or an AMX/AVX512-BF16 CPU); both sides alike")
    p.add_argument("--peak-tflops", type=float, help="device bf16 dense peak for MFU (default: by GPU name)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one variant in this process
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False")
    defaults = dict(pairs=16, prompts=4, completion_len=248, warmup=3, steps=10) if a.device == "cuda" else \
        dict(pairs=4, prompts=1, completion_len=32, warmup=2, steps=5)
    for k, default in defaults.items():
        setattr(a, k, default if getattr(a, k) is None else getattr(a, k))
    names = [v for v in a.variants.split(",") if v] + (["minidpo-compile"] if a.compile else [])
    if unknown := [v for v in names if v not in VARIANTS]:
        p.error(f"--variants: unknown {unknown}; expected names from {list(VARIANTS)}")
    a.variant_list = list(dict.fromkeys(names))
    if a.dtype == "auto":
        from minidpo.experiment.resolve import choose_dtype
        a.dtype = "bf16" if choose_dtype(torch.device(a.device), "auto")[0] is not None else "fp32"
    if min(a.prompt_len, a.completion_len - 1, a.pairs, a.prompts, a.steps, a.warmup + 1) < 1:
        p.error("need --prompt-len >= 1, --completion-len >= 2, --pairs, --prompts, --steps >= 1, --warmup >= 0")
    return a


def n_pairs(a: argparse.Namespace, layout: str) -> int:
    return a.pairs if layout == "pairs" else a.prompts * K * (K - 1) // 2


def forwarded_sequences(a: argparse.Namespace, v: dict) -> int:
    """Sequences each model pass runs per step (policy and reference alike)."""
    return a.prompts * K if v.get("unique") else 2 * n_pairs(a, v["layout"])


# ----------------------------------------------------------------------------- memory and timing helpers

def _proc_status_kb(key: str) -> int | None:
    try:
        return next((int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith(key + ":")), None)
    except OSError:
        return None  # not Linux


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
    hwm = _proc_status_kb("VmHWM")  # else ru_maxrss: bytes on macOS, KB elsewhere
    r = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / MB if hwm is None and sys.platform == "darwin" else r / 1024


def sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# ----------------------------------------------------------------------------- minidpo side

def read_pairs(work: Path, layout: str) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids of every pair of a layout, as write_inputs saved them."""
    ids = json.loads((work / "batch.json").read_text())[layout]
    return list(zip(ids["prompt"], ids["chosen"], ids["rejected"]))


def run_minidpo(a: argparse.Namespace, v: dict, work: Path) -> dict:
    """minidpo.methods.dpo_train's DPO step (policy forward, reference passed in, loss) inside
    minidpo.training.trainer.train_loop, timed from get_batch to on_step_end."""
    from minidpo.dataset.batching import collate_pairs, collate_unique
    from minidpo.dataset.pairs import Pair
    from minidpo.methods.dpo import (
        DPOConfig,
        concatenated_forward,
        dpo_step_loss,
        pair_logps,
        reference_forward,
        sequence_forward,
    )
    from minidpo.model.cast_cache import cache_weight_casts
    from minidpo.model.lora import apply_lora
    from minidpo.model.weights import load_gpt2
    from minidpo.training.trainer import LoopConfig, TrainRun, train_loop

    device = torch.device(a.device)
    amp = torch.bfloat16 if a.dtype == "bf16" else None  # as train.py: bf16 autocast, fp32 weights
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    model = cache_weight_casts(load_gpt2(work / "model", device=device))  # as train.py builds it
    for p in model.parameters():
        p.requires_grad_(False)
    pairs = [Pair("", "", "", *ids, 1.0, 0.0) for ids in read_pairs(work, v["layout"])]
    unique, logprobs, dpo = v.get("unique", False), v.get("logprobs", "fused"), DPOConfig(beta=a.beta)
    collate = collate_unique if unique else collate_pairs
    cpu_batch = collate(pairs, a.prompt_len + a.completion_len, pad_id=EOT)
    batch = {k: t.to(device) for k, t in cpu_batch.items()}
    forward = sequence_forward if unique else concatenated_forward
    if v.get("compile"):
        forward = torch.compile(forward)
    ref_cache = None
    if v["ref"] == "cached":  # like minidpo.experiment.stages.precompute_reference: one pass before the adapter exists
        with autocast:
            ref_cache = reference_forward(model, batch, logprobs, unique=unique)
    torch.manual_seed(a.seed)
    apply_lora(model, **LORA)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    n_tokens, items = 2 * len(pairs) * (a.prompt_len + a.completion_len), len(pairs)
    starts, ends, first = [], [], {}

    def get_batch(step: int, micro: int):
        if step == 0:
            first["base"] = mem_mark(a.device)
        starts.append(sync(a.device))
        return {k: t.to(device, non_blocking=True) for k, t in cpu_batch.items()}

    def step_fn(tensors):  # minidpo.methods.dpo_train.dpo_step
        with autocast:
            policy = forward(model, tensors, logprobs)
            reference = ref_cache or reference_forward(model, tensors, logprobs, unique=unique)
            if unique:  # per-sequence log-probs -> each pair's
                policy, reference = pair_logps(policy, tensors), pair_logps(reference, tensors)
            loss, metrics = dpo_step_loss(policy, reference, dpo)
        if "logps" not in first:  # parity check against TRL's metric of the same name (warm-up step only)
            first["logps"] = [metrics["logps/chosen"].item(), metrics["logps/rejected"].item()]
        return loss, metrics, n_tokens, items

    loop = LoopConfig(steps=a.warmup + a.steps, lr=a.lr, warmup_steps=0, weight_decay=0.0, grad_accum=1,
                      grad_clip=1.0, log_every=10 ** 9, checkpoint_every=0, label=f"bench {a.child}")
    train_loop(TrainRun(loop, on_step_end=lambda step: ends.append(sync(a.device))), params, get_batch, step_fn,
               log=lambda line: None)
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
    pairs = read_pairs(work, v["layout"])
    words = lambda seq: " ".join("<|endoftext|>" if t == EOT else f"w{t}" for t in seq)  # noqa: E731
    data = Dataset.from_dict({"prompt": [words(p) for p, _, _ in pairs],
                              "chosen": [" " + words(c) for _, c, _ in pairs],
                              "rejected": [" " + words(r) for _, _, r in pairs]})
    model = GPT2LMHeadModel.from_pretrained(work / "model", dtype=torch.float32)
    with torch.no_grad():  # from_pretrained memory-maps the file: fault the weights in now, or step 1's CPU peak
        [t.sum() for t in [*model.parameters(), *model.buffers()]]  # would count ~0.5 GB paging in (minidpo copies)
    config = DPOConfig(
        output_dir=str(work / f"out-{a.child}"), max_steps=a.warmup + a.steps, per_device_train_batch_size=len(pairs),
        gradient_accumulation_steps=1, learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, beta=a.beta, loss_type=["sigmoid"],
        max_length=a.prompt_len + a.completion_len, precompute_ref_log_probs=v["ref"] == "cached",
        gradient_checkpointing=v.get("gradient_checkpointing", False), bf16=a.dtype == "bf16", fp16=False,
        use_cpu=not cuda,
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
    for row, pair in zip(trainer.train_dataset, pairs, strict=True):
        if (row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]) != pair:
            raise RuntimeError("TRL's tokenized dataset differs from the benchmark's token ids")
    trainer.train()
    return dict(times=[e - s for s, e in zip(starts, ends)], base_mb=first["base"], peak_mb=mem_peak(a.device),
                logps=first["logps"], attn=model.config._attn_implementation,
                versions={m: __import__(m).__version__ for m in ("trl", "peft", "transformers", "accelerate")})


# ----------------------------------------------------------------------------- parent: setup, children, table

def write_inputs(a: argparse.Namespace, work: Path) -> tuple[GPTConfig, int]:
    """One seeded minidpo GPT exported with save_hf (both sides load it) and the token ids of both layouts."""
    from minidpo.model.export import save_hf

    torch.manual_seed(a.seed)
    cfg = GPTConfig(block_size=max(1024, a.prompt_len + a.completion_len), n_layer=a.n_layer, n_head=a.n_head,
                    n_embd=a.n_embd)
    model = GPT(cfg)
    save_hf(model, work / "model")
    g = torch.Generator().manual_seed(a.seed + 1)
    rand = lambda n: torch.randint(0, EOT, (n,), generator=g).tolist()  # noqa: E731, never <|endoftext|>
    completion = lambda: rand(a.completion_len - 1) + [EOT]  # noqa: E731
    layouts = {"pairs": [(rand(a.prompt_len), completion(), completion()) for _ in range(a.pairs)], "paper": []}
    for _ in range(a.prompts):  # K completions of one prompt, every pair (i, j), i < j: i chosen
        prompt, comps = rand(a.prompt_len), [completion() for _ in range(K)]
        layouts["paper"] += [(prompt, comps[i], comps[j]) for i in range(K) for j in range(i + 1, K)]
    (work / "batch.json").write_text(json.dumps(
        {name: dict(zip(("prompt", "chosen", "rejected"), map(list, zip(*pairs)))) for name, pairs in layouts.items()}))
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
    """Useful FLOPs per forwarded token. N = 12 L C^2 + V C matmul weights (tied head once). Frozen weights need
    activation gradients but no weight gradients: policy forward 2N + backward 2N, reference forward 2N (6N; 4N when
    cached). Attention has no weights, so its backward is 2x its forward of 4 L T C (PaLM, no causal halving):
    12 L T C for the policy + 4 L T C for the reference. Recomputation (minidpo's lm_head backward, checkpointing)
    is not counted. MFU counts the tokens a row forwards, so a unique batch is not credited for the work it skips:
    its gain shows in pairs/s."""
    N = 12 * cfg.n_layer * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    attn = 4 * cfg.n_layer * T * cfg.n_embd  # one forward
    return (4 * N + 3 * attn) if cached_ref else (6 * N + 4 * attn)


def peak_tflops(a: argparse.Namespace) -> float | None:
    return a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)


def summarize(a: argparse.Namespace, name: str, r: dict) -> None:
    timed, T, v = r["times"][a.warmup:], a.prompt_len + a.completion_len, VARIANTS[name]
    r["ms"] = 1000 * statistics.median(timed)
    r["pairs_s"] = n_pairs(a, v["layout"]) / (r["ms"] / 1000)
    r["tok_s"] = 2 * T * r["pairs_s"]                                       # the pairs' tokens
    r["fwd_tok_s"] = forwarded_sequences(a, v) * T / (r["ms"] / 1000)     # the tokens actually forwarded
    r["delta"] = r["peak_mb"] - r["base_mb"]
    r["spread"] = f"{1000 * min(timed):.0f}-{1000 * max(timed):.0f}"


def baseline(name: str, results: dict[str, dict | None]) -> tuple[str, dict | None]:
    """The TRL row a row is compared with: same layout, and the cached-reference TRL row for a cached minidpo row
    when it ran."""
    v = VARIANTS[name]
    if v["layout"] == "paper":
        return "trl-paper", results.get("trl-paper")
    if v["side"] == "minidpo" and v["ref"] == "cached" and results.get("trl-cached-ref"):
        return "trl-cached-ref", results["trl-cached-ref"]
    return "trl", results.get("trl")


def print_table(a: argparse.Namespace, cfg: GPTConfig, results: dict[str, dict | None]) -> None:
    cuda = a.device == "cuda"
    peak = peak_tflops(a) if cuda else None
    cols = ["variant", "pairs", "seqs", "ms/step", "min-max ms", "pairs/s", "tokens/s", "x TRL", "vs",
            "step mem MB", "x TRL", "peak MB", "logps/chosen@1"] + (["MFU"] if cuda else [])
    ok = {n: r for n, r in results.items() if r is not None}
    [summarize(a, n, r) for n, r in ok.items()]
    rows = []
    for name, r in results.items():
        if r is None:
            rows.append([name, "failed"] + [""] * (len(cols) - 2))
            continue
        v, (b_name, b) = VARIANTS[name], baseline(name, ok)
        ratio = lambda key, r=r, b=b: f"{r[key] / b[key]:.2f}" if b and b[key] > 0 else "-"  # noqa: E731
        rows.append([name, n_pairs(a, v["layout"]), forwarded_sequences(a, v), f"{r['ms']:.0f}", r["spread"],
                     f"{r['pairs_s']:.2f}", f"{r['tok_s']:,.0f}", ratio("pairs_s"), b_name if b else "-",
                     f"{r['delta']:,.0f}", ratio("delta"), f"{r['peak_mb']:,.0f}", f"{r['logps'][0]:.4f}"])
        if cuda:
            flops = flops_per_token(cfg, a.prompt_len + a.completion_len, v["ref"] == "cached")
            rows[-1].append(f"{100 * r['fwd_tok_s'] * flops / (peak * 1e12):.1f}%" if peak else "n/a")
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    for line in [cols, ["-" * w for w in widths], *rows]:
        print(" | ".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(line, widths))))
    for layout in ("pairs", "paper"):
        logps = [r["logps"][0] for n, r in ok.items() if VARIANTS[n]["layout"] == layout]
        if logps:
            print(f"parity ({layout} layout): logps/chosen of step 1 (same weights, same tokens) spans "
                  f"{max(logps) - min(logps):.2e} across rows")
    print("pairs: preference pairs per step; seqs: sequences each model pass forwards (a unique batch forwards each "
          "distinct sequence once). tokens/s counts every pair's chosen + rejected tokens. x TRL: vs the row named "
          "in `vs`; pairs/s higher is better, memory lower is better. step mem = peak - memory in use right before "
          "the first step.")


def main(argv: list[str]) -> None:
    a = parse_args(argv)
    if a.child:
        work, v = Path(a.work), VARIANTS[a.child]
        r = (run_minidpo if v["side"] == "minidpo" else run_trl)(a, v, work)
        print("RESULT " + json.dumps({**r, "threads": torch.get_num_threads()}), flush=True)
        return
    dev = torch.cuda.get_device_name() if a.device == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {platform.platform()}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}, device "
          f"{a.device} ({dev}), python {platform.python_version()}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="dpo_step_") as d:
        work = Path(d)
        cfg, n_params = write_inputs(a, work)
        print(f"model: {cfg.n_layer}x{cfg.n_embd} ({n_params / 1e6:.0f}M params) "
              f"{'bf16 autocast (TRL: bf16=True)' if a.dtype == 'bf16' else 'fp32'}; "
              f"sequences of {a.prompt_len} + {a.completion_len} "
              f"tokens; pairs layout: {a.pairs} pairs/step; paper layout: {a.prompts} prompt(s) x {K} completions = "
              f"{n_pairs(a, 'paper')} pairs/step; median of {a.steps} steps after {a.warmup} warm-up; LoRA "
              f"r={LORA['rank']} alpha={LORA['alpha']:g} on c_attn; beta {a.beta}, lr {a.lr}", flush=True)
        results = {name: run_child(name, argv, work) for name in a.variant_list}
    if trl := next((r for n, r in results.items() if r and VARIANTS[n]["side"] == "trl"), None):
        print(f"TRL side: {', '.join(f'{k} {v}' for k, v in trl['versions'].items())}, attention {trl['attn']}")
    print(f"torch threads per process: {sorted({r['threads'] for r in results.values() if r})}; load avg now "
          f"{os.getloadavg()[0]:.1f}\n")
    print_table(a, cfg, results)


if __name__ == "__main__":
    main(sys.argv[1:])
