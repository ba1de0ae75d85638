"""
minidpo end to end: the DPO paper's IMDb experiment (Rafailov et al. 2023, sec. 6.1), and its Figure 2 comparison.

    python train.py                          # GPT-2 124M + full IMDB when available, else the bundled model (tiny)
    python train.py --preset tiny            # bundled small model + shipped IMDB sample, minutes on a CPU
    python train.py --preset tiny --method dpo --out-dir out/tiny-dpo     # the paper's offline DPO (tiny's method)
    python train.py --preset tiny --method rloo --out-dir out/tiny-rloo   # the policy-gradient (RL) baseline instead
    python train.py --preset tiny --method online-dpo --out-dir out/tiny-online   # DPO on the policy's own samples
    python train.py --preset tiny --compare dpo,online-dpo,rlhf,rloo,best-of-n --out-dir out/tiny-compare  # -> frontier
    python train.py --beta-sweep 0.05,0.1,0.5,1 --out-dir out/dpo-sweep   # one DPO run per beta over the same pairs
    python train.py --resume out/tiny        # continue a killed run from its last checkpoint
    torchrun --nproc_per_node 2 train.py --preset tiny --out-dir out/tiny-ddp   # data parallel (gloo / nccl)

The story: 1. the model (official GPT-2, a path, the bundled model, or random init); 2. optional SFT on review text,
folded into the weights, so the SFT model is the reference; 3. a sentiment classifier (the reward); 4. preference
pairs: the reference samples completions of 2-8 token review prefixes and the classifier ranks them; 5. each method
trains a fresh LoRA adapter (best-of-N trains nothing); 6. evaluation on held-out test prompts: reward and
KL(policy || reference) of plain samples; 7. the report: summary.json and the reward-KL frontier. Every stage is
cached, and every run is checked against its folder's settings.
"""

import csv
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from minidpo import config
from minidpo.experiment.compare import check_checkpoints, finish_run, method_runs, run_best_of_n, start_run
from minidpo.experiment.context import RunConfigs, RunContext
from minidpo.experiment.options import build_configs
from minidpo.experiment.report import export_merged, result_lines, sample_hint, seeds_summary, summarize
from minidpo.experiment.resolve import (
    DTYPES,
    autocast,
    check_model_name,
    check_writable,
    choose_dtype,
    imdb_source,
    pick_device,
    slow_dtype_warning,
)
from minidpo.experiment.stages import (
    check_model_fits,
    ensure_pairs,
    fit_classifier,
    load_model_stage,
    load_reviews,
    make_prompt_sets,
    sft_stage,
)
from minidpo.fileio import atomic_write_json
from minidpo.formats.download import cache_dir
from minidpo.model.tokenizer import Tokenizer
from minidpo.registry import BY_NAME, STYLES
from minidpo.training.distributed import is_main, setup_distributed, teardown
from minidpo.training.frontier import write_frontier
from minidpo.training.run_folder import run_folder
from minidpo.training.runs import (
    NOT_SETTINGS,
    RESUME_SAFE,
    RunConflict,
    describe,
    differing,
    read_settings,
    resume_overrides,
)
from minidpo.training.runtime import Runtime


