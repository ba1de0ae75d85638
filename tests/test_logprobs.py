"""Tests for minidpo/methods/logprobs.py (the plain path) and minidpo/methods/fused_logprobs.py (the kernels): fused
log-probs equal the naive log_softmax + gather, in value and gradient, including -inf logits."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minidpo.methods.fused_logprobs import IGNORE_INDEX, fused_token_logps, linear_token_logps
from minidpo.methods.logprobs import naive_token_logps, sequence_logps

# bf16 keeps 8 mantissa bits: a gradient entry stored in bf16 is within 2^-8 relative of the fp32 value, so we
# allow rtol 2^-7 (one rounding plus slack) and a small atol for entries near 0.
BF16_RTOL, BF16_ATOL = 2 ** -7, 1e-4
SETTINGS = settings(max_examples=30, deadline=None)


def naive_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    valid = targets != IGNORE_INDEX
    lp = logits.float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(valid, lp, 0.0)


def make(B=3, T=5, V=37, dtype=torch.float32, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, T, V, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, V, (B, T), generator=g)
    if ignore:
        targets[0, :2] = IGNORE_INDEX
    return logits, targets


@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_fused_token_logps_equals_naive_log_softmax_gather_fp32(chunk_rows):
    logits, targets = make()
    out = fused_token_logps(logits, targets, chunk_rows=chunk_rows)
    assert out.shape == targets.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, naive_logps(logits, targets), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_fused_token_logps_gradient_equals_naive_gradient_fp32(chunk_rows):
    logits, targets = make()
    w = torch.randn(targets.shape)
    (g_fused,) = torch.autograd.grad((fused_token_logps(logits, targets, chunk_rows) * w).sum(), logits)
    (g_naive,) = torch.autograd.grad((naive_logps(logits, targets) * w).sum(), logits)
    torch.testing.assert_close(g_fused, g_naive, atol=1e-5, rtol=0)


def test_fused_token_logps_bf16_matches_fp32_math_on_the_same_values():
    logits, targets = make(V=101, dtype=torch.bfloat16)
    out = fused_token_logps(logits, targets, chunk_rows=3)
    # the forward upcasts to fp32 before any arithmetic, so it is as exact as fp32 on the same bf16 inputs
    torch.testing.assert_close(out, naive_logps(logits, targets), atol=1e-5, rtol=0)
    (g,) = torch.autograd.grad(out.sum(), logits)
    ref = logits.detach().float().requires_grad_()
    (g_ref,) = torch.autograd.grad(naive_logps(ref, targets).sum(), ref)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(g.float(), g_ref, rtol=BF16_RTOL, atol=BF16_ATOL)


def test_ignored_targets_give_zero_logprob_and_no_gradient():
    logits, targets = make()
    out = fused_token_logps(logits, targets, chunk_rows=2)
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert torch.all(out[0, :2] == 0)
    assert torch.all(g[0, :2] == 0)
    assert torch.all(g[0, 2:].abs().sum(-1) > 0)


def test_fused_token_logps_passes_gradcheck_in_float64():
    logits, targets = make(B=2, T=3, V=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: fused_token_logps(x, targets, 2), (logits,))


def test_linear_token_logps_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (2, 3), generator=g)
    targets[1, 0] = IGNORE_INDEX
    assert torch.autograd.gradcheck(lambda h, w: linear_token_logps(h, w, targets, chunk_size=2),
                                    (hidden, weight))


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_token_logps_values_and_gradients_equal_unfused(chunk_size, weight_grad):
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    weight = torch.randn(41, 8, generator=g, requires_grad=weight_grad)
    targets = torch.randint(0, 41, (3, 5), generator=g)
    targets[2, 3] = IGNORE_INDEX
    w = torch.randn(3, 5, generator=g)
    fused = linear_token_logps(hidden, weight, targets, chunk_size=chunk_size)
    naive = naive_logps(hidden @ weight.t(), targets)
    torch.testing.assert_close(fused, naive, atol=1e-5, rtol=0)
    inputs = (hidden, weight) if weight_grad else (hidden,)
    g_fused = torch.autograd.grad((fused * w).sum(), inputs)
    g_naive = torch.autograd.grad((naive * w).sum(), inputs)
    for a, b in zip(g_fused, g_naive):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_linear_token_logps_leaves_a_frozen_weight_without_grad():
    hidden = torch.randn(2, 3, 4, requires_grad=True)
    weight = torch.randn(9, 4)
    linear_token_logps(hidden, weight, torch.randint(0, 9, (2, 3)), chunk_size=2).sum().backward()
    assert weight.grad is None and hidden.grad is not None


def test_linear_token_logps_bf16_matches_unfused_within_bf16_tolerance():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 16, generator=g).bfloat16().requires_grad_()
    weight = (0.3 * torch.randn(50, 16, generator=g)).bfloat16().requires_grad_()
    targets = torch.randint(0, 50, (2, 6), generator=g)
    fused = linear_token_logps(hidden, weight, targets, chunk_size=5)
    naive = naive_logps(hidden @ weight.t(), targets)
    # both use the same bf16 matmul per row; only the accumulation order inside it may differ
    torch.testing.assert_close(fused, naive, atol=2e-2, rtol=0)
    gf = torch.autograd.grad(fused.sum(), (hidden, weight))
    gn = torch.autograd.grad(naive.sum(), (hidden, weight))
    for a, b in zip(gf, gn):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_huge_and_tied_logits_give_finite_values_and_gradients(scale):
    V = 11
    logits = torch.zeros(2, 3, V)
    logits[0] = scale                                   # every logit tied at +-1e4
    logits[1, :, ::2] = scale                           # half tied at +-1e4, half at 0
    logits.requires_grad_()
    targets = torch.randint(0, V, (2, 3))
    out = fused_token_logps(logits, targets, chunk_rows=2)
    (g,) = torch.autograd.grad(out.sum(), logits)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    # fp32 numbers near 1e4 are 2^-10 ~ 1e-3 apart, so logsumexp ~ 1e4 is only known to that resolution
    torch.testing.assert_close(out[0], torch.full((3,), -math.log(V)), atol=1e-3, rtol=0)  # ties: uniform
    torch.testing.assert_close(out, naive_logps(logits, targets), atol=1e-3, rtol=0)

    hidden = torch.full((1, 2, 3), scale, requires_grad=True)
    weight = torch.randn(V, 3)
    lin = linear_token_logps(hidden, weight, targets[:1, :2], chunk_size=1)
    (gh,) = torch.autograd.grad(lin.sum(), hidden)
    assert torch.isfinite(lin).all() and torch.isfinite(gh).all()


logit_arrays = hnp.arrays(
    dtype="float32",
    shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12),
    elements=st.floats(-1e4, 1e4, width=32),
)


@SETTINGS
@given(logit_arrays, st.data())
def test_every_logprob_is_at_most_zero(arr, data):
    logits = torch.from_numpy(arr)
    targets = torch.tensor(data.draw(st.lists(st.integers(0, arr.shape[1] - 1), min_size=arr.shape[0],
                                              max_size=arr.shape[0])))
    out = fused_token_logps(logits, targets, chunk_rows=data.draw(st.integers(1, 5)))
    assert torch.isfinite(out).all()
    assert (out <= 0).all()


@SETTINGS
@given(hnp.arrays("float64", (4, 9), elements=st.floats(-50, 50)), hnp.arrays("float64", (4, 1),
                                                                           elements=st.floats(-1e3, 1e3)))
def test_adding_a_constant_to_a_row_changes_nothing(arr, shift):
    logits = torch.from_numpy(arr)
    targets = torch.tensor([0, 3, 8, 5])
    base = fused_token_logps(logits, targets, chunk_rows=3)
    shifted = fused_token_logps(logits + torch.from_numpy(shift), targets, chunk_rows=3)
    torch.testing.assert_close(shifted, base, atol=1e-9 * (1 + abs(shift).max()), rtol=0)


def test_forward_saves_the_given_logits_by_reference_and_only_small_tensors():
    logits, targets = make(B=2, T=4, V=300)
    out = fused_token_logps(logits, targets, chunk_rows=3)
    saved = out.grad_fn.saved_tensors
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr()  # the same storage, not a copy
    assert sum(t.numel() for t in saved if t is not big[0]) <= 4 * targets.numel()


def test_linear_token_logps_never_saves_a_vocab_sized_activation():
    hidden = torch.randn(4, 16, 8, requires_grad=True)
    weight = torch.randn(500, 8, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_token_logps(hidden, weight, torch.randint(0, 500, (4, 16)), chunk_size=8).sum().backward()
    assert sizes and max(sizes) <= weight.numel()  # [4, 16, 500] would be 32000 > 4000 elements


@pytest.mark.parametrize("bad", ["out_of_range", "negative", "float", "shape"])
def test_bad_targets_raise_a_clear_error(bad):
    logits, targets = make(ignore=False)
    targets = {"out_of_range": targets.masked_fill(targets == targets[0, 0], 37),
               "negative": targets.masked_fill(targets == targets[0, 0], -1),
               "float": targets.float(), "shape": targets[:, :-1]}[bad]
    with pytest.raises((ValueError, TypeError), match="targets"):
        fused_token_logps(logits, targets)
    with pytest.raises((ValueError, TypeError), match="targets"):
        linear_token_logps(torch.randn(3, 5, 4), torch.randn(37, 4), targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient_in_the_logits_own_storage(dtype):
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 5, 8, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, dtype=dtype)
    targets = torch.randint(0, 40, (2, 5), generator=g)
    targets[0, 1] = IGNORE_INDEX
    grads = []
    for inplace in (False, True):
        logits = hidden @ weight.t()  # an intermediate, as lm_head's output is
        seen = []
        logits.register_hook(seen.append)
        (fused_token_logps(logits, targets, inplace_backward=inplace) * torch.arange(10.).view(2, 5)).sum().backward()
        if inplace:
            assert seen[0].untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        grads.append(hidden.grad.clone())
        hidden.grad = None
    torch.testing.assert_close(grads[1], grads[0], atol=0, rtol=0)


def test_inplace_backward_refuses_logits_that_another_op_saved():
    logits = torch.randn(3, 11, requires_grad=True).clone()  # non-leaf
    other = (logits * logits).sum()  # mul saves logits for its own backward
    loss = fused_token_logps(logits, torch.tensor([1, 2, 3]), inplace_backward=True).sum() + other
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- the plain path, and -inf logits

def test_naive_token_logps_is_log_softmax_gather_with_zero_at_ignored_targets():
    logits, targets = make()
    torch.testing.assert_close(naive_token_logps(logits, targets), naive_logps(logits, targets), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequence_logps_equals_a_python_loop_and_the_fused_kernels(dtype):
    g = torch.Generator().manual_seed(11)
    B, T, V = 3, 7, 23
    logits = torch.randn(B, T, V, generator=g, dtype=dtype, requires_grad=True)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0]])
    out = sequence_logps(logits, ids, mask)
    assert out.dtype == dtype and out.shape == (B,)
    for b in range(B):  # position 0 predicts nothing, even when the mask marks it
        loop = sum(logits[b, t - 1].log_softmax(-1)[ids[b, t]].item() for t in range(1, T) if mask[b, t])
        assert out[b].item() == pytest.approx(loop, abs=1e-5)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE_INDEX)
    fused = fused_token_logps(logits[:, :-1], targets, chunk_rows=4).sum(-1)
    torch.testing.assert_close(fused, out, atol=1e-5, rtol=1e-6)
    w = torch.tensor([1.0, -2.0, 3.0], dtype=dtype)
    (g_naive,) = torch.autograd.grad((out * w).sum(), logits)
    (g_fused,) = torch.autograd.grad((fused * w).sum(), logits)
    torch.testing.assert_close(g_fused, g_naive, atol=1e-6, rtol=1e-6)


def minus_inf_logits(dtype=torch.float32):
    """Rows with -inf at the target, at a non-target, and at index 0 of an ignored row (whose safe target is 0)."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 9, generator=g).to(dtype)
    targets = torch.tensor([2, 4, IGNORE_INDEX, 5])
    logits[0, 2] = -math.inf  # the target's logit
    logits[1, 0] = logits[1, 7] = -math.inf
    logits[2, 0] = -math.inf
    logits[3, 1] = -math.inf
    return logits.requires_grad_(), targets


