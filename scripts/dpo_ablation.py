"""
What moves the paper's offline DPO on the tiny preset: one arm per lever, each run over three seeds with train.py,
each read the paper's way (every checkpoint a point, the envelope of a seed's checkpoints read at equal KL, then the
mean +- standard error over seeds).

    python scripts/dpo_ablation.py                        # every arm, in order; out/ablation/<arm>/ and the table
    python scripts/dpo_ablation.py --arms base,temp1      # some arms
    python scripts/dpo_ablation.py --table-only           # rewrite the table from the arms already finished
    python scripts/dpo_ablation.py --protocol out/tiny-fig2   # also set each arm against RLHF and RLOO there

Every arm is the paper's DPO on the tiny preset, `python train.py --preset tiny --method dpo --label-smoothing 0`
(beta 0.1, 80 steps on the pairs of 576 prompts with 8 completions each, sampled at temperature 0.7; the preset
itself has used cDPO's label smoothing 0.1 since this ablation), evaluated every 10 steps on 256 held-out prompts,
with one change (a later flag wins).
A killed ablation continues where it stopped when run again (finished arms are kept; an unfinished one resumes
from its checkpoints). The table (out/ablation/ablation.md and .csv) gives, per arm: the envelope's reward at KL 5
and 10 (mean +- se over seeds; "-" where a seed's envelope does not reach that KL), its difference from the base
arm paired by seed, the held-out implicit-reward accuracy, and the step whose mean reward is highest (where the
run peaks). With --protocol, each arm's envelope is also set against RLHF's and RLOO's from a `--preset tiny-fig2`
run over the same seeds (unpaired: se = sqrt(se_a^2 + se_b^2)); the sft arm's KL is from its SFT model, every other
arm's and theirs from the original model, so its differences are marked as such and carry no verdict.
"""

import argparse
import csv
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from minidpo.registry import STYLES  # noqa: E402
from minidpo.stats import mean_and_se  # noqa: E402
from minidpo.training.frontier import envelope, envelope_reward, group_by, write_frontier  # noqa: E402

FULL_IMDB = ROOT.parent / "shared" / "data" / "aclImdb_v1.tar.gz"
BASE = ["--preset", "tiny", "--method", "dpo", "--label-smoothing", "0", "--eval-every", "10", "--eval-prompts", "256"]
# (name, what changes, train.py flags): the order they run in, most asked-about first
ARMS = [
    ("base", "the paper's DPO on the tiny preset (temperature 0.7, 8 completions, 576 prefixes, sigmoid loss, 80 "
             "steps)", []),
    ("temp1", "pairs sampled at temperature 1.0, the distribution that is evaluated", ["--gen-temperature", "1.0"]),
    ("k4", "4 completions per prefix (the paper's 6 pairs)", ["--completions-per-prompt", "4"]),
    ("margin", "near ties dropped: training pairs whose scores differ by < 0.1", ["--min-score-margin", "0.1"]),
    ("cdpo", "cDPO: label smoothing 0.1", ["--label-smoothing", "0.1"]),
    ("ipo", "IPO's loss instead of the sigmoid", ["--loss-type", "ipo"]),
    ("epochs", "240 steps (about 3.3 epochs) over the same pairs", ["--steps", "240"]),
    ("sft", "Preferred-FT first (80 steps on the chosen completions, merged): DPO's reference, pairs and KL are "
            "then the SFT model's, as in the paper", []),
    ("k16", "16 completions per prefix (120 pairs each)", ["--completions-per-prompt", "16"]),
    ("prefixes", "4,608 prefixes of the full IMDB train split (8x); the reward classifier and the evaluation "
                 "prompts stay the sample's (16 held-out prompts: the sample's 300 test reviews have 272 whose "
                 "prefix is no training prompt)",
     ["--prompt-data", str(FULL_IMDB), "--num-prompts", "4608", "--heldout-prompts", "16"]),
]
RUN = {"seeds": "0,1,2", "extra": []}  # --seeds, and --extra: flags added to every train.py call (a smoke run)
KLS = (5.0, 10.0)


