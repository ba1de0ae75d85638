"""sample.py as a program: bad input is one `error:` line and exit code 1, and a train.py output folder keeps
working after it is moved (run.json's policy_base is resolved against the folder that holds it)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sample as sample_py
from minidpo.config import run_program
from minidpo.experiment.resolve import BUNDLED_MODEL
from minidpo.model.lora import apply_lora, save_lora
from minidpo.model.weights import load_gpt2

SAMPLE_PY = Path(sample_py.__file__).resolve()
QUICK = ["--num-samples", "2", "--max-new-tokens", "6", "--seed", "3", "--device", "cpu", "--prompt", "A film"]


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MINIDPO_DEBUG", None)
    return subprocess.run([sys.executable, str(SAMPLE_PY), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def run_in_process(args: list[str], capsys) -> tuple[int, str, str]:
    code = run_program(sample_py.main, args, sample_py.__doc__, sample_py.SampleConfig)
    out, err = capsys.readouterr()
    return code, out, err


def samples(stdout: str) -> list[str]:
    return stdout.split("--- sample ")[1:]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A train.py-like output folder: a zero LoRA adapter (so the policy is its base) and the base model saved in
    the folder, recorded in run.json by a path relative to the folder."""
    run = tmp_path_factory.mktemp("made") / "run"
    shutil.copytree(BUNDLED_MODEL, run / "base_model")
    model = load_gpt2(run / "base_model")
    apply_lora(model, rank=2, alpha=4.0)
    save_lora(model, run / "adapter")
    (run / "run.json").write_text(json.dumps({"adapter": "adapter", "policy_base": "base_model"}))
    return run


@pytest.mark.slow  # a subprocess
def test_bad_adapter_path_is_one_error_line_and_a_nonzero_exit(tmp_path):
    proc = run_cli(["--adapter", str(tmp_path / "nonexistent"), *QUICK], tmp_path)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nonexistent" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow  # a subprocess
def test_a_moved_output_folder_samples_its_policy_from_any_directory(run_folder, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "renamed-run"
    shutil.copytree(run_folder, moved)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    proc = run_cli(["--adapter", str(moved), *QUICK], elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "adapter" in proc.stdout.splitlines()[0]
    code, bundled, _ = run_in_process(["--model", "bundled", *QUICK], capsys)
    assert code == 0
    assert samples(proc.stdout) == samples(bundled)  # zero adapter on the same weights: the same text


def test_run_json_written_with_a_path_relative_to_the_parent_folder_resolves(run_folder, tmp_path, capsys,
                                                                            monkeypatch):
    outer = tmp_path / "sweep"
    shutil.copytree(run_folder / "base_model", outer / "sft_model")
    shutil.copytree(run_folder / "adapter", outer / "beta-0.1" / "adapter")
    (outer / "beta-0.1" / "run.json").write_text(json.dumps({"adapter": "adapter", "policy_base": "../sft_model"}))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_in_process(["--adapter", str(outer / "beta-0.1"), *QUICK], capsys)
    assert code == 0, err
    assert "sft_model" in out.splitlines()[0]


@pytest.mark.parametrize("case,expected", [
    ("no_model", "--model"), ("no_adapter_file", "adapter.safetensors"), ("bad_run_json", "run.json"),
    ("base_left_behind", "policy_base 'sft_model'"),
    ("bad_top_p", "--top-p"), ("negative_temperature", "--temperature"), ("merged_alone", "--merged"),
])
def test_bad_input_is_one_error_line_naming_what_is_wrong(case, expected, run_folder, tmp_path, capsys):
    args = {
        "no_model": ["--model", str(tmp_path / "nonexistent")],
        "no_adapter_file": ["--adapter", str(tmp_path / "broken")],
        "bad_run_json": ["--adapter", str(tmp_path / "badjson")],
        "base_left_behind": ["--adapter", str(tmp_path / "moved")],
        "bad_top_p": ["--model", "bundled", "--top-p", "1.5"],
        "negative_temperature": ["--model", "bundled", "--temperature", "-1"],
        "merged_alone": ["--model", "bundled", "--merged"],
    }[case]
    if case == "no_adapter_file":
        shutil.copytree(run_folder / "adapter", tmp_path / "broken" / "adapter")
        (tmp_path / "broken" / "adapter" / "adapter.safetensors").unlink()
        (tmp_path / "broken" / "run.json").write_text(json.dumps({"adapter": "adapter", "policy_base": "bundled"}))
    if case == "base_left_behind":  # a sweep's run folder copied away from the sft_model beside it
        shutil.copytree(run_folder / "adapter", tmp_path / "moved" / "adapter")
        (tmp_path / "moved" / "run.json").write_text(json.dumps({"adapter": "adapter", "policy_base": "sft_model"}))
    if case == "bad_run_json":
        (tmp_path / "badjson").mkdir()
        (tmp_path / "badjson" / "run.json").write_text('{"adapter": "adapter"')  # cut short
    code, out, err = run_in_process([*args, *QUICK], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], err
    assert out == ""


def test_top_k_zero_means_off(capsys):
    code, zero, _ = run_in_process(["--model", "bundled", "--top-k", "0", *QUICK], capsys)
    code2, none, _ = run_in_process(["--model", "bundled", "--top-k", "none", *QUICK], capsys)
    assert code == code2 == 0 and samples(zero) == samples(none) and len(samples(zero)) == 2


def test_help_example_uses_the_bundled_model_not_a_download():
    assert "--model gpt2" not in sample_py.__doc__ and "--model bundled" in sample_py.__doc__


@pytest.mark.parametrize("layout", ["compare", "seeds"])
def test_a_folder_of_several_runs_names_the_sub_runs_that_hold_adapters(layout, run_folder, tmp_path, capsys):
    top = tmp_path / "top"
    subs = {"compare": ["dpo_beta_0.1", "rloo_kl_coef_0.02"],
            "seeds": ["seed_0/dpo_beta_0.1", "seed_1/dpo_beta_0.1"]}[layout]
    for sub in subs:
        shutil.copytree(run_folder / "adapter", top / sub / "adapter")
        (top / sub / "run.json").write_text(json.dumps({"adapter": "adapter", "policy_base": "bundled"}))
    (top / "best-of-n_N_4").mkdir()  # a sub-run that trained nothing
    code, out, err = run_in_process(["--adapter", str(top), *QUICK], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and all(sub in lines[0] for sub in subs), err
    assert "best-of-n" not in lines[0] and "not a train.py output" not in lines[0] and out == ""


def test_a_peft_adapter_folder_is_refused_naming_the_run_before_any_model_is_loaded(run_folder, tmp_path, capsys,
                                                                                  monkeypatch):
    from minidpo.model.export import export_peft
    run = tmp_path / "run"
    shutil.copytree(run_folder, run)
    model = load_gpt2(run / "base_model")
    apply_lora(model, rank=2, alpha=4.0)
    export_peft(model, run / "adapter_peft", base_model_name_or_path="gpt2")

    def no_load(*a, **k):
        raise AssertionError("a model was loaded (or downloaded) before the adapter was checked")
    monkeypatch.setattr(sample_py, "load_model", no_load)
    code, out, err = run_in_process(["--adapter", str(run / "adapter_peft"), *QUICK], capsys)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "PEFT" in lines[0] and f"--adapter {run}" in lines[0], err
    assert "format is" not in lines[0]
    (run / "adapter_peft" / "adapter_model.safetensors").unlink()  # any other foreign adapter_config.json
    code, _, err = run_in_process(["--adapter", str(run / "adapter_peft"), *QUICK], capsys)
    assert code == 1 and "adapter_config.json" in err
