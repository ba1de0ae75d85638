"""The Figure 2 methods wired into train.py: RLHF (RLOO on the learned reward model), Preferred-FT, Unlikelihood
beside DPO, online DPO, RLOO and best-of-N; their flags, sub-run folders, summary.json and --seeds aggregation."""

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.dataset.batching import PairData
from minidpo.experiment.compare import method_runs
from minidpo.experiment.context import RunContext
from minidpo.experiment.report import RunResult, seeds_summary, summarize
from minidpo.experiment.stages import ensure_reward_model
from minidpo.registry import NAMES
from train import load_config

ROOT = Path(__file__).resolve().parent.parent
SEVEN = "dpo,online-dpo,rlhf,rloo,preferred-ft,unlikelihood,orpo,best-of-n"  # every method


def test_compare_takes_every_method_each_with_its_own_folders(tmp_path):
    cfg, _ = load_config(["--preset", "tiny", "--compare", SEVEN])
    configs = cfg.configs
    assert list(configs.compare) == SEVEN.split(",") and set(SEVEN.split(",")) == set(NAMES)
    names = [d.name for _, _, d in method_runs(configs, tmp_path)]
    assert "preferred-ft_sft" in names and "unlikelihood_alpha_0.1" in names and "unlikelihood_alpha_1" in names
    assert "rlhf_kl_coef_0.02" in names and "rloo_kl_coef_0.02" in names  # the same kl_coef sweep for both RLs
    assert len(names) == len(set(names))


@pytest.mark.parametrize("method,flag,folders", [
    ("dpo", "--beta-sweep", ["dpo_beta_0.1000001", "dpo_beta_0.1000002", "dpo_beta_0.1"]),
    ("rloo", "--kl-coef-sweep", ["rloo_kl_coef_0.1000001", "rloo_kl_coef_0.1000002", "rloo_kl_coef_0.1"]),
    ("unlikelihood", "--unlikelihood-alpha-sweep",
     ["unlikelihood_alpha_0.1000001", "unlikelihood_alpha_0.1000002", "unlikelihood_alpha_0.1"]),
])
def test_sweep_values_equal_to_six_digits_get_folders_of_their_own(tmp_path, method, flag, folders):
    """Two values of a sweep never share a sub-run folder (the second run would meet the first one's checkpoint):
    a value that 6 significant digits do not show exactly is named in full; others keep their short name."""
    cfg, _ = load_config(["--method", method, flag, "0.1000001,0.1000002,0.1"])
    assert [d.name for _, _, d in method_runs(cfg.configs, tmp_path)] == folders


