"""Checkpoints: every byte checksummed, a damaged file named with the way out, settings recorded, kill-safe saves."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import minidpo.training.checkpoint as ckpt_mod
from minidpo.training.checkpoint import CheckpointCorrupt, Checkpointer
from minidpo.training.runs import RunConflict
from minidpo.training.trainer import LoopConfig, make_optimizer


def make_state(seed: int = 0):
    """Parameters, an optimizer that has taken a step (so it has state) and its scheduler."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    params = dict(model.named_parameters())
    optimizer, scheduler = make_optimizer(LoopConfig(steps=10, lr=0.1), list(params.values()))
    model(torch.randn(4, 3)).square().mean().backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return params, optimizer, scheduler


def snapshot(params) -> dict:
    return {k: v.detach().clone() for k, v in params.items()}


def saved(tmp_path, step: int = 4, settings: dict | None = None):
    params, optimizer, scheduler = make_state()
    Checkpointer(tmp_path, params, settings).save(step, optimizer, scheduler, extra={"loop_state": {"coef": 0.25}})
    return params


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_saved_checkpoint_restores_tensors_optimizer_and_extra(tmp_path):
    want = snapshot(saved(tmp_path))
    params, optimizer, scheduler = make_state(seed=7)
    step, extra = Checkpointer(tmp_path, params).load(optimizer, scheduler)
    assert step == 4 and extra == {"loop_state": {"coef": 0.25}}
    assert all(torch.equal(params[k].detach(), want[k]) for k in want)
    assert scheduler.last_epoch == 1 and len(optimizer.state) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer-4.pt", "state.pt", "trainable-4.safetensors"]


def test_a_flipped_byte_in_the_trainable_file_is_refused_naming_it_and_the_way_out(tmp_path):
    saved(tmp_path)
    target = tmp_path / "trainable-4.safetensors"
    flip(target, -3)  # inside the tensor data: the file still parses, only the checksum can tell
    params, optimizer, scheduler = make_state(seed=7)
    before = snapshot(params)
    with pytest.raises(CheckpointCorrupt) as e:
        Checkpointer(tmp_path, params).load(optimizer, scheduler)
    assert e.value.path == target and str(target) in str(e.value)
    assert f"delete {tmp_path}" in str(e.value) and "restore the file" in str(e.value)
    assert all(torch.equal(params[k].detach(), before[k]) for k in before)  # nothing was half-loaded


def test_a_flipped_byte_in_the_optimizer_file_is_refused(tmp_path):
    saved(tmp_path)
    flip(tmp_path / "optimizer-4.pt", 700)
    params, optimizer, scheduler = make_state()
    with pytest.raises(CheckpointCorrupt, match="optimizer-4.pt"):
        Checkpointer(tmp_path, params).load(optimizer, scheduler)


@pytest.mark.parametrize("keep", [0, 10, 200, 0.5])
def test_a_truncated_state_file_is_refused_naming_it(tmp_path, keep):
    saved(tmp_path)
    state = tmp_path / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[:int(keep * len(data)) if isinstance(keep, float) else keep])
    params, optimizer, scheduler = make_state()
    with pytest.raises(CheckpointCorrupt, match="state.pt is truncated or unreadable"):
        Checkpointer(tmp_path, params).load(optimizer, scheduler)


def test_a_missing_trainable_file_is_refused_naming_it(tmp_path):
    saved(tmp_path)
    (tmp_path / "trainable-4.safetensors").unlink()
    params, optimizer, scheduler = make_state()
    with pytest.raises(CheckpointCorrupt, match="trainable-4.safetensors is missing"):
        Checkpointer(tmp_path, params).load(optimizer, scheduler)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10 ** 9))
@example(where=103)  # renames the envelope's "trainable" key: once a KeyError, now damage
def test_no_flipped_byte_in_state_pt_loads_as_a_different_state(tmp_path_factory, where):
    """torch.load alone would load some flips as other numbers; the envelope's sha256 catches every one."""
    d = tmp_path_factory.mktemp("ck")
    saved(d)
    good = Checkpointer(d, {}).read_state()
    flip(d / "state.pt", where)
    try:
        got = Checkpointer(d, {}).read_state()
    except CheckpointCorrupt:
        return
    assert got["step"] == good["step"] and got["files"] == good["files"] and got["extra"] == good["extra"]
    assert torch.equal(got["rng"]["torch"], good["rng"]["torch"]) and got["scheduler"] == good["scheduler"]


def test_settings_are_recorded_and_a_checkpoint_of_other_settings_is_refused(tmp_path):
    saved(tmp_path, settings={"beta": 0.5, "lr": 0.005, "seed": 0})
    params, optimizer, scheduler = make_state()
    assert Checkpointer(tmp_path, params).stored_settings() == {"beta": 0.5, "lr": 0.005, "seed": 0}
    with pytest.raises(RunConflict) as e:
        Checkpointer(tmp_path, params, {"beta": 0.1, "lr": 0.005, "seed": 0}).load(optimizer, scheduler)
    assert "made with beta=0.5 (now beta=0.1)" in str(e.value) and "lr" not in str(e.value).split(";")[0]
    with pytest.raises(RunConflict) as e:  # nested settings name the setting inside, never a whole dict
        Checkpointer(tmp_path, params, {"beta": 0.5, "lr": 0.005, "seed": {"data": 1}}).load(optimizer, scheduler)
    assert "seed.data=null, seed=0 (now seed.data=1, seed=null)" in str(e.value)
    assert "{" not in str(e.value) and "\n" not in str(e.value)
    step, _ = Checkpointer(tmp_path, params, {"beta": 0.5, "lr": 0.005, "seed": 0}).load(optimizer, scheduler)
    assert step == 4


def test_a_save_killed_before_state_pt_leaves_the_previous_checkpoint_and_is_cleaned_up_later(tmp_path, monkeypatch):
    params, optimizer, scheduler = make_state()
    ck = Checkpointer(tmp_path, params)
    ck.save(4, optimizer, scheduler)
    at_4 = snapshot(params)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)

    def killed(path, data):
        raise KeyboardInterrupt  # dies at the commit point: the step-8 files are written, state.pt is not
    monkeypatch.setattr(ckpt_mod, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        ck.save(8, optimizer, scheduler)
    monkeypatch.undo()
    assert (tmp_path / "trainable-8.safetensors").exists()
    fresh, optimizer2, scheduler2 = make_state(seed=3)
    assert Checkpointer(tmp_path, fresh).load(optimizer2, scheduler2)[0] == 4
    assert all(torch.equal(fresh[k].detach(), at_4[k]) for k in at_4)
    (tmp_path / "state.pt.999999999.deadbeef.tmp").write_bytes(b"partial")  # a temp file of a killed writer
    ck.save(12, optimizer, scheduler)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer-12.pt", "state.pt", "trainable-12.safetensors"]


def test_a_tensor_of_another_shape_is_refused_before_anything_is_loaded(tmp_path):
    saved(tmp_path)
    model = torch.nn.Linear(3, 5)
    params = dict(model.named_parameters())
    optimizer, scheduler = make_optimizer(LoopConfig(steps=10, lr=0.1), list(params.values()))
    with pytest.raises(ValueError, match="tensor weight has shape"):
        Checkpointer(tmp_path, params).load(optimizer, scheduler)
