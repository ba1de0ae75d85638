"""
From train.py's flat options to each component's own small config: `build_configs` maps every flag to the field of
the config that uses it (so a component's error names the flag the user typed) and checks what crosses components,
once per run, before any stage runs. The result is the typed `RunConfigs` (experiment/context.py).
"""

import math

from minidpo.config import build_component, flag_name, parse_list, require
from minidpo.dataset.pairs import PairsConfig
from minidpo.dataset.prompts import PromptConfig
from minidpo.experiment.context import RunConfigs
from minidpo.methods.baselines import UnlikelihoodConfig
from minidpo.methods.dpo import DPOConfig
from minidpo.methods.evaluate import EvalConfig
from minidpo.methods.offline_train import BatchConfig
from minidpo.methods.online_dpo import OnlineDPOConfig
from minidpo.methods.orpo import ORPOConfig
from minidpo.methods.rloo import RLOOConfig
from minidpo.methods.rollout import check_rollout_temperature
from minidpo.methods.sft import SFTConfig
from minidpo.model.generate import SamplingConfig
from minidpo.model.gpt import GPTConfig
from minidpo.model.lora import LoRAConfig
from minidpo.model.tokenizer import EOT_ID
from minidpo.registry import BY_NAME, NAMES, Method
from minidpo.training.trainer import LoopConfig


def require_flag(ok: bool, field: str, detail: str) -> None:
    """require(), naming the flag (--field-name) the user typed."""
    require(ok, flag_name(field), detail)


