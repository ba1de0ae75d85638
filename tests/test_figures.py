"""Seeds and figures: frontier points aggregated over seeds (mean and standard error against the statistics module),
frontier.png and curves.png written when matplotlib is there and skipped with a one-line how-to when it is not."""

import csv
import importlib.util
import json
import math
import statistics
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.training.curves import curve_series, plot_curves, read_log
from minidpo.training.frontier import aggregate_points, append_point, plot_frontier, write_frontier

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
values = st.floats(-5, 5, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(values, st.floats(0, 30)), min_size=1, max_size=8))
def test_mean_and_standard_error_over_seeds_match_the_statistics_module(seeds):
    points = [{"method": "dpo", "setting": "beta=0.1", "step": 80, "reward": r, "kl": k, "kl_sampled": k,
               "seed": s} for s, (r, k) in enumerate(seeds)]
    (row,) = aggregate_points(points)
    assert row["seeds"] == len(seeds) and row["step"] == 80
    for key, col in (("reward", 0), ("kl", 1)):
        xs = [s[col] for s in seeds]
        assert row[key] == pytest.approx(statistics.mean(xs), abs=1e-9)
        if len(xs) == 1:
            assert row[f"{key}_se"] is None  # one seed: no error bar
        else:
            assert row[f"{key}_se"] == pytest.approx(statistics.stdev(xs) / math.sqrt(len(xs)), rel=1e-7, abs=1e-12)


