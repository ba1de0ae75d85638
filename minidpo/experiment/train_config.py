"""train.py's flags and how a run's config is decided: `TrainConfig` (every flag, typed, with its default), the
presets, and `load_config` (the command line or a resumed run's config.json, checked once before any work)."""

import dataclasses
import json
import sys
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch

from minidpo import config
from minidpo.experiment.compare import method_runs
from minidpo.experiment.context import RunConfigs
from minidpo.experiment.options import build_configs
from minidpo.experiment.resolve import DTYPES, choose_dtype
from minidpo.registry import BY_NAME
from minidpo.training.distributed import is_main
from minidpo.training.runs import NOT_SETTINGS, RunConflict, read_settings, resume_overrides


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
    prompt_data: str | None = None  # the training prefixes' reviews (as --data); reward and evaluation stay --data's
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


# bundled 6x256 model, shipped IMDB sample, offline DPO with cDPO's label smoothing 0.1 (scripts/dpo_ablation.py: the
# one lever that made it beat RLHF at equal KL; 0 is the paper's loss): minutes on 2 cores
TINY = dict(model="bundled", data="sample", out_dir="out/tiny", method="dpo", num_prompts=576, label_smoothing=0.1,
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
    # 256 held-out prompts; each method's frontier is the envelope of all its checkpoints (equal_kl.csv); the paper's
    # DPO loss, without the tiny preset's label smoothing
    "tiny-fig2": dict(TINY, out_dir="out/tiny-fig2", compare="dpo,rlhf,rloo,preferred-ft,unlikelihood,best-of-n",
                      label_smoothing=0.0, beta_sweep="0.05,0.1,1,5", unlikelihood_alpha_sweep="0.05,0.1,0.5,1",
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