@pytest.mark.parametrize("chunk_rows", [1, 3, None])
@pytest.mark.parametrize("inplace", [False, True])
def test_minus_inf_logits_give_the_naive_gradients_not_nan(chunk_rows, inplace):
    leaf, targets = minus_inf_logits()
    w = torch.tensor([1.0, 2.0, 3.0, -1.0])
    naive = naive_token_logps(leaf, targets)
    (g_naive,) = torch.autograd.grad((naive * w)[1:].sum() + naive[0], leaf)  # d(-inf)/dx is finite
    logits = leaf * 1  # inplace_backward overwrites its input: give it an intermediate
    fused = fused_token_logps(logits, targets, chunk_rows=chunk_rows, inplace_backward=inplace)
    assert fused[0].item() == -math.inf and torch.isfinite(fused[1:]).all()
    torch.testing.assert_close(fused[1:], naive[1:], atol=1e-6, rtol=0)
    (g_fused,) = torch.autograd.grad((fused * w)[1:].sum() + fused[0], leaf)
    assert torch.isfinite(g_fused).all()
    torch.testing.assert_close(g_fused, g_naive, atol=1e-6, rtol=0)
    assert torch.all(g_fused[2] == 0)  # the ignored row


def test_minus_inf_logits_in_bf16_give_finite_gradients_close_to_fp32():
    leaf, targets = minus_inf_logits(torch.bfloat16)
    (g,) = torch.autograd.grad(fused_token_logps(leaf, targets, chunk_rows=2)[1:].sum(), leaf)
    ref = leaf.detach().float().requires_grad_()
    (g_ref,) = torch.autograd.grad(naive_token_logps(ref, targets)[1:].sum(), ref)
    assert torch.isfinite(g.float()).all()
    torch.testing.assert_close(g.float(), g_ref, rtol=BF16_RTOL, atol=BF16_ATOL)


