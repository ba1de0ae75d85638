"""minidpo: Direct Preference Optimization for GPT-2 with hand-written LoRA, in plain PyTorch."""

from minidpo.dpo import concatenated_forward, dpo_loss, preference_metrics
from minidpo.imdb import Review, load_imdb
from minidpo.length_sampler import LengthSampler
from minidpo.logprobs import linear_token_logprobs, sequence_logprobs, token_logprobs
from minidpo.lora import (LoRALinear, apply_lora, load_lora, lora_disabled, lora_parameters, merge_lora, save_lora,
                          unmerge_lora)
from minidpo.model import GPT, GPTConfig
from minidpo.reward import SentimentClassifier
from minidpo.tokenizer import Tokenizer
from minidpo.weights import load_gpt2

__all__ = [
    "GPT", "GPTConfig", "Tokenizer", "load_gpt2",
    "LoRALinear", "apply_lora", "merge_lora", "unmerge_lora", "lora_disabled", "lora_parameters", "save_lora",
    "load_lora",
    "token_logprobs", "linear_token_logprobs", "sequence_logprobs", "dpo_loss", "preference_metrics",
    "concatenated_forward",
    "load_imdb", "Review", "LengthSampler", "SentimentClassifier",
]
