"""
Training curves of one run: curves.png from the run's log.jsonl (and its evaluation points, points.jsonl).

Three panels, each drawn from whatever the run logged (minidpo.training.trainer writes one JSON line per logging window,
with TRL's metric names, so each method has its own keys):
- loss: "loss" (every method);
- reward: the reward of the training samples ("reward", RLOO and online DPO; "rlhf_reward", RLOO's KL-penalized
  one), DPO's implicit reward margin ("rewards/margins"), the reward model's "margin"; plus the evaluation's reward
  of held-out samples at each evaluation step (points.jsonl);
- KL: the sampled KL of the training samples ("kl/sampled"), DPO's "logratio/ref_minus_policy" (which estimates
  KL(reference || policy) on the pairs), and the evaluation's exact KL(policy || reference) (points.jsonl).
A run resumed after a kill logs some steps twice; the last line of each step wins. matplotlib is optional: without
it the figure is skipped with a one-line how-to.
"""

import json
from pathlib import Path

from minidpo.training.frontier import pyplot, read_points
from minidpo.progress import Log, quiet

PANELS = (
    ("loss", (("loss", "loss"),)),
    ("reward", (("reward", "training samples"), ("rlhf_reward", "KL-penalized"),
                ("rewards/margins", "implicit reward margin"), ("margin", "reward-model margin"))),
    ("KL", (("kl/sampled", "training samples, sampled"), ("logratio/ref_minus_policy", "log ref - log pi on pairs"))),
)
EVAL_KEYS = {"reward": ("reward", "evaluation (held-out)"), "KL": ("kl", "evaluation, exact")}


def read_log(path: Path) -> dict[str, list[dict]]:
    """{stage label: its records by step}, the last record of each step kept; a line cut by a kill is skipped."""
    stages: dict[str, dict[int, dict]] = {}
    if not path.is_file():
        return {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(r, dict) and "step" in r:
            stages.setdefault(str(r.get("stage", "train")), {})[int(r["step"])] = r
    return {stage: [by_step[s] for s in sorted(by_step)] for stage, by_step in stages.items()}


def curve_series(run_dir: Path) -> dict[str, list[tuple[str, list[float], list[float]]]]:
    """{panel: [(label, steps, values), ...]} of every curve the run's files hold (empty panels left out)."""
    run_dir = Path(run_dir)
    stages = read_log(run_dir / "log.jsonl")
    panels: dict[str, list] = {}
    for panel, keys in PANELS:
        for stage, records in stages.items():
            for key, label in keys:
                pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
                if pts:
                    name = label if len(stages) == 1 else f"{stage}: {label}"
                    panels.setdefault(panel, []).append((name, [p[0] for p in pts], [p[1] for p in pts]))
    evals = read_points(run_dir)
    for panel, (key, label) in EVAL_KEYS.items():
        pts = [(p["step"], p[key]) for p in evals if isinstance(p.get(key), (int, float))]
        if pts:
            panels.setdefault(panel, []).append((label, [p[0] for p in pts], [p[1] for p in pts]))
    return panels


def plot_curves(run_dir: str | Path, log: Log = quiet) -> Path | None:
    """run_dir/curves.png: loss, reward and KL per step, as available; None when skipped (no matplotlib, no log)."""
    run_dir = Path(run_dir)
    panels = curve_series(run_dir)
    if not panels:
        log(f"skipped {run_dir / 'curves.png'}: {run_dir / 'log.jsonl'} has no logged steps")
        return None
    plt = pyplot(log, f"{run_dir / 'curves.png'} (then: python -c \"import minidpo.training.curves as c; "
                      f"c.plot_curves('{run_dir}')\")")
    if plt is None:
        return None
    names = [p for p, _ in PANELS if p in panels]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], names):
        for label, steps, values in panels[panel]:
            evaluation = label.startswith("evaluation")
            ax.plot(steps, values, "o--" if evaluation else "-", markersize=4, lw=1.2, label=label)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)
    log(f"wrote {run_dir / 'curves.png'}")
    return run_dir / "curves.png"
