"""
GPT-2 in plain PyTorch, with padding-aware attention and a preallocated KV cache.

References:
1) OpenAI's GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners") and its TensorFlow
   implementation, openai/gpt-2 src/model.py: pre-LN blocks, GELU (tanh form), LayerNorm eps 1e-5, learned positions,
   the output head tied to the token embedding.
2) Karpathy's nanoGPT model.py for the module layout; the parameter names follow Hugging Face's GPT2LMHeadModel
   (`transformer.h.0.attn.c_attn.weight`, ...) so checkpoints map one to one, except that every projection is an
   `nn.Linear` ([out, in]) where OpenAI and Hugging Face store Conv1D ([in, out]).
3) gpt-fast (PyTorch team) for the KV cache, allocated once per `generate` call (model/generate.py).

Padding. `attention_mask` ([B, T], 1 for a real token, 0 for a pad) makes left- and right-padded batches exact: a real
token's position counts only the real tokens before it, and no real token ever attends to a pad. A pad query attends
to itself only, so its (ignored) output stays finite. With `attention_mask=None` attention is plainly causal, which
is also exact for right-padded batches, and lets training use SDPA's fastest (is_causal) kernels.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minidpo.config import require


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0

    @classmethod
    def from_name(cls, name: str) -> "GPTConfig":
        """The four released GPT-2 sizes, by Hugging Face name or by OpenAI's directory name."""
        key = ALIASES.get(name, name)
        if key not in PRESETS:
            allowed = ", ".join(list(PRESETS) + list(ALIASES))
            raise ValueError(f"unknown GPT-2 model name {name!r}; expected one of: {allowed}")
        return cls(**PRESETS[key])

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            require(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}")
        require(self.n_embd % self.n_head == 0, "n_embd",
                f"({self.n_embd}) must be divisible by n_head ({self.n_head})")
        require(math.isfinite(self.dropout) and 0 <= self.dropout < 1, "dropout",
                f"must be in [0, 1), got {self.dropout}")


PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 355M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),      # 1558M
}
ALIASES = {"124M": "gpt2", "355M": "gpt2-medium", "774M": "gpt2-large", "1558M": "gpt2-xl"}


class KVCache(nn.Module):
    """Keys and values of one layer for every position generated so far, allocated once at full length."""

    def __init__(self, batch_size: int, max_seq_len: int, n_head: int, head_size: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch_size, n_head, max_seq_len, head_size)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (B, nh, T, hs) at positions start..start+T-1; return all keys and values up to there."""
        end = start + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, cache_pos: int | None = None) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache_pos is not None:
            k, v = self.kv_cache.update(cache_pos, k, v)  # (B, nh, cache_pos + T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if attn_mask is None:
            # no padding: causal over the block itself, or (one new token against the cache) every key so far;
            # the mask-free calls let SDPA pick its flash kernels
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        # GPT-2 uses the tanh approximation of GELU; the exact erf form differs by ~1e-3 and breaks weight parity.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, cache_pos: int | None = None) -> Tensor:
        x = x + self.attn(self.ln_1(x), attn_mask, cache_pos)
        return x + self.mlp(self.ln_2(x))


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position of every token counting real tokens only: naive `[sum(mask[b, :t+1]) - 1 for t]`, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_bias(key_mask: Tensor, start: int, T: int) -> Tensor:
    """Boolean SDPA mask (B, 1, T, L) for queries at positions start..start+T-1 over keys 0..L-1.

    Naive equivalent: allowed[b, i, j] = j <= start + i and (key_mask[b, j] or j == start + i).
    The `or j == start + i` lets a pad query see itself so no softmax row is empty.
    """
    L = key_mask.size(1)
    q_pos = torch.arange(start, start + T, device=key_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(L, device=key_mask.device)[None, :]                 # (1, L)
    causal = k_pos <= q_pos                                                   # (T, L)
    allowed = causal & (key_mask.bool()[:, None, :] | (k_pos == q_pos))       # (B, T, L)
    return allowed[:, None]                                                   # (B, 1, T, L)


class GPT(nn.Module):

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 paper: scale the init of residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self) -> int:
        """All parameters, the tied head counted once (so 124,439,808 for gpt2)."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: Tensor, attention_mask: Tensor | None = None,
                      cache_pos: int | None = None, key_mask: Tensor | None = None) -> Tensor:
        """Final-LayerNorm output (B, T, C): the input of lm_head.

        Without a cache, `attention_mask` (B, T) marks real tokens. With a cache (`cache_pos` = where idx starts),
        `key_mask` (B, cache_pos + T) marks the real tokens among everything cached so far (None: no padding).
        """
        B, T = idx.size()
        if cache_pos is None:
            if attention_mask is None:
                pos = torch.arange(T, device=idx.device)[None]  # (1, T)
                attn_mask = None
            else:
                pos = positions_from_mask(attention_mask)  # (B, T)
                attn_mask = attention_bias(attention_mask, 0, T)
        elif key_mask is None:  # cached, no padding: T > 1 only for the prefill at cache_pos 0
            pos = torch.arange(cache_pos, cache_pos + T, device=idx.device)[None]  # (1, T)
            attn_mask = None
        else:
            pos = positions_from_mask(key_mask)[:, cache_pos:]  # (B, T)
            attn_mask = attention_bias(key_mask, cache_pos, T)
        if T > self.config.block_size or (cache_pos or 0) + T > self.config.block_size:
            raise ValueError(f"sequence of length {(cache_pos or 0) + T} exceeds block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, attn_mask, cache_pos)
        return self.transformer.ln_f(x)

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, V). See the module docstring for what `attention_mask` guarantees."""
        return self.lm_head(self.hidden_states(idx, attention_mask))

    # ------------------------------------------------------------------ generation

    def setup_cache(self, batch_size: int, max_seq_len: int) -> None:
        """A KV cache per layer, in the dtype attention will read it in: under autocast the keys and values come
        out of c_attn in bf16, and an fp32 cache would be cast back to bf16 for every decoded token."""
        p = self.lm_head.weight
        autocast = torch.is_autocast_enabled(p.device.type)
        dtype = torch.get_autocast_dtype(p.device.type) if autocast else p.dtype
        hs = self.config.n_embd // self.config.n_head
        for block in self.transformer.h:
            block.attn.kv_cache = KVCache(batch_size, max_seq_len, self.config.n_head, hs, dtype, p.device)

    def clear_cache(self) -> None:
        for block in self.transformer.h:
            block.attn.kv_cache = None
