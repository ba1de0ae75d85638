"""What a run leaves behind and in what order: evaluation points saved before the checkpoint of their step, a run
killed before its last outputs left unfinished (and a finished one repaired), a sub-run checkpoint made with other
settings refused before any work, the best-of-N bound never stored as a measured KL, and the last line naming a
sub-run to sample."""

import json
from pathlib import Path

import pytest
import torch

import train
from minidpo.training.checkpoint import Checkpointer
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun, train_loop


def make_problem():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(3))
    x = torch.randn(8, 3)

    def step_fn(batch):
        loss = ((x @ w - 1) ** 2).mean()
        return loss, {}, 8
    return {"w": w}, (lambda step, micro: None), step_fn


def test_a_step_evaluation_is_made_before_that_step_checkpoint(tmp_path, monkeypatch):
    """A kill between the evaluation of step 2 and its checkpoint (injected: the save raises) must not lose the
    point: resume starts from step 1 and re-measures step 2."""
    params, get_batch, step_fn = make_problem()
    cfg = LoopConfig(steps=3, lr=0.1, warmup_steps=0, log_every=100, checkpoint_every=1)
    evaluated = []
    real_save = Checkpointer.save

    def save(self, step, *a, **k):
        if step == 2:
            raise KeyboardInterrupt  # killed here
        return real_save(self, step, *a, **k)
    monkeypatch.setattr(Checkpointer, "save", save)
    with pytest.raises(KeyboardInterrupt):
        train_loop(TrainRun(cfg, tmp_path / "c", on_step_end=evaluated.append), params, get_batch, step_fn)
    assert evaluated == [1, 2]
    monkeypatch.setattr(Checkpointer, "save", real_save)
    train_loop(TrainRun(cfg, tmp_path / "c", on_step_end=evaluated.append), params, get_batch, step_fn)
    assert evaluated == [1, 2, 2, 3]


SMALL = ["--preset", "tiny", "--method", "dpo", "--batch-prompts", "2", "--num-prompts", "12", "--heldout-prompts", "4",
         "--eval-prompts", "4", "--steps", "4", "--batch-size", "4", "--log-every", "2", "--checkpoint-every", "2",
         "--eval-every", "2", "--seed", "3"]


def summary_of(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.slow  # train.main end to end, three times
def test_a_run_killed_before_its_last_outputs_is_not_finished_and_a_finished_one_repairs_them(tmp_path, monkeypatch,
                                                                                             capsys):
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = [*SMALL, "--out-dir", str(out), "--export-merged", str(tmp_path / "m1")]

    def killed(*a, **k):
        raise KeyboardInterrupt  # the injected stop: after summary.json and frontier.csv, before the export
    monkeypatch.setattr(train, "export_merged", killed)
    with pytest.raises(KeyboardInterrupt):
        train.main(argv)
    assert summary_of(out)["finished"] is False and (out / "frontier.csv").is_file()
    monkeypatch.undo()
    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path / "cache"))
    train.main(["--resume", str(out)])
    assert summary_of(out)["finished"] is True and (tmp_path / "m1" / "model.safetensors").is_file()
    rows = (out / "frontier.csv").read_text()
    (out / "frontier.csv").unlink()  # deleted from a finished run, and a new --export-merged for that finished run:
    train.main([*SMALL, "--out-dir", str(out), "--export-merged", str(tmp_path / "m2")])  # both are made
    assert (out / "frontier.csv").read_text() == rows and (tmp_path / "m2" / "model.safetensors").is_file()
    assert "python sample.py --adapter" in capsys.readouterr().out