@pytest.mark.parametrize("argv,message", [
    (["--unlikelihood-alpha-sweep", "0.1,0.1"], "--unlikelihood-alpha-sweep lists a value twice"),
    (["--unlikelihood-alpha-sweep", "0.1,-1"], "--unlikelihood-alpha-sweep must be a finite number >= 0"),
    (["--unlikelihood-alpha", "-1", "--method", "unlikelihood"], "--unlikelihood-alpha must be a finite number"),
    (["--seeds", "0,1,1"], "--seeds lists a value twice"),
    (["--seeds", "0,-1"], "--seeds values must be >= 0"),
    (["--rm-steps", "0"], "--rm-steps must be"),
    (["--compile", "true", "--method", "preferred-ft"], "--compile compiles offline DPO's step only"),
    (["--precompute-ref", "true", "--method", "rlhf"], "--precompute-ref caches the reference's log-probs"),
    (["--target-kl-sweep", "3,6", "--kl-coef-sweep", "0.1,0.2"], "--target-kl-sweep sweeps the adaptive"),
    (["--target-kl-sweep", "3,3"], "--target-kl-sweep lists a value twice"),
    (["--target-kl-sweep", "3,-1", "--method", "rloo"], "--target-kl-sweep must be none or a finite number > 0"),
    (["--min-score-margin", "1.5"], "--min-score-margin must be in"),
])
def test_bad_values_of_the_new_flags_are_refused_naming_the_flag(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(["--preset", "tiny", *argv])


@pytest.mark.parametrize("argv,message", [
    (["--compare", "dpo,rloo"], "this run trains 5 [(]--compare or a sweep[)]: run the one method and setting"),
    (["--method", "rloo", "--kl-coef-sweep", "0.02,0.05"], "this run trains 2"),
    (["--seeds", "0,1"], "--seeds 0,1 trains one per seed: run without it, then export one seed with --resume "),
])
def test_export_merged_of_several_runs_or_seeds_is_refused_before_any_work(tmp_path, argv, message):
    """One merged model per path: a --compare, a sweep or --seeds would overwrite it (or fail after every run)."""
    with pytest.raises(ConfigError, match="^--export-merged writes one model, and " + message):
        load_config(["--preset", "tiny", *argv, "--out-dir", str(tmp_path / "out"),
                     "--export-merged", str(tmp_path / "merged")])
    assert not (tmp_path / "out").exists()


def run_result(method, setting, accuracy=None):
    return RunResult(method, setting, {"reward": 0.4}, {"reward": 0.6, "kl_exact": 1.0},
                     {"reward_accuracy": accuracy} if accuracy is not None else {}, [], [])


def test_summary_has_the_reward_models_accuracy_beside_dpos_implicit_one():
    runs = [run_result("dpo", "beta=0.1", 0.6), run_result("dpo", "beta=0.5", 0.55), run_result("rlhf", "kl_coef=0.1")]
    rm = {"heldout_accuracy": 0.7, "heldout_pairs": 12, "train": {"steps": 3}}
    s = summarize(runs, "bundled", "bundled", Path("x"), "cpu", 1, 1.0, rm)
    assert s["reward_model"]["heldout_accuracy"] == 0.7 and s["reward_model"]["heldout_pairs"] == 12
    assert s["implicit_reward_accuracy"] == {"dpo": {"beta=0.1": 0.6, "beta=0.5": 0.55}}
    assert "reward_model" not in summarize(runs, "bundled", "bundled", Path("x"), "cpu", 1, 1.0)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=2, max_size=5), st.lists(st.floats(0, 20), min_size=2, max_size=5))
