"""train.py end to end on the tiny preset: outputs, sampling, SIGKILL + resume, and two-process data parallelism."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidpo.safetensors import load_file

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--preset", "tiny", "--num-prompts", "12", "--heldout-prompts", "4", "--eval-prompts", "4", "--steps", "8",
         "--batch-size", "4", "--log-every", "2", "--checkpoint-every", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")  # no full IMDB or GPT-2 here: the run must use what the repo ships
    return {**os.environ, "MINIDPO_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(out_dir / "adapter" / "adapter.safetensors").items()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, env) -> tuple[Path, subprocess.CompletedProcess]:
    out_dir = tmp_path_factory.mktemp("run") / "tiny"
    return out_dir, run(["train.py", *SMALL, "--out-dir", str(out_dir), "--export-merged", str(out_dir / "merged")],
                        env)


def test_tiny_run_writes_summary_config_log_and_adapter(finished):
    out_dir, proc = finished
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["model"] == "data/tiny-imdb-gpt2" and summary["data"].endswith("imdb_sample.tar.gz")
    for key in ("reward",):
        assert 0 <= summary["reference"][key] <= 1 and 0 <= summary["policy"][key] <= 1
    assert summary["policy"]["kl"] >= 0
    assert summary["train"]["steps"] == 8 and summary["train"]["tokens_per_s"] > 0
    assert 0 <= summary["train"]["reward_accuracy"] <= 1 and summary["train"]["final_loss"] > 0
    assert json.loads((out_dir / "config.json").read_text())["steps"] == 8
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "kl", "tokens_per_s", "ms_per_step"):
        assert name in log[-1]
    assert "step     8/8" in proc.stdout and "tok/s" in proc.stdout and "eta" in proc.stdout
    assert proc.stdout.count("prompt    |") == 3  # three prompts side by side
    assert (out_dir / "adapter_peft" / "adapter_model.safetensors").is_file()


def test_sample_py_uses_the_trained_adapter_merged_or_not(finished, env):
    out_dir, _ = finished
    args = ["sample.py", "--adapter", str(out_dir), "--temperature", "0", "--num-samples", "1", "--max-new-tokens",
            "12", "--prompt", "This movie"]
    plain = run(args, env).stdout
    merged = run(args + ["--merged"], env).stdout
    assert plain.split("--- sample 1")[1] == merged.split("--- sample 1")[1]
    assert "adapter" in plain.splitlines()[0]


def test_sigkill_then_resume_ends_with_the_same_adapter_as_an_uninterrupted_run(finished, env, tmp_path):
    straight_dir, _ = finished
    out_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "train.py", *SMALL, "--out-dir", str(out_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out_dir / "checkpoint" / "state.pt"
    deadline = time.time() + 500
    try:
        while not state.exists():
            assert proc.poll() is None, "run ended before its first checkpoint"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    step = torch.load(state, weights_only=True)["step"]
    assert proc.returncode == -signal.SIGKILL and step < 8, "the kill must land mid-training"
    assert not (out_dir / "summary.json").exists()
    resumed = run(["train.py", "--resume", str(out_dir)], env)
    assert f"resumed from {out_dir / 'checkpoint'} at step" in resumed.stdout
    a, b = adapter(straight_dir), adapter(out_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_train_like_one_process_with_the_combined_batch(env, tmp_path):
    common = list(SMALL)
    i = common.index("--batch-size")
    one = common[:i] + ["--batch-size", "4"] + common[i + 2:]
    two = common[:i] + ["--batch-size", "2"] + common[i + 2:]
    run(["train.py", *one, "--out-dir", str(tmp_path / "one")], env)
    ddp = run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "train.py", *two, "--out-dir", str(tmp_path / "two")], env)
    assert "device cpu x2" in ddp.stdout
    assert ddp.stdout.count("step     8/8") == 1  # rank 0 logs, rank 1 does not
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=2e-5, rtol=1e-4)


def test_sample_py_takes_the_documented_flags(env):
    out = run(["sample.py", "--model", "bundled", "--prompt", "This movie was", "--num-samples", "3",
               "--max-new-tokens", "12", "--min-new-tokens", "10", "--temperature", "0.8", "--top-k", "50",
               "--top-p", "0.95", "--seed", "0", "--device", "cpu"], env).stdout
    samples = out.split("--- sample ")[1:]
    assert len(samples) == 3 and all(s.split("\n", 1)[1].startswith("This movie was") for s in samples)
    again = run(["sample.py", "--model", "bundled", "--num-samples", "3", "--max-new-tokens", "12", "--min-new-tokens",
                 "10", "--top-k", "50", "--top-p", "0.95", "--seed", "0"], env).stdout
    assert again.split("--- sample ")[1:] == samples  # same seed, same samples (defaults: the same prompt and T)


def test_export_merged_is_the_trained_policy_in_hf_layout(finished):
    from minidpo.lora import load_lora
    from minidpo.weights import load_gpt2
    out_dir, _ = finished
    policy = load_lora(load_gpt2(ROOT / "data" / "tiny-imdb-gpt2"), out_dir / "adapter")
    merged = load_gpt2(out_dir / "merged")
    base = load_gpt2(ROOT / "data" / "tiny-imdb-gpt2")
    ids = torch.tensor([[464, 3807, 373, 1049, 290]])
    with torch.no_grad():
        want, got, before = policy(ids), merged(ids), base(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert (want - before).abs().max() > 1e-3  # the adapter did move the model, so the check means something


def test_sft_stage_is_merged_into_the_reference_that_dpo_starts_from(env, tmp_path):
    from minidpo.weights import load_gpt2
    out_dir = tmp_path / "sft"
    run(["train.py", *SMALL, "--steps", "2", "--sft-steps", "3", "--sft-batch-size", "2", "--sft-block-size", "32",
         "--out-dir", str(out_dir)], env)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["reference_model"] == str(out_dir / "sft_model")
    assert json.loads((out_dir / "run.json").read_text())["policy_base"] == str(out_dir / "sft_model")
    sft, base = load_gpt2(out_dir / "sft_model"), load_gpt2(ROOT / "data" / "tiny-imdb-gpt2")
    assert not any(".lora_" in k for k in sft.state_dict())  # folded in: plain weights
    moved = [k for k, v in sft.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any("attn.c_attn.weight" in k for k in moved)
    assert all(any(t in k for t in ("c_attn", "c_proj", "c_fc")) for k in moved)  # only LoRA targets changed


def test_frontier_csv_has_one_row_per_beta_and_step_and_the_plot_or_how_to_get_it(tmp_path, capsys):
    import csv
    import importlib.util
    from train import write_frontier
    runs = [{"frontier": [{"beta": b, "step": s, "kl": s * b, "reward": 0.4 + s / 100} for s in (0, 5, 10)]}
            for b in (0.1, 1.0)]
    write_frontier(tmp_path, runs)
    with open(tmp_path / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(float(r["beta"]), int(r["step"])) for r in rows] == [(b, s) for b in (0.1, 1.0) for s in (0, 5, 10)]
    printed = capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is None:
        assert "pip install matplotlib" in printed and "plot_frontier" in printed
        assert not (tmp_path / "frontier.png").exists()
    else:
        assert (tmp_path / "frontier.png").stat().st_size > 0


def test_precomputed_reference_trains_the_same_adapter_as_the_live_one(finished, env, tmp_path):
    live_dir, _ = finished
    out_dir = tmp_path / "cached-ref"
    out = run(["train.py", *SMALL, "--out-dir", str(out_dir), "--precompute-ref"], env)
    assert "[reference] precomputing log-probs" in out.stdout
    a, b = adapter(live_dir), adapter(out_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
