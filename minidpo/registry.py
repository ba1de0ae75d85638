"""
The methods minidpo trains and compares, by name: the one place a method is registered.

From this list derive `--method` and `--compare`'s choices (train.py), the names of the sub-run folders a sweep or
`--compare` writes into a run folder, `<method>_<setting>` (training/runs.py: what `--overwrite` may remove), and
the README's table of methods (tests/test_runs.py checks it). A new method is registered here and wired up in
experiment/compare.py (`method_runs`, `setting_name`, `train_method`) and experiment/options.py (its sweep).
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str       # the --method / --compare name, and the prefix of its sub-run folders
    summary: str    # one line, as in the README's table of methods
    sweep: str | None  # the option a --compare sweeps it over (None: one run)


METHODS = (
    Method("dpo", "DPO's loss on pairs sampled once from the reference and ranked by the reward (the paper's)",
           "beta_sweep"),
    Method("online-dpo", "DPO's loss on pairs of the policy's own samples, drawn every step", "beta_sweep"),
    Method("rlhf", "RLOO on a reward model learned from DPO's pairs (Bradley-Terry): RLHF proper, the paper's PPO",
           "kl_coef_sweep"),
    Method("rloo", "REINFORCE with a leave-one-out baseline on the KL-penalized true reward (the paper's PPO-GT)",
           "kl_coef_sweep"),
    Method("preferred-ft", "supervised fine-tuning on the chosen completion of each of DPO's pairs", None),
    Method("unlikelihood", "log p(chosen) + alpha * sum of log(1 - p(token)) over the rejected completion",
           "unlikelihood_alpha_sweep"),
    Method("best-of-n", "N samples from the reference, the highest-reward one kept; trains nothing", "best_of_n"),
)
NAMES = tuple(m.name for m in METHODS)
# the folders of a sweep or --compare inside a run folder, and of each seed of --seeds (seed_<s>)
SUBRUN = re.compile(rf"^(({'|'.join(re.escape(n) for n in NAMES)})_.+|seed_\d+)$")
