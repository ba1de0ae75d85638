"""
The methods minidpo trains and compares, by name: the one place a method is registered.

From this list derive `--method` and `--compare`'s choices (train.py), the names of the sub-run folders a sweep or
`--compare` writes into a run folder, `<method>_<setting>` (training/runs.py: what `--overwrite` may remove), and
the README's table of methods (tests/test_runs.py checks it). A new method is registered here and wired up in
experiment/compare.py (`method_runs`, `run_one`).
"""

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    name: str       # the --method / --compare name, and the prefix of its sub-run folders
    summary: str    # one line, as in the README's table of methods
    sweep: str      # the option a --compare sweeps it over


METHODS = (
    Method("dpo", "DPO's loss on pairs sampled once from the reference and ranked by the reward (the paper's)",
           "beta_sweep"),
    Method("online-dpo", "DPO's loss on pairs of the policy's own samples, drawn every step", "beta_sweep"),
    Method("rloo", "REINFORCE with a leave-one-out baseline on the KL-penalized reward", "kl_coef_sweep"),
    Method("best-of-n", "N samples from the reference, the highest-reward one kept; trains nothing", "best_of_n"),
)
NAMES = tuple(m.name for m in METHODS)
# the folders of a sweep or --compare inside a run folder
SUBRUN = re.compile(rf"^({'|'.join(re.escape(n) for n in NAMES)})_.+$")
