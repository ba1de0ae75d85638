"""
minidpo end to end: the DPO paper's IMDb experiment (Rafailov et al. 2023, sec. 6.1) at GPT-2 scale.

    python train.py --preset tiny            # bundled small model + shipped IMDB sample, a few minutes on a CPU
    python train.py                          # GPT-2 124M and the full IMDB set when available (--model auto)
    python train.py --beta-sweep 0.05,0.1,0.5,1   # one DPO run per beta over the same pairs -> frontier.csv/.png
    python train.py --resume out/tiny        # continue a killed run from its last checkpoint
    torchrun --nproc_per_node 2 train.py --preset tiny   # data parallel (gloo on CPU, nccl on GPU)

Pipeline: 1. model (official GPT-2, a path, the bundled model, or random init); 2. optional SFT on review text,
merged into the weights, so the SFT model is the reference; 3. a sentiment classifier (the reward), cached;
4. preference pairs: the reference samples completions of 2-8 token review prefixes and the classifier ranks them,
cached; 5. DPO with a fresh LoRA adapter; 6. evaluation on held-out test prompts: reward of policy and reference
samples, exact KL(policy || reference), implicit-reward accuracy; summary.json.

The reference. DPO's reference log-probs come from the same weights with the LoRA adapter disabled (or, with
--precompute-ref, from one pass of those weights over the pairs before training, cached). This is exactly the
starting policy because the DPO adapter is created with B = 0 on top of weights that already contain any SFT
adapter (merged), which avoids the mismatch of TRL issues #4723 / #6591.
"""

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from minidpo.config import ConfigError, build_config, cli_config, save_config
from minidpo.pipeline import (build_pair_sets, fit_classifier, make_batch_fn, precompute_reference,
                                 reference_fingerprint)
from minidpo.dpo import concatenated_forward, dpo_batch_loss
from minidpo.evaluate import EvalConfig, evaluate, side_by_side
from minidpo.imdb import load_imdb
from minidpo.lora import apply_lora, export_peft, merge_and_unwrap, remove_lora, save_lora
from minidpo.model import GPT, GPTConfig
from minidpo.resolve import autocast_dtype, imdb_source, load_model, pick_device, timed
from minidpo.sft import pack_texts, run_sft
from minidpo.tokenizer import Tokenizer
from minidpo.trainer import Checkpointer, LoopConfig, NonFiniteLoss, format_seconds, is_main, train_loop
from minidpo.weights import load_gpt2, save_hf


