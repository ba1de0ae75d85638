"""What the audit and attack of issue 22 found, pinned: duplicates and bad values refused with the flag's name, the
best-of-N bound never stored as a measured KL, evaluation points saved before the checkpoint of their step,
finished runs marked only once every output is there, and LoRA dropout on in training steps only."""

import json
from pathlib import Path

import pytest
import torch

import train
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import TrainRun
from minidpo.model.generate import SamplingConfig
from minidpo.config import ConfigError
from minidpo.training.checkpoint import Checkpointer
from minidpo.training.trainer import LoopConfig, Training, train_loop


@pytest.mark.parametrize("argv, flag", [
    (["--preset", "tiny", "--compare", "online-dpo,online-dpo"], "--compare"),
    (["--preset", "tiny", "--method", "dpo", "--beta-sweep", "0.1,0.1"], "--beta-sweep"),
    (["--preset", "tiny", "--method", "rloo", "--kl-coef-sweep", "0.02,0.02"], "--kl-coef-sweep"),
    (["--preset", "tiny", "--method", "best-of-n", "--best-of-n", "2,2"], "--best-of-n"),
    (["--preset", "tiny", "--method", "best-of-n", "--best-of-n", "4,,8"], "--best-of-n"),
    (["--preset", "tiny", "--kl-coef", "-1"], "--kl-coef "),
    (["--preset", "tiny", "--kl-coef", "nan"], "--kl-coef "),
    (["--preset", "tiny", "--compare", "rloo,dpo", "--kl-coef", "inf"], "--kl-coef "),
    (["--preset", "tiny", "--eval-every", "500"], "--eval-every"),
    (["--preset", "tiny", "--method", "online-dpo", "--compile"], "--compile"),
    (["--preset", "tiny", "--compare", "dpo,rloo", "--compile"], "--compile"),
])
def test_duplicates_and_bad_values_are_refused_naming_the_flag(argv, flag):
    with pytest.raises(ConfigError) as e:
        train.load_config(argv)
    assert str(e.value).startswith(flag), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("flag", ["--gen-temperature", "--rloo-temperature"])
def test_nan_zero_and_tiny_temperatures_get_one_range_message(flag):
    messages = set()
    for bad in ("nan", "0", "1e-4", "1e-30", "-1", "inf"):
        with pytest.raises(ConfigError) as e:
            train.load_config(["--preset", "tiny", flag, bad])
        messages.add(str(e.value).rsplit("got", 1)[0])
    assert len(messages) == 1 and flag in messages.pop()
    train.load_config(["--preset", "tiny", flag, "0.05"])


def test_compile_changes_results_so_it_is_a_recorded_setting():
    assert "compile" not in train.NOT_SETTINGS
    train.load_config(["--preset", "tiny", "--method", "dpo", "--compile"])


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
        train_loop(Training(cfg, params, get_batch, step_fn), Checkpointer(tmp_path / "c", params), on_step_end=evaluated.append)
    assert evaluated == [1, 2]
    monkeypatch.setattr(Checkpointer, "save", real_save)
    train_loop(Training(cfg, params, get_batch, step_fn), Checkpointer(tmp_path / "c", params), on_step_end=evaluated.append,
               resume=True)
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


def test_lora_dropout_is_on_in_every_training_step_and_off_in_every_rollout(tmp_path, monkeypatch):
    """Each LoRA forward with gradient (a training step) runs in train mode; each without (sampling, the rollout's
    scoring) in eval mode, from the first step on, whatever mode the model was loaded in."""
    from minidpo.model import lora as lora_mod
    from minidpo.methods.rloo import RLOOConfig
    from minidpo.methods.rloo import train_rloo
    from tests.test_pg import VowelScorer, tiny_setup
    model, tok, prompts = tiny_setup()
    model.eval()  # as stages.load_model_stage returns it
    for m in lora_mod.lora_layers(model).values():
        m.dropout = torch.nn.Dropout(0.5)
        m.train()  # as apply_lora leaves new modules
    seen = []
    forward = lora_mod.LoRALinear.forward

    def spy(self, x):
        if not self.disabled:
            seen.append((torch.is_grad_enabled(), self.training))
        return forward(self, x)
    monkeypatch.setattr(lora_mod.LoRALinear, "forward", spy)
    cfg = RLOOConfig(sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=4), k=2, prompts_per_step=2, kl_coef=0.1, seed=1)
    train_rloo(model, tok, VowelScorer(), prompts, cfg,
               TrainRun(LoopConfig(steps=2, lr=1e-2, log_every=1, label="rloo"), tmp_path), Runtime())
    assert {(True, True), (False, False)} == set(seen)


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
    ckpt = Checkpointer(run_dir / "checkpoint", params, checkpoint_settings(configs, record, method, setting))
    train_loop(Training(LoopConfig(steps=1, lr=0.1, warmup_steps=0), params, get_batch, step_fn), ckpt)
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