def test_linear_token_logps_with_a_minus_inf_logit_matches_the_unfused_gradients():
    # hidden[:, 0] * weight[0, 0] overflows fp32 to -inf; every other row of weight has a 0 there, so only the
    # logit of token 0 is -inf: the target of row 0, and the safe target of the ignored row 1.
    hidden = torch.tensor([[1e30, 1.0], [1e30, -0.5], [0.0, 2.0]], requires_grad=True)
    weight = torch.tensor([[-1e10, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, -1.0]], requires_grad=True)
    targets = torch.tensor([0, IGNORE_INDEX, 2])
    assert (hidden @ weight.t())[:2, 0].eq(-math.inf).all()
    fused = linear_token_logps(hidden, weight, targets, chunk_size=2)
    naive = naive_logps(hidden @ weight.t(), targets)
    torch.testing.assert_close(fused, naive)
    gf = torch.autograd.grad(fused.sum(), (hidden, weight))
    gn = torch.autograd.grad(naive.sum(), (hidden, weight))
    for a, b in zip(gf, gn):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_linear_token_logps_under_autocast_matches_the_autocast_matmul():
    g = torch.Generator().manual_seed(13)
    hidden = torch.randn(2, 5, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()
    targets = torch.randint(0, 50, (2, 5), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = linear_token_logps(hidden, weight, targets, chunk_size=3)
        naive = naive_logps(hidden @ weight.t(), targets)  # the matmul in bf16, the log-softmax in fp32
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, naive, atol=2e-2, rtol=0)
    gf = torch.autograd.grad(fused.sum(), (hidden, weight))
    gn = torch.autograd.grad(naive.sum(), (hidden, weight))
    for a, b in zip(gf, gn):
        assert a.dtype == torch.float32  # the leaves' dtype, as for nn.Linear under autocast
        torch.testing.assert_close(a, b, atol=5e-2, rtol=2e-2)


def test_linear_token_logps_refuses_mixed_dtypes_outside_autocast():
    with pytest.raises(TypeError, match="same dtype"):
        linear_token_logps(torch.randn(2, 4).bfloat16(), torch.randn(9, 4), torch.tensor([1, 2]))
