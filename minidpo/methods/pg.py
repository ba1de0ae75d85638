"""
Policy-gradient fine-tuning, the RL side of the comparison: REINFORCE with a leave-one-out baseline (RLOO) on a
KL-penalized reward. The training loop that uses these pieces is minidpo/methods/rloo.py.

References: Williams 1992 (REINFORCE, the score-function estimator); Kool et al. 2019, "Buy 4 REINFORCE samples, get
a baseline for free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
from Human Feedback in LLMs" (arXiv:2402.14740) and TRL's RLOOTrainer; Ziegler et al. 2019, "Fine-Tuning Language
Models from Human Preferences" (the KL penalty and its adaptive coefficient, TRL's AdaptiveKLController).

The estimator. For a prompt x, the objective is J(theta) = E_{y ~ pi_theta(.|x)}[R(x, y)] = sum_y pi(y|x) R(x, y).
R does not depend on theta, and grad pi = pi * grad log pi (the log-derivative trick), so

    grad J = sum_y R(x, y) grad pi(y|x) = sum_y pi(y|x) R(x, y) grad log pi(y|x) = E_{y~pi}[R(x, y) grad log pi(y|x)],

an expectation we can estimate from samples of the policy without differentiating through the sampling or the
reward. The whole completion is one action: log pi(y|x) = sum_t log pi(y_t | x, y_<t) over its tokens.

A baseline. For any b that does not depend on y, E[b grad log pi(y|x)] = b sum_y grad pi(y|x) = b grad 1 = 0, so
E[(R - b) grad log pi] is still grad J while its variance can be far lower (R's common offset no longer multiplies
the noisy grad log pi). RLOO draws K completions y_1..y_K per prompt and gives y_i the mean reward of the OTHER K-1
as its baseline: b_i = sum_{j != i} R_j / (K - 1) is independent of y_i, so the estimate stays unbiased, and the
advantages A_i = R_i - b_i = K / (K - 1) * (R_i - mean_j R_j) sum to zero over each prompt's K completions.

The loss is the surrogate L = -mean_i(A_i * log pi(y_i|x)) with A_i detached: minimizing it ascends J.

The KL term. RLHF maximizes E_{y~pi}[R(x, y)] - beta * KL(pi(.|x) || ref(.|x)), with
KL = E_{y~pi}[log pi(y|x) - log ref(y|x)]. This equals E_{y~pi}[r(x, y)] for the per-sequence penalized reward
r = R - beta * (log pi(y|x) - log ref(y|x)). Differentiating, the log pi inside r contributes
-beta * E[grad log pi] = 0, so treating r as a fixed reward (policy log-probs detached) in the estimator above
gives exactly the gradient of the regularized objective. The reference is the policy with its LoRA adapter
disabled, as in DPO; the mean of log pi - log ref over samples of the policy is itself an unbiased estimate of
the sequence KL (logged as "kl/sampled").

Adaptive coefficient (Ziegler et al. 2019, TRL's AdaptiveKLController): after each step, with KL the batch's mean
sequence KL and n the completions it used, beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon).

Sampling. With a temperature T the sampled policy is softmax(logits / T), and every log-prob (and so the KL
penalty) is of that tempered policy and the tempered reference, as in TRL's RLOOTrainer: the estimator stays exactly
on-policy for it. Top-k sampling draws from pi truncated to its k most likely tokens while the log-probs are pi's:
off-policy, and blind to the tail.
"""

from torch import Tensor

# (metric key, short label, format) for the progress line (LoopConfig.show)
RLOO_SHOW = (("reward", "reward", "{:.3f}"), ("kl/sampled", "kl", "{:.3f}"), ("kl_coef", "kl_coef", "{:.4f}"))


def rloo_advantages(rewards: Tensor) -> Tensor:
    """(P, K) rewards of K completions of each of P prompts -> (P, K) advantages, each row summing to zero.

    Naive equivalent: A[p, i] = rewards[p, i] - mean(rewards[p, j] for j != i).
    """
    if rewards.dim() != 2:
        raise ValueError(f"rloo_advantages: rewards must be (prompts, K), got shape {tuple(rewards.shape)}")
    K = rewards.size(1)
    if K < 2:
        raise ValueError(f"rloo_advantages: need K >= 2 completions per prompt for a leave-one-out baseline, got {K}")
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (K - 1)  # (P, K): mean of the other K-1
    return rewards - baseline


def kl_penalized_rewards(scores: Tensor, policy_logps: Tensor, reference_logps: Tensor, kl_coef: float) -> Tensor:
    """Per-sequence RL reward: scores - kl_coef * (log pi(y|x) - log ref(y|x)), all the same shape.

    Pass detached policy log-probs: the penalty is part of the reward, not a path for the gradient (see above).
    """
    if not (scores.shape == policy_logps.shape == reference_logps.shape):
        raise ValueError(f"kl_penalized_rewards: shapes differ: scores {tuple(scores.shape)}, policy "
                         f"{tuple(policy_logps.shape)}, reference {tuple(reference_logps.shape)}")
    return scores - kl_coef * (policy_logps - reference_logps)


def policy_gradient_loss(advantages: Tensor, logps: Tensor) -> Tensor:
    """REINFORCE surrogate: -(advantages.detach() * logps).mean(); its gradient is minus the estimate of grad J."""
    if advantages.shape != logps.shape:
        raise ValueError(f"policy_gradient_loss: advantages {tuple(advantages.shape)} and logps "
                         f"{tuple(logps.shape)} must have the same shape")
    return -(advantages.detach() * logps).mean()


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n: int, horizon: int) -> float:
    """TRL's AdaptiveKLController.update: kl_coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n / horizon)