@dataclass
class TrainConfig:
    preset: str | None = None       # tiny | tiny-fig2 | gpt2 | gpt2-large: a set of defaults; flags you give still win
    out_dir: str = "out/run"        # outputs; a folder holding a run made with other settings is refused
    resume: str | None = None       # an out_dir to continue from its checkpoint (its config.json is used)
    overwrite: bool = False         # replace the outputs of an earlier run in --out-dir
    method: str = "dpo"             # dpo | online-dpo | rlhf | rloo | preferred-ft | unlikelihood | orpo | best-of-n
    compare: str | None = None      # methods on one frontier, e.g. dpo,online-dpo,rloo,best-of-n (each with its sweep)
    seeds: str | None = None        # repeat the whole run per seed into out_dir/seed_<s>/, e.g. 0,1,2 (error bars)
    device: str = "auto"            # auto: cuda, then mps, then cpu
    dtype: str = "auto"             # auto (bf16 on CUDA or an AMX/AVX512-BF16 CPU, else fp32) | fp32 | bf16
    compile: bool = False           # torch.compile offline DPO's step (--method dpo only); changes the last digits
    seed: int = 0                   # every random choice (prompts, samples, batches, init) derives from it
    # 1. model
    model: str = "auto"            # auto | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | 124M.. | PATH | bundled | random
    n_layer: int = 4                # layers (--model random only)
    n_head: int = 4                 # attention heads (--model random only)
    n_embd: int = 128               # width (--model random only)
    block_size: int = 128           # context length (--model random only)
    # 2. SFT
    sft_steps: int = 0              # supervised fine-tuning steps on review text before DPO (0: none)
    sft_lr: float = 3e-4            # SFT peak learning rate
    sft_batch_size: int = 8         # SFT windows per step
    sft_block_size: int = 128       # SFT window length in tokens
    sft_lora: bool = True           # LoRA during SFT (merged afterwards); false trains every weight
    # 3. reward
    data: str = "auto"              # auto | sample | PATH to aclImdb_v1.tar.gz or an aclImdb directory
    # 4. prompts and pairs
    pairs_mode: str = "generated"   # generated (the paper's: sampled and ranked) | labels (pos/neg review text)
    pairing: str = "all"            # all (every distinct-score pair) | best_vs_worst (one per prompt)
    num_prompts: int = 512          # training prompts (2-8 token prefixes of train reviews)
    completions_per_prompt: int = 4  # samples per prompt (the paper: 4, so 6 pairs); online-dpo: per prompt per step
    prompt_min_tokens: int = 2      # shortest prompt
    prompt_max_tokens: int = 8      # longest prompt
    min_new_tokens: int = 4         # shortest completion (end-of-text is forbidden before it)
    max_new_tokens: int = 16        # longest completion
    min_score_margin: float = 0.0   # drop training pairs whose classifier scores differ by less (near ties)
    gen_temperature: float = 1.0    # sampling temperature for pair generation (online-dpo: its training samples)
    gen_top_k: int | None = None    # top-k for pair generation (0 or none: full softmax); online-dpo too
    gen_batch_size: int = 64        # sequences per generate call
    max_length: int = 64            # prompt + completion tokens per training sequence
    # 5. DPO
    beta: float = 0.1               # DPO's KL strength: higher stays closer to the reference
    beta_sweep: str | None = None   # DPO betas for a sweep or --compare, e.g. 0.05,0.1,0.5,1
    loss_type: str = "sigmoid"      # sigmoid (DPO; cDPO with label smoothing) | robust | ipo | hinge
    label_smoothing: float = 0.0    # assumed label-flip rate: sigmoid [0, 0.5], robust [0, 0.5), else 0
    batching: str = "unique"        # unique: whole prompts, each distinct sequence forwarded once | pairs
    batch_size: int = 8             # pairs per micro-batch per process (--batching pairs)
    batch_prompts: int = 2          # whole prompts per micro-batch per process (--batching unique; online-dpo)
    logprobs: str = "fused"         # fused (memory-lean kernels) | naive (log_softmax + gather, to read and check)
    precompute_ref: bool = False    # reference log-probs once before training, cached, not every step
    # 6. LoRA and optimization (DPO; SFT uses the LoRA settings too)
    lora_rank: int = 8              # LoRA rank r
    lora_alpha: float = 16.0        # LoRA scale alpha (the update is alpha / r * B A)
    lora_dropout: float = 0.0       # dropout on the LoRA input
    lora_targets: str = "attn.c_attn"  # comma-separated: attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
    steps: int = 200                # DPO optimizer steps (online-dpo too)
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 5e-4                # DPO peak learning rate (AdamW, warmup then cosine; online-dpo too)
    warmup_steps: int = 10          # linear warmup steps
    weight_decay: float = 0.0       # AdamW weight decay on matrices
    grad_clip: float = 1.0          # max gradient norm (0: no clipping)
    log_every: int = 10             # steps between log lines
    checkpoint_every: int = 50      # steps between checkpoints (0: only at the end)
    eval_every: int = 0             # also evaluate every N steps (frontier points); 0: only at the end
    # 7. RLOO (the RL baseline)
    rloo_steps: int = 200           # RLOO optimizer steps
    rloo_lr: float = 5e-4           # RLOO peak learning rate
    rloo_k: int = 4                 # completions per prompt (the leave-one-out baseline needs >= 2)
    rloo_prompts: int = 8           # prompts per RLOO step
    rloo_top_k: int | None = None   # top-k of RLOO's training samples (0 or none: full softmax)
    rloo_temperature: float = 1.0   # temperature of RLOO's samples (log-probs and KL are of the tempered policy)
    kl_coef: float = 0.1            # RLOO's KL penalty: reward - kl_coef * (log pi - log ref) per completion
    kl_coef_sweep: str | None = None  # RLOO kl_coefs for a sweep or --compare, e.g. 0.02,0.1,0.5
    target_kl: float | None = None  # adapt kl_coef toward this KL per completion (TRL's AdaptiveKLController)
    target_kl_sweep: str | None = None  # RL target KLs for a sweep or --compare (adaptive, from --kl-coef), e.g. 3,6,9
    kl_horizon: int = 10000         # adaptive KL horizon, in sampled completions
    # 8. the learned reward model (--method rlhf) and the paper's baselines (preferred-ft, unlikelihood)
    rm_steps: int = 100             # reward-model optimizer steps (Bradley-Terry on DPO's pairs and batches; --lora-*)
    rm_lr: float = 5e-4             # reward-model peak learning rate (LoRA on the reference body, head trained fully)
    unlikelihood_alpha: float = 1.0  # weight of the rejected completion's unlikelihood term
    unlikelihood_alpha_sweep: str | None = None  # alphas for a sweep or --compare, e.g. 0.1,1
    orpo_lambda: float = 0.1        # ORPO's weight of the odds-ratio term (TRL's beta)
    orpo_lambda_sweep: str | None = None  # ORPO lambdas for a sweep or --compare, e.g. 0.1,1
    # 9. best-of-N and evaluation
    best_of_n: str = "1,2,4,8,16"   # N values for --method best-of-n (samples from the reference, keep the best)
    eval_prompts: int = 64          # held-out test prompts for reward and KL
    heldout_prompts: int = 32       # held-out test prompts for implicit-reward accuracy (DPO)
    export_merged: str | None = None  # also write the policy with LoRA folded in, in Hugging Face's layout

    @cached_property
    def configs(self) -> RunConfigs:
        """The component configs this run will use, built (and so every option checked) once per config."""
        return build_configs(self, COMPARE_SWEEPS)


