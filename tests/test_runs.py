"""Run folders: settings mismatches refused by name, finished runs left alone, one run per folder, portable paths."""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.training.runs import (
    OutDirLock,
    RunConflict,
    RunLocked,
    check_out_dir,
    clear_run_outputs,
    differing,
    from_portable,
    is_finished,
    mark_finished,
    resume_overrides,
    to_portable,
)

ROOT = Path(__file__).resolve().parent.parent
EARLIER = {"beta": 0.5, "lr": 0.005, "steps": 100, "seed": 0, "lora_targets": "attn.c_attn", "log_every": 10,
           "gen_top_k": None, "out_dir": "out/k2"}


def made(out_dir: Path, stored: dict = EARLIER) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(stored))
    return out_dir


def test_a_new_run_with_other_settings_is_refused_naming_exactly_the_differing_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    made(Path("out/k2"))
    now = {**EARLIER, "beta": 0.1, "lr": 1e-4, "log_every": 5, "out_dir": "elsewhere"}  # log_every: no effect
    with pytest.raises(RunConflict) as e:
        check_out_dir("out/k2", now)
    assert str(e.value) == ("out/k2 holds a run made with --beta 0.5 --lr 0.005 (now --beta 0.1 --lr 0.0001); "
                            "continue it with --resume out/k2, or choose a new --out-dir, or pass --overwrite")
    assert json.loads(Path("out/k2/config.json").read_text()) == EARLIER  # nothing touched


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.sampled_from(["a_b", "c", "d", "e", "f"]),
                       st.integers(-3, 3) | st.none() | st.text(max_size=3), min_size=1), st.data())
def test_differing_lists_exactly_the_changed_keys(stored, data):
    changed = data.draw(st.sets(st.sampled_from(sorted(stored))))
    given_ = {k: ([v, "x"] if k in changed else v) for k, v in stored.items()}
    assert set(differing(stored, given_)) == changed
    assert differing(stored, given_, exclude=changed) == []


def test_the_same_settings_continue_and_tuples_equal_their_json_lists(tmp_path):
    out = made(tmp_path / "r", {**EARLIER, "lora_targets": ["attn.c_attn", "mlp.c_fc"]})
    state = check_out_dir(out, {**EARLIER, "lora_targets": ("attn.c_attn", "mlp.c_fc")})
    assert state.status == "unfinished" and state.stored["beta"] == 0.5
    assert check_out_dir(tmp_path / "new", EARLIER).empty


def test_a_setting_the_folder_never_recorded_counts_as_different(tmp_path):
    out = made(tmp_path / "r", {k: v for k, v in EARLIER.items() if k != "seed"})
    with pytest.raises(RunConflict, match=r"--seed \(not recorded\) \(now --seed 0\)"):
        check_out_dir(out, EARLIER)


def test_resume_accepts_the_safe_options_only(tmp_path):
    out = made(tmp_path / "r")
    assert check_out_dir(out, {**EARLIER, "steps": 200}, resume=True).status == "unfinished"
    with pytest.raises(RunConflict, match="--steps 100"):
        check_out_dir(out, {**EARLIER, "steps": 200})
    with pytest.raises(RunConflict, match="--beta 0.5"):
        check_out_dir(out, {**EARLIER, "beta": 0.1}, resume=True)
    with pytest.raises(RunConflict, match="no run to resume"):
        check_out_dir(tmp_path / "empty", EARLIER, resume=True)
    with pytest.raises(RunConflict, match="--overwrite would delete it"):
        check_out_dir(out, EARLIER, resume=True, overwrite=True)


def test_resume_overrides_keep_the_stored_settings_and_report_what_was_ignored():
    merged, ignored = resume_overrides(EARLIER, {"steps": 300, "beta": 0.1, "seed": 0, "lr": 1.0},
                                       safe={"steps", "export_merged"})
    assert merged == {**EARLIER, "steps": 300}
    assert ignored == ["beta", "lr"]  # seed was given but agrees: nothing to report


def test_overwrite_removes_only_what_minidpo_writes(tmp_path):
    out = made(tmp_path / "r")
    for name in ["summary.json", "log.jsonl", "checkpoint/state.pt", "adapter/adapter.safetensors",
                 "dpo_beta_0.5/run.json", "dpo_beta_0.5/checkpoint/state.pt", "rloo_kl_coef_0.1/log.jsonl",
                 "config.json.123.0badcafe.tmp", "notes.txt", "data/mine.csv", "dpo_beta_0.5/my_notes.txt", ".lock"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    state = check_out_dir(out, {**EARLIER, "beta": 0.1}, overwrite=True)
    assert state.empty and "dpo_beta_0.5/run.json" in state.cleared
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == [".lock", "data/mine.csv", "dpo_beta_0.5/my_notes.txt", "notes.txt"]
    assert clear_run_outputs(tmp_path / "missing") == []


def test_outputs_without_a_config_are_refused(tmp_path):
    out = tmp_path / "r"
    (out / "checkpoint").mkdir(parents=True)
    with pytest.raises(RunConflict, match="no config.json"):
        check_out_dir(out, EARLIER)
    (out / "config.json").write_text("{not json")
    with pytest.raises(RunConflict, match=r"config.json is unreadable"):
        check_out_dir(out, EARLIER)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"n_layer": 12, "n_embd": 768}))
    with pytest.raises(RunConflict, match="not a minidpo run"):
        check_out_dir(tmp_path / "hf", EARLIER)


