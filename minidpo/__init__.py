"""minidpo: Direct Preference Optimization for GPT-2 with hand-written LoRA, in plain PyTorch.

Import what you need from its module (one concept per file; the folders are layers, listed in the README's map of the
code), e.g. `from minidpo.methods.dpo import dpo_loss` or `from minidpo.model.gpt import GPT`. The names below are the
most used ones.
"""

from minidpo.dataset.imdb import Review, load_imdb
from minidpo.dataset.length_sampler import LengthSampler
from minidpo.dataset.reward import SentimentClassifier
from minidpo.methods.dpo import DPOConfig, concatenated_forward, dpo_loss, preference_metrics, sequence_forward
from minidpo.methods.logprobs import sequence_logps
from minidpo.methods.pg import kl_penalized_rewards, policy_gradient_loss, rloo_advantages
from minidpo.model.gpt import GPT, GPTConfig
from minidpo.model.lora import (
                          LoRAConfig,
                          LoRALinear,
                          apply_lora,
                          load_lora,
                          lora_disabled,
                          lora_parameters,
                          merge_lora,
                          remove_lora,
                          save_lora,
                          unmerge_lora,
)
from minidpo.model.tokenizer import EOT_ID, Tokenizer
from minidpo.model.weights import load_gpt2

__all__ = [
    "GPT", "GPTConfig", "Tokenizer", "EOT_ID", "load_gpt2",
    "LoRAConfig", "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "remove_lora", "lora_disabled",
    "lora_parameters", "save_lora", "load_lora",
    "sequence_logps", "DPOConfig", "dpo_loss", "preference_metrics", "concatenated_forward", "sequence_forward",
    "rloo_advantages", "kl_penalized_rewards", "policy_gradient_loss",
    "load_imdb", "Review", "LengthSampler", "SentimentClassifier",
]