def test_points_are_grouped_by_method_setting_and_step_and_missing_values_are_left_out():
    points = [{"method": m, "setting": s, "step": k, "reward": 0.1 * seed + k / 100, "kl": float(k),
               "kl_sampled": None if m == "best-of-n" else float(k), "seed": seed}
              for seed in (0, 1, 2) for m, s, k in (("dpo", "beta=0.1", 0), ("dpo", "beta=0.1", 50),
                                                    ("dpo", "beta=0.5", 50), ("best-of-n", "N=4", 0))]
    rows = aggregate_points(points)
    assert [(r["method"], r["setting"], r["step"]) for r in rows] == [
        ("dpo", "beta=0.1", 0), ("dpo", "beta=0.1", 50), ("dpo", "beta=0.5", 50), ("best-of-n", "N=4", 0)]
    assert all(r["seeds"] == 3 for r in rows)
    assert rows[1]["reward"] == pytest.approx(0.6) and rows[1]["reward_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert rows[3]["kl_sampled"] is None and rows[3]["kl_sampled_se"] is None


def frontier_points(seeds: int) -> list[dict]:
    pts = []
    for seed in range(seeds):
        for i, (m, s) in enumerate((("dpo", "beta=0.1"), ("rlhf", "kl_coef=0.05"), ("unlikelihood", "alpha=1"),
                                    ("preferred-ft", "sft"))):
            for k in (0, 40, 80):
                pts.append({"method": m, "setting": s, "step": k, "reward": 0.4 + k / (200 + 100 * i) + 0.01 * seed,
                            "kl": k / (10 + 3 * i) + 0.2 * seed * (k > 0), "kl_sampled": k / 10, "seed": seed})
        pts.append({"method": "best-of-n", "setting": "N=4", "step": 0, "reward": 0.6, "kl": math.log(4) - 0.75,
                    "kl_sampled": None, "seed": seed})
    return pts


@pytest.mark.parametrize("seeds", [1, 3])
def test_frontier_files_hold_every_seed_and_the_means_only_when_there_are_several(tmp_path, seeds):
    logs = []
    write_frontier(tmp_path, frontier_points(seeds), log=logs.append)
    with open(tmp_path / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13 * seeds and {r["seed"] for r in rows} == {str(s) for s in range(seeds)}
    assert (tmp_path / "frontier_mean.csv").is_file() == (seeds > 1)
    if HAS_MATPLOTLIB:
        assert (tmp_path / "frontier.png").stat().st_size > 0
    else:
        assert any("pip install matplotlib" in m for m in logs)


def test_without_matplotlib_the_figures_are_skipped_with_a_one_line_how_to(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    logs = []
    write_frontier(tmp_path, frontier_points(2), log=logs.append)
    assert (tmp_path / "frontier.csv").is_file() and not (tmp_path / "frontier.png").exists()
    write_log(tmp_path)
    assert plot_curves(tmp_path, logs.append) is None and not (tmp_path / "curves.png").exists()
    assert len(logs) == 2 and all("pip install matplotlib" in m and "\n" not in m for m in logs)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib (pip install matplotlib)")
def test_with_matplotlib_frontier_png_is_written_for_one_and_several_seeds(tmp_path):
    for seeds in (1, 3):
        out = tmp_path / str(seeds)
        out.mkdir()
        write_frontier(out, frontier_points(seeds))
        assert plot_frontier(out) == out / "frontier.png"
        assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_log(run_dir, resumed: bool = True):
    lines = [{"stage": "rloo kl_coef=0.05", "step": s, "loss": 1.0 / s, "reward": 0.4 + s / 100, "kl/sampled": s / 10}
             for s in (1, 2, 3)]
    if resumed:  # a resumed run logs step 3 again: the last one wins
        lines.append({**lines[-1], "loss": 0.25})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"stage": "rloo", "st'  # a line cut by a kill
    (run_dir / "log.jsonl").write_text(text)
    for step, reward, kl in ((0, 0.4, 0.0), (3, 0.5, 0.3)):
        append_point(run_dir, {"method": "rloo", "setting": "kl_coef=0.05", "step": step, "reward": reward, "kl": kl,
                               "kl_sampled": kl})


def test_curves_read_the_last_record_of_each_step_and_every_available_series(tmp_path):
    write_log(tmp_path)
    (stage,) = read_log(tmp_path / "log.jsonl").values()
    assert [r["step"] for r in stage] == [1, 2, 3] and stage[-1]["loss"] == 0.25
    panels = curve_series(tmp_path)
    assert set(panels) == {"loss", PROB, KL}
    assert [label for label, _, _ in panels[PROB]] == ["training samples", "evaluation (held-out)"]
    assert panels[KL][-1][1:] == ([0, 3], [0.0, 0.3])
    assert panels["loss"][0][2] == [1.0, 0.5, 0.25]


def test_curves_of_a_run_without_a_log_are_skipped_with_a_message(tmp_path):
    logs = []
    assert plot_curves(tmp_path, logs.append) is None and "no logged steps" in logs[0]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib (pip install matplotlib)")
def test_with_matplotlib_curves_png_is_written(tmp_path):
    write_log(tmp_path)
    assert plot_curves(tmp_path) == tmp_path / "curves.png"
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


PROB, KL = "P(positive), sentiment classifier", "KL(policy || reference), nats"


def write_run_log(run_dir, stage: str, steps: tuple[int, ...]) -> None:
    """A method's log.jsonl (RLHF's or DPO's keys) and its evaluation points at step 0 and the last step."""
    keys = {"rlhf": ("loss", "reward", "rlhf_reward", "kl/sampled"),
            "dpo": ("loss", "rewards/margins", "logratio/ref_minus_policy")}[stage.split()[0]]
    (run_dir / "log.jsonl").write_text("".join(json.dumps({"stage": stage, "step": s, **{k: 0.1 * s for k in keys}})
                                               + "\n" for s in steps))
    for step in (0, steps[-1]):
        append_point(run_dir, {"method": stage.split()[0], "setting": "x", "step": step, "reward": 0.4, "kl": 0.1})


@pytest.mark.parametrize("stage", ["rlhf kl_coef=0.05", "dpo beta=0.1"])
def test_curves_put_one_quantity_on_each_axis(tmp_path, stage):
    write_run_log(tmp_path, stage, (2, 4, 6, 8))
    panels = curve_series(tmp_path, learned_reward=stage.startswith("rlhf"))
    # the classifier's P(positive) of held-out samples stands alone: not beside the learned reward model's
    # normalized score (RLHF's training reward) nor DPO's implicit margin in nats
    assert [label for label, _, _ in panels[PROB]] == ["evaluation (held-out)"]
    if stage.startswith("rlhf"):
        assert [label for label, _, _ in panels["learned reward model's score (normalized)"]] == ["training samples"]
        assert "KL-penalized reward (reward - kl_coef * KL)" in panels
    else:
        assert [label for label, _, _ in panels["implicit reward margin, nats"]] == [
            "chosen - rejected, training pairs"]
        assert "log ref - log pi on DPO's pairs, nats" in panels and len(panels[KL]) == 1


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib (pip install matplotlib)")
@pytest.mark.parametrize("steps", [(5,), (2, 4, 6, 8)])
def test_curves_png_labels_each_axis_with_its_quantity_and_marks_series_of_few_points(tmp_path, monkeypatch, steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure plot_curves draws, to read it back
    write_run_log(tmp_path, "rlhf kl_coef=0.05", steps)
    assert plot_curves(tmp_path, learned_reward=True) == tmp_path / "curves.png"
    axes = [ax for ax in figures[0].axes if ax.get_visible() and ax.lines]
    labels = [ax.get_ylabel() for ax in axes]
    assert sorted(labels) == sorted(curve_series(tmp_path, learned_reward=True)) and len(set(labels)) == len(labels)
    assert all(line.get_marker() not in ("", "None", None) for ax in axes for line in ax.lines)
    plt.close("all")


def test_matplotlib_is_a_listed_test_requirement_so_the_figure_tests_run_and_runtime_stays_without_it():
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    runtime, tests = (root / "requirements.txt").read_text().split("# Tests")
    assert "matplotlib" not in runtime
    assert any(line.split("#")[0].strip().startswith("matplotlib") for line in tests.splitlines())
    readme = " ".join((root / "README.md").read_text().split())
    assert "skipped too where matplotlib is missing (`pip install -r requirements.txt` brings it)" in readme
