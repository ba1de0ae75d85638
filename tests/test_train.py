"""train.py end to end on the tiny preset: outputs, sampling, SIGKILL + resume, and two-process data parallelism."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minidpo.formats.safetensors import load_file

pytestmark = pytest.mark.slow  # train.py and sample.py end to end, in subprocesses
ROOT = Path(__file__).resolve().parent.parent
# the paper's offline DPO (the tiny preset's own method), 2 prompts a step
SMALL = ["--preset", "tiny", "--method", "dpo", "--batch-prompts", "2", "--num-prompts", "12", "--heldout-prompts", "4",
         "--eval-prompts", "4", "--steps", "8", "--batch-size", "4", "--log-every", "2", "--checkpoint-every", "2",
         "--seed", "3", "--dtype", "fp32", "--label-smoothing", "0"]
# fp32 and the paper's loss: these tests compare adapters to 1e-5 (bf16 has tests/test_bf16.py); the tiny preset's
# cDPO gradient -beta ((1 - e) - sigmoid(beta D)) crosses zero, where Adam turns rounding into steps of 6e-5


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")  # no full IMDB or GPT-2 here: the run must use what the repo ships
    return {**os.environ, "MINIDPO_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def run(args: list[str], env: dict, timeout: int = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def fails(args: list[str], env: dict, timeout: int = 300) -> str:
    """Run a program that must refuse: exit code 1 and exactly one line on stderr, `error: ...`, no traceback."""
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, f"{args}: exit {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


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
    assert summary["model"] == "bundled" and summary["data"].endswith("imdb_sample.tar.gz")
    for key in ("reward",):
        assert 0 <= summary["reference"][key] <= 1 and 0 <= summary["policy"][key] <= 1
    assert summary["policy"]["kl_exact"] >= 0 and "kl_sampled" in summary["policy"]
    assert summary["train"]["steps"] == 8 and summary["train"]["tokens_per_s"] > 0
    assert summary["train"]["pairs_per_s"] > 0 and summary["finished"] is True
    assert 0 <= summary["train"]["reward_accuracy"] <= 1 and summary["train"]["final_loss"] > 0
    assert json.loads((out_dir / "config.json").read_text())["steps"] == 8
    log = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6, 8]
    for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "logratio/ref_minus_policy", "tokens_per_s", "pairs_per_s",
                 "ms_per_step"):
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


def test_two_cpu_processes_train_like_one_process_and_a_finished_torchrun_exits_cleanly_on_both_ranks(env, tmp_path):
    # --batching pairs: every micro-batch has the same number of pairs, so the mean of two ranks' means is the mean
    # over the combined batch (with whole prompts, prompts with more pairs would weigh differently)
    common = list(SMALL) + ["--batching", "pairs"]
    i = common.index("--batch-size")
    one = common[:i] + ["--batch-size", "4"] + common[i + 2:]
    two = common[:i] + ["--batch-size", "2"] + common[i + 2:]
    run(["train.py", *one, "--out-dir", str(tmp_path / "one")], env)
    def torchrun() -> subprocess.CompletedProcess:
        return run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                    "--master_port", str(free_port()), "train.py", *two, "--out-dir", str(tmp_path / "two")], env)
    ddp = torchrun()
    assert "device cpu x2" in ddp.stdout
    assert ddp.stdout.count("step     8/8") == 1  # rank 0 logs, rank 1 does not
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    for k in a:
        # 2e-4: two ranks sum gradients in another order than one process, and 8 Adam steps (which divide by the
        # gradient's own size) turn that last-bit difference into up to ~1e-4 on a few near-zero-gradient elements
        # of the 17.6M bundled model; a rank that saw other data would move every element by ~1e-2.
        torch.testing.assert_close(b[k], a[k], atol=2e-4, rtol=1e-3)
    # the same command again: the run is finished, and both ranks exit cleanly (run() checks torchrun's exit code)
    again = torchrun()
    assert again.stdout.count("already holds this run, finished") == 1 and "Traceback" not in again.stderr
    after = adapter(tmp_path / "two")
    assert after.keys() == b.keys() and all(torch.equal(after[k], b[k]) for k in b)


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
    from minidpo.model.lora import load_lora
    from minidpo.model.weights import load_gpt2
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
    from minidpo.model.weights import load_gpt2
    out_dir = tmp_path / "sft"
    run(["train.py", *SMALL, "--steps", "2", "--sft-steps", "3", "--sft-batch-size", "2", "--sft-block-size", "32",
         "--out-dir", str(out_dir)], env)
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["reference_model"] == "sft_model"
    assert json.loads((out_dir / "run.json").read_text())["policy_base"] == "sft_model"  # relative: folders move
    sft, base = load_gpt2(out_dir / "sft_model"), load_gpt2(ROOT / "data" / "tiny-imdb-gpt2")
    assert not any(".lora_" in k for k in sft.state_dict())  # folded in: plain weights
    moved = [k for k, v in sft.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert any("attn.c_attn.weight" in k for k in moved)
    assert all(any(t in k for t in ("c_attn", "c_proj", "c_fc")) for k in moved)  # only LoRA targets changed


def test_precomputed_reference_trains_the_same_adapter_as_the_live_one(finished, env, tmp_path):
    live_dir, _ = finished
    out_dir = tmp_path / "cached-ref"
    out = run(["train.py", *SMALL, "--out-dir", str(out_dir), "--precompute-ref"], env)
    assert "[reference] precomputing log-probs" in out.stdout
    a, b = adapter(live_dir), adapter(out_dir)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)


def test_a_new_run_into_a_folder_made_with_other_settings_is_refused_naming_them(finished, env):
    out_dir, _ = finished
    before = (out_dir / "summary.json").read_bytes()
    msg = fails(["train.py", *SMALL, "--out-dir", str(out_dir), "--beta", "0.3", "--lr", "1e-4"], env)
    assert "--beta" in msg and "--lr" in msg and "--resume" in msg and "--overwrite" in msg
    assert (out_dir / "summary.json").read_bytes() == before  # nothing of the earlier run was touched


def test_resuming_a_finished_run_leaves_its_outputs_as_they_were(finished, env):
    out_dir, _ = finished
    files = {p: p.read_bytes() for p in out_dir.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")}
    out = run(["train.py", "--resume", str(out_dir)], env)
    assert "finished" in out.stdout
    assert {p: p.read_bytes() for p in files} == files


@pytest.mark.parametrize("args,names", [
    (["--model", "/nonexistent/model"], "--model /nonexistent/model"),
    (["--data", "/nonexistent/imdb.tar.gz"], "--data /nonexistent/imdb.tar.gz"),
    (["--prompt-data", "/nonexistent/imdb"], "--prompt-data /nonexistent/imdb"),
    (["--gen-batch-size", "0"], "--gen-batch-size"),
    (["--lora-targets", "bogus"], "--lora-targets"),
    (["--lora-alpha", "0"], "--lora-alpha"),
    (["--grad-clip", "nan"], "--grad-clip"),
    (["--beta", "inf"], "--beta"),
    (["--device", "bogus"], "--device"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--heldout-prompts", "-2"], "--heldout-prompts"),
])
def test_bad_paths_and_values_are_one_line_before_any_work_or_write(args, names, env, tmp_path):
    msg = fails(["train.py", *SMALL, "--out-dir", str(tmp_path / "o"), *args], env)
    assert names in msg
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_prompt_data_gives_the_training_prefixes_while_held_out_prompts_and_reward_stay_the_datas(env, tmp_path):
    imdb = tmp_path / "aclImdb"  # every training review opens with "Zebra", which no review of the sample does
    for split, n in (("train", 8), ("test", 1)):
        for label, rating in (("pos", 9), ("neg", 2)):
            (imdb / split / label).mkdir(parents=True)
            for i in range(n):
                (imdb / split / label / f"{i}_{rating}.txt").write_text(f"Zebra {i} {label} was a film I saw once.")
    run(["train.py", *SMALL, "--steps", "2", "--prompt-data", str(imdb), "--out-dir", str(tmp_path / "o")], env)
    pairs = [json.loads(line) for line in (tmp_path / "o" / "pairs.jsonl").read_text().splitlines()[1:]]
    train_prompts = {p["prompt"] for p in pairs if p["split"] != "test"}
    heldout_prompts = {p["prompt"] for p in pairs if p["split"] == "test"}
    assert train_prompts and all(p.startswith("Zebra") for p in train_prompts)
    assert heldout_prompts and not any(p.startswith("Zebra") for p in heldout_prompts)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["prompt_data"] == str(imdb)


def test_an_output_folder_works_from_another_directory_and_after_being_moved(finished, env, tmp_path):
    out_dir, _ = finished
    moved = tmp_path / "elsewhere" / "tiny"
    moved.parent.mkdir()
    import shutil
    shutil.copytree(out_dir, moved)
    out = run([str(ROOT / "sample.py"), "--adapter", str(moved), "--temperature", "0", "--num-samples", "1",
               "--max-new-tokens", "6"], env, cwd=tmp_path)
    assert "--- sample 1" in out.stdout


def test_dpo_online_dpo_rloo_and_best_of_n_share_one_frontier(env, tmp_path):
    import csv
    out_dir = tmp_path / "cmp"
    small = [a for a in SMALL if a not in ("--method", "dpo")]  # --compare refuses --method beside it
    run(["train.py", *small, "--out-dir", str(out_dir), "--compare", "dpo,online-dpo,rloo,best-of-n",
         "--beta-sweep", "0.5", "--kl-coef-sweep", "0.1", "--rloo-steps", "2", "--rloo-prompts", "2", "--rloo-k", "2",
         "--best-of-n", "1,2"], env)
    with open(out_dir / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} == {"dpo", "online-dpo", "rloo", "best-of-n"}
    for method in ("dpo", "online-dpo", "rloo"):
        first = min((r for r in rows if r["method"] == method), key=lambda r: int(r["step"]))
        assert float(first["kl"]) == 0.0  # every line starts at the reference's own point
    bon = {r["setting"]: float(r["kl_bound"]) for r in rows if r["method"] == "best-of-n"}
    assert bon["N=1"] == 0.0 and abs(bon["N=2"] - (math.log(2) - 0.5)) < 1e-9
    assert all(r["kl"] == "" for r in rows if r["method"] == "best-of-n")  # a bound, never a measured kl
    summary = json.loads((out_dir / "summary.json").read_text())
    assert [r["method"] for r in summary["runs"]] == ["dpo", "online-dpo", "rloo", "best-of-n"]
    assert (out_dir / "rloo_kl_coef_0.1" / "run.json").is_file()
    online = [json.loads(s) for s in (out_dir / "online-dpo_beta_0.5" / "log.jsonl").read_text().splitlines()]
    assert len(online) == 4 and all(0 <= m["reward"] <= 1 and "rewards/accuracies" in m for m in online)


def test_plain_train_py_offline_uses_the_tiny_settings_for_the_bundled_model():
    from train import PRESETS, TrainConfig, with_tiny_defaults
    cfg = with_tiny_defaults(TrainConfig(steps=7), {"steps"})
    assert cfg.steps == 7  # what the user gave wins
    assert cfg.lr == PRESETS["tiny"]["lr"] and cfg.beta == PRESETS["tiny"]["beta"]
    assert cfg.out_dir == TrainConfig().out_dir and cfg.model == "auto"


# ----------------------------------------------------------------------------- --seeds, in process

# no --preset and no GPT-2 to be had (an unreachable release URL): --model auto falls back to the bundled model and
# its tiny defaults, as a plain `python train.py --seeds 0,1` does offline
SEEDS = ["--seeds", "0,1", "--method", "dpo", "--num-prompts", "12", "--heldout-prompts", "4", "--eval-prompts", "4",
         "--steps", "2", "--batch-prompts", "2", "--completions-per-prompt", "4", "--dtype", "fp32"]


def offline(mp: pytest.MonkeyPatch, cache: Path) -> None:
    mp.setenv("MINIDPO_CACHE", str(cache))
    mp.setenv("MINIDPO_GPT2_URL", "http://127.0.0.1:9")  # nothing listens there: the download fails at once


@pytest.fixture(scope="module")
def seeds_run(tmp_path_factory) -> tuple[Path, Path]:
    """(a `--seeds 0,1` run killed during seed 1 then resumed to its end, the cache it used). The kill is an injected
    stop: seed 1's training raises."""
    import train
    cache, out = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("seeds") / "run"
    start_run = train.start_run

    def killed_in_seed_1(ctx, method, setting, run_dir):
        if "seed_1" in run_dir.parts:
            raise KeyboardInterrupt
        return start_run(ctx, method, setting, run_dir)
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, cache)
        mp.setattr(train, "start_run", killed_in_seed_1)
        with pytest.raises(KeyboardInterrupt):
            train.main([*SEEDS, "--out-dir", str(out)])
        assert (out / "seed_0" / "summary.json").is_file() and not (out / "seed_1" / "summary.json").exists()
        mp.setattr(train, "start_run", start_run)
        train.main(["--resume", str(out)])
    return out, cache