def build_configs(cfg, sweeps: dict[str, str]) -> RunConfigs:
    """Each component's own small config, built from train.py's flags (`cfg`, a TrainConfig). Each checks itself;
    a bad value fails here, before any stage runs, with the flag's name. `sweeps`: the settings a --compare without
    its own sweeps runs each method at (train_config.py's COMPARE_SWEEPS)."""
    require_flag(cfg.method in NAMES, "method", f"must be one of {', '.join(NAMES)}, got {cfg.method!r}")
    compare = [m.strip() for m in parse_list("compare", cfg.compare, str)]  # "dpo, rloo" as typed in a shell
    for m in compare:
        require_flag(m in NAMES, "compare", f"items must be among {', '.join(NAMES)}, got {m!r}")
    require_flag(cfg.prompt_max_tokens < cfg.max_length, "prompt_max_tokens",
                 f"({cfg.prompt_max_tokens}) must be < --max-length ({cfg.max_length})")
    require_flag(not cfg.precompute_ref or cfg.batching == "unique", "precompute_ref", "needs --batching unique")
    require_flag(cfg.prompt_data is None or cfg.pairs_mode == "generated", "prompt_data",
                 "needs --pairs-mode generated (--pairs-mode labels pairs each prefix with its own review's text)")
    methods = [BY_NAME[m] for m in compare or [cfg.method]]
    require_flag(not cfg.precompute_ref or any(m.reference_cache for m in methods), "precompute_ref",
                 "caches the reference's log-probs of offline pairs: it needs --method dpo (the other methods use "
                 "no reference log-probs of the pairs, or score each step's own samples)")
    require_flag(cfg.eval_every >= 0, "eval_every", f"must be >= 0 (0: only at the end), got {cfg.eval_every}")
    require_flag(len(set(compare)) == len(compare), "compare", f"lists a method twice: {cfg.compare}")
    require_flag(math.isfinite(cfg.kl_coef) and cfg.kl_coef >= 0, "kl_coef",
                 f"must be a finite number >= 0, got {cfg.kl_coef}")
    require_flag(cfg.eval_every <= max(cfg.steps, cfg.rloo_steps), "eval_every",
                 f"({cfg.eval_every}) is larger than --steps ({cfg.steps}) and --rloo-steps ({cfg.rloo_steps}): no "
                 "step would be evaluated before the end; use 0 (only at the end) or a smaller value")
    # on-policy temperatures first: one range message whatever the bad value (nan, 0, 1e-4)
    build_component(check_rollout_temperature, {"temperature": "gen_temperature"}, temperature=cfg.gen_temperature)
    build_component(check_rollout_temperature, {"temperature": "rloo_temperature"}, temperature=cfg.rloo_temperature)
    gen = build_component(SamplingConfig, {"temperature": "gen_temperature", "top_k": "gen_top_k"},
                          temperature=cfg.gen_temperature, top_k=cfg.gen_top_k or None,
                          min_new_tokens=cfg.min_new_tokens, max_new_tokens=cfg.max_new_tokens, eot_id=EOT_ID)
    online = build_component(OnlineDPOConfig, ONLINE_DPO_FLAGS, sampling=gen, k=cfg.completions_per_prompt,
                             prompts_per_step=cfg.batch_prompts, logprobs=cfg.logprobs, seed=cfg.seed,
                             pairing=cfg.pairing)
    sweeps = sweeps if compare else {}

    def sweep(field: str, single: float) -> list[float]:  # the flag's values, --compare's default ones, or one
        return parse_list(field, getattr(cfg, field) or sweeps.get(field), float) or [single]
    betas = sweep("beta_sweep", cfg.beta)
    targets = parse_list("target_kl_sweep", cfg.target_kl_sweep, float)
    require_flag(not (targets and (cfg.kl_coef_sweep or cfg.target_kl is not None)), "target_kl_sweep",
                 "sweeps the adaptive controller's target from --kl-coef: drop --kl-coef-sweep and --target-kl")
    kl_coefs = [] if targets else sweep("kl_coef_sweep", cfg.kl_coef)
    alphas = sweep("unlikelihood_alpha_sweep", cfg.unlikelihood_alpha)
    lambdas = sweep("orpo_lambda_sweep", cfg.orpo_lambda)
    seeds = parse_list("seeds", cfg.seeds, int)
    require_flag(all(s >= 0 for s in seeds), "seeds", f"values must be >= 0, got {cfg.seeds}")
    ns = parse_list("best_of_n", cfg.best_of_n, int)
    require_flag(all(n >= 1 for n in ns), "best_of_n", f"values must be >= 1, got {cfg.best_of_n}")
    top = seed_limit(methods, ns)
    for field, values in (("seed", [cfg.seed]), ("seeds", seeds)):
        bad = [s for s in values if not 0 <= s <= top]
        require_flag(not bad, field, f"must be in 0..{top} (torch's generators take 64-bit seeds and this run also "
                                     f"uses seed + {SEED_MAX - top}), got {bad[0] if bad else ''}")
    for field, raw, values in (("beta_sweep", cfg.beta_sweep, betas), ("kl_coef_sweep", cfg.kl_coef_sweep, kl_coefs),
                               ("target_kl_sweep", cfg.target_kl_sweep, targets),
                               ("best_of_n", cfg.best_of_n, ns),
                               ("unlikelihood_alpha_sweep", cfg.unlikelihood_alpha_sweep, alphas),
                               ("orpo_lambda_sweep", cfg.orpo_lambda_sweep, lambdas),
                               ("seeds", cfg.seeds, seeds), ("compare", cfg.compare, compare)):
        require_flag(len(set(values)) == len(values), field, f"lists a value twice: {raw} (each value is one run)")
        require_flag("" not in [x.strip() for x in (raw or "x").split(",")], field, f"has an empty item: {raw!r}")
    require_flag(not cfg.compile or all(m.compiles for m in methods), "compile",
                 "compiles offline DPO's step only: use it with --method dpo (the other methods train uncompiled)")
    loop = dict(warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, grad_accum=cfg.grad_accum,
                grad_clip=cfg.grad_clip, log_every=cfg.log_every, checkpoint_every=cfg.checkpoint_every)
    component = build_component  # each config below, its errors naming the flag the user typed
    return RunConfigs(
        compare=tuple(compare or [cfg.method]),
        prompts=component(PromptConfig, None, train=cfg.num_prompts, heldout=cfg.heldout_prompts,
                          eval=cfg.eval_prompts, min_tokens=cfg.prompt_min_tokens, max_tokens=cfg.prompt_max_tokens,
                          seed=cfg.seed),
        pairs=component(PairsConfig, {"n_completions": "completions_per_prompt", "mode": "pairs_mode",
                                      "batch_size": "gen_batch_size", "min_margin": "min_score_margin"},
                        sampling=gen, mode=cfg.pairs_mode, n_completions=cfg.completions_per_prompt,
                        pairing=cfg.pairing, min_margin=cfg.min_score_margin, batch_size=cfg.gen_batch_size,
                        seed=cfg.seed),
        dpo=tuple(component(DPOConfig, {"beta": "beta_sweep" if cfg.beta_sweep else "beta"}, beta=b,
                            loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing) for b in betas),
        lora=component(LoRAConfig, {"rank": "lora_rank", "alpha": "lora_alpha", "dropout": "lora_dropout",
                                    "targets": "lora_targets"}, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                       dropout=cfg.lora_dropout, targets=tuple(t.strip() for t in cfg.lora_targets.split(","))),
        batch=component(BatchConfig, None, mode=cfg.batching, pairs=cfg.batch_size, prompts=cfg.batch_prompts,
                        grad_accum=cfg.grad_accum, max_length=cfg.max_length, pad_id=EOT_ID, logprobs=cfg.logprobs,
                        seed=cfg.seed),
        loop=component(LoopConfig, {"lr": "lr", "steps": "steps"}, steps=cfg.steps, lr=cfg.lr, label="dpo", **loop),
        sft_loop=component(LoopConfig, {"steps": "sft_steps", "lr": "sft_lr"}, steps=cfg.sft_steps, lr=cfg.sft_lr,
                           label="sft", **{**loop, "warmup_steps": min(20, cfg.sft_steps // 10)})
        if cfg.sft_steps > 0 else None,
        sft=component(SFTConfig, {"batch_size": "sft_batch_size", "block_size": "sft_block_size"},
                      batch_size=cfg.sft_batch_size, block_size=cfg.sft_block_size, lora=cfg.sft_lora, seed=cfg.seed),
        random_model=component(GPTConfig, None, block_size=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
                               n_embd=cfg.n_embd) if cfg.model == "random" else None,
        online_dpo=online,
        rloo=tuple(component(RLOOConfig, {**RLOO_FLAGS, "kl_coef": "kl_coef_sweep" if cfg.kl_coef_sweep else "kl_coef",
                                          "target_kl": "target_kl_sweep" if targets else "target_kl"},
                             **rloo_values(cfg, kl, target)) for kl, target in
                   ([(cfg.kl_coef, t) for t in targets] or [(kl, cfg.target_kl) for kl in kl_coefs])),
        rloo_loop=component(LoopConfig, {"steps": "rloo_steps", "lr": "rloo_lr"}, steps=cfg.rloo_steps,
                            lr=cfg.rloo_lr, label="rloo", **loop),
        best_of_n=tuple(ns),
        unlikelihood=tuple(component(UnlikelihoodConfig, {"unlikelihood_alpha": "unlikelihood_alpha_sweep"
                                                          if cfg.unlikelihood_alpha_sweep else "unlikelihood_alpha"},
                                     alpha=a) for a in alphas),
        orpo=tuple(component(ORPOConfig, {"orpo_lambda": "orpo_lambda_sweep"
                                          if cfg.orpo_lambda_sweep else "orpo_lambda"},
                             lambda_=x) for x in lambdas),
        rm_loop=component(LoopConfig, {"steps": "rm_steps", "lr": "rm_lr"}, steps=cfg.rm_steps, lr=cfg.rm_lr,
                          label="reward-model", **loop),
        seeds=tuple(seeds),
        eval=component(EvalConfig, None, sampling=component(SamplingConfig, None, min_new_tokens=cfg.min_new_tokens,
                                                            max_new_tokens=cfg.max_new_tokens, eot_id=EOT_ID),
                       seed=cfg.seed + 1, max_length=cfg.max_length),
        eval_every=cfg.eval_every, max_length=cfg.max_length, precompute_ref=cfg.precompute_ref, compile=cfg.compile,
        export_merged=cfg.export_merged, seed=cfg.seed,
    )


SEED_MAX = 2**64 - 1  # the largest seed torch.Generator.manual_seed takes


def seed_limit(methods: list[Method], ns: list[int]) -> int:
    """The largest seed whose derived seeds still fit SEED_MAX: evaluation samples with seed + 1, and best-of-N's
    round j with seed + 1 + j (j < max N), so a seed near the top would train and then fail at evaluation."""
    return SEED_MAX - (max(ns) if any(m.seeds_rounds for m in methods) else 1)


ONLINE_DPO_FLAGS = {"k": "completions_per_prompt", "prompts_per_step": "batch_prompts",
                    "temperature": "gen_temperature", "top_k": "gen_top_k"}
RLOO_FLAGS = {"k": "rloo_k", "prompts_per_step": "rloo_prompts", "kl_coef": "kl_coef_sweep", "top_k": "rloo_top_k",
              "horizon": "kl_horizon", "temperature": "rloo_temperature"}


def rloo_values(cfg, kl_coef: float, target_kl: float | None) -> dict:
    sampling = build_component(SamplingConfig, {"temperature": "rloo_temperature", "top_k": "rloo_top_k"},
                                 temperature=cfg.rloo_temperature, top_k=cfg.rloo_top_k or None,
                                 min_new_tokens=cfg.min_new_tokens, max_new_tokens=cfg.max_new_tokens, eot_id=EOT_ID)
    return dict(sampling=sampling, k=cfg.rloo_k, prompts_per_step=cfg.rloo_prompts, kl_coef=kl_coef,
                target_kl=target_kl, horizon=cfg.kl_horizon, logprobs=cfg.logprobs, seed=cfg.seed)
