"""A small character-level GPT and the text it trains on, shared by the examples,
benchmarks and integration tests.

The corpus is CPython's own ``pydoc_data.topics`` (the text of ``help()``
topics, about 0.5 MB), so nothing is downloaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def load_corpus() -> str:
    """The help-topic text that ships with CPython (deterministic order)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class CharData:
    """Character-level tokens of the corpus with a 90/10 train/validation split."""

    def __init__(self, text: str | None = None, val_fraction: float = 0.1) -> None:
        text = load_corpus() if text is None else text
        chars = sorted(set(text))
        self.vocab = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        n_val = int(len(data) * val_fraction)
        self.train = data[:-n_val]
        self.val = data[-n_val:]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def batch(self, split: str, batch_size: int, seq_len: int,
              generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random windows (inputs, next-character targets), reproducible from ``generator``."""
        data = self.train if split == "train" else self.val
        ix = torch.randint(len(data) - seq_len - 1, (batch_size,), generator=generator)
        x = torch.stack([data[i:i + seq_len] for i in ix.tolist()])
        y = torch.stack([data[i + 1:i + seq_len + 1] for i in ix.tolist()])
        return x, y


@dataclass
class GPTConfig:
    vocab_size: int = 128
    seq_len: int = 64
    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    tie_weights: bool = False


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.fc_proj = nn.Linear(4 * d, d, bias=False)
        self.qk_clip: Any = None  # a matrixopt.optim.QKClip records this block's logits

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        h = self.ln1(x)
        q, k, v = (m(h).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for m in (self.q, self.k, self.v))
        if self.qk_clip is not None:  # QK-clip: the per-head max logit of this call
            self.qk_clip.record(self, q, k, causal=True)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, C))
        return x + self.fc_proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Pre-norm decoder-only transformer: 6 matrices per block (q, k, v, proj, fc, fc_proj)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init)
        for b in self.blocks:  # GPT-2's scaled init of residual projections
            for w in (b.proj.weight, b.fc_proj.weight):
                nn.init.normal_(w, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        T = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