# bundled 6x256 model, shipped IMDB sample, the paper's offline DPO (+0.22..+0.26 over 3 seeds): minutes on 2 cores
TINY = dict(model="bundled", data="sample", out_dir="out/tiny", method="dpo", num_prompts=576,
            completions_per_prompt=8, gen_temperature=0.7, gen_top_k=None, heldout_prompts=24, eval_prompts=128,
            steps=80, batch_prompts=8, batch_size=16, lr=5e-3, beta=0.1, warmup_steps=10, lora_rank=8,
            log_every=25, checkpoint_every=50, min_new_tokens=8, max_new_tokens=16, max_length=32,
            lora_targets="attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj", rloo_steps=80, rloo_lr=1e-2,
            rloo_k=8, rloo_prompts=8, rloo_temperature=0.7, kl_coef=0.02, best_of_n="1,2,4,8,16",
            rm_steps=80, rm_lr=5e-3)
PRESETS = {
    "tiny": TINY,
    # the paper's Figure 2 protocol on the tiny preset: its methods and sweeps (DPO beta 0.05-5, Unlikelihood alpha
    # 0.05-1, RL at target KL 3-12 through the adaptive controller), every run evaluated every 20 of its 80 steps on
    # 256 held-out prompts; each method's frontier is the envelope of all its checkpoints (equal_kl.csv)
    "tiny-fig2": dict(TINY, out_dir="out/tiny-fig2", compare="dpo,rlhf,rloo,preferred-ft,unlikelihood,best-of-n",
                      beta_sweep="0.05,0.1,1,5", unlikelihood_alpha_sweep="0.05,0.1,0.5,1",
                      target_kl_sweep="3,6,9,12", kl_coef=0.05, kl_horizon=1000, eval_every=20, eval_prompts=256),
    # GPT-2 124M on the full set: about a quarter of an hour on one modern GPU
    "gpt2": dict(model="gpt2", data="auto", out_dir="out/gpt2", sft_steps=200, sft_batch_size=16, num_prompts=2048,
                 steps=400, batch_prompts=4, batch_size=16, lr=5e-4, max_new_tokens=32, max_length=48,
                 eval_every=100, eval_prompts=256, heldout_prompts=64, rloo_steps=400, rloo_prompts=16),
    "gpt2-large": dict(model="gpt2-large", data="auto", out_dir="out/gpt2-large", sft_steps=200,
                       sft_batch_size=16, num_prompts=2048, steps=400, batch_prompts=2, batch_size=8, grad_accum=2,
                       lr=2e-4, max_new_tokens=32, max_length=48, eval_every=100, eval_prompts=256,
                       heldout_prompts=64),
}
# a --compare without its own sweeps: the settings each method is swept over
COMPARE_SWEEPS = {"beta_sweep": "0.05,0.1,0.5", "kl_coef_sweep": "0.02,0.05", "unlikelihood_alpha_sweep": "0.1,1",
                  "orpo_lambda_sweep": "0.1,1"}


