"""
The reward-vs-KL frontier: the DPO paper's Figure 2 (left), Rafailov et al. 2023.

Every evaluation of every run (DPO at each beta, RLOO at each kl_coef, best-of-N at each N) is one point: the mean
reward of samples on held-out prompts against KL(policy || reference). A run's points are appended to
`<run_dir>/points.jsonl` as they are measured, so a resumed run keeps the points from before a kill; `frontier.csv`
gathers every run's points with a `method` column (and `seed`), and `frontier.png` draws them in the paper's style.

Seeds. With several seeds, `aggregate_points` gives, for each (method, setting, step), the mean of reward and KL
over seeds and its standard error std(ddof=1) / sqrt(n) (frontier_mean.csv; error bars in the plot), so a gap
between two methods can be read against the noise of the runs themselves.

The paper's reading (sec. 6.1: every checkpoint of every run a point). A method's frontier is its upper envelope:
over all its settings and evaluated checkpoints (the reference, KL 0, included), the best reward reached at or below
each KL. `envelope` gives its vertices for one seed; `envelope_reward` reads it at a KL, linear between vertices,
flat after the last vertex up to the largest KL the method reached, undefined beyond (never extrapolated). Each
seed's envelope is read on its own and the readings averaged over seeds, since the envelope of noisy points is
biased upward alike for every method: `envelope.csv` holds the vertices, `equal_kl.csv` each method's reading at
EQUAL_KLS and, for every pair of methods, the difference paired by seed with its standard error.

Best-of-N is not an autoregressive policy, so its KL is not measured but bounded: KL(best-of-N || reference) <=
log N - (N - 1) / N (Stiennon et al. 2020; Beirami et al. 2024): its points hold that bound as `kl_bound` (their `kl`
is empty), and the plot places them at it.
"""

import csv
import json
import math
from pathlib import Path

from minidpo.fileio import atomic_path
from minidpo.progress import Log, quiet
from minidpo.stats import mean_and_se

COLUMNS = ["method", "setting", "step", "kl", "kl_bound", "kl_sampled", "reward", "seed", "reward_se", "kl_se"]
MEAN_COLUMNS = ["method", "setting", "step", "seeds", "reward", "reward_se", "kl", "kl_se", "kl_sampled",
                "kl_sampled_se", "kl_bound"]


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


def write_frontier(out: Path, points: list[dict], log: Log = quiet, styles: dict | None = None) -> Path:
    """frontier.csv (and frontier_mean.csv when some point was measured over several seeds; frontier.png when
    matplotlib is installed, `styles` as plot_frontier's) from every run's points."""
    write_csv(out / "frontier.csv", points, COLUMNS)
    means = aggregate_points(points)
    if any(m["seeds"] > 1 for m in means):
        write_csv(out / "frontier_mean.csv", means, MEAN_COLUMNS)
    write_envelopes(out, points)
    plot_frontier(out, log, styles)
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
    return math.nan if v is None or v in ("", "None") else float(v)


