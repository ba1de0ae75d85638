"""The reward-vs-KL frontier: points survive a resume, one CSV with a method column, a plot with sane axes."""

import csv
import importlib.util
import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------------------------------- the envelope, equal KL

from minidpo.training.frontier import envelope, envelope_reward, equal_kl_table  # noqa: E402

point_lists = st.lists(st.tuples(st.floats(0, 30), st.floats(0, 1)), min_size=1, max_size=25)


def as_points(pairs, method="dpo", seed=0):
    return [{"method": method, "seed": seed, "setting": "s", "step": i, "kl": kl, "reward": r}
            for i, (kl, r) in enumerate(pairs)]


@settings(max_examples=200, deadline=None)
@given(point_lists, st.floats(0, 35))
def test_the_envelope_is_the_best_reward_at_or_below_each_kl_and_never_extrapolated(pairs, kl):
    vertices, reached = envelope(as_points(pairs))
    kls, rewards = [v["kl"] for v in vertices], [v["reward"] for v in vertices]
    assert kls == sorted(kls) and all(a < b for a, b in zip(rewards, rewards[1:]))  # a staircase of records
    for v in vertices:  # each vertex is the best reward at or below its KL
        assert v["reward"] == max(r for k, r in pairs if k <= v["kl"])
    value = envelope_reward(vertices, reached, kl)
    if kl > max(k for k, _ in pairs) or kl < min(k for k, _ in pairs):
        assert value is None
    else:  # between the staircase (what was reached) and the next record (not reached until its KL)
        best = max(r for k, r in pairs if k <= kl)
        later = sorted(((k, -r) for k, r in pairs if k > kl and r > best))  # the next record, by KL
        nxt = -later[0][1] if later else best
        assert best - 1e-12 <= value <= nxt + 1e-12


@settings(max_examples=100, deadline=None)
@given(point_lists, st.floats(0, 30), st.floats(0, 30))
def test_the_envelope_reading_never_falls_as_kl_grows(pairs, a, b):
    vertices, reached = envelope(as_points(pairs))
    lo, hi = sorted((a, b))
    r_lo, r_hi = envelope_reward(vertices, reached, lo), envelope_reward(vertices, reached, hi)
    if r_lo is not None and r_hi is not None:
        assert r_lo <= r_hi + 1e-12


def test_equal_kl_pairs_differences_by_seed_and_calls_a_gap_beyond_two_standard_errors():
    points = []
    for seed, (a, b) in enumerate([(0.8, 0.5), (0.82, 0.55), (0.78, 0.52)]):
        points += as_points([(0.0, 0.4), (10.0, a)], "rloo", seed) + as_points([(0.0, 0.4), (10.0, b)], "dpo", seed)
    rows = {(r["method"], r["other"], r["kl"]): r for r in equal_kl_table(points, kls=(5.0, 12.0))}
    rloo = rows[("rloo", "", 5.0)]
    assert rloo["seeds"] == 3 and math.isclose(rloo["reward"], 0.4 + (0.8 + 0.82 + 0.78) / 3 * 0.5 - 0.2)
    gap = rows[("rloo", "dpo", 5.0)]
    assert gap["verdict"] == "beats" and math.isclose(gap["reward"], (0.15 + 0.135 + 0.13) / 3)
    assert rows[("dpo", "rloo", 5.0)]["verdict"] == "loses to"
    assert rows[("rloo", "", 12.0)]["seeds"] == 0 and rows[("rloo", "", 12.0)]["reward"] is None  # not reached


def test_frontier_files_include_the_envelope_and_the_equal_kl_table(tmp_path):
    points = as_points([(0.0, 0.4), (3.0, 0.6), (6.0, 0.55), (12.0, 0.7)]) + [
        {"method": "best-of-n", "seed": 0, "setting": "N=4", "step": 0, "kl": None, "kl_bound": 0.636,
         "reward": 0.5}]
    write_frontier(tmp_path, points)
    with open(tmp_path / "envelope.csv", newline="") as f:
        env = list(csv.DictReader(f))
    assert [(r["method"], float(r["kl"])) for r in env] == [("dpo", 0.0), ("dpo", 3.0), ("dpo", 12.0),
                                                           ("best-of-n", 0.636)]
    with open(tmp_path / "equal_kl.csv", newline="") as f:
        table = {(r["method"], r["other"], r["kl"]): r for r in csv.DictReader(f)}
    assert math.isclose(float(table[("dpo", "", "5.0")]["reward"]), 0.6 + 0.1 * 2 / 9)
    markdown = (tmp_path / "equal_kl.md").read_text()
    assert "| dpo | 0.567 | 0.622 | 0.678 |" in markdown and "| best-of-n | not reached |" in markdown


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
