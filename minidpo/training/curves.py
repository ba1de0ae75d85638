"""
Training curves of one run: curves.png from the run's log.jsonl (and its evaluation points, points.jsonl).

One quantity per panel (PANELS), its y axis labelled with what it is, each drawn from whatever the run logged
(minidpo.training.trainer writes TRL's metric names, so each method has its own keys); a panel nothing was logged
for is left out. A series of a few points is drawn with markers. A run resumed after a kill logs some steps twice;
the last line of each step wins. matplotlib is optional: without it the figure is skipped with a one-line how-to.
"""

import json
from pathlib import Path

from minidpo.progress import Log, quiet
from minidpo.training.frontier import pyplot, read_points

# (panel: the y axis label, the one quantity it shows), each with the logged keys drawn there: (key, legend label)
PANELS = (
    ("loss", (("loss", "loss"),)),
    ("P(positive), sentiment classifier", (("reward", "training samples"),)),
    ("learned reward model's score (normalized)", (("reward", "training samples"),)),  # RLHF's "reward"
    ("KL-penalized reward (reward - kl_coef * KL)", (("rlhf_reward", "training samples"),)),
    ("implicit reward margin, nats", (("rewards/margins", "chosen - rejected, training pairs"),)),
    ("reward-model margin (chosen - rejected score)", (("margin", "training pairs"),)),
    ("KL(policy || reference), nats", (("kl/sampled", "training samples, sampled"),)),
    ("log ref - log pi on DPO's pairs, nats", (("logratio/ref_minus_policy", "training pairs"),)),
)
LEARNED_REWARD_PANEL = PANELS[2][0]
EVAL_KEYS = {"P(positive), sentiment classifier": ("reward", "evaluation (held-out)"),
             "KL(policy || reference), nats": ("kl", "evaluation, exact")}
FEW_POINTS = 12  # a series with at most this many points is drawn with markers


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


def curve_series(run_dir: Path, learned_reward: bool = False) -> dict[str, list[tuple[str, list[float], list[float]]]]:
    """{panel: [(label, steps, values), ...]} of every curve the run's files hold (empty panels left out);
    learned_reward: the logged "reward" is a learned reward model's score (RLHF's), not P(positive)."""
    run_dir = Path(run_dir)
    stages = read_log(run_dir / "log.jsonl")
    panels: dict[str, list] = {}
    for panel, keys in PANELS:
        for stage, records in stages.items():
            for key, label in keys:
                if key == "reward" and learned_reward != (panel == LEARNED_REWARD_PANEL):
                    continue
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


def plot_curves(run_dir: str | Path, log: Log = quiet, learned_reward: bool = False) -> Path | None:
    """run_dir/curves.png: a panel per logged quantity (loss, rewards, margins, KL) against the step; None when
    skipped (no matplotlib, no log). learned_reward as curve_series'."""
    run_dir = Path(run_dir)
    panels = curve_series(run_dir, learned_reward)
    if not panels:
        log(f"skipped {run_dir / 'curves.png'}: {run_dir / 'log.jsonl'} has no logged steps")
        return None
    plt = pyplot(log, f"{run_dir / 'curves.png'} (then: python -c \"import minidpo.training.curves as c; "
                      f"c.plot_curves('{run_dir}', learned_reward={learned_reward})\")")
    if plt is None:
        return None
    names = [p for p, _ in PANELS if p in panels]
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_axis_off()
    for ax, panel in zip(axes.flat, names):
        for label, steps, values in panels[panel]:
            line = "--" if label.startswith("evaluation") else "-"
            marker = "o" if len(steps) <= FEW_POINTS else ""
            ax.plot(steps, values, marker + line, markersize=4, lw=1.2, label=label)
        ax.set_ylabel(panel, fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.suptitle(run_dir.name, fontsize=9)
    fig.tight_layout()
    fig.savefig(run_dir / "curves.png", dpi=110)
    plt.close(fig)
    log(f"wrote {run_dir / 'curves.png'}")
    return run_dir / "curves.png"
