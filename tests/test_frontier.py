"""The reward-vs-KL frontier: points survive a resume, one CSV with a method column, a plot with sane axes."""

import csv
import importlib.util
import json
import math

from hypothesis import given, settings, strategies as st

from minidpo.training.frontier import append_point, read_points, reward_range, write_frontier


def test_points_appended_before_a_kill_are_read_back_after_it(tmp_path):
    append_point(tmp_path, {"method": "dpo", "setting": "beta=0.5", "step": 0, "reward": 0.4, "kl": 0.0,
                            "kl_sampled": 0.0})
    append_point(tmp_path, {"method": "dpo", "setting": "beta=0.5", "step": 50, "reward": 0.5, "kl": 1.0,
                            "kl_sampled": 1.1})
    with open(tmp_path / "points.jsonl", "a") as f:
        f.write('{"method": "dpo", "step": 10')  # a line cut by SIGKILL
    # the resumed run re-measures step 50 and goes on
    append_point(tmp_path, {"method": "dpo", "setting": "beta=0.5", "step": 50, "reward": 0.55, "kl": 1.0,
                            "kl_sampled": 1.0})
    append_point(tmp_path, {"method": "dpo", "setting": "beta=0.5", "step": 100, "reward": 0.6, "kl": 2.0,
                            "kl_sampled": 2.1})
    pts = read_points(tmp_path)
    assert [p["step"] for p in pts] == [0, 50, 100]
    assert pts[1]["reward"] == 0.55  # the last measurement of a step wins


def test_frontier_csv_has_a_method_column_and_a_row_per_point(tmp_path, capsys):
    pts = [{"method": m, "setting": s, "step": k, "reward": 0.4 + k / 1000, "kl": k / 10, "kl_sampled": k / 10}
           for m, s in (("dpo", "beta=0.1"), ("rloo", "kl_coef=0.05")) for k in (0, 50, 100)]
    pts.append({"method": "best-of-n", "setting": "N=4", "step": 0, "reward": 0.6, "kl": math.log(4) - 0.75,
                "kl_sampled": None})
    write_frontier(tmp_path, pts, log=print)
    with open(tmp_path / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["dpo"] * 3 + ["rloo"] * 3 + ["best-of-n"]
    assert {r["setting"] for r in rows} == {"beta=0.1", "kl_coef=0.05", "N=4"}
    printed = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install matplotlib" in printed and not (tmp_path / "frontier.png").exists()
    else:
        assert (tmp_path / "frontier.png").stat().st_size > 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=20))
def test_reward_axis_holds_every_point_is_at_least_0_2_wide_and_stays_in_0_1(rewards):
    lo, hi = reward_range(rewards)
    assert 0 <= lo <= min(rewards) and max(rewards) <= hi <= 1
    assert hi - lo >= 0.2 - 1e-9


def test_points_file_is_strict_json(tmp_path):
    append_point(tmp_path, {"method": "dpo", "setting": "beta=1", "step": 0, "reward": 0.5, "kl": 0.0,
                            "kl_sampled": None})
    line = (tmp_path / "points.jsonl").read_text().strip()
    assert json.loads(line)["kl_sampled"] is None and "NaN" not in line


def test_a_line_of_points_jsonl_that_is_not_a_point_is_skipped_like_a_cut_line(tmp_path):
    append_point(tmp_path, {"method": "dpo", "setting": "beta=0.5", "step": 0, "reward": 0.4, "kl": 0.0})
    with open(tmp_path / "points.jsonl", "a") as f:
        f.write('[1, 2]\n3\n"text"\nnull\n{"method": "dpo"}\n{"step": [5]}\n{"step": true}\n')
    append_point(tmp_path, {"method": "dpo", "setting": "beta=0.5", "step": 50, "reward": 0.5, "kl": 1.0})
    assert [p["step"] for p in read_points(tmp_path)] == [0, 50]


def test_best_of_n_kl_bound_is_in_frontier_mean_csv_and_the_seeds_summary_means(tmp_path):
    from minidpo.experiment.report import seeds_summary
    bound = math.log(4) - 0.75
    pts = [{"method": m, "setting": s, "step": 0, "reward": 0.5 + seed / 10, "kl": kl, "kl_bound": b,
            "kl_sampled": None, "seed": seed}
           for seed in (0, 1) for m, s, kl, b in (("dpo", "beta=0.1", 0.0, None), ("best-of-n", "N=4", None, bound))]
    write_frontier(tmp_path, pts)
    with open(tmp_path / "frontier_mean.csv", newline="") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert float(rows["best-of-n"]["kl_bound"]) == bound and rows["best-of-n"]["kl"] == ""
    assert rows["dpo"]["kl_bound"] == ""
    means = {m["method"]: m for m in seeds_summary({0: {}, 1: {}}, pts)["mean"]}
    assert means["best-of-n"]["kl_bound"] == bound and means["dpo"]["kl_bound"] is None
