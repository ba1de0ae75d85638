"""
The DPO family of preference losses, and the policy forward pass they need.

With D = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) (w = chosen, l = rejected):
- sigmoid: -log sigmoid(beta D). Direct Preference Optimization, Rafailov et al. 2023, eq. 7
  (arXiv:2305.18290). With label smoothing e > 0 it is conservative DPO (cDPO, E. Mitchell 2023, "A note on DPO
  with noisy preferences & relationship to IPO"): the preference label is assumed flipped with probability e,
  -(1-e) log sigmoid(beta D) - e log sigmoid(-beta D).
- robust: (-(1-e) log sigmoid(beta D) + e log sigmoid(-beta D)) / (1 - 2e), the unbiased loss under label flips
  of rate e of Chowdhury et al. 2024, "Provably Robust DPO" (arXiv:2403.00409), eq. 7.
- ipo: (D - 1/(2 beta))^2, Identity Preference Optimisation, Azar et al. 2023, "A General Theoretical Paradigm to
  Understand Learning from Human Preferences" (arXiv:2310.12036), eq. 17. Its authors use length-averaged
  log-probs, so pass the `*_logps_mean` of `concatenated_forward` for it.
- hinge: relu(1 - beta D), the SLiC calibration loss, Zhao et al. 2023 (arXiv:2305.10425), with 1/beta as margin.
Reference-free (reference log-probs None) sets the reference terms to 0.

The loss names, defaults and metric names follow Hugging Face TRL's DPOTrainer so numbers compare one to one.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minidpo.logprobs import IGNORE_INDEX, linear_token_logprobs, sequence_logprobs, token_logprobs
from minidpo.lora import lora_disabled

LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
BATCH_KEYS = ("chosen_ids", "chosen_attention_mask", "chosen_response_mask",
              "rejected_ids", "rejected_attention_mask", "rejected_response_mask")


def _check_loss_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not (beta > 0 and beta < float("inf")):
        raise ValueError(f"dpo_loss: beta must be a finite number > 0, got {beta}")
    e = label_smoothing
    if loss_type == "sigmoid" and not 0.0 <= e <= 1.0:
        raise ValueError(f"dpo_loss: label_smoothing for 'sigmoid' must be in [0, 1], got {e}")
    if loss_type == "robust" and not 0.0 <= e < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing for 'robust' must be in [0, 0.5), got {e}")
    if loss_type in ("ipo", "hinge") and e != 0.0:
        raise ValueError(f"dpo_loss: label_smoothing is only used by 'sigmoid' and 'robust'; it must be 0 for "
                         f"{loss_type!r}, got {e}")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             reference_chosen_logps: Tensor | None, reference_rejected_logps: Tensor | None,
             beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair losses (B,) and the implicit rewards beta * (policy - reference) of chosen and rejected (B,).

    Naive equivalent for 'sigmoid' with e = 0: -log(sigmoid(beta * ((pc - rc) - (pr - rr)))). See the module
    docstring for the other losses. Rewards are detached: they are for logging, not for gradients.
    """
    _check_loss_args(beta, loss_type, label_smoothing)
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("dpo_loss: pass both reference log-probs, or neither (reference-free)")
    shapes = {tuple(t.shape) for t in (policy_chosen_logps, policy_rejected_logps,
                                       reference_chosen_logps, reference_rejected_logps) if t is not None}
    if len(shapes) != 1:
        raise ValueError(f"dpo_loss: all log-probs must have the same shape (B,), got {sorted(shapes)}")
    if reference_chosen_logps is None:
        reference_chosen_logps = reference_rejected_logps = torch.zeros_like(policy_chosen_logps)

    chosen_logratios = policy_chosen_logps - reference_chosen_logps        # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    D = chosen_logratios - rejected_logratios                              # (B,)
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * D) - e * F.logsigmoid(-beta * D)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * D) + e * F.logsigmoid(-beta * D)) / (1 - 2 * e)
    elif loss_type == "ipo":
        losses = (D - 1 / (2 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1 - beta * D)
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    return losses, chosen_rewards, rejected_rewards


@torch.no_grad()
def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor,
                       policy_chosen_logps: Tensor, policy_rejected_logps: Tensor) -> dict[str, Tensor]:
    """Batch means under TRL's names, as detached 0-dim tensors on the inputs' device.

    Tensors, not floats, so a training loop can accumulate them on the GPU and call .item() only when it logs:
    a float here would force a host sync every step.
    """
    return {
        "rewards/chosen": chosen_rewards.float().mean(),
        "rewards/rejected": rejected_rewards.float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).float().mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "logps/chosen": policy_chosen_logps.float().mean(),
        "logps/rejected": policy_rejected_logps.float().mean(),
    }


