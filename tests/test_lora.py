"""Tests for minidpo/model/lora.py: the LoRA math, merging, disabling (the DPO reference), freezing, config checks,
save/load and its errors. The Hugging Face exports are tested in tests/test_export.py."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from conftest import tiny_gpt
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.config import ConfigError
from minidpo.formats.safetensors import save_file
from minidpo.model.gpt import GPT
from minidpo.model.lora import (
    GPT2_TARGETS,
    LoRAConfig,
    LoRAFileError,
    LoRALinear,
    adapters_are_zero,
    apply_lora,
    load_lora,
    lora_config_of,
    lora_disabled,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    read_lora_config,
    remove_lora,
    save_lora,
    unmerge_lora,
)

TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)
ALL_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tokens(seed: int = 1, B: int = 2, T: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY["vocab_size"], (B, T), generator=g)


def randomize_lora(model: nn.Module, seed: int = 2, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def lora_gpt(targets=("attn.c_attn",), rank: int = 4, seed: int = 0) -> tuple[GPT, GPT]:
    """(base copy, model with random non-zero adapters)."""
    base = tiny_gpt(seed)
    model = apply_lora(copy.deepcopy(base), rank=rank, alpha=8, targets=targets)
    randomize_lora(model)
    return base, model


# ---------------------------------------------------------------------------------------------- LoRALinear math

@settings(max_examples=30, deadline=None)
@given(in_f=st.integers(1, 24), out_f=st.integers(1, 24), rank=st.integers(1, 8),
       alpha=st.floats(0.5, 32.0), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_lora_linear_output_equals_naive_formula(in_f, out_f, rank, alpha, bias, seed):
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).double()
    layer = LoRALinear(base, rank, alpha)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, in_f, dtype=torch.float64)
    naive = x @ base.weight.T + (base.bias if bias else 0) + x @ layer.lora_A.T @ layer.lora_B.T * (alpha / rank)
    torch.testing.assert_close(layer(x), naive, rtol=1e-10, atol=1e-10)


@settings(max_examples=30, deadline=None)
@given(in_f=st.integers(1, 24), out_f=st.integers(1, 24), rank=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_merge_unmerge_round_trip_restores_weight_and_output(in_f, out_f, rank, seed):
    torch.manual_seed(seed)
    layer = LoRALinear(nn.Linear(in_f, out_f), rank, alpha=2.0 * rank)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    w0 = layer.base.weight.detach().clone()
    x = torch.randn(4, in_f)
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=0, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)


def test_lora_init_is_kaiming_uniform_A_and_zero_B():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 48), rank=16, alpha=32)
    assert layer.lora_A.shape == (16, 64) and layer.lora_B.shape == (48, 16)
    assert torch.equal(layer.lora_B, torch.zeros(48, 16))
    bound = 1 / 64 ** 0.5  # kaiming_uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.8 * bound


def test_lora_dropout_applies_to_the_adapter_branch_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=4, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)  # the same dropout mask, drawn by hand
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = layer.base(x) + dropped @ layer.lora_A.T @ layer.lora_B.T * layer.scaling  # base input undropped
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert not torch.equal(dropped, x)
    eval_expected = layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    torch.testing.assert_close(layer.eval()(x), eval_expected, rtol=1e-6, atol=1e-6)  # no dropout in eval mode


def test_weight_and_bias_properties_point_at_base():
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=4)
    assert layer.weight is layer.base.weight and layer.bias is layer.base.bias
    assert (layer.in_features, layer.out_features) == (8, 6)


BAD_SETTINGS = [(dict(rank=0), "rank"), (dict(rank=2.0), "rank"), (dict(alpha=0), "alpha"), (dict(alpha=-1), "alpha"),
                (dict(alpha=math.nan), "alpha"), (dict(alpha=math.inf), "alpha"), (dict(dropout=1.0), "dropout"),
                (dict(dropout=2), "dropout"), (dict(dropout=-0.1), "dropout")]


@pytest.mark.parametrize("kwargs,field", BAD_SETTINGS)
def test_lora_linear_rejects_bad_hyperparameters(kwargs, field):
    with pytest.raises(ConfigError) as e:
        LoRALinear(nn.Linear(4, 4), **{"rank": 2, "alpha": 4.0, **kwargs})
    assert e.value.field == field


@pytest.mark.parametrize("kwargs,field", BAD_SETTINGS + [(dict(targets=("bogus",)), "targets"),
                                                         (dict(targets=()), "targets"),
                                                         (dict(targets=("attn.c_attn", "_attn")), "targets"),
                                                         (dict(targets=("lm_head",)), "targets")])
def test_lora_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        LoRAConfig(**kwargs)
    assert e.value.field == field
    if field == "targets":  # the message lists what is valid
        assert all(t in str(e.value) for t in GPT2_TARGETS)


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 64), alpha=st.floats(1e-3, 1e3), dropout=st.floats(0.0, 0.99),
       targets=st.lists(st.sampled_from(GPT2_TARGETS), min_size=1, max_size=6))
def test_lora_config_accepts_every_valid_setting_and_normalizes_targets(rank, alpha, dropout, targets):
    cfg = LoRAConfig(rank, alpha, dropout, targets)
    assert cfg.targets == tuple(dict.fromkeys(targets))  # a tuple, each once, order kept
    assert LoRAConfig(rank, alpha, dropout, "mlp.c_fc").targets == ("mlp.c_fc",)
    assert LoRAConfig(targets=("transformer.h.0.attn.c_attn",)).targets == ("transformer.h.0.attn.c_attn",)
    with pytest.raises(AttributeError):
        cfg.rank = 3  # frozen


# ---------------------------------------------------------------------------------------------- on the GPT

def test_zero_B_gives_base_outputs_exactly():
    base = tiny_gpt()
    model = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets=ALL_TARGETS)
    idx = tokens()
    assert torch.equal(model(idx), base(idx))
    assert adapters_are_zero(model)


def test_nonzero_B_changes_outputs():
    base, model = lora_gpt()
    assert not adapters_are_zero(model)
    assert (model(tokens()) - base(tokens())).abs().max() > 1e-4


def test_apply_lora_names_base_weight_under_base():
    _, model = lora_gpt()
    keys = set(model.state_dict())
    assert "transformer.h.0.attn.c_attn.base.weight" in keys
    assert "transformer.h.0.attn.c_attn.lora_A" in keys and "transformer.h.1.attn.c_attn.lora_B" in keys
    assert "transformer.h.0.attn.c_attn.weight" not in keys


def test_merge_then_forward_equals_unmerged_forward():
    _, model = lora_gpt(targets=ALL_TARGETS)
    idx = tokens()
    y = model(idx)
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(model(idx), y, rtol=0, atol=1e-5)
    merge_lora(model)  # a second merge must not add the delta again
    torch.testing.assert_close(model(idx), y, rtol=0, atol=1e-5)


def test_unmerge_restores_base_weights():
    base, model = lora_gpt(targets=ALL_TARGETS)
    merge_lora(model)
    assert (model.transformer.h[0].attn.c_attn.base.weight - base.transformer.h[0].attn.c_attn.weight).abs().max() > 0
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.base.weight, base.get_submodule(name).weight, rtol=0, atol=1e-6)


def test_outputs_inside_lora_disabled_equal_base_and_adapter_returns_after():
    base, model = lora_gpt(targets=ALL_TARGETS)
    idx = tokens()
    y = model(idx)
    with lora_disabled(model):
        assert torch.equal(model(idx), base(idx))
    assert torch.equal(model(idx), y)


def test_lora_disabled_restores_flags_after_an_exception():
    _, model = lora_gpt()
    with pytest.raises(ZeroDivisionError):
        with lora_disabled(model):
            raise ZeroDivisionError
    assert not any(layer.disabled for layer in lora_layers(model).values())


def test_lora_disabled_refuses_a_merged_model():
    _, model = lora_gpt()
    merge_lora(model)
    with pytest.raises(RuntimeError, match="unmerge_lora"):
        with lora_disabled(model):
            pass


def test_lora_disabled_refuses_a_model_without_lora():
    with pytest.raises(ValueError, match="apply_lora"):
        with lora_disabled(tiny_gpt()):
            pass


@pytest.mark.parametrize("targets", [("attn.c_attn",), ALL_TARGETS])
def test_only_lora_parameters_require_grad_and_count_matches_formula(targets):
    _, model = lora_gpt(targets=targets, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    expected = sum(4 * (layer.in_features + layer.out_features) for layer in lora_layers(model).values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert sum(p.numel() for p in lora_parameters(model)) == expected
    assert len(lora_layers(model)) == TINY["n_layer"] * len(targets)


def test_backward_reaches_only_lora_parameters():
    _, model = lora_gpt()
    model(tokens()).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert all(p.grad.abs().sum() > 0 for p in lora_parameters(model))


def test_apply_lora_without_match_names_targets_and_available_modules():
    with pytest.raises(ValueError, match=r"attn\.c_proj.*mlp\.c_fc"):
        apply_lora(toy(nn.Linear(4, 4)), targets=("attn.c_proj",))


def toy(c_fc: nn.Module, parent: str = "mlp") -> nn.Module:
    """A model whose only candidate module is `<parent>.c_fc`, plus an embedding."""
    model = nn.Module()
    model.emb = nn.Embedding(4, 4)
    setattr(model, parent, nn.Module())
    getattr(model, parent).c_fc = c_fc
    return model


def test_apply_lora_matches_whole_name_components_only():
    with pytest.raises(ValueError, match="no module"):
        apply_lora(toy(nn.Linear(4, 4), parent="xmlp"), targets=("mlp.c_fc",))  # "xmlp.c_fc" is not "mlp.c_fc"
    assert list(lora_layers(apply_lora(toy(nn.Linear(4, 4)), targets=("mlp.c_fc",)))) == ["mlp.c_fc"]


def test_apply_lora_refuses_non_linear_and_tied_targets():
    with pytest.raises(TypeError, match="nn.Linear"):
        apply_lora(toy(nn.LayerNorm(4)), targets=("mlp.c_fc",))
    tied = toy(nn.Linear(4, 4, bias=False))
    tied.mlp.c_fc.weight = tied.emb.weight
    with pytest.raises(ValueError, match="tied"):
        apply_lora(tied, targets=("mlp.c_fc",))


def test_apply_lora_takes_a_config_or_its_fields_by_name_not_both():
    cfg = LoRAConfig(rank=3, alpha=6.0, targets=("attn.c_attn", "mlp.c_proj"))
    a, b = apply_lora(tiny_gpt(), cfg), apply_lora(tiny_gpt(), rank=3, alpha=6.0, targets=cfg.targets)
    assert lora_config_of(a) == lora_config_of(b) == cfg
    assert list(lora_layers(a)) == list(lora_layers(b)) and len(lora_layers(a)) == 2 * TINY["n_layer"]
    with pytest.raises(TypeError, match="not both"):
        apply_lora(tiny_gpt(), cfg, rank=2)
    with pytest.raises(ConfigError, match="targets"):
        apply_lora(tiny_gpt(), targets=("bogus",))


def test_apply_lora_refuses_a_model_that_already_has_lora():
    _, model = lora_gpt()
    with pytest.raises(RuntimeError, match="remove_lora"):
        apply_lora(model)


def test_remove_lora_with_merge_restores_plain_linears_with_the_adapter_folded_in():
    base, model = lora_gpt(targets=ALL_TARGETS)
    idx = tokens()
    y = model(idx)
    remove_lora(model, merge=True)
    assert not lora_layers(model)
    c_fc = model.transformer.h[1].mlp.c_fc
    assert type(c_fc) is type(base.transformer.h[1].mlp.c_fc)  # the plain projection model.py builds
    assert set(model.state_dict()) == set(base.state_dict())
    torch.testing.assert_close(model(idx), y, rtol=0, atol=1e-5)
    # the SFT-then-DPO path: a fresh adapter on top, disabled == the merged SFT model
    apply_lora(model, rank=2, alpha=4)
    with lora_disabled(model):
        reference = model(idx)
    assert torch.equal(model(idx), reference)
    torch.testing.assert_close(reference, y, rtol=0, atol=1e-5)


def test_remove_lora_without_merge_gives_back_the_base_model():
    base, model = lora_gpt()
    merge_lora(model)
    remove_lora(model, merge=False)
    torch.testing.assert_close(model(tokens()), base(tokens()), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- save / load

def test_save_load_round_trip_into_a_fresh_model(tmp_path):
    _, model = lora_gpt(targets=("attn.c_attn", "mlp.c_fc"), rank=3)
    save_lora(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (cfg["rank"], cfg["alpha"], cfg["targets"]) == (3, 8.0, ["attn.c_attn", "mlp.c_fc"])
    fresh = load_lora(tiny_gpt(), tmp_path / "adapter")
    for k, v in lora_state_dict(model).items():
        assert torch.equal(lora_state_dict(fresh)[k], v)
    assert torch.equal(fresh(tokens()), model(tokens()))


def test_load_lora_into_existing_adapters_overwrites_them(tmp_path):
    _, model = lora_gpt()
    save_lora(model, tmp_path)
    other = apply_lora(tiny_gpt(), rank=4, alpha=8)
    load_lora(other, tmp_path)
    assert torch.equal(other(tokens()), model(tokens()))


def test_load_lora_rejects_wrong_shapes_and_keys(tmp_path):
    _, model = lora_gpt(rank=4)
    save_lora(model, tmp_path)
    sd = lora_state_dict(model)
    key = "transformer.h.0.attn.c_attn.lora_A"
    save_file({**sd, key: torch.zeros(4, 31)}, tmp_path / "adapter.safetensors")
    with pytest.raises(LoRAFileError, match=r"adapter\.safetensors: key .*lora_A.*\(4, 31\)"):
        load_lora(tiny_gpt(), tmp_path)
    save_file({k: v for k, v in sd.items() if k != key}, tmp_path / "adapter.safetensors")
    with pytest.raises(LoRAFileError, match=r"adapter\.safetensors does not fit the model: missing keys"):
        load_lora(tiny_gpt(), tmp_path)


def test_load_lora_rejects_a_different_rank(tmp_path):
    _, model = lora_gpt(rank=4)
    save_lora(model, tmp_path)
    with pytest.raises(ValueError, match="rank=4"):
        load_lora(apply_lora(tiny_gpt(), rank=2, alpha=8), tmp_path)


def test_load_lora_without_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(tiny_gpt(), tmp_path)


def test_save_lora_leaves_no_temporary_files_and_overwrites_atomically(tmp_path):
    _, model = lora_gpt()
    save_lora(model, tmp_path)
    randomize_lora(model, seed=5)
    save_lora(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors", "adapter_config.json"]
    assert torch.equal(load_lora(tiny_gpt(), tmp_path)(tokens()), model(tokens()))


CORRUPT_CONFIGS = {
    "truncated": lambda text: text[:len(text) // 2],
    "not JSON": lambda text: "\x00\x01garbage",
    "a list": lambda text: "[1, 2]",
    "other format": lambda text: text.replace("minidpo-lora-v1", "peft"),
    "missing key": lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "alpha"}),
    "rank 0": lambda text: json.dumps({**json.loads(text), "rank": 0}),
    "alpha as text": lambda text: json.dumps({**json.loads(text), "alpha": "big"}),
    "bogus target": lambda text: json.dumps({**json.loads(text), "targets": ["bogus"]}),
    "targets not a list": lambda text: json.dumps({**json.loads(text), "targets": 3}),
}


@pytest.mark.parametrize("damage", CORRUPT_CONFIGS.values(), ids=CORRUPT_CONFIGS.keys())
def test_a_corrupt_adapter_config_raises_one_error_naming_the_file(tmp_path, damage):
    _, model = lora_gpt()
    save_lora(model, tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(damage(config.read_text()))
    for call in (lambda: read_lora_config(tmp_path), lambda: load_lora(tiny_gpt(), tmp_path)):
        with pytest.raises(LoRAFileError, match="adapter_config.json"):
            call()


@pytest.mark.parametrize("keep", [0, 5, 40, -8])
def test_a_truncated_adapter_file_raises_one_error_naming_the_file(tmp_path, keep):
    _, model = lora_gpt()
    save_lora(model, tmp_path)
    file = tmp_path / "adapter.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    fresh = tiny_gpt()
    with pytest.raises(LoRAFileError, match="adapter.safetensors"):
        load_lora(fresh, tmp_path)
    assert not lora_layers(fresh)  # the file is read before the model is touched


def test_load_lora_without_adapter_tensors_names_the_file(tmp_path):
    _, model = lora_gpt()
    save_lora(model, tmp_path)
    (tmp_path / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter.safetensors"):
        load_lora(tiny_gpt(), tmp_path)


def test_lora_errors_are_value_errors():
    assert issubclass(LoRAFileError, ValueError) and issubclass(ConfigError, ValueError)
