"""Rank handling: single-process no-ops, and two gloo processes averaging gradients and building stages in turn."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minidpo.training.distributed import (
    average_gradients,
    barrier,
    is_main,
    rank_and_world,
    rank_zero_first,
    setup_distributed,
    teardown,
)

ROOT = Path(__file__).resolve().parent.parent


def test_without_torchrun_everything_is_the_single_process_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert setup_distributed() == (0, 1, None) and not dist.is_initialized()
    assert is_main() and rank_and_world() == (0, 1)
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    loss = torch.tensor(0.5)
    assert average_gradients([p], [loss])[0] is loss and torch.equal(p.grad, torch.full((3,), 2.0))
    with rank_zero_first():
        built = 7
    assert built == 7
    barrier()
    teardown()


def test_a_non_integer_world_size_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(RuntimeError, match="WORLD_SIZE='two'"):
        setup_distributed()


# Each rank runs this as its own process; it imports minidpo.training.distributed without the package's __init__ (which
# loads the whole library): torch alone is enough, and the test stays quick.
WORKER = textwrap.dedent("""
    import json, os, sys, time, types
    pkg = types.ModuleType("minidpo")
    pkg.__path__ = [os.path.join(sys.argv[1], "minidpo")]
    sys.modules["minidpo"] = pkg
    import torch
    from minidpo.training.distributed import average_gradients, is_main, rank_zero_first, setup_distributed, teardown
    rank = int(os.environ["RANK"])
    rank_, world, device = setup_distributed(device="cpu")
    result = {"setup": [rank_, world, device], "main": is_main()}
    p = torch.nn.Parameter(torch.zeros(2, 3))
    q = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((2, 3), float(rank + 1))
    q.grad = torch.full((4,), 4.0) if rank == 0 else None  # no gradient on rank 1: counts as zeros
    loss, metric = average_gradients([p, q], [torch.tensor(float(rank)), torch.tensor(10.0 * rank)])
    result["grads"] = [p.grad.tolist(), q.grad.tolist()]
    result["extras"] = [loss.item(), metric.item()]
    order = []
    with rank_zero_first():
        order.append(time.monotonic())
        result["built"] = f"built by {rank}"
    result["build_time"] = order[0]

    def fails_on_rank_0():
        if rank == 0:
            raise OSError("disk full")
        return "should not be reached"
    try:
        with rank_zero_first():
            fails_on_rank_0()
    except BaseException as e:
        result["failure"] = f"{type(e).__name__}: {e}"
    teardown()
    with open(os.path.join(sys.argv[2], f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a subprocess
def test_two_gloo_processes_average_gradients_and_extras_and_share_a_failure_of_rank_0(tmp_path):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(ROOT), str(tmp_path)],
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                                   "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
             for r in (0, 1)]
    try:
        for p in procs:  # a hang (a rank waiting for one that failed) fails here instead of forever
            assert p.wait(timeout=240) == 0
    finally:
        for p in procs:
            p.kill()
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["setup"] == [0, 2, "cpu"] and r1["setup"] == [1, 2, "cpu"] and r0["main"] and not r1["main"]
    for r in (r0, r1):
        assert r["grads"] == [[[1.5] * 3] * 2, [2.0] * 4]  # the mean over ranks, a missing gradient as zero
        assert r["extras"] == [0.5, 5.0]
    assert r0["built"] == "built by 0" and r1["built"] == "built by 1" and r0["build_time"] <= r1["build_time"]
    assert r0["failure"] == "OSError: disk full"
    assert r1["failure"].startswith("RuntimeError: rank 0 failed") and "disk full" in r1["failure"]


# Each rank enters the run folder as train.py's main does, then does a collective (as training would), so a rank
# that went on alone would hang there and the test's timeout would catch it.
FOLDER_WORKER = textwrap.dedent("""
    import json, os, sys, types
    pkg = types.ModuleType("minidpo")
    pkg.__path__ = [os.path.join(sys.argv[1], "minidpo")]
    sys.modules["minidpo"] = pkg
    from minidpo.training.distributed import barrier, setup_distributed, teardown
    from minidpo.training.run_folder import run_folder
    from minidpo.training.runs import RunConflict
    rank, world, _ = setup_distributed(device="cpu")
    out, settings = sys.argv[2], json.loads(sys.argv[3])
    result = {}
    try:
        with run_folder(out, settings, resume=False, overwrite=False,
                        record=lambda o: open(os.path.join(o, "config.json"), "w").write(json.dumps(settings))) as f:
            result["finished"] = f.finished
            if not f.finished:
                barrier()  # the run's work: every rank takes part
                open(os.path.join(out, "summary.json"), "w").write("{}") if rank == 0 else None
    except RunConflict as e:
        result["refused"] = str(e)
    barrier()
    teardown()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
        json.dump(result, fh)
""")


def two_ranks_enter(out: Path, settings: dict) -> list[dict]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", FOLDER_WORKER, str(ROOT), str(out), json.dumps(settings)],
                              env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
                                   "WORLD_SIZE": "2", "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": "2"})
             for r in (0, 1)]
    try:
        for p in procs:  # a rank left waiting for the other fails here instead of hanging
            assert p.wait(timeout=240) == 0
    finally:
        for p in procs:
            p.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow  # subprocesses
def test_every_rank_enters_the_run_folder_alike_new_finished_or_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    assert two_ranks_enter(out, {"beta": 0.1}) == [{"finished": False}] * 2
    assert json.loads((out / "summary.json").read_text()) == {"finished": True}  # marked by rank 0 on exit
    assert two_ranks_enter(out, {"beta": 0.1}) == [{"finished": True}] * 2        # both ranks stop, cleanly
    refused = two_ranks_enter(out, {"beta": 0.5})
    assert all("beta" in r["refused"] for r in refused) and refused[0] == refused[1]