def _check_batch(batch: dict[str, Tensor]) -> None:
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"concatenated_forward: batch lacks {missing}; expected keys {BATCH_KEYS}")
    for side in ("chosen", "rejected"):
        ids = batch[f"{side}_ids"]
        for k in (f"{side}_attention_mask", f"{side}_response_mask"):
            if batch[k].shape != ids.shape:
                raise ValueError(f"concatenated_forward: batch[{k!r}] has shape {tuple(batch[k].shape)}, "
                                 f"expected {tuple(ids.shape)} like batch['{side}_ids']")
        # Checked only where it is free: on a GPU this would be a host sync every step.
        am = batch[f"{side}_attention_mask"]
        if am.device.type == "cpu" and bool((am[:, 1:] > am[:, :-1]).any()):
            raise ValueError(f"concatenated_forward: batch['{side}_attention_mask'] must be right-padded "
                             "(ones then zeros); left padding would shift the positions of real tokens")
    if batch["chosen_ids"].size(0) != batch["rejected_ids"].size(0):
        raise ValueError("concatenated_forward: chosen_ids and rejected_ids must have the same batch size")


def _pad_right(x: Tensor, T: int) -> Tensor:
    """(B, t) -> (B, T) with zeros after; 0 is a valid token id, and pad positions are masked out anyway."""
    return F.pad(x, (0, T - x.size(1)), value=0)


SMALL_LOGITS_BYTES = 64 * 2**20  # below this, materializing the logits beats recomputing them in backward


def head_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, fused: bool | None = None,
                  chunk_size: int = 128) -> Tensor:
    """log p(targets) (M,) for hidden rows (M, C) under the tied head weight (V, C).

    Naive equivalent: (hidden @ weight.T).float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1).
    fused=True never holds the (M, V) logits (linear_token_logprobs: one matmul recomputed in backward); False
    materializes them once and lets backward write their gradient into their own storage (token_logprobs with
    inplace_backward); None picks False when the logits fit in SMALL_LOGITS_BYTES (small batches, e.g. on a CPU,
    where the recompute costs ~8% of a DPO step) and True otherwise.
    """
    if fused is None:
        fused = hidden.size(0) * weight.size(0) * hidden.element_size() > SMALL_LOGITS_BYTES
    if fused:
        return linear_token_logprobs(hidden, weight, targets, chunk_size)
    # the matmul saves its inputs, not its output, so nothing else reads the logits after this
    return token_logprobs(hidden @ weight.t(), targets, inplace_backward=True)


