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
