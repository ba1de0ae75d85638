"""
The reward-vs-KL frontier: the DPO paper's Figure 2 (left), Rafailov et al. 2023.

Every evaluation of every run (DPO at each beta, RLOO at each kl_coef, best-of-N at each N) is one point: the mean
reward of samples on held-out prompts against KL(policy || reference). A run's points are appended to
`<run_dir>/points.jsonl` as they are measured, so a killed and resumed run keeps the points from before the kill;
`frontier.csv` gathers every run's points with a `method` column (and a `seed` column when runs are repeated over
seeds), and `frontier.png` draws them in the paper's style: KL on x, reward on y, one colour per method, a point per
setting and evaluation step (joined by a faint line per setting, from the reference's own point at KL 0).

Seeds. The paper's figure shows single runs. With several seeds (`seed` set on the points), `aggregate_points`
gives, for each (method, setting, step), the mean of reward and KL over seeds and its standard error
std(ddof=1) / sqrt(n); the plot draws those means with error bars in both directions, and frontier_mean.csv holds
them, so a gap between two methods can be read against the noise of the runs themselves.

Best-of-N is not an autoregressive policy, so its KL is not measured but bounded: KL(best-of-N || reference) <=
log N - (N - 1) / N (Stiennon et al. 2020; Beirami et al. 2024): its points hold that bound as `kl_bound` (their `kl`
is empty), and the plot places them at it, labelled "KL bound".
"""

import csv
import json
import math
from pathlib import Path

from minidpo.stats import mean_and_se
from minidpo.fileio import atomic_path
from minidpo.progress import Log, quiet

COLUMNS = ["method", "setting", "step", "kl", "kl_bound", "kl_sampled", "reward", "seed"]
MEAN_COLUMNS = ["method", "setting", "step", "seeds", "reward", "reward_se", "kl", "kl_se", "kl_sampled",
                "kl_sampled_se", "kl_bound"]
# the order of the legend and the colours (the paper's Figure 2 methods and ours)
METHOD_LABELS = {"dpo": "DPO", "online-dpo": "online DPO", "rlhf": "RLHF (RLOO on the learned reward)",
                 "rloo": "RLOO on the true reward (PPO-GT)", "preferred-ft": "Preferred-FT",
                 "unlikelihood": "Unlikelihood", "best-of-n": "best-of-N (KL bound)"}
MARKERS = {"dpo": "o", "online-dpo": "D", "rlhf": "P", "rloo": "s", "preferred-ft": "v", "unlikelihood": "X",
           "best-of-n": "^"}


def append_point(run_dir: Path, point: dict) -> None:
    """Add one evaluation point to run_dir/points.jsonl (one JSON line, appended, so a kill loses nothing)."""
    path = run_dir / "points.jsonl"
    # a kill mid-write can leave a last line without its newline: start a fresh line so only that one is lost
    cut = path.is_file() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
    with open(path, "a") as f:
        f.write(("\n" if cut else "") + json.dumps({k: point.get(k) for k in COLUMNS}, allow_nan=False) + "\n")


def read_points(run_dir: Path) -> list[dict]:
    """The points of one run, last measurement per step (a resumed run may re-measure a step), by step."""
    path = run_dir / "points.jsonl"
    if not path.is_file():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            p = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        if not isinstance(p, dict) or isinstance(p.get("step"), bool) or not isinstance(p.get("step"), (int, float)):
            continue  # valid JSON but not a point (`[1, 2]`, `3`, a damaged line): skipped like a cut one
        by_step[p["step"]] = p
    return [by_step[s] for s in sorted(by_step)]


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows({k: r.get(k) for k in columns} for r in rows)


def write_frontier(out: Path, points: list[dict], log: Log = quiet) -> Path:
    """frontier.csv (and frontier_mean.csv when some point was measured over several seeds; frontier.png when
    matplotlib is installed) from every run's points."""
    write_csv(out / "frontier.csv", points, COLUMNS)
    means = aggregate_points(points)
    if any(m["seeds"] > 1 for m in means):
        write_csv(out / "frontier_mean.csv", means, MEAN_COLUMNS)
    plot_frontier(out, log)
    return out / "frontier.csv"


