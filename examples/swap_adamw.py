"""Swap AdamW for Muon or GaLoreAdamW on a Hugging Face GPT-2 (built from a config).

    python examples/swap_adamw.py --steps 50

Builds a small ``GPT2LMHeadModel`` from a ``GPT2Config`` (no download; needs
``transformers``), prints where ``muon_param_groups`` routes each parameter —
the tied ``lm_head`` / ``wte`` to AdamW, GPT-2's fused ``Conv1D`` ``c_attn``
(stored ``[d, 3d]``) split into Q, K, V column blocks — and trains the same
initialisation with AdamW, Muon and GaLoreAdamW on the character data of
``examples/gpt.py``, printing the final training loss of each. The three
optimizer lines in ``build`` are the whole swap.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gpt import CharData  # noqa: E402

import matrixopt  # noqa: E402


def make_model(vocab: int, d: int, layers: int, seq: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_embd=d, n_layer=layers, n_head=max(1, d // 32),
                     n_positions=seq, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def build(name: str, model: torch.nn.Module, example: torch.Tensor, lr: float
          ) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    if name == "muon":
        groups = matrixopt.muon_param_groups(model, split={"*.c_attn": (3, "cols")},
                                             example_inputs=example)
        return matrixopt.Muon(groups, lr=lr, weight_decay=0.1)
    groups = matrixopt.galore_param_groups(model, rank=16, update_proj_gap=50, scale=0.25)
    return matrixopt.GaLoreAdamW(groups, lr=lr, weight_decay=0.1)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--quiet", action="store_true", help="do not print the routing report")
    args = ap.parse_args(argv)

    data = CharData()
    torch.manual_seed(0)
    init = make_model(data.vocab_size, args.d_model, args.n_layer, args.seq_len).state_dict()
    example = data.batch("train", 2, args.seq_len, torch.Generator().manual_seed(0))[0]
    result: dict[str, Any] = {}
    for name in ("adamw", "muon", "galore_adamw"):
        model = make_model(data.vocab_size, args.d_model, args.n_layer, args.seq_len)
        model.load_state_dict(init)
        opt = build(name, model, example, args.lr)
        if name == "muon" and not args.quiet:
            print(matrixopt.muon_param_groups(model, split={"*.c_attn": (3, "cols")},
                                              example_inputs=example).report)
        gen = torch.Generator().manual_seed(1)
        loss = torch.tensor(float("nan"))
        for _ in range(args.steps):
            x, _ = data.batch("train", args.batch_size, args.seq_len, gen)
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels itself
            loss.backward()
            opt.step()
            opt.zero_grad()
        result[name] = float(loss.detach())
        print(f"{name:>13}: train loss after {args.steps} steps {result[name]:.3f}")
    return result


if __name__ == "__main__":
    main()