def aggregate_points(points: list[dict]) -> list[dict]:
    """One row per (method, setting, step), in order of first appearance: "seeds" (how many points), the mean of
    reward, kl, kl_sampled and kl_bound over them and each mean's standard error ("_se", None for one seed); a missing
    or NaN value is left out of its mean. Naive equivalent per group and key: statistics.mean(v) and
    statistics.stdev(v) / sqrt(len(v)).
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


def plot_frontier(out: str | Path, log: Log = quiet, styles: dict[str, tuple[str, str]] | None = None
                  ) -> Path | None:
    """frontier.png from out/frontier.csv, in the style of the paper's Figure 2 (left): KL(policy || reference) on
    x, reward on y, one colour per method, a point per setting and evaluation step (means over seeds, with standard
    error bars when there are several), the reference (KL 0) once, in black. `styles`: {method: (legend label,
    marker)} in legend order (minidpo.registry.STYLES). A method whose points hold a KL bound (best-of-N) is one
    line over its settings."""
    out, styles = Path(out), styles or {}
    plt = pyplot(log, f"{out / 'frontier.png'} (then: python -c \"import minidpo.training.frontier as f, "
                      f"minidpo.registry as r; f.plot_frontier('{out}', styles=r.STYLES)\")")
    if plt is None:
        return None
    points = read_frontier(out)
    rows = [r for r in aggregate_points(points) if r["reward"] is not None and r["kl"] is not None]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.get_cmap("tab10")
    order = list(styles) + sorted({r["method"] for r in rows} - set(styles))
    reference = [r for r in rows if r["kl"] == 0.0 and r["kl_bound"] is None]
    if reference:
        ax.plot([0.0], [sum(r["reward"] for r in reference) / len(reference)], "*", color="black", markersize=11,
                label="reference", zorder=3)
    for method in (m for m in order if any(r["method"] == m for r in rows)):
        mine = [r for r in rows if r["method"] == method]
        colour = colours(order.index(method) % 10)  # a method keeps its colour
        label, marker = styles.get(method, (method, "o"))
        bound = any(r["kl_bound"] is not None for r in mine)
        for setting in dict.fromkeys(r["setting"] for r in mine):
            line = sorted((r for r in mine if r["setting"] == setting), key=lambda r: (r["step"], r["kl"]))
            if bound:
                line = sorted(mine, key=lambda r: r["kl"])  # one line over N
            ax.plot([r["kl"] for r in line], [r["reward"] for r in line], "-", color=colour, alpha=0.3, lw=1)
            if bound:
                break
        shown = [r for r in mine if not (r["kl"] == 0.0 and not bound)]
        errors = any(r["seeds"] > 1 for r in shown)
        ax.errorbar([r["kl"] for r in shown], [r["reward"] for r in shown],
                    yerr=[r["reward_se"] or 0.0 for r in shown] if errors else None,
                    xerr=[r["kl_se"] or 0.0 for r in shown] if errors else None,
                    fmt=marker, color=colour, markersize=5, capsize=2, elinewidth=0.8,
                    label=label)
        xs, ys = mean_envelope([p for p in points if p["method"] == method])
        ax.plot(xs, ys, "-", color=colour, lw=1.8, alpha=0.9)
    if rows:
        ax.set_ylim(*reward_range([r["reward"] for r in rows]))
    seeds = max((r["seeds"] for r in rows), default=1)
    ax.set_xlabel("KL(policy || reference), nats per completion")
    ax.set_ylabel("mean reward: P(positive) of held-out completions")
    ax.set_title("IMDb controlled sentiment: reward vs KL, each method's envelope"
                 + (f"\n(mean of {seeds} seeds, standard-error bars)" if seeds > 1 else ""), fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)
    plt.close(fig)
    log(f"wrote {out / 'frontier.csv'} and {out / 'frontier.png'}")
    return out / "frontier.png"


EQUAL_KLS = (2.5, 5.0, 10.0)
ENVELOPE_COLUMNS = ["method", "seed", "kl", "reward", "reward_se", "kl_se", "setting", "step"]
EQUAL_KL_COLUMNS = ["method", "other", "kl", "reward", "reward_se", "seeds", "verdict"]


def point_kl(p: dict) -> float:
    """The x of a point: its measured KL, or best-of-N's KL bound."""
    kl = _number(p.get("kl"))
    return kl if math.isfinite(kl) else _number(p.get("kl_bound"))


def envelope(points: list[dict]) -> tuple[list[dict], float]:
    """(the vertices of the best reward reached at or below each KL, by KL; the largest KL reached) of one method's
    points at one seed. A vertex is a point no other point beats at lower or equal KL.

    Naive equivalent: [p for p in points if not any(q.kl <= p.kl and q.reward >= p.reward and q is not p
    and (q.kl, -q.reward) < (p.kl, -p.reward) for q in points)], sorted by kl.
    """
    usable = [p for p in points if math.isfinite(point_kl(p)) and math.isfinite(_number(p.get("reward")))]
    vertices, best = [], -math.inf
    for p in sorted(usable, key=lambda p: (point_kl(p), -_number(p["reward"]))):
        if _number(p["reward"]) > best:
            vertices.append(p)
            best = _number(p["reward"])
    return vertices, max((point_kl(p) for p in usable), default=-math.inf)


def envelope_reward(vertices: list[dict], reached: float, kl: float) -> float | None:
    """The envelope at `kl`: linear between the vertices around it, the last vertex's reward from there up to
    `reached` (a point there has KL >= kl and less reward), None below the first vertex or above `reached`."""
    if not vertices or kl < point_kl(vertices[0]) or kl > reached:
        return None
    for a, b in zip(vertices, vertices[1:]):
        ka, kb = point_kl(a), point_kl(b)
        if ka <= kl <= kb:
            ra, rb = _number(a["reward"]), _number(b["reward"])
            return ra if kb == ka else ra + (rb - ra) * (kl - ka) / (kb - ka)
    return _number(vertices[-1]["reward"])


