"""DPO training steps under bf16 autocast and torch.compile on the CPU track the fp32 eager ones.

A random tiny GPT (minidpo.model.gpt.GPT) with a LoRA adapter (minidpo.model.lora.apply_lora) takes a few AdamW steps of
the DPO loss on one unique batch (two prompts, 4 and 3 completions, 9 pairs); the loss curves are compared.
"""

import copy
import os
import shutil

import pytest
import torch

from minidpo.methods.dpo import DPOConfig, dpo_step_loss, pair_logps, reference_forward, sequence_forward
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import apply_lora

V = 61


def tiny_policy(seed: int = 0, n_layer: int = 2) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=32, vocab_size=V, n_layer=n_layer, n_head=2, n_embd=32))
    apply_lora(model, rank=4, alpha=8.0)  # B = 0: the policy starts as the reference
    return model


def unique_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Prompts of 3 and 5 tokens with 4 and 3 completions; all pairs within a prompt; right-padded."""
    g = torch.Generator().manual_seed(seed)
    rows, chosen, rejected = [], [], []
    for p, lens in ((3, [6, 4, 8, 3]), (5, [5, 9, 4])):
        prompt, first = torch.randint(0, V, (p,), generator=g), len(rows)
        rows += [torch.cat([prompt, torch.randint(0, V, (n,), generator=g)]) for n in lens]
        pairs = [(first + i, first + j) for i in range(len(lens)) for j in range(i + 1, len(lens))]
        chosen += [a for a, _ in pairs]
        rejected += [b for _, b in pairs]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    attn, resp = torch.zeros_like(ids), torch.zeros_like(ids)
    for n, (r, p) in enumerate(zip(rows, [3] * 4 + [5] * 3)):
        ids[n, :len(r)], attn[n, :len(r)], resp[n, p:len(r)] = r, 1, 1
    return {"ids": ids, "attention_mask": attn, "response_mask": resp,
            "chosen_index": torch.tensor(chosen), "rejected_index": torch.tensor(rejected)}


def train(model: GPT, steps: int, logprobs: str, autocast: torch.autocast, lr: float = 0.05,
          cached_reference: dict[str, torch.Tensor] | None = None) -> list[float]:
    """Losses of `steps` AdamW steps on one batch. The reference is passed in explicitly, as train.py does: the
    adapter-disabled model every step, or log-probs cached before training."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch, cfg, losses = unique_batch(), DPOConfig(beta=0.5), []
    for _ in range(steps):
        with autocast:
            reference = cached_reference or reference_forward(model, batch, logprobs)
            policy = pair_logps(sequence_forward(model, batch, logprobs), batch)
            loss, _ = dpo_step_loss(policy, pair_logps(reference, batch), cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("logprobs", ["naive", "fused"])
def test_bf16_autocast_dpo_steps_track_fp32(logprobs):
    fp32 = train(tiny_policy(), 6, logprobs, torch.autocast("cpu", enabled=False))
    bf16 = train(tiny_policy(), 6, logprobs, torch.autocast("cpu", dtype=torch.bfloat16))
    # Step 0: the adapter is zero, so policy and reference run the same bf16 ops and D = 0 exactly in both.
    assert fp32[0] == pytest.approx(0.6931471805599453, abs=1e-6) and bf16[0] == pytest.approx(fp32[0], abs=1e-6)
    assert fp32[0] - fp32[-1] > 0.15  # the curve moves far more than the tolerance below
    # Tolerance: bf16 rounds to 8 significant bits (unit roundoff u = 2^-9 ~ 0.002). Policy and reference share the
    # base weights, inputs and most roundings, so the error left in D = policy - reference log-ratios is a few u
    # times |D| plus a few u per token of the small adapter's contribution; beta = 0.5 and |d loss / d(beta D)| < 1
    # pass it on undamped. Measured: at most 0.0018 over seeds 0-2, for both paths. 0.01 is 5x that margin and
    # still 15x smaller than the distance the loss moves, so a broken cast (or no training under autocast) fails.
    assert max(abs(a - b) for a, b in zip(fp32, bf16)) < 0.01, (fp32, bf16)


def have_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


# Inductor builds C++ kernels for the CPU. On a machine without a working C++ toolchain this test cannot run at
# all; MINIDPO_SKIP_COMPILE_TEST=1 skips it there (nothing else should need it).
@pytest.mark.skipif(not have_cpp_compiler() or os.environ.get("MINIDPO_SKIP_COMPILE_TEST") == "1",
                    reason="torch.compile (inductor) needs a C++ compiler on the CPU; or MINIDPO_SKIP_COMPILE_TEST=1")
@pytest.mark.slow  # inductor compiles for several seconds
def test_torch_compile_of_the_forward_matches_eager_for_three_steps():
    eager = tiny_policy(1, n_layer=1)
    compiled = copy.deepcopy(eager)
    # The transformer body (where the FLOPs are) compiled; the head's fused log-prob kernel stays eager. The
    # reference is cached (computed once, eagerly) so that inductor builds two graphs (training forward and
    # backward) and not a third for a no-grad forward: on 2 CPU cores the C++ builds are most of this test's time.
    reference = reference_forward(eager, unique_batch(), "fused")
    compiled.hidden_states = torch.compile(compiled.hidden_states, dynamic=False)
    off = torch.autocast("cpu", enabled=False)
    a = train(eager, 3, "fused", off, cached_reference=reference)
    b = train(compiled, 3, "fused", off, cached_reference=reference)
    assert a[0] - a[-1] > 0.05
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, (a, b)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4, msg=name)