def test_a_sub_run_checkpoint_made_with_other_settings_is_refused_in_one_line_before_any_work(tmp_path):
    """A --compare sub-run's checkpoint records every option that changes results; a later run with --lora-alpha 64
    (or other --steps, --gen-temperature) is refused naming it, not resumed, and nothing is written first."""
    import dataclasses

    from minidpo.experiment.compare import check_checkpoints, checkpoint_settings, method_runs
    from minidpo.training.runs import RunConflict
    out = tmp_path / "cmp"

    def settings_of(argv):
        cfg, _ = train.load_config(argv)
        return cfg.configs, {k: v for k, v in dataclasses.asdict(cfg).items() if k not in train.NOT_SETTINGS}
    base = ["--preset", "tiny", "--compare", "dpo,online-dpo", "--out-dir", str(out)]
    configs, record = settings_of(base)
    method, setting, run_dir = [r for r in method_runs(configs, out) if r[0].name == "online-dpo"][0]
    params, get_batch, step_fn = make_problem()
    train_loop(TrainRun(LoopConfig(steps=1, lr=0.1, warmup_steps=0), run_dir,
                        settings=checkpoint_settings(configs, record, method, setting)), params, get_batch, step_fn)
    check_checkpoints(configs, record, out)  # the same settings: fine
    for extra, named in ((["--lora-alpha", "64"], "run.lora_alpha=16.0"), (["--steps", "9"], "steps=80"),
                         (["--gen-temperature", "0.5"], "run.gen_temperature=0.7")):
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        with pytest.raises(RunConflict) as e:
            check_checkpoints(*settings_of(base + extra), out)
        message = str(e.value)
        assert named in message and "\n" not in message and "{" not in message, message
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_best_of_n_stores_its_bound_as_kl_bound_and_sets_the_reference_reward_without_n_1(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from minidpo.experiment import compare, report
    from minidpo.methods.best_of_n import kl_bound
    from minidpo.registry import BY_NAME
    from minidpo.training.frontier import read_frontier, write_frontier
    asked = []

    def sweep(model, tok, scorer, prompts, ns, cfg):
        asked.append(list(ns))
        return [{"n": n, "reward": 0.4 + 0.01 * n, "kl_bound": kl_bound(n), "scores": [0.4, 0.5]} for n in ns]
    monkeypatch.setattr(compare, "best_of_n_sweep", sweep)
    ctx = SimpleNamespace(model=None, tok=None, scorer=None, prompts=SimpleNamespace(eval=[]),
                          configs=SimpleNamespace(eval=None), runtime=Runtime())
    result = compare.run_best_of_n(ctx, BY_NAME["best-of-n"], [2, 4], tmp_path)
    assert asked == [[1, 2, 4]] and result.reference == {"reward": pytest.approx(0.41)}
    assert "kl_exact" not in result.policy and result.policy["kl_bound"] == pytest.approx(kl_bound(4))
    assert all(p["kl"] is None and p["kl_bound"] > 0 for p in result.frontier)
    write_frontier(tmp_path, result.frontier)
    header, *rows = (tmp_path / "frontier.csv").read_text().splitlines()
    assert "kl_bound" in header.split(",")
    assert all(r["kl"] == pytest.approx(r["kl_bound"]) for r in read_frontier(tmp_path))  # the plot's x: the bound
    assert "KL bound" in report.result_lines(result, {"total_seconds": 1.0}, tmp_path)


def test_the_last_line_names_a_sub_run_that_holds_an_adapter_or_says_there_is_none(tmp_path):
    from minidpo.experiment.report import sample_hint
    (tmp_path / "best-of-n_N_1,2").mkdir()
    assert "python sample.py" not in sample_hint(tmp_path) and "no trained adapter" in sample_hint(tmp_path)
    for name in ("dpo_beta_0.1", "rloo_kl_coef_0.02"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text("{}")
    assert sample_hint(tmp_path).startswith(f"sample with: python sample.py --adapter {tmp_path / 'rloo_kl_coef_0.02'}")
    (tmp_path / "run.json").write_text("{}")  # a single run writes into the folder itself
    assert sample_hint(tmp_path) == f"sample with: python sample.py --adapter {tmp_path}"