def read_frontier(out: Path) -> list[dict]:
    with open(out / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("step", "kl", "kl_bound", "kl_sampled", "reward", "seed"):
            r[k] = float(r[k]) if r.get(k) not in (None, "", "None") else math.nan
        if math.isnan(r["kl"]) and not math.isnan(r["kl_bound"]):
            r["kl"] = r["kl_bound"]  # best-of-N: the plot's x is its KL bound (labelled so); the csv keeps them apart
    return rows


def reward_range(rewards: list[float]) -> tuple[float, float]:
    """Y limits: the data with a margin, at least 0.2 wide, inside [0, 1] (a reward is P(positive))."""
    lo, hi = min(rewards), max(rewards)
    mid, half = (lo + hi) / 2, min(0.5, max(0.1, (hi - lo) / 2 + 0.05))
    shift = max(0.0, half - mid) - max(0.0, mid + half - 1.0)  # slide the window back inside [0, 1]
    return max(0.0, min(lo, mid + shift - half)), min(1.0, max(hi, mid + shift + half))


def _number(v) -> float:
    return math.nan if v is None or v == "" else float(v)


def aggregate_points(points: list[dict]) -> list[dict]:
    """One row per (method, setting, step), in order of first appearance: "seeds" (how many points), the mean of
    reward, kl, kl_sampled and kl_bound over them and each mean's standard error ("_se": std(ddof=1) / sqrt(n), None
    for one seed). A missing or NaN value (best-of-N has no kl_sampled and no kl, the others no kl_bound) is left out
    of its mean (None if none is left).

    Naive equivalent per group and key: statistics.mean(v) and statistics.stdev(v) / sqrt(len(v)).
    """
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["method"], p["setting"], _number(p["step"])), []).append(p)
    rows = []
    for (method, setting, step), mine in groups.items():
        row = {"method": method, "setting": setting, "step": int(step) if math.isfinite(step) else None,
               "seeds": len(mine)}
        for key in ("reward", "kl", "kl_sampled", "kl_bound"):
            values = [v for v in (_number(p.get(key)) for p in mine) if math.isfinite(v)]
            row[key], row[f"{key}_se"] = mean_and_se(values) if values else (None, None)
        rows.append(row)
    return rows


def pyplot(log: Log, what: str):
    """matplotlib.pyplot on the Agg backend, or None after one line saying how to get `what`."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"skipped {what}: pip install matplotlib")
        return None
    return plt


def plot_frontier(out: str | Path, log: Log = quiet) -> Path | None:
    """frontier.png from out/frontier.csv, in the style of the paper's Figure 2 (left): KL(policy || reference) on
    x, reward on y, one colour per method, a point per setting and evaluation step (means over seeds, with standard
    error bars when there are several), the reference (KL 0) once, in black."""
    out = Path(out)
    plt = pyplot(log, f"{out / 'frontier.png'} (then: python -c \"import minidpo.training.frontier as f; "
                      f"f.plot_frontier('{out}')\")")
    if plt is None:
        return None
    rows = [r for r in aggregate_points(read_frontier(out)) if r["reward"] is not None and r["kl"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.get_cmap("tab10")
    order = list(METHOD_LABELS) + sorted({r["method"] for r in rows} - set(METHOD_LABELS))
    reference = [r for r in rows if r["kl"] == 0.0 and r["method"] != "best-of-n"]
    if reference:
        ax.plot([0.0], [sum(r["reward"] for r in reference) / len(reference)], "*", color="black", markersize=11,
                label="reference", zorder=3)
    for method in (m for m in order if any(r["method"] == m for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        colour, marker = colours(order.index(method) % 10), MARKERS.get(method, "o")  # a method keeps its colour
        for setting in dict.fromkeys(r["setting"] for r in mine):
            line = sorted((r for r in mine if r["setting"] == setting), key=lambda r: (r["step"], r["kl"]))
            if method == "best-of-n":
                line = sorted(mine, key=lambda r: r["kl"])  # one line over N
            ax.plot([r["kl"] for r in line], [r["reward"] for r in line], "-", color=colour, alpha=0.3, lw=1)
            if method == "best-of-n":
                break
        shown = [r for r in mine if not (r["kl"] == 0.0 and method != "best-of-n")]
        errors = any(r["seeds"] > 1 for r in shown)
        ax.errorbar([r["kl"] for r in shown], [r["reward"] for r in shown],
                    yerr=[r["reward_se"] or 0.0 for r in shown] if errors else None,
                    xerr=[r["kl_se"] or 0.0 for r in shown] if errors else None,
                    fmt=marker, color=colour, markersize=5, capsize=2, elinewidth=0.8,
                    label=METHOD_LABELS.get(method, method))
    if rows:
        ax.set_ylim(*reward_range([r["reward"] for r in rows]))
    seeds = max((r["seeds"] for r in rows), default=1)
    ax.set_xlabel("KL(policy || reference), nats per completion")
    ax.set_ylabel("mean reward: P(positive) of held-out completions")
    ax.set_title("IMDb controlled sentiment: reward vs KL"
                 + (f" (mean of {seeds} seeds, standard-error bars)" if seeds > 1 else ""))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
    log(f"wrote {out / 'frontier.csv'} and {out / 'frontier.png'}")
    return out / "frontier.png"
