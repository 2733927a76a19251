"""GaLoreAdamW(natural=True): a float64 step-by-step reference (explicit F̂ inverse),
the λ → ∞ limit (plain GaLore), the ring window, the skip policy, refresh, checkpoint,
memory_report and bad keys."""

from __future__ import annotations

import io

import pytest
import torch

from matrixopt.optim import GaLoreAdamW
from matrixopt.optim._common import GroupError
from matrixopt.optim.memory import memory_report

M, N, RANK, S = 8, 12, 3, 3
KW = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1, rank=RANK, scale=0.5,
          stagger=1, projector="svd")


def _grads(steps: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(M, N, generator=gen, dtype=torch.float64) for _ in range(steps)]


def _run(grads: list[torch.Tensor], **kw: object) -> tuple[torch.nn.Parameter, GaLoreAdamW]:
    W = torch.nn.Parameter(torch.linspace(-1, 1, M * N, dtype=torch.float64).view(M, N))
    opt = GaLoreAdamW([W], **{**KW, **kw})  # type: ignore[arg-type]
    for g in grads:
        W.grad = g.clone()
        opt.step()
    return W, opt


def test_matches_a_dense_float64_reference() -> None:
    """One basis (no refresh within the run): R = PᵀG, window of the last s, g̃ =
    solve(λI + ΓΓᵀ, R), Adam on g̃, W ← W(1 − lr·wd) − lr·α·P·m̂/(√v̂ + ε)."""
    grads = _grads(6)
    lam = 0.05
    W, opt = _run(grads, natural=True, natural_window=S, natural_damping=lam,
                  update_proj_gap=100)
    P = opt.state[W]["projector"].double()  # the basis of step 1 (left: M < N)
    assert P.shape == (M, RANK)
    w = torch.linspace(-1, 1, M * N, dtype=torch.float64).view(M, N)
    m = torch.zeros(RANK, N, dtype=torch.float64)
    v = torch.zeros_like(m)
    hist: list[torch.Tensor] = []
    b1, b2 = KW["betas"]  # type: ignore[misc]
    for t, g in enumerate(grads, start=1):
        r = (P.T @ g).reshape(-1)
        hist = (hist + [r])[-S:]
        Gam = torch.stack(hist, dim=1)
        F = lam * torch.eye(r.numel(), dtype=torch.float64) + Gam @ Gam.T
        nat = torch.linalg.solve(F, r).view(RANK, N)
        m = b1 * m + (1 - b1) * nat
        v = b2 * v + (1 - b2) * nat * nat
        d = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + KW["eps"])
        w = w * (1 - KW["lr"] * KW["weight_decay"]) - KW["lr"] * KW["scale"] * (P @ d)
    torch.testing.assert_close(W.detach(), w, rtol=1e-9, atol=1e-10)
    # the window holds the last S projected gradients, ring-ordered by the counter
    win = opt.state[W]["natural_window"]
    assert int(opt.state[W]["natural_count"]) == 6 and win.shape == (RANK, N, S)
    for j, g in enumerate(grads[-S:]):
        slot = (6 - S + j) % S
        torch.testing.assert_close(win[..., slot], P.T @ g, rtol=1e-12, atol=1e-12)


def test_large_damping_is_plain_galore() -> None:
    """λ → ∞ (derived): g̃ → g/λ and Adam with ε/λ on g/λ is Adam with ε on g, so the
    trajectory (refreshes and moment transport included) is plain GaLore's."""
    grads = _grads(9, seed=1)
    lam = 1e10  # deviation O(‖Γ‖²/λ)
    plain, _ = _run(grads, update_proj_gap=4)
    nat, _ = _run(grads, update_proj_gap=4, natural=True, natural_window=S,
                  natural_damping=lam, eps=KW["eps"] / lam)
    torch.testing.assert_close(nat.detach(), plain.detach(), rtol=1e-6, atol=1e-8)
    # and λ = O(‖g‖²) is not plain GaLore (the test can fail)
    other, _ = _run(grads, update_proj_gap=4, natural=True, natural_window=S,
                    natural_damping=1.0)
    assert (other.detach() - plain.detach()).abs().max() > 1e-4


def test_a_skipped_step_does_not_enter_the_window() -> None:
    grads = _grads(4, seed=2)
    W, opt = _run(grads[:3], natural=True, natural_window=S, update_proj_gap=100)
    win, w = opt.state[W]["natural_window"].clone(), W.detach().clone()
    bad = grads[3].clone()
    bad[0, 0] = float("nan")
    W.grad = bad
    opt.step()
    torch.testing.assert_close(opt.state[W]["natural_window"], win, rtol=0, atol=0)
    torch.testing.assert_close(W.detach(), w, rtol=0, atol=0)


def test_a_refresh_clears_the_window() -> None:
    W, opt = _run(_grads(5, seed=3), natural=True, natural_window=S, update_proj_gap=4)
    win = opt.state[W]["natural_window"]  # refreshed at step 5: only its vector
    nonzero = [j for j in range(S) if win[..., j].abs().max() > 0]
    assert nonzero == [4 % S]
    W2, opt2 = _run(_grads(5, seed=3), natural=True, natural_window=S, update_proj_gap=4,
                    on_refresh="keep")
    assert all(opt2.state[W2]["natural_window"][..., j].abs().max() > 0 for j in range(S))


def test_checkpoint_round_trip_weights_only() -> None:
    grads = _grads(8, seed=4)
    full, _ = _run(grads, natural=True, natural_window=S, update_proj_gap=3)
    W, opt = _run(grads[:5], natural=True, natural_window=S, update_proj_gap=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    W2 = torch.nn.Parameter(W.detach().clone())
    opt2 = GaLoreAdamW([W2], **{**KW, "natural": True, "natural_window": S,  # type: ignore[arg-type]
                                "update_proj_gap": 3})
    opt2.load_state_dict(sd)
    assert opt2.state[W2]["natural_count"].device.type == "cpu"
    for g in grads[5:]:
        W2.grad = g.clone()
        opt2.step()
    torch.testing.assert_close(W2.detach(), full.detach(), rtol=0, atol=0)


def test_memory_report_counts_the_window() -> None:
    grads = _grads(1)
    _, plain = _run(grads)
    _, nat = _run(grads, natural=True, natural_window=5)
    extra = memory_report(nat).state_bytes - memory_report(plain).state_bytes
    assert extra == 5 * RANK * N * 8 + 8  # float64 window + the int64 counter


@pytest.mark.parametrize("key, value", [("natural_damping", 0.0), ("natural_damping", -1.0),
                                        ("natural_window", 0), ("natural", "yes")])
def test_bad_keys_name_group_and_value(key: str, value: object) -> None:
    W = torch.nn.Parameter(torch.zeros(M, N))
    with pytest.raises(GroupError, match=key):
        GaLoreAdamW([W], rank=2, **{key: value})  # type: ignore[arg-type]