def equal_kl_table(points: list[dict], kls: tuple[float, ...] = EQUAL_KLS) -> list[dict]:
    """Each method's envelope read at each KL (mean +- standard error over the seeds whose envelope reaches it),
    then for every ordered pair of methods the difference, paired by seed (a seed shares its prompts, pairs and
    reference across methods), with "beats"/"loses" when it exceeds two standard errors, else "ties"."""
    readings: dict[str, dict[float, dict]] = {}  # method -> kl -> seed -> reward
    for (method, seed), mine in group_by(points, ("method", "seed")).items():
        vertices, reached = envelope(mine)
        for kl in kls:
            r = envelope_reward(vertices, reached, kl)
            if r is not None:
                readings.setdefault(method, {}).setdefault(kl, {})[seed] = r
    methods = list(dict.fromkeys(p["method"] for p in points))
    rows = []
    for kl in kls:
        for a in methods:
            mine = readings.get(a, {}).get(kl, {})
            rows.append(summary_row(a, "", kl, list(mine.values())))
        for a in methods:
            for b in methods:
                ra, rb = readings.get(a, {}).get(kl, {}), readings.get(b, {}).get(kl, {})
                if a != b:
                    rows.append(summary_row(a, b, kl, [ra[s] - rb[s] for s in ra if s in rb]))
    return rows


def summary_row(method: str, other: str, kl: float, values: list[float]) -> dict:
    """One row of equal_kl.csv: the mean and standard error of `values`, and (for a difference) the verdict."""
    mean, se = mean_and_se(values) if values else (None, None)
    verdict = ""
    if other and se is not None:
        verdict = "beats" if mean > 2 * se else "loses to" if mean < -2 * se else "ties"
    return {"method": method, "other": other, "kl": kl, "reward": mean, "reward_se": se, "seeds": len(values),
            "verdict": verdict}


def group_by(points: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault(tuple(p.get(k) for k in keys), []).append(p)
    return groups


def write_envelopes(out: Path, points: list[dict]) -> None:
    """envelope.csv (each method's envelope vertices per seed) and equal_kl.csv (readings at EQUAL_KLS)."""
    rows = []
    for mine in group_by(points, ("method", "seed")).values():
        rows += [{**p, "kl": point_kl(p)} for p in envelope(mine)[0]]
    write_csv(out / "envelope.csv", rows, ENVELOPE_COLUMNS)
    table = equal_kl_table(points)
    write_csv(out / "equal_kl.csv", table, EQUAL_KL_COLUMNS)
    (out / "equal_kl.md").write_text(equal_kl_markdown(table))


def equal_kl_markdown(table: list[dict]) -> str:
    """equal_kl.csv as two markdown tables: each method's envelope reward at each KL, and for every pair of methods
    the row method's difference from the column method's, with its verdict at two standard errors."""
    kls = list(dict.fromkeys(r["kl"] for r in table))
    methods = list(dict.fromkeys(r["method"] for r in table))
    cell = {(r["method"], r["other"], r["kl"]): r for r in table}

    def show(r: dict) -> str:
        if r["reward"] is None:
            return "not reached"
        text = f"{r['reward']:+.3f}" if r["other"] else f"{r['reward']:.3f}"
        return text + (f" +- {r['reward_se']:.3f}" if r["reward_se"] is not None else "") + (
            f" {r['verdict']}" if r["verdict"] else "") + (f" ({r['seeds']} seeds)" if r["seeds"] < max(
                (c["seeds"] for c in table), default=0) else "")
    lines = ["| method | " + " | ".join(f"reward at KL {kl:g}" for kl in kls) + " |", "|---" * (len(kls) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(show(cell[(m, "", kl)]) for kl in kls) + " |" for m in methods]
    for kl in kls:
        lines += ["", f"At KL {kl:g}, row minus column (mean +- se over seeds, paired by seed):", "",
                  "| | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join("" if a == b else show(cell[(a, b, kl)]) for b in methods) + " |"
                  for a in methods]
    return "\n".join(lines) + "\n"


def mean_envelope(points: list[dict], n: int = 60) -> tuple[list[float], list[float]]:
    """The envelope line of one method as plotted: on a grid of KLs up to the largest KL that every seed's
    envelope reaches, the mean over seeds of each seed's envelope."""
    per_seed = [envelope(mine) for mine in group_by(points, ("seed",)).values()]
    top = min((reached for _, reached in per_seed), default=-math.inf)
    start = max((point_kl(v[0]) for v, _ in per_seed if v), default=math.inf)
    if not per_seed or not all(v for v, _ in per_seed) or top < start:
        return [], []
    xs = [min(top, start + (top - start) * i / (n - 1)) for i in range(n)]
    ys = [sum(envelope_reward(v, reached, x) for v, reached in per_seed) / len(per_seed) for x in xs]
    return xs, ys
