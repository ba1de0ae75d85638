"""bf16 autocast on the CPU: every method runs end to end through evaluation under --dtype bf16 (on any x86 CPU; only
the speed needs AMX/AVX512-BF16), training under bf16 changes what the forward sees (no autocast region around a
loop freezing the weights), --dtype auto's choice and its reason open the run, frozen weights are cast once with
autocast's exact values, and the bf16 KV cache samples exactly what an fp32 one does."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import minidpo.experiment.resolve as resolve
import minidpo.model.gpt as model_module
from minidpo.methods.sft import SFTConfig, run_sft
from minidpo.model.cast_cache import Linear, autocast_weight, cache_weight_casts
from minidpo.model.generate import generate
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora
from minidpo.training.runtime import Runtime
from minidpo.training.trainer import LoopConfig, TrainRun

ROOT = Path(__file__).resolve().parent.parent
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
# every method (each at one setting) after a short SFT, the smallest sizes that still train and evaluate
COMPARE = ["--preset", "tiny", "--compare", "dpo,online-dpo,rloo,best-of-n", "--beta-sweep", "0.1",
           "--kl-coef-sweep", "0.02", "--best-of-n", "1,2", "--sft-steps", "2", "--num-prompts", "12",
           "--heldout-prompts", "4", "--eval-prompts", "4", "--steps", "3", "--rloo-steps", "3", "--rloo-prompts", "2",
           "--rloo-k", "2", "--batch-prompts", "2", "--completions-per-prompt", "2", "--lr", "0.02",
           "--rloo-lr", "0.02", "--log-every", "1", "--seed", "3", "--dtype", "bf16"]


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bf16") / "compare"
    env = {**os.environ, "MINIDPO_CACHE": str(tmp_path_factory.mktemp("cache")), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "train.py", *COMPARE, "--out-dir", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out, proc.stdout


def last_log(run_dir: Path) -> dict:
    return json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])


@pytest.mark.slow  # the compare_run fixture: train.py end to end in a subprocess
def test_every_method_runs_end_to_end_under_bf16_and_says_so_first(compare_run):
    out, stdout = compare_run
    assert stdout.splitlines()[0].startswith("minidpo: device cpu, bf16 autocast (--dtype bf16)")
    methods = {line.split(",")[0] for line in (out / "frontier.csv").read_text().splitlines()[1:]}
    assert methods == {"dpo", "online-dpo", "rloo", "best-of-n"}
    for run in ("dpo_beta_0.1", "online-dpo_beta_0.1", "rloo_kl_coef_0.02"):
        result = json.loads((out / run / "result.json").read_text())
        for side in ("reference", "policy"):
            assert 0 <= result[side]["reward"] <= 1
        assert math.isfinite(result["policy"]["kl_exact"]) and result["policy"]["kl_exact"] >= 0


@pytest.mark.slow  # the compare_run fixture: train.py end to end in a subprocess
def test_bf16_training_moves_the_policy_every_forward_sees(compare_run):
    """The adapter starts at B = 0, so policy == reference at step 0 exactly. Had an autocast region wrapped the
    loop, every forward would keep reading autocast's step-0 copy of the adapter and these would stay exactly 0."""
    out, _ = compare_run
    assert last_log(out / "dpo_beta_0.1")["rewards/chosen"] != 0.0
    for run in ("online-dpo_beta_0.1", "rloo_kl_coef_0.02"):
        assert last_log(out / run)["kl/sampled"] != 0.0, run
        assert json.loads((out / run / "result.json").read_text())["policy"]["kl_exact"] > 0, run


def test_sft_under_bf16_lowers_the_loss_of_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=32, block_size=16))
    stream = torch.arange(400) % 7  # a periodic stream: quickly learnable
    loop = LoopConfig(steps=12, lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_accum=1, grad_clip=1.0,
                      log_every=10 ** 9, checkpoint_every=0)
    x = stream[None, :16].long()
    amp = torch.autocast(**BF16)

    def loss() -> float:
        with torch.no_grad(), amp:
            return float(nn.functional.cross_entropy(model(x[:, :-1]).float().flatten(0, 1), x[0, 1:]))

    before = loss()
    run_sft(model, stream, SFTConfig(batch_size=4, block_size=15), TrainRun(loop), Runtime(autocast=amp))
    assert loss() < 0.5 * before


@pytest.mark.parametrize("flags, precision", [({"avx2", "amx_bf16", "avx512_bf16"}, "bf16 autocast"),
                                              ({"avx2", "avx512f"}, "fp32")])
def test_dtype_auto_on_cpu_picks_by_the_cpu_flags_and_the_first_line_says_why(monkeypatch, tmp_path, capsys, flags,
                                                                              precision):
    import train

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setenv("MINIDPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(resolve, "cpu_flags", lambda *a: set(flags))
    monkeypatch.setattr(train, "load_reviews", stop)  # the first line is printed just before the data is read
    with pytest.raises(Stop):
        train.main(["--preset", "tiny", "--device", "cpu", "--dtype", "auto", "--out-dir", str(tmp_path / "run")])
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"minidpo: device cpu, {precision} (auto: this CPU has ")
    assert ("has amx_bf16 and avx512_bf16" in first) == (precision != "fp32")
    assert ("has neither" in first) == (precision == "fp32")


# ----------------------------------------------------------------------------- frozen weights cast once

