"""muon_param_groups / galore_param_groups on real architectures built from configs.

No downloads: Hugging Face GPT-2, LLaMA and ViT from tiny configs, a
torchvision-style ResNet written here (torchvision does not install with this
torch), ``nn.Transformer`` with a head, the issue's ``nn.Sequential`` and a
Sequential CNN. For each: the head found without and with a traced forward,
every hidden matrix on Muon, nothing warns, and one optimizer step runs.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from matrixopt.optim import GaLoreAdamW, Muon
from matrixopt.optim.routing import galore_param_groups, muon_param_groups

transformers = pytest.importorskip("transformers", reason="needs transformers (test extra)")
transformers.logging.set_verbosity_error()

_MATRIX_GROUPS = ("muon", "muon_flatten", "muon_split3_cols")


# --------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (same layers and names)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                         nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + idt)


class ResNet(nn.Module):
    """torchvision.models.ResNet layout (conv1/bn1/maxpool/layer1-4/avgpool/fc)."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans = [width, width, 2 * width, 4 * width, 8 * width]
        for i in range(4):
            setattr(self, f"layer{i + 1}", nn.Sequential(
                BasicBlock(chans[i], chans[i + 1], 1 if i == 0 else 2),
                BasicBlock(chans[i + 1], chans[i + 1])))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class TransformerLM(nn.Module):
    """nn.Transformer with embeddings and a head; ``head_first`` defines the head first
    (module order then does not end with the head: only a trace can tell)."""

    def __init__(self, vocab: int = 40, d: int = 32, head_first: bool = False) -> None:
        super().__init__()
        if head_first:
            self.head = nn.Linear(d, vocab)
        self.src_emb = nn.Embedding(vocab, d)
        self.tgt_emb = nn.Embedding(vocab, d)
        self.transformer = nn.Transformer(d, nhead=2, num_encoder_layers=1,
                                          num_decoder_layers=1, dim_feedforward=64,
                                          batch_first=True, dropout=0.0)
        if not head_first:
            self.head = nn.Linear(d, vocab)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return self.head(self.transformer(self.src_emb(src), self.tgt_emb(tgt)))


def gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def llama() -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg)


def vit() -> nn.Module:
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, num_labels=5)
    return transformers.ViTForImageClassification(cfg)


def issue_sequential() -> nn.Module:
    # issue 15: every Linear has out_features == num_embeddings
    return nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64),
                         nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))


def sequential_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _tokens(vocab: int) -> Callable[[], Any]:
    return lambda: torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0))


@dataclass
class Arch:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    head: list[str]                 # the head modules
    head_params: set[str]           # parameters routed as "output head" (or tied embedding)
    n_matrices: int                 # parameters that must reach Muon / GaLore
    loss: Callable[[Any], torch.Tensor]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


ARCHS = [
    Arch("gpt2", gpt2, _tokens(96), ["lm_head"], {"transformer.wte.weight"}, 2 * 4,
         lambda out: _logits(out).square().mean()),
    Arch("llama", llama, _tokens(96), ["lm_head"], {"lm_head.weight"}, 2 * 7,
         lambda out: _logits(out).square().mean()),
    Arch("vit", vit, lambda: torch.randn(2, 3, 16, 16), ["classifier"], {"classifier.weight"},
         1 + 2 * 6, lambda out: _logits(out).square().mean()),
    Arch("resnet", ResNet, lambda: torch.randn(2, 3, 32, 32), ["fc"], {"fc.weight"},
         1 + 4 * 4 + 3, lambda out: out.square().mean()),
    Arch("nn.Transformer+head", TransformerLM, lambda: (_tokens(40)(), _tokens(40)()), ["head"],
         {"head.weight"}, 4 + 6, lambda out: out.square().mean()),
    Arch("issue-sequential", issue_sequential, _tokens(64), ["6"], {"6.weight"}, 2,
         lambda out: out.square().mean()),
    Arch("sequential-cnn", sequential_cnn, lambda: torch.randn(2, 3, 8, 8), ["8"], {"8.weight"},
         2, lambda out: out.square().mean()),
]


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _routes(groups: Any) -> dict[str, str]:
    return {r.name: r.group for r in groups.routes}