def test_overwrite_after_a_compare_of_every_method_starts_clean(tmp_path):
    """The sub-run folders are named by compare.method_runs for every registered method (online-dpo included), and
    --overwrite removes each one's outputs, so no old checkpoint is resumed or refused."""
    from types import SimpleNamespace as NS

    from minidpo.experiment.compare import method_runs
    from minidpo.registry import NAMES
    out = made(tmp_path / "r")
    configs = NS(compare=list(NAMES), dpo=[NS(beta=0.1), NS(beta=0.5)], rloo=[NS(kl_coef=0.02, target_kl=None)],
                unlikelihood=[NS(alpha=0.1), NS(alpha=1.0)], orpo=[NS(lambda_=0.1)], best_of_n=[1, 4])
    runs = method_runs(configs, out)
    assert {m.name for m, _, _ in runs} == set(NAMES) and all(d.parent == out for _, _, d in runs)
    for _, _, d in runs:
        (d / "checkpoint").mkdir(parents=True)
        (d / "checkpoint" / "state.pt").write_text("x")
        (d / "run.json").write_text("{}")
    state = check_out_dir(out, {**EARLIER, "beta": 0.1}, overwrite=True)
    assert state.empty and {c.split("/")[0] for c in state.cleared if "/" in c} == {d.name for _, _, d in runs}
    assert sorted(p.name for p in out.iterdir()) == []


def test_the_readme_lists_every_registered_method_with_its_sweep():
    from minidpo.registry import METHODS
    readme = (ROOT / "README.md").read_text()
    for m in METHODS:
        sweep = f"`--{m.sweep.replace('_', '-')}`" if m.sweep else "one run"
        assert f"| `{m.name}` | {m.summary} | {sweep} |" in readme, m.name


def test_a_run_is_finished_only_once_marked(tmp_path):
    out = made(tmp_path / "r")
    assert check_out_dir(out, EARLIER).status == "unfinished" and not is_finished(out)
    (out / "summary.json").write_text(json.dumps({"policy": {"reward": 0.6}}))
    assert not is_finished(out)
    mark_finished(out)
    assert is_finished(out) and check_out_dir(out, EARLIER).finished
    assert json.loads((out / "summary.json").read_text()) == {"policy": {"reward": 0.6}, "finished": True}
    (out / "summary.json").write_text('{"finished": tru')  # a damaged summary is not a finished run
    assert not is_finished(out)
    with pytest.raises(FileNotFoundError, match="summary.json"):
        mark_finished(tmp_path / "none")


# the holder imports minidpo.training.runs without the package's __init__ (which loads torch): seconds saved per process
HOLDER = textwrap.dedent("""
    import sys, types
    pkg = types.ModuleType("minidpo")
    pkg.__path__ = [{root!r} + "/minidpo"]
    sys.modules["minidpo"] = pkg
    from minidpo.training.runs import OutDirLock
    with OutDirLock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
""")


def hold_lock(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT)), str(out)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.slow  # a subprocess
def test_a_second_process_is_refused_while_the_first_holds_the_folder_and_a_killed_holder_frees_it(tmp_path):
    out = tmp_path / "r"
    proc = hold_lock(out)
    try:
        with pytest.raises(RunLocked) as e:
            with OutDirLock(out):
                pass
        assert str(out) in str(e.value) and f"pid {proc.pid}" in str(e.value)
    finally:
        proc.communicate("\n", timeout=60)
    with OutDirLock(out):  # released at the end of the holder's block
        pass
    proc = hold_lock(out)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    with OutDirLock(out) as lock:  # the kernel released the dead holder's lock
        assert (out / ".lock").read_text().strip() == str(__import__("os").getpid())
        assert lock.fd is not None


def test_portable_paths_work_after_moving_the_folder_and_from_another_directory(tmp_path, monkeypatch):
    top = tmp_path / "out" / "tiny"
    sub = top / "dpo_beta_0.5"
    (sub / "adapter").mkdir(parents=True)
    (top / "sft_model").mkdir()
    outside = tmp_path / "models" / "gpt2"
    stored = {"adapter": to_portable(sub / "adapter", sub), "base": to_portable(top / "sft_model", sub, within=top),
              "model": to_portable(outside, sub, within=top)}
    assert stored == {"adapter": "adapter", "base": "../sft_model", "model": str(outside.resolve())}
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(str(top), str(moved))
    monkeypatch.chdir(tmp_path / "elsewhere")
    new_sub = Path("renamed") / "dpo_beta_0.5"  # a relative run folder, from another working directory
    assert from_portable(stored["adapter"], new_sub).is_dir()
    assert from_portable(stored["base"], new_sub).resolve() == (moved / "sft_model").resolve()
    assert from_portable(stored["model"], new_sub) == outside.resolve()
