"""train.py's flags checked once, before any work, each refusal naming the flag: duplicate sweep values, bad
numbers, temperatures, and --compile (which changes results, so it is a recorded setting)."""

import pytest

import train
from minidpo.config import ConfigError


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
    (["--preset", "tiny", "--pairs-mode", "labels", "--prompt-data", "sample"], "--prompt-data"),
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