@pytest.mark.parametrize("traced", [False, True], ids=["module-order", "traced"])
@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_head_and_hidden_matrices(arch: Arch, traced: bool):
    torch.manual_seed(0)
    model = arch.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a correct routing warns about nothing
        groups = muon_param_groups(model, example_inputs=arch.inputs() if traced else None)
    assert groups.heads == arch.head
    where = _routes(groups)
    for name in arch.head_params:
        assert where[name] == "adamw", (name, groups.report)
    on_muon = [n for n, g in where.items() if g in _MATRIX_GROUPS]
    assert len(on_muon) == arch.n_matrices, groups.report
    # every 2-D weight on Muon belongs to a hidden layer: none of the head's, no embedding
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = dict(model.named_parameters())
    assert not any(id(params[n]) in embeddings for n in on_muon)
    assert not any(n.startswith(tuple(h + "." for h in arch.head)) for n in on_muon)
    # and every ≥ 2-D parameter not on Muon is an embedding, a head or a broadcast table
    for n, g in where.items():
        if g.startswith("adamw") and params[n].ndim >= 2:
            assert (id(params[n]) in embeddings or n in arch.head_params
                    or params[n].shape[0] == 1), (n, groups.report)


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_one_muon_and_one_galore_step(arch: Arch):
    torch.manual_seed(0)
    model = arch.build()
    inputs = arch.inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opts = [Muon(muon_param_groups(model), lr=1e-2, ns_dtype=torch.float32),
                GaLoreAdamW(galore_param_groups(model, rank=4, update_proj_gap=10), lr=1e-3)]
    for opt in opts:
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.train()
        arch.loss(_call(model, inputs)).backward()
        opt.step()
        opt.zero_grad()
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert moved and all(torch.isfinite(p).all() for p in model.parameters())


def test_galore_routes_like_muon():
    model = llama()
    mg, gg = muon_param_groups(model), galore_param_groups(model, rank=8)
    on = {r.name for r in mg.routes if r.group.startswith("muon")}
    assert on == {r.name for r in gg.routes if r.group.startswith("galore")}
    assert gg.heads == mg.heads == ["lm_head"]
    rank_groups = [g for g in gg if g.get("rank") is not None]
    assert [g["name"] for g in rank_groups] == ["galore"] and rank_groups[0]["rank"] == 8


def test_trace_finds_a_head_defined_before_the_body():
    """Module order ends with the decoder's last Linear; the traced forward ends with the head."""
    model = TransformerLM(head_first=True)
    plain = muon_param_groups(model)
    assert plain.heads == ["transformer.decoder.layers.0.linear2"]  # what module order says
    traced = muon_param_groups(model, example_inputs=(_tokens(40)(), _tokens(40)()))
    assert traced.heads == ["head"]
    where = _routes(traced)
    assert where["head.weight"] == "adamw"
    assert where["transformer.decoder.layers.0.linear2.weight"] == "muon"


def test_trace_leaves_the_model_as_it_was():
    model = ResNet()
    model.train()
    model.layer1.eval()  # mixed modes are restored per module
    stats = {n: b.clone() for n, b in model.named_buffers()}
    muon_param_groups(model, example_inputs=torch.randn(2, 3, 32, 32))
    assert model.training and not model.layer1.training and model.layer2.training
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n  # BatchNorm running statistics untouched
    assert all(p.grad is None for p in model.parameters())


def test_gpt2_fused_c_attn_split_by_columns():
    model = gpt2()
    groups = muon_param_groups(model, split={"*.c_attn": (3, "cols")})
    where = _routes(groups)
    assert where["transformer.h.0.attn.c_attn.weight"] == "muon_split3_cols"
    assert where["transformer.h.0.attn.c_proj.weight"] == "muon"
    opt = Muon(groups, lr=1e-2, ns_dtype=torch.float32)
    split_group = next(g for g in opt.param_groups if g["name"] == "muon_split3_cols")
    assert tuple(split_group["split"]) == (3, "cols")
    _logits(model(_tokens(96)())).square().mean().backward()
    opt.step()


def test_swap_example_runs():
    import sys
    from pathlib import Path

    examples = Path(__file__).resolve().parents[2] / "examples"
    sys.path.insert(0, str(examples))
    try:
        import swap_adamw
    finally:
        sys.path.remove(str(examples))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        losses = swap_adamw.main(["--steps", "3", "--d-model", "32", "--n-layer", "1",
                                  "--seq-len", "16", "--batch-size", "2", "--quiet"])
    assert set(losses) == {"adamw", "muon", "galore_adamw"}
    assert all(0 < v < 10 for v in losses.values())
