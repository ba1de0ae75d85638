"""
The reward-vs-KL frontier: the DPO paper's Figure 2 (left), Rafailov et al. 2023.

Every evaluation of every run (DPO at each beta, RLOO at each kl_coef, best-of-N at each N) is one point: the mean
reward of samples on held-out prompts against KL(policy || reference). A run's points are appended to
`<run_dir>/points.jsonl` as they are measured, so a killed and resumed run keeps the points from before the kill;
`frontier.csv` gathers every run's points with a `method` column, and `frontier.png` draws one line per method and
setting, each starting at the reference's own point (KL 0).

Best-of-N is not an autoregressive policy, so its KL is not measured but bounded: KL(best-of-N || reference) <=
log N - (N - 1) / N (Stiennon et al. 2020; Beirami et al. 2024), and that bound is what its points use.
"""

import csv
import json
import math
from pathlib import Path

from minidpo.fileio import atomic_path
from minidpo.progress import Log, quiet

COLUMNS = ["method", "setting", "step", "kl", "kl_sampled", "reward"]


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
        by_step[p["step"]] = p
    return [by_step[s] for s in sorted(by_step)]


def write_frontier(out: Path, points: list[dict], log: Log = quiet) -> Path:
    """frontier.csv (and frontier.png when matplotlib is installed) from every run's points."""
    with atomic_path(out / "frontier.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows({k: p.get(k) for k in COLUMNS} for p in points)
    plot_frontier(out, log)
    return out / "frontier.csv"


def read_frontier(out: Path) -> list[dict]:
    with open(out / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for k in ("step", "kl", "kl_sampled", "reward"):
            r[k] = float(r[k]) if r.get(k) not in (None, "", "None") else math.nan
    return rows


def reward_range(rewards: list[float]) -> tuple[float, float]:
    """Y limits: the data with a margin, at least 0.2 wide, inside [0, 1] (a reward is P(positive))."""
    lo, hi = min(rewards), max(rewards)
    mid, half = (lo + hi) / 2, min(0.5, max(0.1, (hi - lo) / 2 + 0.05))
    shift = max(0.0, half - mid) - max(0.0, mid + half - 1.0)  # slide the window back inside [0, 1]
    return max(0.0, min(lo, mid + shift - half)), min(1.0, max(hi, mid + shift + half))


def plot_frontier(out: str | Path, log: Log = quiet) -> None:
    """frontier.png from out/frontier.csv: reward against KL, a line per method and setting (Figure 2, left)."""
    out = Path(out)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log(f"wrote {out / 'frontier.csv'}; for frontier.png: pip install matplotlib, then "
            f"python -c \"import minidpo.training.frontier as f; f.plot_frontier('{out}')\"")
        return
    rows = read_frontier(out)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"dpo": "o-", "online-dpo": "D-.", "rloo": "s--", "best-of-n": "^:"}
    for method in sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == method]
        if method == "best-of-n":  # one line over N: each N is one point
            pts = sorted(mine, key=lambda r: r["kl"])
            ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], styles[method], color="gray",
                    label="best-of-N (KL bound)")
            continue
        for setting in sorted({r["setting"] for r in mine}):
            pts = sorted((r for r in mine if r["setting"] == setting), key=lambda r: r["step"])
            ax.plot([p["kl"] for p in pts], [p["reward"] for p in pts], styles.get(method, "o-"),
                    label=f"{method.upper()} {setting}", markersize=4)
    ax.set_ylim(*reward_range([r["reward"] for r in rows]))
    ax.set_xlabel("KL(policy || reference), nats per completion")
    ax.set_ylabel("mean reward: P(positive) of held-out completions")
    ax.set_title("IMDb controlled sentiment: reward vs KL")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
    log(f"wrote {out / 'frontier.csv'} and {out / 'frontier.png'}")
