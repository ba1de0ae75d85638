"""Typed command-line configuration: overrides, presets, and one clear message per mistake."""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

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
    (["--beta", "0"], "--beta must be > 0"),
    (["--beta-sweep", "0.1,-1"], "--beta-sweep values must be > 0"),
    (["--min-new-tokens", "20", "--max-new-tokens", "10"], "--min-new-tokens"),
    (["--prompt-min-tokens", "9", "--prompt-max-tokens", "8"], "--prompt-min-tokens"),
    (["--prompt-max-tokens", "70", "--max-length", "64"], "--prompt-max-tokens .* must be < --max-length"),
    (["--loss-type", "dpo"], "--loss-type must be sigmoid, robust, ipo or hinge"),
    (["--label-smoothing", "0.5"], "--label-smoothing"),
    (["--preset", "huge"], "--preset must be one of tiny, gpt2, gpt2-large"),
])
def test_impossible_training_values_are_rejected(argv, message):
    with pytest.raises(ConfigError, match=message):
        load_config(argv)


def test_preset_then_command_line_overrides_apply_in_order():
    cfg = load_config(["--preset", "tiny", "--steps", "3"])
    assert cfg.steps == 3 and cfg.model == PRESETS["tiny"]["model"] and cfg.batch_size == PRESETS["tiny"]["batch_size"]
    assert load_config([]) == TrainConfig()


def test_train_py_rejects_a_misspelt_flag_before_doing_any_work():
    out = subprocess.run([sys.executable, "train.py", "--lerning-rate", "1e-3"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "unknown option --lerning-rate" in out.stderr
    assert out.stdout == ""


def test_resume_needs_a_train_output_directory(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(["--resume", str(tmp_path)])