@dataclass
class TrainConfig:
    preset: str | None = None       # tiny | gpt2 | gpt2-large
    out_dir: str = "out/run"
    resume: str | None = None       # an out_dir to continue; its config.json is used
    device: str = "auto"            # auto: cuda, then mps, then cpu
    seed: int = 0
    # 1. model
    model: str = "auto"             # auto | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | 124M.. | PATH | bundled | random
    n_layer: int = 4                # --model random only
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    # 2. SFT
    sft_steps: int = 0
    sft_lr: float = 3e-4
    sft_batch_size: int = 8
    sft_block_size: int = 128
    sft_lora: bool = True           # LoRA during SFT (merged afterwards); False trains every weight
    # 3. reward
    data: str = "auto"              # auto | sample | PATH to aclImdb_v1.tar.gz or an aclImdb directory
    # 4. pairs
    pairs_mode: str = "generated"   # generated (the paper's) | labels
    pairing: str = "all"            # all | best_vs_worst
    num_prompts: int = 512
    completions_per_prompt: int = 4
    prompt_min_tokens: int = 2
    prompt_max_tokens: int = 8
    min_new_tokens: int = 4
    max_new_tokens: int = 16
    gen_temperature: float = 1.0
    gen_top_k: int | None = None    # top-k for pair generation and evaluation samples (None: full softmax)
    gen_batch_size: int = 64
    max_length: int = 64            # prompt + response tokens per sequence in DPO batches
    # 5. DPO
    beta: float = 0.1
    beta_sweep: str | None = None   # e.g. 0.05,0.1,0.5,1
    loss_type: str = "sigmoid"      # sigmoid | robust | ipo | hinge
    label_smoothing: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "attn.c_attn"
    precompute_ref: bool = False
    steps: int = 200
    batch_size: int = 8             # pairs per micro-batch per process
    grad_accum: int = 1
    lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    log_every: int = 10
    checkpoint_every: int = 50
    eval_every: int = 0             # also evaluate every N steps (frontier points); 0: only at the end
    compile: bool = False
    # 6. evaluation
    eval_prompts: int = 64
    heldout_prompts: int = 32
    export_merged: str | None = None

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)
        need(self.beta > 0, f"--beta must be > 0, got {self.beta}")
        for b in self.betas():
            need(b > 0, f"--beta-sweep values must be > 0, got {b}")
        need(self.loss_type in ("sigmoid", "robust", "ipo", "hinge"),
             f"--loss-type must be sigmoid, robust, ipo or hinge, got {self.loss_type!r}")
        need(0 <= self.label_smoothing < 0.5, f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        need(1 <= self.prompt_min_tokens <= self.prompt_max_tokens,
             f"need 1 <= --prompt-min-tokens ({self.prompt_min_tokens}) <= --prompt-max-tokens "
             f"({self.prompt_max_tokens})")
        need(1 <= self.min_new_tokens <= self.max_new_tokens,
             f"need 1 <= --min-new-tokens ({self.min_new_tokens}) <= --max-new-tokens ({self.max_new_tokens})")
        need(self.prompt_max_tokens < self.max_length,
             f"--prompt-max-tokens ({self.prompt_max_tokens}) must be < --max-length ({self.max_length})")
        need(self.pairs_mode in ("generated", "labels"), f"--pairs-mode must be generated or labels, "
             f"got {self.pairs_mode!r}")
        need(self.pairing in ("all", "best_vs_worst"), f"--pairing must be all or best_vs_worst, got {self.pairing!r}")
        for name in ("steps", "batch_size", "grad_accum", "num_prompts", "eval_prompts", "lora_rank", "log_every"):
            need(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        need(self.completions_per_prompt >= 2, "--completions-per-prompt must be >= 2 to form pairs")
        need(self.lr > 0 and self.sft_lr > 0, "--lr and --sft-lr must be > 0")

    def betas(self) -> list[float]:
        if not self.beta_sweep:
            return [self.beta]
        try:
            return [float(b) for b in self.beta_sweep.split(",") if b.strip()]
        except ValueError:
            raise ConfigError(f"--beta-sweep expects numbers separated by commas, got {self.beta_sweep!r}") from None


PRESETS = {
    # bundled 4x128 model, shipped IMDB sample: the whole pipeline in a few minutes on 2 CPU cores
    "tiny": dict(model="bundled", data="sample", out_dir="out/tiny", num_prompts=576, completions_per_prompt=8,
                 gen_top_k=50, heldout_prompts=24, eval_prompts=128, steps=600, batch_size=16, lr=5e-3, beta=0.5,
                 warmup_steps=10, lora_rank=8, log_every=25, checkpoint_every=100, min_new_tokens=8,
                 max_new_tokens=16, max_length=32, lora_targets="attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj"),
    # GPT-2 124M on the full set: about a quarter of an hour on one modern GPU
    "gpt2": dict(model="gpt2", data="auto", out_dir="out/gpt2", sft_steps=200, sft_batch_size=16, num_prompts=2048,
                 steps=400, batch_size=16, lr=5e-4, max_new_tokens=32, max_length=48, eval_every=100,
                 eval_prompts=256, heldout_prompts=64),
    "gpt2-large": dict(model="gpt2-large", data="auto", out_dir="out/gpt2-large", sft_steps=200,
                       sft_batch_size=16, num_prompts=2048, steps=400, batch_size=8, grad_accum=2, lr=2e-4,
                       max_new_tokens=32, max_length=48, eval_every=100, eval_prompts=256, heldout_prompts=64),
}


def say(msg: str) -> None:
    if is_main():
        print(msg, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def setup_distributed() -> tuple[int, int, str | None]:
    """(rank, world size, device override) under torchrun; (0, 1, None) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        return dist.get_rank(), world, f"cuda:{local}"
    # processes share the cores: give each its share so they do not oversubscribe
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return dist.get_rank(), world, "cpu"


def stage_model(cfg: TrainConfig, device: torch.device) -> tuple[GPT, str]:
    if cfg.model == "random":
        torch.manual_seed(cfg.seed)
        cfg_m = GPTConfig(block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
        return GPT(cfg_m).to(device), f"random({cfg.n_layer}x{cfg.n_embd})"
    return load_model(cfg.model, device)


def stage_sft(cfg: TrainConfig, model: GPT, tok: Tokenizer, reviews, out: Path, device, amp, rank) -> GPT:
    """SFT on review text, then fold it into the weights; the result is both the reference and DPO's start."""
    done = out / "sft_model"
    if (done / "config.json").is_file():
        say(f"[sft] reusing {done}")
        return load_gpt2(done, device=device)
    say(f"[sft] {cfg.sft_steps} steps on {len(reviews):,} reviews ({'LoRA' if cfg.sft_lora else 'all weights'})")
    if cfg.sft_lora:
        apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets.split(",")))
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    stream = pack_texts([r.text for r in reviews], tok)
    loop = LoopConfig(steps=cfg.sft_steps, lr=cfg.sft_lr, warmup_steps=min(20, cfg.sft_steps // 10),
                      log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every, label="sft")
    block = min(cfg.sft_block_size, model.config.block_size)
    run_sft(model, stream, loop, cfg.sft_batch_size, block, cfg.seed, device, out, resume=True,
            autocast_dtype=amp, rank=rank)
    if cfg.sft_lora:
        merge_and_unwrap(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if is_main():
        save_hf(model, done)
    return model.eval()


def run_dpo(cfg: TrainConfig, model: GPT, beta: float, sets: dict, run_dir: Path, tok: Tokenizer, scorer,
            device: torch.device, amp, rank: int, world: int) -> dict:
    """One DPO run at `beta`: fresh adapter, train, evaluate; returns the run's summary and frontier points."""
    torch.manual_seed(cfg.seed)
    apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
               targets=tuple(cfg.lora_targets.split(",")))
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    forward = torch.compile(concatenated_forward) if cfg.compile else concatenated_forward
    ref_cache = sets.get("reference")
    get_batch = make_batch_fn(sets["train"], cfg, rank, world, device)
    eval_cfg = EvalConfig(max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens,
                          temperature=cfg.gen_temperature, top_k=cfg.gen_top_k, seed=cfg.seed + 1)
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def step_fn(batch):
        idx, tensors, n_tokens = batch
        with autocast:
            loss, metrics = dpo_batch_loss(model, tensors, beta, cfg.loss_type, cfg.label_smoothing, ref_cache, idx,
                                           forward)
        return loss, metrics, n_tokens

    def do_eval(step: int, with_reference: bool) -> dict:
        say(f"[eval beta={beta}] step {step}: sampling {len(sets['eval_prompts'])} held-out prompts from the policy"
            + (" and the reference" if with_reference else "") + ", exact KL, implicit-reward accuracy ...")
        with autocast:
            r = evaluate(model, tok, scorer, sets["eval_prompts"], sets["heldout"], eval_cfg, cfg.max_length, beta,
                         device, with_reference=with_reference)
        say(f"[eval beta={beta}] step {step}: policy reward {r['policy']['reward']:.3f}, KL {r['policy']['kl']:.3f}, "
            f"held-out reward accuracy {r['reward_accuracy']:.3f}")
        return r

    points = []
    if cfg.eval_every and is_main():
        r0 = do_eval(0, with_reference=False)
        points.append({"beta": beta, "step": 0, "reward": r0["policy"]["reward"], "kl": r0["policy"]["kl"]})

    def on_step_end(step: int) -> None:
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps and is_main():
            r = do_eval(step, with_reference=False)
            points.append({"beta": beta, "step": step, "reward": r["policy"]["reward"], "kl": r["policy"]["kl"]})

    loop = LoopConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
                      grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, log_every=cfg.log_every,
                      checkpoint_every=cfg.checkpoint_every, label=f"dpo beta={beta}")
    t0 = time.perf_counter()
    last = train_loop(loop, params, get_batch, step_fn, Checkpointer(run_dir / "checkpoint", params),
                      run_dir / "log.jsonl", on_step_end, resume=True)
    train_s = time.perf_counter() - t0
    result = {}
    if is_main():
        save_lora(model, run_dir / "adapter")
        export_peft(model, run_dir / "adapter_peft", base_model_name_or_path=sets["base_desc"])
        r = do_eval(cfg.steps, with_reference=True)
        points.append({"beta": beta, "step": cfg.steps, "reward": r["policy"]["reward"], "kl": r["policy"]["kl"]})
        result = {"beta": beta, "reference": r["reference"], "policy": r["policy"],
                  "train": {"steps": cfg.steps, "tokens_per_s": last.get("tokens_per_s"),
                            "final_loss": last.get("loss"), "reward_accuracy": r["reward_accuracy"],
                            "train_batch_reward_accuracy": last.get("rewards/accuracies"),
                            "seconds": train_s},
                  "examples": r["examples"], "frontier": points}
        (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    barrier()
    return result


def write_frontier(out: Path, runs: list[dict]) -> None:
    rows = [p for r in runs for p in r["frontier"]]
    with open(out / "frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["beta", "step", "kl", "reward"])
        w.writeheader()
        w.writerows({k: p[k] for k in w.fieldnames} for p in rows)
    plot_frontier(out)


def plot_frontier(out: str | Path) -> None:
    """frontier.png from out/frontier.csv: reward against KL, one line per beta (the DPO paper's Figure 2, left)."""
    out = Path(out)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out / 'frontier.csv'}; for frontier.png: pip install matplotlib, then "
              f"python -c \"import train; train.plot_frontier('{out}')\"", flush=True)
        return
    with open(out / "frontier.csv", newline="") as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for beta in sorted({p["beta"] for p in rows}):
        pts = sorted((p for p in rows if p["beta"] == beta), key=lambda p: p["step"])
        ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], "o-", label=f"beta={beta:g}")
    ax.set_xlabel("KL(policy || reference)")
    ax.set_ylabel("mean reward (P(positive))")
    ax.set_title("IMDb sentiment: reward vs KL frontier")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    print(f"wrote {out / 'frontier.csv'} and {out / 'frontier.png'}", flush=True)


