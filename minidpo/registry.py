"""
The methods minidpo trains and compares, by name: the one place a method is registered, with everything the driver
(train.py's `run`, experiment/compare.py) needs to run it.

From this list derive `--method` and `--compare`'s choices (train.py), the names of the sub-run folders a sweep or
`--compare` writes into a run folder, `<method>_<setting>` (training/runs.py: what `--overwrite` may remove), and
the README's table of methods (tests/test_runs.py checks it). A new method is one file in minidpo/methods/ (its
config, its loss and step, its train function) and one entry here; its sweep's flag goes in experiment/options.py.
"""

import re
from dataclasses import dataclass
from typing import Callable

from minidpo.methods.baselines import train_baseline
from minidpo.methods.dpo_train import train_dpo
from minidpo.methods.online_dpo import train_online_dpo
from minidpo.methods.orpo import train_orpo
from minidpo.methods.rloo import train_rloo


@dataclass(frozen=True)
class Method:
    """train(ctx, setting, run) -> the training summary: the method's train function, given the run's shared
    context (experiment/context.py's RunContext: the model with a fresh adapter, pairs, reward, prompts, configs)."""
    name: str       # the --method / --compare name, and the prefix of its sub-run folders
    summary: str    # one line, as in the README's table of methods
    legend: str     # its label and marker on frontier.png
    marker: str
    sweep: str | None  # the option a --compare sweeps it over (None: one run)
    settings: Callable        # the run's configs -> its settings, one run each
    setting_name: Callable    # a setting -> its name on the frontier and in its sub-run folder, e.g. "beta=0.1"
    train: Callable | None = None  # None: trains nothing (best-of-N)
    reads_pairs: bool = False      # trains on the offline pairs (built once, before any adapter)
    reward_model: bool = False     # trains on RLHF's learned reward model instead of the classifier
    has_beta: bool = False         # DPO's family: the implicit reward's held-out accuracy is measured at its beta
    rl_loop: bool = False          # trains with the RL loop's steps and lr (--rloo-steps, --rloo-lr)
    reference_cache: bool = False  # its step can read the pairs' reference log-probs cached once (--precompute-ref)
    compiles: bool = False         # its step can run under torch.compile (--compile)
    seeds_rounds: bool = False     # samples round j of N with seed + 1 + j (best-of-N): options.seed_limit


def number_name(x: float) -> str:
    """x in 6 significant digits (0.1, 1e-05) when they read back as x, else in full (0.1000001): two values of a
    sweep never share a sub-run folder or a frontier label."""
    short = f"{x:g}"
    return short if float(short) == x else repr(x)


def beta_name(dpo) -> str:
    return f"beta={number_name(dpo.beta)}"


def kl_name(rloo) -> str:
    return (f"kl_coef={number_name(rloo.kl_coef)}" if rloo.target_kl is None
            else f"target_kl={number_name(rloo.target_kl)}")


METHODS = (
    Method("dpo", "DPO's loss on pairs sampled once from the reference and ranked by the reward (the paper's)",
           "DPO", "o", "beta_sweep", lambda configs: configs.dpo, beta_name,
           lambda ctx, dpo, run: train_dpo(ctx.model, ctx.pairs, dpo, ctx.configs.batch, run, ctx.runtime,
                                           ctx.reference_cache, ctx.configs.compile),
           reads_pairs=True, has_beta=True, reference_cache=True, compiles=True),
    Method("online-dpo", "DPO's loss on pairs of the policy's own samples, drawn every step", "online DPO", "D",
           "beta_sweep",
           lambda configs: configs.dpo, beta_name,
           lambda ctx, dpo, run: train_online_dpo(ctx.model, ctx.tok, ctx.scorer, ctx.prompts.train, dpo,
                                                  ctx.configs.online_dpo, run, ctx.runtime),
           has_beta=True),
    Method("rlhf", "RLOO on a reward model learned from DPO's pairs (Bradley-Terry): RLHF proper, the paper's PPO",
           "RLHF (RLOO on the learned reward)", "P", "kl_coef_sweep", lambda configs: configs.rloo, kl_name,
           lambda ctx, rloo, run: train_rloo(ctx.model, ctx.tok, ctx.reward_model, ctx.prompts.train, rloo,
                                             run, ctx.runtime, label="rlhf"),
           reward_model=True, rl_loop=True),
    Method("rloo", "REINFORCE with a leave-one-out baseline on the KL-penalized true reward (the paper's PPO-GT)",
           "RLOO on the true reward (PPO-GT)", "s", "kl_coef_sweep", lambda configs: configs.rloo, kl_name,
           lambda ctx, rloo, run: train_rloo(ctx.model, ctx.tok, ctx.scorer, ctx.prompts.train, rloo,
                                             run, ctx.runtime),
           rl_loop=True),
    Method("preferred-ft", "supervised fine-tuning on the chosen completion of each of DPO's pairs", "Preferred-FT",
           "v", None,
           lambda configs: (None,), lambda _: "sft",
           lambda ctx, _, run: train_baseline(ctx.model, ctx.pairs, "preferred-ft", ctx.configs.batch, run,
                                              ctx.runtime),
           reads_pairs=True),
    Method("unlikelihood", "log p(chosen) + alpha * sum of log(1 - p(token)) over the rejected completion",
           "Unlikelihood", "X", "unlikelihood_alpha_sweep", lambda configs: configs.unlikelihood,
           lambda ul: f"alpha={number_name(ul.alpha)}",
           lambda ctx, ul, run: train_baseline(ctx.model, ctx.pairs, "unlikelihood", ctx.configs.batch, run,
                                               ctx.runtime, unlikelihood=ul),
           reads_pairs=True),
    Method("orpo", "NLL of the chosen completion + lambda * -log sigmoid(log odds ratio); no reference model",
           "ORPO", "h", "orpo_lambda_sweep", lambda configs: configs.orpo, lambda o: f"lambda={number_name(o.lambda_)}",
           lambda ctx, orpo, run: train_orpo(ctx.model, ctx.pairs, orpo, ctx.configs.batch, run, ctx.runtime),
           reads_pairs=True),
    Method("best-of-n", "N samples from the reference, the highest-reward one kept; trains nothing",
           "best-of-N (KL bound)", "^", "best_of_n", lambda configs: (configs.best_of_n,),
           lambda ns: "N=" + ",".join(str(n) for n in ns), seeds_rounds=True),
)
BY_NAME = {m.name: m for m in METHODS}
# frontier.png's legend (in this order) and markers: minidpo.training.frontier.plot_frontier's `styles`
STYLES = {m.name: (m.legend, m.marker) for m in METHODS}
NAMES = tuple(BY_NAME)
# the folders of a sweep or --compare inside a run folder, and of each seed of --seeds (seed_<s>)
SUBRUN = re.compile(rf"^(({'|'.join(re.escape(n) for n in NAMES)})_.+|seed_\d+)$")