def settings_of(folder: Path) -> dict:
    from minidpo.config import config_from_dict
    from train import TrainConfig, run_settings
    stored = config_from_dict(TrainConfig, json.loads((folder / "config.json").read_text()), str(folder))
    return {k: v for k, v in run_settings(stored).items() if k != "seed"}


def test_a_plain_seeds_run_offline_killed_in_seed_1_resumes_with_the_settings_every_seed_used(seeds_run):
    out, _ = seeds_run
    assert json.loads((out / "summary.json").read_text())["finished"] is True
    top = settings_of(out)
    assert top["lr"] == 5e-3 and top["data"] == "sample"  # the bundled model's tiny defaults, recorded once
    assert settings_of(out / "seed_0") == top == settings_of(out / "seed_1")


def test_a_seed_folder_made_with_other_settings_is_refused_with_the_whole_runs_ways_on(seeds_run, tmp_path):
    import train
    from minidpo.training.runs import RunConflict
    out = tmp_path / "run"
    shutil.copytree(seeds_run[0], out)
    config = json.loads((out / "seed_1" / "config.json").read_text())
    (out / "seed_1" / "config.json").write_text(json.dumps({**config, "beta": 0.3}))
    (out / "summary.json").unlink()
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, seeds_run[1])
        with pytest.raises(RunConflict) as e:
            train.main(["--resume", str(out)])
    assert f"{out / 'seed_1'} holds seed 1 made with --beta 0.3" in str(e.value)
    assert "--overwrite" in str(e.value) and "--resume" not in str(e.value)


