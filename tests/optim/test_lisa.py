"""LISA: exactly n_active blocks train between switches, frozen blocks are untouched and
hold no optimizer state, seeded and checkpointable, with every optimizer and with
LayerwiseStepper."""

from __future__ import annotations

import pytest
import torch
from optim_registry import weights_only_copy
from torch import nn

import matrixopt
from matrixopt.optim import LISA, LayerwiseStepper


class Toy(nn.Module):
    def __init__(self, d=32, vocab=40, n=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d)) for _ in
                                    range(n))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return self.head(h)


def _model(seed=0):
    torch.manual_seed(seed)
    return Toy()


def _loss(model, step):
    g = torch.Generator().manual_seed(step)
    x = torch.randint(40, (8, 6), generator=g)
    return nn.functional.cross_entropy(model(x).flatten(0, 1), torch.roll(x, 1, 1).flatten())


MAKERS = {
    "adamw": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2),
    "muon": lambda m: matrixopt.Muon(matrixopt.muon_param_groups(m), lr=1e-2),
    "galore_adamw": lambda m: matrixopt.GaLoreAdamW(
        matrixopt.galore_param_groups(m, rank=8, update_proj_gap=3), lr=1e-2),
    "adafactor": lambda m: matrixopt.Adafactor(m.parameters(), lr=1e-2, relative_step=False,
                                               beta1=0.9),
}


def _train(model, opt, lisa, steps, start=0, stepper=None):
    for t in range(start, start + steps):
        _loss(model, t).backward()
        if stepper is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        lisa.step() if lisa is not None else None


@pytest.mark.parametrize("name", list(MAKERS))
def test_only_active_blocks_train_and_hold_state(name):
    model = _model()
    opt = MAKERS[name](model)
    lisa = LISA(opt, model.blocks, n_active=2, period=2, always=(model.embed, model.head), seed=1)
    always = {id(p) for m in (model.embed, model.head) for p in m.parameters()}
    seen_sets, restarted = set(), False
    for _ in range(5):  # 5 switches of 2 steps
        active = list(lisa.active)
        assert len(active) == 2 and active == sorted(set(active))
        seen_sets.add(tuple(active))
        before = [[p.detach().clone() for p in b.parameters()] for b in model.blocks]
        _train(model, opt, None, 2)
        for i, b in enumerate(model.blocks):
            for p, p0 in zip(b.parameters(), before[i]):
                assert p.requires_grad == (i in active)
                if i not in active:  # frozen: bitwise unchanged, no state
                    assert torch.equal(p, p0)
                    assert p not in opt.state or not opt.state[p]
                else:
                    assert not torch.equal(p, p0)
        allowed = always | {id(p) for i in active for p in model.blocks[i].parameters()}
        assert {id(p) for p, s in opt.state.items() if s} <= allowed
        assert all(p.requires_grad for m in (model.embed, model.head) for p in m.parameters())
        for _ in range(2):
            lisa.step()
        if any(i in lisa.active and i not in active for i in range(4)):
            restarted = True  # a newly sampled block starts without state
            new = next(i for i in lisa.active if i not in active)
            assert all(p not in opt.state or not opt.state[p]
                       for p in model.blocks[new].parameters())
    assert len(seen_sets) > 1 and restarted