def run_arm(name: str, flags: list[str], out: Path) -> int:
    """train.py for one arm over the seeds; a folder with a config.json is resumed (a finished one is left)."""
    folder = out / name
    cmd = [sys.executable, str(ROOT / "train.py"), *BASE, *flags, *RUN["extra"], "--seeds", RUN["seeds"], "--out-dir",
           str(folder)]
    if (folder / "config.json").is_file():
        cmd += ["--resume", str(folder)]
    print(f"[ablation] {name}: {' '.join(cmd[1:])}", flush=True)
    return subprocess.call(cmd, cwd=ROOT)


def run_sft_arm(out: Path) -> int:
    """Per seed: Preferred-FT on the tiny preset's pairs, merged into the weights (--export-merged), then the base
    arm's DPO with that model as --model (its own pairs, reference and evaluation reference); then one folder with
    every seed's points, as train.py --seeds writes it, and the SFT models' own reward and KL from the original."""
    folder = out / "sft"
    points, accuracy, sft_final = [], [], []
    for seed in RUN["seeds"].split(","):
        sft, dpo = folder / f"preferred_ft_seed_{seed}", folder / f"seed_{seed}"
        for flags, where in (
                (["--preset", "tiny", "--method", "preferred-ft", "--seed", seed, "--export-merged",
                  str(sft / "merged")], sft),
                ([*BASE, "--model", str(sft / "merged"), "--seed", seed], dpo)):
            argv = [sys.executable, str(ROOT / "train.py"), *flags, *RUN["extra"], "--out-dir", str(where)]
            if (where / "config.json").is_file():
                argv += ["--resume", str(where)]
            print(f"[ablation] sft: {' '.join(argv[1:])}", flush=True)
            if subprocess.call(argv, cwd=ROOT) != 0:
                return 1
        points += [{**row, "seed": seed} for row in read_rows(dpo / "frontier.csv")]
        summary = json.loads((dpo / "summary.json").read_text())
        accuracy += list(summary["implicit_reward_accuracy"].get("dpo", {}).values())
        sft_final.append(json.loads((sft / "result.json").read_text())["policy"])
    write_frontier(folder, points, styles=STYLES)
    stat = lambda v: dict(zip(("mean", "se"), mean_and_se(v)), seeds=len(v))  # noqa: E731
    (folder / "summary.json").write_text(json.dumps({
        "finished": True, "seeds": RUN["seeds"], "implicit_reward_accuracy": {"dpo": {"beta=0.1": stat(accuracy)}},
        "sft_model": {"reward": stat([p["reward"] for p in sft_final]),
                      "kl_from_original": stat([p["kl_exact"] for p in sft_final])}}, indent=1))
    return 0


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def readings(points: list[dict], method: str) -> dict[float, dict[str, float]]:
    """KL -> seed -> the envelope's reward there, for one method's points of every seed."""
    out: dict[float, dict[str, float]] = {kl: {} for kl in KLS}
    for (m, seed), mine in group_by(points, ("method", "seed")).items():
        if m == method:
            vertices, reached = envelope(mine)
            for kl in KLS:
                r = envelope_reward(vertices, reached, kl)
                if r is not None:
                    out[kl][seed] = r
    return out


def stat(values: list[float]) -> tuple[float | None, float | None, int]:
    return (*mean_and_se(values), len(values)) if values else (None, None, 0)


def fmt(mean: float | None, se: float | None, seeds: int, expected: int = 3) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.3f}" if mean < 0 else f"{mean:.3f}"
    return text + (f" +- {se:.3f}" if se is not None else "") + (f" ({seeds} seeds)" if seeds != expected else "")


def peak_step(folder: Path) -> str:
    """The evaluated step whose reward, averaged over seeds, is highest (frontier_mean.csv)."""
    rows = [r for r in read_rows(folder / "frontier_mean.csv") if r["method"] == "dpo" and r["reward"]]
    best = max(rows, key=lambda r: float(r["reward"]))
    return f"{best['step']} ({float(best['reward']):.3f})"


