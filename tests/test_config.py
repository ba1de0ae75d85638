"""Typed command-line configuration: overrides, presets, and one clear message per mistake."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError, build_config, parse_overrides
from train import PRESETS, TrainConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Demo:
    beta: float = 0.1
    steps: int = 10
    name: str = "x"
    flag: bool = False
    top_k: int | None = None


def test_overrides_are_typed_and_accept_both_spellings():
    cfg = build_config(Demo, ["--beta", "0.5", "--steps=3", "--name", "y", "--flag", "--top-k", "7"])
    assert cfg == Demo(beta=0.5, steps=3, name="y", flag=True, top_k=7)
    assert build_config(Demo, ["--top_k", "none", "--no-flag"]) == Demo(top_k=None, flag=False)
    assert build_config(Demo, ["--flag", "false"]).flag is False


def test_unknown_flag_names_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown option --bta; did you mean --beta\?"):
        build_config(Demo, ["--bta", "0.2"])


@pytest.mark.parametrize("argv,message", [
    (["--steps", "ten"], "--steps expects an integer, got 'ten'"),
    (["--beta", "high"], "--beta expects a number, got 'high'"),
    (["--flag", "maybe"], "--flag expects true or false"),
    (["--steps"], "--steps needs a value"),
    (["steps", "3"], "unexpected argument 'steps'"),
])
def test_wrong_types_are_one_clear_message(argv, message):
    with pytest.raises(ConfigError, match=message):
        build_config(Demo, argv)


@settings(max_examples=50, deadline=None)
@given(st.integers(-10**9, 10**9), st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_round_trip_through_the_command_line(n, x):
    assert parse_overrides(["--steps", str(n), "--beta", repr(x)], {"steps": int, "beta": float}) == \
        {"steps": n, "beta": x}


@pytest.mark.parametrize("argv,message", [
    (["--beta", "0"], "--beta must be"),
    (["--beta-sweep", "0.1,-1"], "--beta-sweep must be"),
    (["--min-new-tokens", "20", "--max-new-tokens", "10"], "--max-new-tokens must be >= min_new_tokens"),
    (["--prompt-min-tokens", "9", "--prompt-max-tokens", "8"], "--prompt-min-tokens"),
    (["--prompt-max-tokens", "70", "--max-length", "64"], "--prompt-max-tokens .* must be < --max-length"),
    (["--loss-type", "dpo"], "--loss-type must be one of"),
    (["--loss-type", "ipo", "--label-smoothing", "0.1"], "--label-smoothing"),
    (["--label-smoothing", "0.9"], "--label-smoothing"),
    (["--preset", "huge"], "--preset must be one of tiny, tiny-fig2, gpt2, gpt2-large"),
])
def test_impossible_training_values_are_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


@pytest.mark.parametrize("argv,flag", [
    (["--gen-batch-size", "0"], "--gen-batch-size"), (["--eval-every", "-1"], "--eval-every"),
    (["--heldout-prompts", "-2"], "--heldout-prompts"), (["--grad-clip", "nan"], "--grad-clip"),
    (["--beta", "inf"], "--beta"), (["--lora-alpha", "0"], "--lora-alpha"), (["--lora-dropout", "2"], "--lora-dropout"),
    (["--lora-targets", "bogus"], "--lora-targets"), (["--lora-rank", "0"], "--lora-rank"),
    (["--batching", "both"], "--batching"), (["--logprobs", "fast"], "--logprobs"), (["--method", "ppo"], "--method"),
    (["--compare", "dpo,ppo"], "--compare"), (["--kl-coef", "-1"], "--kl-coef"), (["--rloo-k", "1"], "--rloo-k"),
    (["--best-of-n", "0,4"], "--best-of-n"), (["--kl-coef-sweep", "a,b"], "--kl-coef-sweep"),
    (["--gen-top-k", "-1"], "--gen-top-k"), (["--steps", "0"], "--steps"), (["--lr", "nan"], "--lr"),
    (["--precompute-ref", "--batching", "pairs"], "--precompute-ref"), (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--precompute-ref", "--method", "rloo"], "--precompute-ref"),
    (["--method", "online-dpo", "--gen-temperature", "0"], "--gen-temperature"),
    (["--method", "online-dpo", "--pairing", "some"], "--pairing"),
])
def test_every_option_value_is_checked_before_any_stage_runs_naming_its_flag(argv, flag):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert str(e.value).startswith(flag), str(e.value)


def test_help_shows_each_options_comment_from_the_config_class():
    from minidpo.config import help_text
    text = help_text(TrainConfig)
    assert "--beta [0.1]" in text and "DPO's KL strength" in text
    assert "--batching [unique]" in text and "each distinct sequence forwarded once" in text


def test_a_resumed_config_json_with_a_wrong_type_is_refused_naming_the_key(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"steps": "16"}))
    with pytest.raises(ConfigError, match="config.json: 'steps' must be"):
        load_config(["--resume", str(tmp_path)])
    (tmp_path / "config.json").write_text('{"steps": 1')
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(["--resume", str(tmp_path)])


def test_preset_then_command_line_overrides_apply_in_order():
    cfg, given = load_config(["--preset", "tiny", "--steps", "3"])
    assert cfg.steps == 3 and cfg.model == PRESETS["tiny"]["model"] and cfg.batch_size == PRESETS["tiny"]["batch_size"]
    assert given == {"preset", "steps"}
    assert load_config([]) == (TrainConfig(), set())


@pytest.mark.slow  # a subprocess
def test_train_py_rejects_a_misspelt_flag_before_doing_any_work():
    out = subprocess.run([sys.executable, "train.py", "--lerning-rate", "1e-3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown option --lerning-rate" in out.stderr
    assert out.stdout == ""


def test_resume_needs_a_train_output_directory(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(["--resume", str(tmp_path)])


@pytest.mark.parametrize("argv,flag", [
    (["--seed", str(2**64)], "--seed"), (["--seed", str(2**64 - 1)], "--seed"), (["--seed", "-1"], "--seed"),
    (["--seeds", f"0,{2**64}"], "--seeds"), (["--seeds", f"{2**64 - 1}"], "--seeds"),
    (["--method", "best-of-n", "--best-of-n", "1,16", "--seed", str(2**64 - 16)], "--seed"),
])
def test_seeds_whose_derived_seeds_overflow_torchs_generators_are_refused_with_the_valid_range(argv, flag):
    with pytest.raises(ConfigError) as e:
        load_config(["--preset", "tiny", *argv])
    assert str(e.value).startswith(f"{flag} must be in 0..") and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("method", ["dpo", "best-of-n"])
def test_the_largest_accepted_seed_reaches_evaluation_and_every_best_of_n_round(method):
    import torch

    from minidpo.experiment.options import SEED_MAX
    top = SEED_MAX - (16 if method == "best-of-n" else 1)  # the tiny preset's best-of-n goes up to N=16
    cfg, _ = load_config(["--preset", "tiny", "--method", method, "--seed", str(top)])
    rounds = max(cfg.configs.best_of_n) if method == "best-of-n" else 1
    for j in range(rounds):  # best-of-N's round j samples with the evaluation seed + j
        torch.Generator().manual_seed(cfg.configs.eval.seed + j)
    with pytest.raises(ConfigError, match=f"--seed must be in 0..{top} "):
        load_config(["--preset", "tiny", "--method", method, "--seed", str(top + 1)])


@pytest.mark.parametrize("first,again,unused,ignored", [
    (["--method", "dpo"], ["--method", "dpo", "--rm-steps", "9", "--rm-lr", "1e-3"], (), ["rm_lr", "rm_steps"]),
    (["--dtype", "auto"], ["--dtype", "fp32"], (), ["dtype"]),  # auto is fp32 on a CPU without bf16 units
    (["--seeds", "0,1"], ["--seeds", "0,1", "--seed", "5"], ("seed",), ["seed"]),
    (["--method", "rlhf"], ["--method", "rlhf", "--rm-steps", "9"], (), None),  # these do change results
    (["--dtype", "auto"], ["--dtype", "bf16"], (), None),
    (["--seed", "0"], ["--seed", "5"], (), None),
])
def test_an_option_that_cannot_change_results_does_not_refuse_a_run_into_its_own_folder(first, again, unused, ignored,
                                                                                         tmp_path, monkeypatch, capsys):
    import torch

    import train
    from minidpo.config import flag_name, save_config
    from minidpo.experiment import resolve
    from minidpo.training.runs import RunConflict, check_out_dir
    monkeypatch.setattr(resolve, "cpu_flags", lambda *a: {"avx2"})
    out = ["--preset", "tiny", "--out-dir", str(tmp_path)]
    save_config(load_config([*first, *out])[0], tmp_path / "config.json")
    cfg = train.keep_recorded(load_config([*again, *out])[0], torch.device("cpu"), frozenset(unused))
    if ignored is None:
        with pytest.raises(RunConflict):
            check_out_dir(tmp_path, train.run_settings(cfg))
        assert capsys.readouterr().err == ""
    else:
        check_out_dir(tmp_path, train.run_settings(cfg))  # the same run: it goes on there
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith(f"[resume] ignoring {', '.join(flag_name(k) for k in ignored)}: "), line


@pytest.mark.parametrize("argv", [["--preset", "tiny", "--help"], ["-h", "--preset=tiny"]])
def test_help_under_a_preset_shows_the_presets_values_marked(argv, capsys):
    import train
    from minidpo.config import run_program
    assert run_program(train.main, argv, train.__doc__, TrainConfig, PRESETS) == 0
    text = capsys.readouterr().out
    assert "* --preset tiny's value" in text and "--preset [tiny]*" in text
    assert f"--steps [{PRESETS['tiny']['steps']}]*" in text and "--steps [200]" not in text
    assert f"--lr [{PRESETS['tiny']['lr']}]*" in text and "--device [auto] " in text  # not in the preset: its default
    assert run_program(train.main, ["--help"], train.__doc__, TrainConfig, PRESETS) == 0
    assert "--steps [200] " in capsys.readouterr().out


@pytest.mark.slow  # a subprocess
def test_train_py_help_under_a_preset_shows_its_values():
    out = subprocess.run([sys.executable, "train.py", "--preset", "tiny", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and f"--steps [{PRESETS['tiny']['steps']}]*" in out.stdout