def test_all_blocks_active_is_plain_training():
    m1, m2 = _model(), _model()
    o1, o2 = torch.optim.AdamW(m1.parameters(), lr=1e-2), torch.optim.AdamW(m2.parameters(),
                                                                              lr=1e-2)
    lisa = LISA(o2, m2.blocks, n_active=4, period=2, always=(m2.embed, m2.head))
    _train(m1, o1, None, 5)
    _train(m2, o2, lisa, 5)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_seeded_and_checkpoint_resumes_the_same_blocks_and_weights():
    def run(seed):
        m = _model()
        o = matrixopt.Muon(matrixopt.muon_param_groups(m), lr=1e-2)
        lisa = LISA(o, m.blocks, n_active=2, period=2, always=(m.embed, m.head), seed=seed)
        return m, o, lisa

    m, o, lisa = run(7)
    _train(m, o, lisa, 5)
    ck = weights_only_copy({"model": m.state_dict(), "opt": o.state_dict(),
                            "lisa": lisa.state_dict()})
    history = []
    for t in range(5, 12):
        _train(m, o, lisa, 1, start=t)
        history.append(tuple(lisa.active))
    m2, o2, lisa2 = run(123)  # a different seed: the checkpoint's generator wins
    m2.load_state_dict(ck["model"])
    lisa2.load_state_dict(ck["lisa"])
    o2.load_state_dict(ck["opt"])
    history2 = []
    for t in range(5, 12):
        _train(m2, o2, lisa2, 1, start=t)
        history2.append(tuple(lisa2.active))
    assert history == history2 and lisa2.num_steps == 12
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    m3, _, lisa3 = run(7)
    m4, _, lisa4 = run(8)
    seq3, seq4 = [], []
    for _ in range(10):
        seq3.append(tuple(lisa3.active))
        seq4.append(tuple(lisa4.active))
        for _ in range(2):
            lisa3.step()
            lisa4.step()
    assert seq3 == [tuple(x) for x in seq3] and seq3 != seq4


@pytest.mark.parametrize("name", ["adamw", "galore_adamw"])
def test_with_layerwise_stepper_matches_regular_stepping(name):
    m1, m2 = _model(), _model()
    o1, o2 = MAKERS[name](m1), MAKERS[name](m2)
    l1 = LISA(o1, m1.blocks, n_active=2, period=2, always=(m1.embed, m1.head), seed=3)
    stepper = LayerwiseStepper(o2)
    l2 = LISA(stepper, m2.blocks, n_active=2, period=2, always=(m2.embed, m2.head), seed=3)
    _train(m1, o1, l1, 7)
    _train(m2, o2, l2, 7, stepper=stepper)
    stepper.remove()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=5e-5)  # per-matrix rounding
    with_state = [[bool(o.state.get(p)) for p in m.parameters()] for o, m in ((o1, m1), (o2, m2))]
    assert with_state[0] == with_state[1] and not all(with_state[0])


def test_state_bytes_with_half_the_blocks_active():
    """2 of 4 blocks: the state is what full training keeps for embed/head plus half the blocks'."""
    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    m1, m2 = _model(), _model()
    o1, o2 = torch.optim.AdamW(m1.parameters()), torch.optim.AdamW(m2.parameters())
    lisa = LISA(o2, m2.blocks, n_active=2, period=2, always=(m2.embed, m2.head))
    _train(m1, o1, None, 4)
    _train(m2, o2, lisa, 3)
    block = sum(p.numel() for p in m1.blocks[0].parameters())
    other = sum(p.numel() for p in m1.parameters()) - 4 * block
    assert state_bytes(o2) == 8 * (other + 2 * block) + 4 * (len(list(m1.embed.parameters()))
                                                              + 1 + 2 * 4)
    assert state_bytes(o2) < 0.8 * state_bytes(o1)


def test_bad_arguments_name_the_argument_and_value():
    m = _model()
    opt = torch.optim.AdamW(m.parameters())
    with pytest.raises(ValueError, match=r"n_active must be an int in \[0, 4\], got 5"):
        LISA(opt, m.blocks, n_active=5, period=2)
    with pytest.raises(ValueError, match="period must be an int >= 1, got 0"):
        LISA(opt, m.blocks, n_active=2, period=0)
    with pytest.raises(ValueError, match=r"model_layers\[0\] has a parameter .* does not hold"):
        LISA(torch.optim.AdamW(m.head.parameters()), m.blocks, n_active=2, period=2)
    with pytest.raises(ValueError, match="`always` module shares a parameter"):
        LISA(opt, m.blocks, n_active=2, period=2, always=(m.blocks[0],))
    with pytest.raises(TypeError, match="optimizer must be"):
        LISA(object(), m.blocks, n_active=2, period=2)  # type: ignore[arg-type]
