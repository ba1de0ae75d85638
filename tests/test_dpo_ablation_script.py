import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_protocol_folder_without_frontier_csv_is_refused_before_any_arm_runs(tmp_path):
    out, protocol = tmp_path / "ablation", tmp_path / "tiny-fig2"
    protocol.mkdir()  # a protocol run still in progress: no frontier.csv at its top yet
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "dpo_ablation.py"), "--arms", "base", "--out",
                           str(out), "--protocol", str(protocol)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"--protocol {protocol}: no frontier.csv there" in done.stderr
    assert not out.exists()  # refused before the output folder or any train.py run


def write_arm(folder: Path, method: str, rewards: tuple[float, float], summary: dict) -> None:
    """A finished arm (or protocol run) over seeds 0-2: the reference at KL 0, then one checkpoint at KL 12."""
    folder.mkdir(parents=True)
    head = "method,setting,step,kl,reward,seed\n"
    rows = "".join(f"{method},beta=0.1,{step},{kl},{r + 0.001 * s},{s}\n" for s in range(3)
                   for step, kl, r in ((0, 0.0, rewards[0]), (80, 12.0, rewards[1])))
    (folder / "frontier.csv").write_text(head + rows)
    means = f"method,step,reward\n{method},0,{rewards[0]}\n{method},80,{rewards[1]}\n"
    (folder / "frontier_mean.csv").write_text(means)
    (folder / "summary.json").write_text(json.dumps({"finished": True, **summary}))


def test_the_sft_arm_is_set_against_rl_without_a_verdict_because_its_kl_is_from_another_model(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import dpo_ablation

    accuracy = {"implicit_reward_accuracy": {"dpo": {"beta=0.1": {"mean": 0.7, "se": 0.01, "seeds": 3}}}}
    write_arm(tmp_path / "ablation" / "base", "dpo", (0.4, 0.7), accuracy)
    sft = {"reward": {"mean": 0.47, "se": 0.01, "seeds": 3}, "kl_from_original": {"mean": 4.6, "se": 0.1, "seeds": 3}}
    write_arm(tmp_path / "ablation" / "sft", "dpo", (0.4, 0.9), {**accuracy, "sft_model": sft})
    protocol = tmp_path / "tiny-fig2"
    write_arm(protocol, "rlhf", (0.4, 0.5), {})
    with open(protocol / "frontier.csv", "a") as f:  # the protocol's RLOO beside its RLHF
        f.writelines(f"rloo,kl=0.05,{step},{kl},{r},{s}\n" for s in range(3) for step, kl, r in ((0, 0.0, 0.4),
                                                                                               (80, 12.0, 0.95)))
    rows = {r["arm"]: r for r in dpo_ablation.table(tmp_path / "ablation", protocol)}
    assert rows["base"]["vs rlhf@10"].endswith("(beats)") and rows["base"]["vs rloo@10"].endswith("(loses)")
    assert all(rows["sft"][f"vs {m}@{kl}"].endswith("(KL from another reference)") for m in ("rlhf", "rloo")
               for kl in (5, 10))
    assert rows["sft"]["vs base@10"] == "0.167 +- 0.000 (KL from another reference)"  # paired: 0.2 * 10 / 12
