"""minidpo.model.export: save_hf writes what transformers' GPT2LMHeadModel loads (checked against transformers' own file
of the same weights, and by reading it back with load_gpt2); export_peft writes PEFT's adapter layout."""

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt
from hypothesis import given, settings
from hypothesis import strategies as st

from minidpo.formats.safetensors import load_file, read_header
from minidpo.model.export import export_peft, save_hf
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora, lora_parameters, remove_lora
from minidpo.model.weights import load_gpt2

FIXTURES = Path(__file__).parent / "fixtures"
OPENAI = FIXTURES / "gpt2-tiny-openai"
ST = FIXTURES / "gpt2-tiny-safetensors"  # transformers' save_pretrained of the same weights
TINY = dict(n_layer=2, n_head=2, n_embd=32, vocab_size=64, block_size=32)


def with_random_adapter(model: GPT, rank: int = 4, targets=("attn.c_attn",)) -> GPT:
    apply_lora(model, rank=rank, alpha=8, targets=targets)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def tokens(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- save_hf

@settings(max_examples=6, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(1, 8), (2, 16), (4, 16)]), st.integers(5, 40), st.integers(0, 1000))
def test_save_hf_then_load_gpt2_gives_identical_weights_and_logits(tmp_path_factory, n_layer, heads_embd, vocab,
                                                                    seed):
    torch.manual_seed(seed)
    n_head, n_embd = heads_embd
    model = GPT(GPTConfig(block_size=8, vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd)).eval()
    out = save_hf(model, tmp_path_factory.mktemp("hf"))
    back = load_gpt2(out)
    assert back.config == model.config
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(back(tokens(vocab)), model(tokens(vocab)))


def test_save_hf_writes_conv1d_layout_without_lm_head_and_a_gpt2_config(tmp_path):
    model = load_gpt2(OPENAI)
    save_hf(model, tmp_path)
    header, _ = read_header(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in header and header["__metadata__"]["format"] == "pt"
    assert header["transformer.h.0.attn.c_attn.weight"]["shape"] == [32, 96]  # Conv1D [in, out]
    assert header["transformer.h.1.mlp.c_proj.weight"]["shape"] == [128, 32]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert (config["n_layer"], config["n_head"], config["n_embd"], config["n_positions"], config["vocab_size"]) == \
        (2, 2, 32, 64, 512)
    assert config["eos_token_id"] is None  # a 512-token vocabulary has no <|endoftext|> at 50256
    saved = load_file(tmp_path / "model.safetensors")
    ref = load_file(ST / "model.safetensors")
    assert saved.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(saved[k], ref[k], rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left


def test_save_hf_casts_to_the_requested_dtype_and_records_it(tmp_path):
    save_hf(load_gpt2(OPENAI), tmp_path, dtype=torch.float16)
    assert read_header(tmp_path / "model.safetensors")[0]["transformer.wte.weight"]["dtype"] == "F16"
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float16"
    assert all(p.dtype == torch.float16 for p in load_gpt2(tmp_path, dtype=torch.float16).parameters())


def test_save_hf_refuses_a_model_that_still_has_lora_layers(tmp_path):
    model = with_random_adapter(tiny_gpt())
    idx = tokens(TINY["vocab_size"])
    with torch.no_grad():
        expected = model(idx)
    with pytest.raises(ValueError, match=r"remove_lora\(model, merge=True\)"):
        save_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing half-written
    remove_lora(model, merge=True)
    back = load_gpt2(save_hf(model, tmp_path / "y"))
    with torch.no_grad():  # the merged export computes what the adapted model computed
        torch.testing.assert_close(back(idx), expected, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- export_peft

def test_export_peft_writes_peft_key_names_shapes_and_config(tmp_path):
    model = with_random_adapter(tiny_gpt(), rank=4)
    export_peft(model, tmp_path, base_model_name_or_path="gpt2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    C = TINY["n_embd"]
    expected = {f"base_model.model.transformer.h.{i}.attn.c_attn.lora_{ab}.weight": shape
                for i in range(TINY["n_layer"]) for ab, shape in (("A", (4, C)), ("B", (3 * C, 4)))}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected
    assert torch.equal(tensors["base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"],
                       model.transformer.h[1].attn.c_attn.lora_B)
    assert torch.equal(tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"],
                       model.transformer.h[0].attn.c_attn.lora_A)
    assert read_header(tmp_path / "adapter_model.safetensors")[0]["__metadata__"] == {"format": "pt"}
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["fan_in_fan_out"] is True
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["base_model_name_or_path"]) == (4, 8.0, 0.0, "gpt2")
    assert cfg["target_modules"] == [f"transformer.h.{i}.attn.c_attn" for i in range(TINY["n_layer"])]


def test_export_peft_covers_every_target_and_leaves_the_model_unchanged(tmp_path):
    targets = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    model = with_random_adapter(tiny_gpt(), rank=2, targets=targets)
    before = copy.deepcopy(model.state_dict())
    export_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(cfg["target_modules"]) == TINY["n_layer"] * len(targets)
    assert len(load_file(tmp_path / "adapter_model.safetensors")) == 2 * len(cfg["target_modules"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_export_peft_refuses_a_model_without_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="apply_lora"):
        export_peft(tiny_gpt(), tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