@torch.no_grad()
def estimate_seconds(cfg: TrainConfig, model: GPT, device: torch.device, amp) -> dict[str, float]:
    """Rough wall time of each phase from two probes: one forward of a DPO-shaped batch and a short generate call
    (per-token decode cost). A DPO step costs about six such forwards (policy forward + backward ~3, reference
    forward 1, and ~2 more for the adapter, the head and the optimizer, as measured on CPU); five with a cached
    reference."""
    V = model.config.vocab_size
    autocast = torch.autocast(device.type, dtype=amp, enabled=amp is not None)
    ids = torch.randint(0, V, (2 * cfg.batch_size, cfg.max_length), device=device)
    with autocast:
        fwd = timed(lambda: model.hidden_states(ids), device)
        prompt = torch.randint(0, V, (cfg.gen_batch_size, cfg.prompt_max_tokens), device=device)
        per_token = timed(lambda: model.generate(prompt, 4, eos_id=None), device) / 4
    n_calls = math.ceil((cfg.num_prompts + cfg.heldout_prompts) * cfg.completions_per_prompt / cfg.gen_batch_size)
    sft_fwd = fwd * cfg.sft_batch_size * cfg.sft_block_size / (2 * cfg.batch_size * cfg.max_length)
    est = {"sft": cfg.sft_steps * 3 * sft_fwd,
           "pairs": 0.0 if cfg.pairs_mode == "labels" else n_calls * cfg.max_new_tokens * per_token,
           "dpo": len(cfg.betas()) * cfg.steps * cfg.grad_accum * fwd * (5 if cfg.precompute_ref else 6),
           "eval": len(cfg.betas()) * (2 + (cfg.steps // cfg.eval_every if cfg.eval_every else 0)) *
           math.ceil(cfg.eval_prompts / 32) * cfg.max_new_tokens * per_token}
    return est


def load_config(argv: list[str]) -> TrainConfig:
    cfg = build_config(TrainConfig, argv, PRESETS)
    if cfg.resume is None:
        return cfg
    saved = Path(cfg.resume) / "config.json"
    if not saved.is_file():
        raise ConfigError(f"--resume {cfg.resume}: no config.json there (not a train.py output directory)")
    stored = json.loads(saved.read_text())
    # the run's own settings win, so a resumed run is the same run; only where to export may be added
    return replace(TrainConfig(**{**stored, "resume": cfg.resume}), out_dir=cfg.resume,
                   export_merged=cfg.export_merged or stored.get("export_merged"))


def main(argv: list[str]) -> None:
    cfg = cli_config(TrainConfig, argv, __doc__, build=load_config)
    t_start = time.perf_counter()
    rank, world, dev_override = setup_distributed()
    device = pick_device(dev_override or cfg.device)
    amp = autocast_dtype(device)
    out = Path(cfg.out_dir)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.json")
    torch.manual_seed(cfg.seed)
    say(f"minidpo: device {device}{' x' + str(world) if world > 1 else ''}, "
        f"{'bf16 autocast' if amp else 'fp32'}, out_dir {out}")

    model, model_desc = stage_model(cfg, device)
    for p in model.parameters():
        p.requires_grad_(False)
    need = cfg.prompt_max_tokens + cfg.max_new_tokens
    if need > model.config.block_size or cfg.max_length > model.config.block_size:
        sys.exit(f"error: --prompt-max-tokens + --max-new-tokens ({need}) and --max-length ({cfg.max_length}) must "
                 f"fit the model's context of {model.config.block_size} tokens")
    if cfg.resume is None:
        est = estimate_seconds(cfg, model, device, amp)
        say(f"[eta] about {format_seconds(sum(est.values()))} on {device} before classifier training: " +
            ", ".join(f"{k} {format_seconds(v)}" for k, v in est.items() if v > 0))
    data_src = imdb_source(cfg.data)
    tok = Tokenizer()
    t0 = time.perf_counter()
    train_reviews = load_imdb(data_src, "train", ("pos", "neg"))
    test_reviews = load_imdb(data_src, "test", ("pos", "neg"))
    say(f"[data] {data_src}: {len(train_reviews):,} train / {len(test_reviews):,} test reviews "
        f"({time.perf_counter() - t0:.1f} s)")

    base_desc = model_desc
    if cfg.sft_steps > 0:
        model = stage_sft(cfg, model, tok, train_reviews, out, device, amp, rank)
        base_desc = str(out / "sft_model")
    elif cfg.model == "random" and is_main():
        save_hf(model, out / "base_model")
        base_desc = str(out / "base_model")
    model.eval()

    scorer = fit_classifier(data_src, train_reviews, test_reviews, say)
    sets = build_pair_sets(cfg, model, tok, scorer, train_reviews, test_reviews, out, device, amp, rank, say)
    sets["base_desc"] = base_desc
    if cfg.precompute_ref:
        sets["reference"] = precompute_reference(model, sets["train"], cfg, out, device, amp,
                                                 reference_fingerprint(model, sets), say)

    runs = []
    betas = cfg.betas()
    for beta in betas:
        run_dir = out if len(betas) == 1 else out / f"beta_{beta:g}"
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            runs.append(run_dpo(cfg, model, beta, sets, run_dir, tok, scorer, device, amp, rank, world))
        except NonFiniteLoss as e:
            sys.exit(f"error: {e}")
        if is_main():
            with open(run_dir / "run.json", "w") as f:
                json.dump({"adapter": "adapter", "policy_base": base_desc, "beta": beta}, f)
        if beta != betas[-1]:
            drop_adapter(model)

    if is_main():
        last = runs[-1]  # a sweep's summary leads with its last beta; every run is under "runs"
        summary = {"model": model_desc, "data": str(data_src), "reference_model": base_desc,
                   "reference": last["reference"], "policy": last["policy"], "train": last["train"],
                   "device": str(device), "world_size": world, "total_seconds": time.perf_counter() - t_start,
                   "runs": [{k: r[k] for k in ("beta", "reference", "policy", "train")} for r in runs]}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if len(betas) > 1 or cfg.eval_every:
            write_frontier(out, runs)
        print("\n" + side_by_side(last["examples"]))
        print(f"reference reward {last['reference']['reward']:.3f} | policy reward {last['policy']['reward']:.3f} | "
              f"KL {last['policy']['kl']:.3f} | held-out reward accuracy {last['train']['reward_accuracy']:.3f} | "
              f"total {format_seconds(summary['total_seconds'])}")
        print(f"wrote {out / 'summary.json'}; sample with: python sample.py --adapter {run_dir}")
        if cfg.export_merged:
            merge_and_unwrap(model)  # plain nn.Linear weights with the adapter folded in, as transformers expects
            save_hf(model, Path(cfg.export_merged))
            print(f"wrote merged HF-layout model to {cfg.export_merged}")
    if dist.is_initialized():
        dist.destroy_process_group()


def drop_adapter(model: GPT) -> None:
    """Drop the adapter (not merged) so the next beta starts from the same reference weights."""
    remove_lora(model, merge=False)
    for p in model.parameters():
        p.requires_grad_(False)


if __name__ == "__main__":
    main(sys.argv[1:])