def test_seeds_summary_gives_the_mean_and_standard_error_of_the_last_evaluation(rewards, kls):
    n = min(len(rewards), len(kls))
    points = []
    for s in range(n):  # each seed: the reference point at step 0 and the trained one at step 4
        points += [{"method": "dpo", "setting": "beta=0.1", "step": "0", "reward": "0.4", "kl": "0.0", "seed": s},
                   {"method": "dpo", "setting": "beta=0.1", "step": "4", "reward": str(rewards[s]),
                    "kl": str(kls[s]), "seed": s}]
    per_seed = {s: {"reward_model": {"heldout_accuracy": rewards[s]},
                    "implicit_reward_accuracy": {"dpo": {"beta=0.1": kls[s] / 20}}} for s in range(n)}
    out = seeds_summary(per_seed, points)
    (row,) = out["mean"]
    r, k = [float(str(x)) for x in rewards[:n]], [float(str(x)) for x in kls[:n]]
    assert row["step"] == 4 and row["seeds"] == n
    assert math.isclose(row["reward"], statistics.mean(r), abs_tol=1e-12)
    assert math.isclose(row["reward_se"], statistics.stdev(r) / math.sqrt(n), rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(row["kl_se"], statistics.stdev(k) / math.sqrt(n), rel_tol=1e-9, abs_tol=1e-12)
    acc = out["reward_model"]["heldout_accuracy"]
    assert acc["seeds"] == n and math.isclose(acc["se"], statistics.stdev(rewards[:n]) / math.sqrt(n),
                                              rel_tol=1e-9, abs_tol=1e-12)
    assert out["implicit_reward_accuracy"]["dpo"]["beta=0.1"]["seeds"] == n


def test_a_seeds_summary_in_a_seed_folder_is_refused_and_only_a_seeds_own_rows_count(tmp_path):
    """A --seeds run once started inside a seed's folder left a summary over seeds there (and other seeds' rows
    in its frontier.csv): the top's means must never count them, nor fail on them with a TypeError."""
    from minidpo.training.runs import RunConflict
    from train import gather_seeds
    header = "method,setting,step,reward,kl,kl_bound,kl_sampled,seed\n"
    for s in (0, 1):
        (tmp_path / f"seed_{s}").mkdir()
        (tmp_path / f"seed_{s}" / "summary.json").write_text(json.dumps({"runs": [], "finished": True}))
        (tmp_path / f"seed_{s}" / "frontier.csv").write_text(
            header + f"dpo,beta=0.1,2,0.{5 + s},1.0,,1.0,{s}\n" + ("dpo,beta=0.1,2,0.9,1.0,,1.0,0\n" if s else ""))
    points, per_seed = gather_seeds(tmp_path, (0, 1))
    assert [(p["seed"], p["reward"]) for p in points] == [(0, "0.5"), (1, "0.6")] and set(per_seed) == {0, 1}
    nested = {"seeds": [0, 1], "per_seed": {}, "reward_model": {"heldout_accuracy": {"mean": 0.6}}, "finished": True}
    (tmp_path / "seed_1" / "summary.json").write_text(json.dumps(nested))
    with pytest.raises(RunConflict, match=f"{tmp_path / 'seed_1'}/summary.json sums up seeds"):
        gather_seeds(tmp_path, (0, 1))


def reward_model_contexts(tmp_path: Path, lines: list[str]):
    """A factory of run contexts over one tiny model, tokenizer and six pairs, all writing into tmp_path: what
    ensure_reward_model needs, twice (a fresh run, then a resumed one that finds the file)."""
    from dataclasses import replace

    import torch

    from minidpo.dataset.batching import prompt_groups
    from minidpo.dataset.pairs import Pair
    from minidpo.experiment.resolve import autocast
    from minidpo.methods.offline_train import BatchConfig
    from minidpo.model.gpt import GPT, GPTConfig
    from minidpo.model.lora import LoRAConfig
    from minidpo.model.tokenizer import EOT_ID, Tokenizer
    from minidpo.training.runtime import Runtime
    from minidpo.training.trainer import LoopConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = Tokenizer()
    pairs = [Pair(f"movie {i}", " great fun", " awful", tok.encode(f"movie {i}"), tok.encode(" great fun"),
                  tok.encode(" awful"), 0.9, 0.1, "train" if i < 4 else "heldout") for i in range(6)]
    data = PairData(pairs[:4], pairs[4:], prompt_groups(pairs[:4]), "fp")
    configs = replace(load_config(["--max-length", "32"])[0].configs, lora=LoRAConfig(rank=2, alpha=4.0),
                     batch=BatchConfig(mode="unique", prompts=2, max_length=32, pad_id=EOT_ID),
                     rm_loop=LoopConfig(steps=2, lr=1e-2, log_every=1, label="reward-model"))

    def context():
        return RunContext(model, tok, None, None, None, configs, "bundled", tmp_path,
                          Runtime(autocast=autocast(torch.device("cpu"), None), log=lines.append), pairs=data)
    return context


def test_the_reward_model_stage_is_trained_once_then_reused_from_its_file(tmp_path):
    """ensure_reward_model trains on the pairs before any adapter, saves it, and a new context reuses the file:
    the same scores, nothing trained again (its info, the held-out accuracy, read back)."""
    import torch

    lines = []
    context = reward_model_contexts(tmp_path, lines)
    first = context()
    scores = ensure_reward_model(first).score(["movie 1 great fun", "movie 1 awful"])
    assert (tmp_path / "reward_model.safetensors").is_file() and first.reward_model_info["heldout_pairs"] == 2
    reference = first.model.named_modules()
    assert not any(n.startswith("lora") or "lora_" in n for n, _ in reference if n)  # the reference as it was
    again = context()
    assert torch.equal(ensure_reward_model(again).score(["movie 1 great fun", "movie 1 awful"]), scores)
    assert any("reusing" in line for line in lines)
    assert again.reward_model_info["heldout_accuracy"] == first.reward_model_info["heldout_accuracy"]


def test_the_reward_model_block_is_the_same_when_the_cached_model_is_reused(tmp_path):
    """summary.json's reward_model block, fresh and on a resume that reuses reward_model.safetensors: the training
    record (loss, accuracy, margin, step, grad_norm) is kept with the cached model, and `lr` is the configured
    --rm-lr, not the schedule's last value."""
    lines = []
    context = reward_model_contexts(tmp_path, lines)
    first, again = context(), context()
    ensure_reward_model(first)
    ensure_reward_model(again)
    assert any("reusing" in line for line in lines)
    train = first.reward_model_info["train"]
    assert train["lr"] == 1e-2 and train["steps"] == 2
    assert {"loss", "accuracy", "margin", "step", "grad_norm"} <= set(train)
    assert again.reward_model_info == first.reward_model_info


# ----------------------------------------------------------------------------- end to end (slow)

SMALL = ["--preset", "tiny", "--method", "dpo", "--batch-prompts", "2", "--num-prompts", "12", "--heldout-prompts",
         "4", "--eval-prompts", "4", "--steps", "4", "--batch-size", "4", "--log-every", "2", "--checkpoint-every",
         "2", "--seed", "3", "--rloo-steps", "2", "--rloo-prompts", "2", "--rloo-k", "2", "--rm-steps", "3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return {**os.environ, "MINIDPO_CACHE": str(tmp_path_factory.mktemp("cache")), "PYTHONUNBUFFERED": "1"}


def train(args: list[str], env: dict) -> None:
    small = [a for a in SMALL if a not in ("--method", "dpo")] if "--compare" in args else SMALL  # not both
    out = subprocess.run([sys.executable, "train.py", *small, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"


@pytest.mark.slow
def test_rlhf_preferred_ft_and_unlikelihood_run_end_to_end_beside_dpo(env, tmp_path):
    out = tmp_path / "cmp"
    train(["--out-dir", str(out), "--compare", "dpo,rlhf,preferred-ft,unlikelihood", "--beta-sweep", "0.5",
           "--kl-coef-sweep", "0.1", "--unlikelihood-alpha-sweep", "0.5"], env)
    with open(out / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"dpo", "rlhf", "preferred-ft", "unlikelihood"}
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["reward_model"]["heldout_accuracy"] <= 1 and summary["reward_model"]["heldout_pairs"] > 0
    assert set(summary["implicit_reward_accuracy"]["dpo"]) == {"beta=0.5"}
    for d in ("rlhf_kl_coef_0.1", "preferred-ft_sft", "unlikelihood_alpha_0.5"):
        assert (out / d / "run.json").is_file() and (out / d / "log.jsonl").is_file()
    assert (out / "reward_model.safetensors").is_file()


@pytest.mark.slow
def test_seeds_repeat_the_run_and_write_the_mean_with_error_bars(env, tmp_path):
    out = tmp_path / "seeds"
    train(["--out-dir", str(out), "--seeds", "0,1", "--steps", "2"], env)
    assert (out / "seed_0" / "summary.json").is_file() and (out / "seed_1" / "summary.json").is_file()
    with open(out / "frontier.csv", newline="") as f:
        assert {r["seed"] for r in csv.DictReader(f)} == {"0", "1"}
    with open(out / "frontier_mean.csv", newline="") as f:
        last = [r for r in csv.DictReader(f) if r["step"] == "2"]
    assert len(last) == 1 and last[0]["seeds"] == "2" and last[0]["reward_se"] != ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["finished"] is True and summary["mean"][0]["seeds"] == 2


def test_the_paper_protocol_preset_runs_the_papers_sweeps_with_rl_at_target_kls(tmp_path):
    configs = load_config(["--preset", "tiny-fig2"])[0].configs
    names = [d.name for _, _, d in method_runs(configs, tmp_path)]
    assert [n for n in names if n.startswith("dpo_")] == ["dpo_beta_0.05", "dpo_beta_0.1", "dpo_beta_1", "dpo_beta_5"]
    assert [n for n in names if n.startswith("rloo_")] == [f"rloo_target_kl_{t}" for t in (3, 6, 9, 12)]
    assert [n for n in names if n.startswith("unlikelihood_")] == [
        f"unlikelihood_alpha_{a}" for a in ("0.05", "0.1", "0.5", "1")]
    assert {(c.target_kl, c.kl_coef) for c in configs.rloo} == {(t, 0.05) for t in (3.0, 6.0, 9.0, 12.0)}
    assert configs.eval_every == 20 and configs.prompts.eval == 256


def test_min_score_margin_drops_near_tie_training_pairs_and_keeps_every_held_out_pair(monkeypatch):
    """A near tie is mostly the classifier's noise; held-out pairs stay whole so accuracy means the same."""
    import minidpo.dataset.pairs as P
    from minidpo.dataset.prompts import Prompt
    from minidpo.model.generate import SamplingConfig
    scores = iter([0.9, 0.85, 0.2, 0.9, 0.85, 0.2])  # gaps 0.05, 0.7, 0.65 in each prompt

    class Tok:
        def decode(self, ids):
            return "x" * len(ids)
    monkeypatch.setattr(P, "generate_completions", lambda *a, **k: [[[1], [2], [3]], [[1], [2], [3]]])
    monkeypatch.setattr(P, "score_all", lambda scorer, texts, *a: [next(scores) for _ in texts])
    monkeypatch.setattr(P, "response_text", lambda c, tok: str(c))
    cfg = P.PairsConfig(sampling=SamplingConfig(min_new_tokens=1, max_new_tokens=2), n_completions=3, min_margin=0.1)
    prompts = [Prompt([5], "a", "train"), Prompt([6], "b", "test")]
    pairs = P.generated_pairs(cfg, prompts, Tok(), None, None)
    assert sorted(round(p.chosen_score - p.rejected_score, 2) for p in pairs if p.split == "train") == [0.65, 0.7]
    assert len([p for p in pairs if p.split == "test"]) == 3


def fake_run(cfg, given, rt, precision) -> None:
    """train.run's outputs for one seed, without training."""
    from minidpo.training.frontier import write_frontier
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_frontier(out, [{"method": "dpo", "setting": "beta=0.1", "step": 2, "reward": 0.5 + cfg.seed / 10, "kl": 1.0,
                          "seed": cfg.seed}])
    (out / "summary.json").write_text(json.dumps({"finished": True}))


@pytest.mark.parametrize("seeds", ["5", "0,1"])
def test_the_last_line_of_seeds_names_frontier_mean_csv_only_when_it_was_written(seeds, tmp_path, monkeypatch):
    import train
    from minidpo.training.runtime import Runtime
    monkeypatch.setattr(train, "run", fake_run)
    cfg, given = load_config(["--preset", "tiny", "--seeds", seeds, "--out-dir", str(tmp_path / "s")])
    logs = []
    train.run_seeds(cfg, given, Runtime(log=logs.append), "fp32")
    wrote_means = (tmp_path / "s" / "frontier_mean.csv").is_file()
    assert wrote_means == ("," in seeds)
    assert ("frontier_mean.csv (mean" in logs[-1]) == wrote_means and logs[-1].startswith("wrote "), logs[-1]


def test_compare_refuses_an_empty_item_accepts_spaces_after_commas_and_refuses_method_beside_it():
    with pytest.raises(ConfigError, match=r"^--compare has an empty item: 'dpo,,rloo'"):
        load_config(["--preset", "tiny", "--compare", "dpo,,rloo"])
    with pytest.raises(ConfigError, match=r"^--compare has an empty item"):
        load_config(["--preset", "tiny", "--compare", "dpo, "])
    cfg, _ = load_config(["--preset", "tiny", "--compare", "dpo, rloo"])
    assert cfg.configs.compare == ("dpo", "rloo")
    with pytest.raises(ConfigError) as e:
        load_config(["--preset", "tiny", "--method", "rloo", "--compare", "dpo,rloo"])
    assert str(e.value).startswith("--method rloo and --compare dpo,rloo were both given") and "\n" not in str(e.value)


def test_seed_beside_seeds_does_not_refuse_a_run_into_its_own_folder(tmp_path, monkeypatch, capsys):
    import train
    from minidpo.training.runtime import Runtime
    monkeypatch.setattr(train, "run", fake_run)
    out = ["--preset", "tiny", "--seeds", "0,1", "--out-dir", str(tmp_path / "s")]
    for more in ([], ["--seed", "5"]):  # each seed's folder records its own seed: the top's --seed is unused
        cfg, given = load_config([*out, *more])
        train.run_seeds(cfg, given, Runtime(), "fp32")
    assert "[resume] ignoring --seed: " in capsys.readouterr().err
    assert json.loads((tmp_path / "s" / "config.json").read_text())["seed"] == 0
