"""
What a run reports when its methods are done: each run's `RunResult`, summary.json (one run, a --compare, or the
mean and standard error over --seeds), the last lines train.py prints, where to sample from, and the merged model
of --export-merged.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from minidpo.experiment.resolve import model_source
from minidpo.methods.evaluate import side_by_side
from minidpo.model.export import save_hf
from minidpo.model.lora import remove_lora
from minidpo.progress import Log
from minidpo.stats import mean_and_se
from minidpo.training.frontier import aggregate_points
from minidpo.training.trainer import format_seconds


@dataclass
class RunResult:
    """What one training run (any method, one setting) produced; the frontier points include step 0."""
    method: str
    setting: str
    reference: dict
    policy: dict
    train: dict
    examples: list
    frontier: list[dict]


def implicit_reward_accuracy(runs: list[RunResult]) -> dict:
    """{method: {setting: held-out pair accuracy of the policy's implicit reward}} for the DPO runs (Rafailov et al.
    sec. 5: the policy is a reward model), measured on the pairs the learned reward model's accuracy uses."""
    out: dict = {}
    for r in runs:
        if r.train.get("reward_accuracy") is not None:
            out.setdefault(r.method, {})[r.setting] = r.train["reward_accuracy"]
    return out


def summarize(runs: list[RunResult], model_desc: str, base: str, data_src: Path, device: torch.device,
              world: int, seconds: float, reward_model: dict | None = None) -> dict:
    """summary.json: the last run leads (a single run is the only one); every run is under "runs"; the learned
    reward model's held-out accuracy (when RLHF ran) beside DPO's implicit-reward accuracy on the same pairs."""
    last = runs[-1]
    return {"model": model_source(model_desc), "data": str(data_src), "reference_model": base,
            "method": last.method, "setting": last.setting, "reference": last.reference, "policy": last.policy,
            "train": last.train, "device": str(device), "world_size": world, "total_seconds": seconds,
            "finished": False,  # train.py marks it finished once every output is written (runs.mark_finished)
            "runs": [{"method": r.method, "setting": r.setting, "reference": r.reference, "policy": r.policy,
                      "train": r.train} for r in runs],
            **({"reward_model": reward_model} if reward_model is not None else {}),
            "implicit_reward_accuracy": implicit_reward_accuracy(runs)}


def seeds_summary(per_seed: dict[int, dict], points: list[dict]) -> dict:
    """The top summary.json of --seeds: each seed's results, and per method and setting the mean over seeds of the
    last evaluation's reward and KL with its standard error (frontier.aggregate_points); likewise the learned reward
    model's and DPO's implicit-reward held-out accuracy."""
    last: dict = {}
    for row in aggregate_points(points):  # a setting's row with the largest step is its final evaluation
        key = (row["method"], row["setting"])
        if key not in last or (row["step"] or 0) >= (last[key]["step"] or 0):
            last[key] = row
    accuracy: dict = {}
    for s in per_seed.values():
        for method, by_setting in s.get("implicit_reward_accuracy", {}).items():
            for setting, acc in by_setting.items():
                accuracy.setdefault(method, {}).setdefault(setting, []).append(acc)
    rm = [s["reward_model"]["heldout_accuracy"] for s in per_seed.values()
          if s.get("reward_model", {}).get("heldout_accuracy") is not None]
    stat = lambda v: dict(zip(("mean", "se"), mean_and_se(v)), seeds=len(v))  # noqa: E731
    return {"seeds": sorted(per_seed), "finished": False,
            "mean": list(last.values()),
            **({"reward_model": {"heldout_accuracy": stat(rm)}} if rm else {}),
            "implicit_reward_accuracy": {m: {k: stat(v) for k, v in d.items()} for m, d in accuracy.items()},
            "per_seed": {str(k): {key: s.get(key) for key in ("runs", "reward_model", "implicit_reward_accuracy",
                                                                "total_seconds")}
                         for k, s in per_seed.items()}}


def result_lines(last: RunResult, summary: dict, out: Path) -> str:
    lines = ["", side_by_side(last.examples)] if last.examples else [""]
    pol, ref = last.policy, last.reference
    kl = (f"KL bound {pol['kl_bound']:.3f}" if "kl_bound" in pol
          else f"KL(policy||reference) {pol.get('kl_exact', math.nan):.3f}")
    lines.append(f"{last.method} {last.setting}: reference reward {ref.get('reward', math.nan):.3f} | policy reward "
                 f"{pol.get('reward', math.nan):.3f} | {kl} | total {format_seconds(summary['total_seconds'])}")
    lines.append(f"wrote {out / 'summary.json'}; {sample_hint(out)}")
    return "\n".join(lines)


def sample_hint(out: Path) -> str:
    """How to sample the run in `out`: the folder itself when it holds an adapter, else the last sub-run (of a sweep
    or --compare) that does, else a note that there is none (best-of-N trains nothing)."""
    if (out / "run.json").is_file():
        return f"sample with: python sample.py --adapter {out}"
    held = [p for p in sorted(out.iterdir()) if p.is_dir() and (p / "run.json").is_file()] if out.is_dir() else []
    if not held:
        return "no trained adapter to sample (best-of-N trains nothing)"
    return f"sample with: python sample.py --adapter {held[-1]} ({len(held)} trained runs in {out})"


def export_merged(model: torch.nn.Module, path: Path, log: Log) -> None:
    remove_lora(model, merge=True)  # plain nn.Linear weights with the adapter folded in, as transformers expects
    save_hf(model, path)
    log(f"wrote the merged model in Hugging Face's layout to {path}")