def load_config(argv: list[str]) -> tuple[TrainConfig, set[str]]:
    """(config, the options given on the command line), every option checked (its configs built). --resume reads
    the run's own config.json instead."""
    types = config.field_types(TrainConfig)
    given = config.parse_overrides(argv, types)
    cfg = config.build_config(TrainConfig, argv, PRESETS)
    if {"method", "compare"} <= set(given):
        raise config.ConfigError(f"--method {cfg.method} and --compare {cfg.compare} were both given: --compare runs "
                                 "every method it lists, so drop --method (or list that method in --compare)", "method")
    if cfg.resume is not None:
        cfg = resumed_config(cfg, given)
    configs = cfg.configs  # built here, so a bad option fails before any work
    check_export_merged(cfg, configs)
    return cfg, set(given)


def check_export_merged(cfg: TrainConfig, configs: RunConfigs) -> None:
    """--export-merged writes one merged model to one path, so it takes a run of one method at one setting with one
    seed, refused here before any work otherwise."""
    if cfg.export_merged is None:
        return
    runs = method_runs(configs, Path(cfg.out_dir))
    if len(runs) > 1:
        raise config.ConfigError(f"--export-merged writes one model, and this run trains {len(runs)} (--compare or a "
                                 "sweep): run the one method and setting to export on its own with --export-merged, or "
                                 "merge a sub-run's adapter_peft/ with PEFT", "export_merged")
    if configs.seeds and resumes_one_seed(cfg) is None:
        raise config.ConfigError(f"--export-merged writes one model, and --seeds {cfg.seeds} trains one per seed: run "
                                 f"without it, then export one seed with --resume {Path(cfg.out_dir) / 'seed_<s>'} "
                                 "--export-merged PATH", "export_merged")


def resumes_one_seed(cfg: TrainConfig) -> Path | None:
    """The folder of the --seeds run when cfg resumes one of its seeds' folders (seed_<s>, inside a folder whose
    config.json records the same --seeds), else None: such a folder resumes as that one seed's run."""
    if cfg.resume is None or not cfg.seeds or Path(cfg.resume).name != f"seed_{cfg.seed}":
        return None
    top = Path(cfg.resume).resolve().parent
    try:
        stored = read_settings(top)
    except RunConflict:
        return None
    return top if stored is not None and stored.get("seeds") == cfg.seeds else None