def test_resuming_a_seed_folder_resumes_that_seed_and_the_top_then_means_the_two_seeds(seeds_run, tmp_path):
    import train
    out = tmp_path / "run"
    shutil.copytree(seeds_run[0], out)
    mean_before = (out / "frontier_mean.csv").read_text()
    (out / "seed_1" / "summary.json").unlink()
    (out / "summary.json").unlink()
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, seeds_run[1])
        train.main(["--resume", str(out / "seed_1")])
        assert not list((out / "seed_1").glob("seed_*"))  # no --seeds run nested inside the seed's folder
        seed_1 = json.loads((out / "seed_1" / "summary.json").read_text())
        assert seed_1["finished"] is True and "per_seed" not in seed_1 and seed_1["method"] == "dpo"
        train.main(["--resume", str(out)])
    assert (out / "frontier_mean.csv").read_text() == mean_before  # over seeds 0 and 1, each once
    assert json.loads((out / "summary.json").read_text())["seeds"] == [0, 1]


def test_a_finished_seeds_run_remakes_its_deleted_top_files_without_training(seeds_run, tmp_path):
    import train
    out = tmp_path / "run"
    shutil.copytree(seeds_run[0], out)
    before = {name: (out / name).read_text() for name in ("frontier.csv", "frontier_mean.csv")}
    summary = json.loads((out / "summary.json").read_text())
    for name in before:
        (out / name).unlink()

    def no_training(*a, **k):
        raise AssertionError("a finished seed was trained again")
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, seeds_run[1])
        mp.setattr(train, "start_run", no_training)
        train.main(["--resume", str(out)])
        assert {name: (out / name).read_text() for name in before} == before
        (out / "frontier.csv").unlink()
        train.main([*SEEDS, "--out-dir", str(out)])  # the same command again repairs too
    assert {name: (out / name).read_text() for name in before} == before
    assert json.loads((out / "summary.json").read_text())["mean"] == summary["mean"]


def test_one_seeds_policy_is_exported_by_resuming_its_folder_with_export_merged(seeds_run, tmp_path):
    """What the refusal of --seeds with --export-merged advises works: one seed's merged model."""
    import train
    out = tmp_path / "run"
    shutil.copytree(seeds_run[0], out)
    with pytest.MonkeyPatch.context() as mp:
        offline(mp, seeds_run[1])
        train.main(["--resume", str(out / "seed_0"), "--export-merged", str(tmp_path / "merged")])
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert not list((out / "seed_0").glob("seed_*"))