def concatenated_forward(model: nn.Module, batch: dict[str, Tensor], fused_linear: bool | None = None,
                         chunk_size: int = 128, response_rows_only: bool | None = None) -> dict[str, Tensor]:
    """Sequence log-probs of the chosen and rejected responses from one forward over both stacked.

    Returns chosen_logps, rejected_logps (sums over response tokens, (B,)), chosen_logps_mean, rejected_logps_mean
    (length-averaged, for IPO) and chosen_num_tokens, rejected_num_tokens (B,). The logprob of token t+1 uses the
    output at position t, so a response token at position 0 could not be scored (a prompt always precedes it).
    The head is scored by `head_logprobs` (fused_linear: its `fused`). response_rows_only (default: on CPU) sends
    only response positions through the head. Naive equivalent per side:
    (model(ids).log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * response_mask[:, 1:]).sum(-1).
    """
    _check_batch(batch)
    B = batch["chosen_ids"].size(0)
    T = max(batch["chosen_ids"].size(1), batch["rejected_ids"].size(1))
    ids = torch.cat([_pad_right(batch["chosen_ids"], T), _pad_right(batch["rejected_ids"], T)])  # (2B, T)
    keep = torch.cat([_pad_right(batch[f"{s}_response_mask"] * batch[f"{s}_attention_mask"], T)
                      for s in ("chosen", "rejected")]).bool()                                  # (2B, T)
    keep = keep[:, 1:]                                                   # (2B, T-1), aligned with the targets
    targets = ids[:, 1:].masked_fill(~keep, IGNORE_INDEX)                # (2B, T-1)
    inputs = ids[:, :-1]                                                 # (2B, T-1); the last token predicts nothing
    head = model.lm_head
    if getattr(head, "bias", None) is not None:
        raise ValueError("concatenated_forward: the head must be a bias-free linear map (GPT-2's tied lm_head)")
    # attention_mask=None (plain causal) is exact here: sequences are right-padded, so every real token sits at its
    # true position and only attends to earlier, real tokens. Pad positions compute garbage that `keep` masks out,
    # and the causal path lets SDPA use its fastest kernels.
    hidden = model.hidden_states(inputs)                                 # (2B, T-1, C)
    hidden, flat_targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)  # (2B*(T-1), C), (2B*(T-1),)
    if response_rows_only if response_rows_only is not None else keep.device.type == "cpu":
        # Only response positions go through the vocabulary projection; prompt and pad rows would be computed
        # and thrown away. Off by default on accelerators: the data-dependent row count costs a host sync.
        rows = keep.reshape(-1).nonzero().squeeze(1)                                       # (M,)
        scored = head_logprobs(hidden[rows], head.weight, flat_targets[rows], fused_linear, chunk_size)  # (M,)
        token_logps = scored.new_zeros(keep.numel()).index_copy(0, rows, scored).view(keep.shape)
    else:
        token_logps = head_logprobs(hidden, head.weight, flat_targets, fused_linear, chunk_size).view(keep.shape)
    total, mean = sequence_logprobs(token_logps, keep)  # (2B,) each
    num_tokens = keep.sum(-1)                           # (2B,)
    return {
        "chosen_logps": total[:B], "rejected_logps": total[B:],
        "chosen_logps_mean": mean[:B], "rejected_logps_mean": mean[B:],
        "chosen_num_tokens": num_tokens[:B], "rejected_num_tokens": num_tokens[B:],
    }


def dpo_step_loss(policy_out: dict[str, Tensor], reference_out: dict[str, Tensor] | None,
                  beta: float = 0.1, loss_type: str = "sigmoid",
                  label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean loss and metrics from two `concatenated_forward` outputs (reference_out None: reference-free).

    Picks the length-averaged log-probs for IPO and the sums otherwise, so callers cannot mix them up.
    """
    suffix = "_mean" if loss_type == "ipo" else ""
    pc, pr = policy_out["chosen_logps" + suffix], policy_out["rejected_logps" + suffix]
    rc = rr = None
    if reference_out is not None:
        rc, rr = reference_out["chosen_logps" + suffix].detach(), reference_out["rejected_logps" + suffix].detach()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing)
    metrics = preference_metrics(chosen_rewards, rejected_rewards, pc, pr)
    return losses.mean(), metrics


def dpo_batch_loss(model: nn.Module, batch: dict[str, Tensor], beta: float = 0.1, loss_type: str = "sigmoid",
                   label_smoothing: float = 0.0, reference: dict[str, Tensor] | None = None,
                   idx: Tensor | None = None, forward=concatenated_forward) -> tuple[Tensor, dict[str, Tensor]]:
    """One DPO micro-batch: (mean loss, TRL's metrics plus "kl"), the training step of train.py.

    The reference log-probs are `reference[k][idx]` when precomputed for the whole dataset, else the same model
    with its LoRA adapter disabled (exactly the starting policy, since the adapter starts at B = 0).
    "kl" estimates KL(reference || policy) on the pairs' responses, which the reference sampled:
    E_ref[log ref(y|x) - log pi(y|x)], averaged over chosen and rejected.
    """
    policy = forward(model, batch)
    if reference is not None:
        ref = {k: v[idx] for k, v in reference.items()}
    else:
        with torch.no_grad(), lora_disabled(model):
            ref = forward(model, batch)
    loss, metrics = dpo_step_loss(policy, ref, beta, loss_type, label_smoothing)
    metrics["kl"] = ((ref["chosen_logps"] - policy["chosen_logps"]) +
                     (ref["rejected_logps"] - policy["rejected_logps"])).detach().float().mean() / 2
    return loss, metrics