def test_a_frozen_weight_is_cast_once_with_autocasts_values_and_recast_after_a_write():
    w = torch.randn(48, 32)
    with torch.autocast(**BF16):
        a = autocast_weight(w)
        assert a.dtype == torch.bfloat16 and torch.equal(a, w.to(torch.bfloat16))
        assert autocast_weight(w) is a  # reused
        with torch.no_grad():
            w.mul_(2)  # an in-place write (optimizer step, LoRA merge, load_state_dict) bumps the version
        b = autocast_weight(w)
        assert b is not a and torch.equal(b, w.to(torch.bfloat16))
        trained = torch.randn(4, 4, requires_grad=True)
        assert autocast_weight(trained) is trained  # autocast's own per-region cache handles trained weights
    assert autocast_weight(w) is w  # outside autocast: the fp32 weight itself


def test_linear_under_autocast_equals_nn_linear_bit_for_bit_in_value_and_gradient():
    torch.manual_seed(0)
    ours, plain = Linear(32, 24), nn.Linear(32, 24)
    plain.load_state_dict(ours.state_dict())
    ours.weight.requires_grad_(False)
    plain.weight.requires_grad_(False)
    x1, x2 = (torch.randn(5, 32).requires_grad_() for _ in range(2))
    with torch.no_grad():
        x2.copy_(x1)
    with torch.autocast(**BF16):
        y1, y2 = ours(x1), plain(x2)
    assert torch.equal(y1, y2)
    (y1.float() ** 2).sum().backward()
    (y2.float() ** 2).sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(ours.bias.grad, plain.bias.grad)


def test_the_model_file_builds_plain_layers_and_the_cast_cache_is_opt_in():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))
    kinds = {type(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    assert kinds == {nn.Linear, nn.Embedding}
    keys = list(model.state_dict())
    assert cache_weight_casts(model) is model
    assert {type(m) for m in model.modules() if isinstance(m, nn.Linear)} == {Linear}
    assert list(model.state_dict()) == keys and model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("lora_first", [False, True])
def test_cached_layers_give_plain_layers_bits_in_loss_and_adapter_gradient_with_lora(lora_first):
    """Plain and cached models, LoRA applied before or after the swap: same logits and same adapter gradients under
    bf16 autocast, bit for bit; the base stays frozen and each LoRA layer wraps the swapped base."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, block_size=16)
    plain = GPT(config)
    cached = GPT(config)
    cached.load_state_dict(plain.state_dict())
    targets = ("attn.c_attn", "mlp.c_fc")
    for model in (plain, cached):
        for p in model.parameters():
            p.requires_grad_(False)
        if model is cached and not lora_first:
            cache_weight_casts(model)
        torch.manual_seed(1)  # the same adapter init on both
        apply_lora(model, rank=2, alpha=4.0, targets=targets)
        if model is cached and lora_first:
            cache_weight_casts(model)
    assert type(cached.transformer.h[0].attn.c_attn.base) is Linear
    assert type(plain.transformer.h[0].attn.c_attn.base) is nn.Linear
    idx = torch.randint(0, 64, (2, 8))
    for model in (plain, cached):
        with torch.no_grad():
            model.transformer.h[0].mlp.c_fc.lora_B.fill_(0.1)  # a trained adapter, so its gradient reaches lora_A too
    grads = []
    for model in (plain, cached):
        for _ in range(2):  # the second pass reads the cached casts
            model.zero_grad(set_to_none=True)
            with torch.autocast(**BF16):
                logits = model(idx)
            logits.float().square().mean().backward()
        grads.append((logits, [p.grad for p in model.parameters() if p.requires_grad]))
    (a, ga), (b, gb) = grads
    assert torch.equal(a, b) and len(ga) == len(gb) == 8
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_a_lora_forward_sees_the_updated_adapter_and_an_unchanged_frozen_base_under_bf16():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=1, n_head=2, n_embd=16, block_size=16))
    apply_lora(model, rank=2, alpha=4.0, targets=("attn.c_attn",))
    idx = torch.randint(0, 64, (2, 8))
    with torch.autocast(**BF16):
        before = model(idx)
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.lora_B.fill_(0.5)  # what an optimizer step does
    with torch.autocast(**BF16):
        after = model(idx)
    assert not torch.equal(before, after)


def test_bf16_kv_cache_samples_exactly_what_an_fp32_cache_does_under_autocast(monkeypatch):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=16, block_size=32)).eval()
    idx = torch.randint(0, 64, (3, 4))

    def sample() -> tuple[torch.Tensor, torch.dtype]:
        with torch.autocast(**BF16):
            out = generate(model, idx, 12, temperature=1.0, generator=torch.Generator().manual_seed(1), eos_id=None)
            model.setup_cache(1, 4)
            dtype = model.transformer.h[0].attn.kv_cache.k.dtype
            model.clear_cache()
        return out, dtype

    bf16_out, bf16_cache = sample()

    class FP32Cache(model_module.KVCache):
        def __init__(self, batch_size, max_seq_len, n_head, head_size, dtype, device):
            super().__init__(batch_size, max_seq_len, n_head, head_size, torch.float32, device)

    monkeypatch.setattr(model_module, "KVCache", FP32Cache)  # keys and values kept in fp32 under autocast
    fp32_out, fp32_cache = sample()
    assert (bf16_cache, fp32_cache) == (torch.bfloat16, torch.float32)
    assert torch.equal(bf16_out, fp32_out)