def resumed_config(cfg: TrainConfig, given: dict) -> TrainConfig:
    """The config a run in cfg.resume was started with; options given now that change results are ignored."""
    saved = Path(cfg.resume) / "config.json"
    if not saved.is_file():
        raise config.ConfigError(f"--resume {cfg.resume}: no config.json there (not a train.py output directory)")
    try:
        stored_raw = json.loads(saved.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise config.ConfigError(f"{saved}: not valid JSON ({e}); the run cannot be resumed, start it again") from None
    stored = config.config_from_dict(TrainConfig, stored_raw, str(saved))
    merged, ignored = resume_overrides(dataclasses.asdict(stored), {k: getattr(cfg, k) for k in given},
                                       safe=NOT_SETTINGS - {"preset", "out_dir"})
    if ignored:
        print(f"[resume] ignoring {', '.join('--' + k.replace('_', '-') for k in sorted(ignored))}: a resumed run "
              "keeps the settings it was started with (start a new --out-dir to change them)", file=sys.stderr)
    return replace(TrainConfig(**merged), out_dir=cfg.resume, resume=cfg.resume)


def with_tiny_defaults(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """The bundled model with GPT-2-sized settings learns nothing: take the tiny preset's values for every option
    the user did not give."""
    return replace(cfg, **{k: v for k, v in PRESETS["tiny"].items() if k not in given | {"out_dir", "model"}})


def keep_recorded(cfg: TrainConfig, device: torch.device, unused: frozenset[str] = frozenset()) -> TrainConfig:
    """cfg with the values recorded in its --out-dir for the options that cannot change this run's results, so a
    run into its own folder continues there instead of being refused: `unused` (the caller's: --seed beside
    --seeds), the reward model's options when no method trains one, and a --dtype that means the same precision here
    as the recorded one. Options that change results are left to the folder's check."""
    try:
        raw = None if cfg.resume is not None or cfg.overwrite else read_settings(cfg.out_dir)
        stored = config.config_from_dict(TrainConfig, raw, "config.json") if raw is not None else None
    except (config.ConfigError, RunConflict):
        stored = None  # the folder's check says what is wrong with it
    if stored is None:
        return cfg
    unused = set(unused) | ({"rm_steps", "rm_lr"} if not any(BY_NAME[m].reward_model for m in cfg.configs.compare)
                            else set())
    autocast_of = lambda name: choose_dtype(device, name)[0]  # noqa: E731
    if stored.dtype in ("auto", *DTYPES) and autocast_of(stored.dtype) == autocast_of(cfg.dtype):
        unused.add("dtype")
    ignored = sorted(k for k in unused if getattr(stored, k) != getattr(cfg, k))
    if ignored and is_main():
        print(f"[resume] ignoring {', '.join(config.flag_name(k) for k in ignored)}: cannot change this run's results, "
              f"so {cfg.out_dir} goes on with the values it was made with", file=sys.stderr)
    return replace(cfg, **{k: getattr(stored, k) for k in ignored})


def run_settings(cfg: TrainConfig) -> dict:
    """The options that change results: what config.json's check compares (runs.NOT_SETTINGS are left out)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SETTINGS}


def make_runtime(cfg: TrainConfig, rank: int, world: int, device_override: str | None) -> tuple[Runtime, str]:
    """This process's Runtime, and its precision in words for the run's first line."""
    device = pick_device(device_override or cfg.device)
    dtype, why = choose_dtype(device, cfg.dtype)
    say = (lambda msg: print(msg, flush=True)) if is_main() else (lambda msg: None)
    if is_main() and (warning := slow_dtype_warning(device, dtype)):
        print(warning, file=sys.stderr, flush=True)
    return Runtime(device, autocast(device, dtype), rank, world, say), f"{'bf16 autocast' if dtype else 'fp32'} ({why})"


def main(argv: list[str]) -> None:
    """The story of the docstring (`run`), the same on every rank; --seeds repeats it per seed (`run_seeds`)."""
    cfg, given = load_config(argv)
    check_model_name(cfg.model)  # every path is checked before any work or any write
    rank, world, device_override = setup_distributed()
    try:
        runtime, precision = make_runtime(cfg, rank, world, device_override)
        top = resumes_one_seed(cfg)
        if top is not None:
            runtime.log(f"[seeds] {cfg.resume} is seed {cfg.seed} of the --seeds {cfg.seeds} run in {top}: resuming "
                        f"that seed alone (--resume {top} resumes every seed and writes their means)")
        if cfg.configs.seeds and top is None:
            run_seeds(cfg, given, runtime, precision)
        else:
            run(cfg, given, runtime, precision)
    finally:
        teardown()


def run(cfg: TrainConfig, given: set[str], runtime: Runtime, precision: str) -> None:
    """One whole run (every method and setting of --compare) with one seed, into cfg.out_dir."""
    t_start = time.perf_counter()
    data_src, data_note = imdb_source(cfg.data)
    # 1. the model (the bundled model brings the tiny preset's settings unless some were given)
    model, model_desc, notes = load_model_stage(cfg.model, runtime.device, cfg.configs.random_model, cfg.seed)
    if notes and cfg.preset is None and cfg.resume is None:
        cfg = with_tiny_defaults(cfg, given)
    cfg = keep_recorded(cfg, runtime.device)
    for line in notes:
        runtime.log(line)
    configs, out, tok = cfg.configs, Path(cfg.out_dir), Tokenizer()  # tok: read and sha256-checked once
    check_model_fits(model, cfg.prompt_max_tokens + cfg.max_new_tokens, cfg.max_length, tok.vocab_size)
    with enter_run_folder(cfg, out) as folder:
        if folder.finished:
            runtime.log(f"{out} already holds this run, finished; its outputs stay as they are (--overwrite to run it "
                        f"again). {sample_hint(out).capitalize()}")
            return
        if folder.repairing:  # every sub-run resumes at its last step: nothing is trained again
            runtime.log(f"{out} holds this run, finished, without {', '.join(missing_outputs(cfg, out))}: making them")
        torch.manual_seed(cfg.seed)
        world = f" x{runtime.world}" if runtime.world > 1 else ""
        runtime.log(f"minidpo: device {runtime.device}{world}, {precision}, model {model_desc}, out_dir {out}")
        if data_note:
            runtime.log(data_note)
        t0 = time.perf_counter()
        reviews = load_reviews(data_src)
        runtime.log(f"[data] {data_src}: {len(reviews.train):,} train / {len(reviews.test):,} test reviews "
                    f"({time.perf_counter() - t0:.1f} s)")
        # 2. optional SFT, folded into the weights: the reference
        model, base = sft_stage(model, model_desc, reviews, tok, configs, out, runtime)
        # 3. the reward: a sentiment classifier
        scorer = fit_classifier(reviews, runtime.log)
        # 4. prompts (the pairs are built by the first method that needs them, then cached)
        prompts = make_prompt_sets(reviews, tok, configs.prompts)
        ctx = RunContext(model, tok, scorer, reviews, prompts, configs, base, out, runtime, settings=run_settings(cfg))
        # 5-6. each method and setting trains a fresh adapter (or none, best-of-N) and is evaluated the same way
        runs = []
        for method, setting, run_dir in method_runs(configs, out):
            if method.reads_pairs:  # built by the first method that needs them, then cached
                ensure_pairs(ctx)
            if method.train is None:
                runs.append(run_best_of_n(ctx, method, setting, run_dir))
                continue
            train_run = start_run(ctx, method, setting, run_dir)  # a fresh adapter; its checkpoint, its evaluations
            summary = method.train(ctx, setting, train_run)       # e.g. methods/dpo_train.py's train_dpo
            runs.append(finish_run(ctx, method, setting, run_dir, summary))
        # 7. the report: summary.json, the frontier, the merged model (rank 0)
        if is_main():
            report(ctx, cfg, runs, model_desc, data_src, time.perf_counter() - t_start)
        # leaving the folder marks the run finished, last: a kill before leaves a run that --resume completes


def enter_run_folder(cfg: TrainConfig, out: Path):
    """run_folder (every rank alike) for this run: the paths are checked writable first (rank 0); a sub-run's
    checkpoint made with other settings is refused before anything is written; config.json is recorded."""
    if is_main():
        check_writable(out, "--out-dir")
        check_writable(cache_dir(), "the cache dir ($MINIDPO_CACHE)")
    settings = run_settings(cfg)

    def record(o: Path) -> None:  # rank 0, after the folder check: refuse a sub-run made otherwise first
        check_checkpoints(cfg.configs, settings, o)
        config.save_config(cfg, o / "config.json")
    return run_folder(out, settings, resume=cfg.resume is not None, overwrite=cfg.overwrite, record=record,
                      missing=lambda o: missing_outputs(cfg, o))


def wants_frontier(cfg: TrainConfig) -> bool:
    """A frontier.csv for several runs, several evaluation steps, or each seed of --seeds (what the top gathers)."""
    return len(method_runs(cfg.configs, Path(cfg.out_dir))) > 1 or bool(cfg.eval_every) or bool(cfg.seeds)


def missing_outputs(cfg: TrainConfig, out: Path) -> list[str]:
    """What a finished run in `out` lacks of what this command writes: frontier.csv, or the --export-merged model."""
    files = [out / "frontier.csv"] if wants_frontier(cfg) else []
    files += [Path(cfg.export_merged) / "model.safetensors"] if cfg.export_merged else []
    return [str(f) for f in files if not f.is_file()]


def report(ctx: RunContext, cfg: TrainConfig, runs: list, model_desc: str, data_src: Path, seconds: float) -> None:
    """summary.json, frontier.csv (with this run's seed), the --export-merged model and the last lines."""
    summary = summarize(runs, model_desc, ctx.base, data_src, ctx.runtime.device, ctx.runtime.world, seconds,
                        ctx.reward_model_info)
    atomic_write_json(ctx.out / "summary.json", summary)
    if wants_frontier(cfg):
        write_frontier(ctx.out, [{**p, "seed": cfg.seed} for r in runs for p in r.frontier], ctx.runtime.log, STYLES)
    if cfg.export_merged:
        export_merged(ctx.model, Path(cfg.export_merged), ctx.runtime.log)
    ctx.runtime.log(result_lines(runs[-1], summary, ctx.out))


def run_seeds(cfg: TrainConfig, given: set[str], runtime: Runtime, precision: str) -> None:
    """--seeds: the whole run once per seed into out_dir/seed_<s>/, then frontier.csv (a `seed` column),
    frontier_mean.csv, frontier.png and a summary.json with the mean and standard error per method and setting."""
    cfg = keep_recorded(cfg, runtime.device, frozenset({"seed"}))  # each seed's folder records its own seed
    out, seeds = Path(cfg.out_dir), cfg.configs.seeds
    if is_main():
        check_writable(out, "--out-dir")
    if cfg.model == "auto" and cfg.preset is None and cfg.resume is None:
        # the bundled model's tiny defaults, decided once: the top config.json and every seed's record the same
        _, _, notes = load_model_stage(cfg.model, runtime.device, cfg.configs.random_model, cfg.seed)
        if notes:
            cfg = with_tiny_defaults(cfg, given)

    def record(o: Path) -> None:
        check_seed_folders(cfg, o)
        config.save_config(cfg, o / "config.json")
    with run_folder(out, run_settings(cfg), resume=cfg.resume is not None, overwrite=cfg.overwrite, record=record,
                    missing=lambda o: missing_seed_outputs(cfg, o)) as folder:
        if folder.finished:
            runtime.log(f"{out} already holds this run over seeds {cfg.seeds}, finished; its outputs stay as they are "
                        "(--overwrite to run it again)")
            return
        if folder.repairing:  # every seed is finished: nothing is trained again
            runtime.log(f"{out} holds this run over seeds {cfg.seeds}, finished, without "
                        f"{', '.join(missing_seed_outputs(cfg, out))}: making them")
        settled = set(config.field_types(TrainConfig))  # every option is decided above, for every seed alike
        for s in seeds:
            sub_out = out / f"seed_{s}"
            resume = str(sub_out) if cfg.resume and (sub_out / "config.json").is_file() else None
            runtime.log(f"[seeds] seed {s} of {cfg.seeds} -> {sub_out}")
            run(replace(cfg, seed=s, out_dir=str(sub_out), resume=resume, overwrite=False), settled, runtime, precision)
        if is_main():
            points, per_seed = gather_seeds(out, seeds)
            write_frontier(out, points, runtime.log, STYLES)
            atomic_write_json(out / "summary.json", seeds_summary(per_seed, points))
            means = out / "frontier_mean.csv"  # write_frontier makes it only from points measured over several seeds
            runtime.log(f"wrote {out / 'summary.json'} and {means} (mean and standard error over seeds {cfg.seeds})"
                        if len(seeds) > 1 else f"wrote {out / 'summary.json'} (one seed, {cfg.seeds}: no mean or "
                        f"standard error to take, so no {means.name})")


def check_seed_folders(cfg: TrainConfig, out: Path) -> None:
    """Before any work: each seed folder already in `out` must hold that seed made with this run's settings, else
    one RunConflict whose ways on are the whole --seeds run's (a seed's own --resume would not mend the mix)."""
    safe = RESUME_SAFE if cfg.resume is not None else frozenset()
    for s in cfg.configs.seeds:
        sub = out / f"seed_{s}"
        stored, settings = read_settings(sub), run_settings(replace(cfg, seed=s))
        diff = differing(stored, settings, NOT_SETTINGS | safe) if stored is not None else []
        if diff:
            raise RunConflict(f"{sub} holds seed {s} made with {describe(diff, stored)} (now "
                              f"{describe(diff, settings)}); choose a new --out-dir, or pass --overwrite to run every "
                              "seed again")


def missing_seed_outputs(cfg: TrainConfig, out: Path) -> list[str]:
    """What a finished --seeds run in `out` lacks: a seed's summary.json, or the top frontier.csv and
    frontier_mean.csv that gather the seeds."""
    files = [out / f"seed_{s}" / "summary.json" for s in cfg.configs.seeds] + [out / "frontier.csv"]
    files += [out / "frontier_mean.csv"] if len(cfg.configs.seeds) > 1 else []
    return [str(f) for f in files if not f.is_file()]


def gather_seeds(out: Path, seeds: tuple[int, ...]) -> tuple[list[dict], dict[int, dict]]:
    """(every seed's frontier points, each tagged with its seed; {seed: its summary.json}). A summary over seeds
    found in a seed's folder (a --seeds run started inside it) is refused: the means are over each seed once."""
    points, per_seed = [], {}
    for s in seeds:
        sub = out / f"seed_{s}"
        summary = json.loads((sub / "summary.json").read_text())
        if "per_seed" in summary:
            raise RunConflict(f"{sub}/summary.json sums up seeds {summary.get('seeds')}, not seed {s}'s run (a "
                              f"--seeds run was started inside its folder): remove {sub}/summary.json and the seed_* "
                              f"folders in {sub}, then --resume {out}")
        with open(sub / "frontier.csv", newline="") as f:
            points += [{**row, "seed": s} for row in csv.DictReader(f) if row.get("seed") in (None, "", str(s))]
        per_seed[s] = summary
    return points, per_seed


if __name__ == "__main__":
    sys.exit(config.run_program(main, sys.argv[1:], __doc__, TrainConfig, PRESETS))