def table(out: Path, protocol: Path | None) -> list[dict]:
    """One row per finished arm: envelope readings at KLS, the difference from base, accuracy, peak step."""
    base_points = read_rows(out / "base" / "frontier.csv") if (out / "base" / "frontier.csv").is_file() else []
    base = readings(base_points, "dpo")
    rivals = {}
    if protocol is not None:
        for method in ("rlhf", "rloo"):
            rivals[method] = readings(read_rows(protocol / "frontier.csv"), method)
    rows = []
    for name, what, _ in ARMS:
        folder = out / name
        if not (folder / "summary.json").is_file() or not json.loads((folder / "summary.json").read_text()).get(
                "finished"):
            continue
        summary = json.loads((folder / "summary.json").read_text())
        mine = readings(read_rows(folder / "frontier.csv"), "dpo")
        row = {"arm": name, "change": what}
        # the sft arm's KL is from its SFT model, everyone else's from the original: its differences get no verdict
        other_reference = "KL from another reference" if "sft_model" in summary else None
        if other_reference:
            sft = summary["sft_model"]
            row["change"] += (f" (the SFT model itself: reward {fmt(**sft['reward'])} at KL "
                              f"{fmt(**sft['kl_from_original'])} from the original)")
        for kl in KLS:
            row[f"reward@{kl:g}"] = fmt(*stat(list(mine[kl].values())))
            paired = [mine[kl][s] - base[kl][s] for s in mine[kl] if s in base[kl]]
            note = f" ({other_reference})" if other_reference else ""
            row[f"vs base@{kl:g}"] = fmt(*stat(paired)) + note if name != "base" else ""
            for method, theirs in rivals.items():
                a, b = stat(list(mine[kl].values())), stat(list(theirs[kl].values()))
                if a[0] is None or b[0] is None or a[1] is None or b[1] is None:
                    row[f"vs {method}@{kl:g}"] = "-"
                    continue
                diff, se = a[0] - b[0], math.hypot(a[1], b[1])
                verdict = other_reference or ("beats" if diff > 2 * se else "loses" if diff < -2 * se else "ties")
                row[f"vs {method}@{kl:g}"] = f"{diff:+.3f} +- {se:.3f} ({verdict})"
        acc = next(iter(summary["implicit_reward_accuracy"].get("dpo", {}).values()), None)
        row["implicit accuracy"] = fmt(acc["mean"], acc["se"], acc["seeds"]) if acc else "-"
        row["peak step (reward)"] = peak_step(folder)
        rows.append(row)
    return rows


def write_table(out: Path, rows: list[dict]) -> None:
    if not rows:
        print("[ablation] no finished arm yet")
        return
    columns = list(rows[0])
    with open(out / "ablation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    missing = [name for name, _, _ in ARMS if name not in {r["arm"] for r in rows}]
    if missing:
        lines.append(f"\nNot run (or not finished) yet: {', '.join(missing)}.")
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"[ablation] wrote {out / 'ablation.md'} and {out / 'ablation.csv'}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(a[0] for a in ARMS), help="comma-separated arm names")
    p.add_argument("--out", default="out/ablation", help="where each arm's run folder and the table go")
    p.add_argument("--protocol", default=None, help="a --preset tiny-fig2 run folder to compare against")
    p.add_argument("--table-only", action="store_true", help="only (re)write the table")
    p.add_argument("--seeds", default=RUN["seeds"], help="seeds of every arm")
    p.add_argument("--extra", default="", help="flags added to every train.py call, e.g. '--steps 2' (a smoke run)")
    args = p.parse_args()
    RUN.update(seeds=args.seeds, extra=args.extra.split())
    names = [a.strip() for a in args.arms.split(",")]
    unknown = [n for n in names if n not in {a[0] for a in ARMS}]
    if unknown:
        p.error(f"--arms: unknown {unknown}; choose among {', '.join(a[0] for a in ARMS)}")
    protocol = Path(args.protocol) if args.protocol else None
    if protocol is not None and not (protocol / "frontier.csv").is_file():
        p.error(f"--protocol {protocol}: no frontier.csv there (a finished --preset tiny-fig2 run writes it); run "
                f"the arms without --protocol and add it with --table-only once that run has finished")
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.table_only:
        for name, _, flags in ARMS:
            if name in names:
                if name == "prefixes" and not FULL_IMDB.is_file():
                    print(f"[ablation] prefixes: skipped, {FULL_IMDB} not found")
                    continue
                if (run_sft_arm(out) if name == "sft" else run_arm(name, flags, out)) != 0:
                    failed.append(name)
                write_table(out, table(out, protocol))  # after every arm: a stop loses no finished arm
    write_table(out, table(out, protocol))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
