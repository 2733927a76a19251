"""``python -m matrixopt``: versions, detected backends and a short self-check.

Prints the matrixopt and torch versions, whether CUDA is available, whether
Triton imports (and its version) and whether Triton's CPU interpreter is on,
then runs a few quick checks against float64 SVD references and prints ``OK``
or ``FAIL`` for each. The exit status is 0 when every check passes, 1 otherwise
(so it can gate a CI job or a cluster image).
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Sequence

import torch

from . import __version__
from .kernels import interpreter_enabled
from .linalg import orthogonalize, polar

Check = tuple[str, Callable[[], str]]


def backends() -> list[tuple[str, str]]:
    """``(name, description)`` of the runtime matrixopt dispatches on."""
    try:
        import triton

        triton_desc = f"yes ({triton.__version__})"
    except Exception as exc:  # noqa: BLE001  (ImportError, or a broken install raising)
        triton_desc = f"no ({type(exc).__name__})"
    cuda = torch.cuda.is_available()
    cuda_desc = (f"yes ({torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)})"
                 if cuda else "no")
    return [
        ("matrixopt", __version__),
        ("torch", torch.__version__),
        ("python", sys.version.split()[0]),
        ("CUDA available", cuda_desc),
        ("Triton importable", triton_desc),
        ("Triton interpreter (TRITON_INTERPRET)", "on" if interpreter_enabled() else "off"),
    ]


def _well_conditioned(m: int, n: int, seed: int) -> torch.Tensor:
    """An ``m×n`` float64 matrix with singular values spread over [0.5, 1]."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    W, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return W @ torch.diag(torch.linspace(0.5, 1.0, k, dtype=torch.float64)) @ V.T


def _svd_polar(A: torch.Tensor) -> torch.Tensor:
    W, _, Vh = torch.linalg.svd(A.double(), full_matrices=False)
    return W @ Vh


def check_orthogonalize() -> str:
    """Muon's orthogonalisation (float32, Polar Express) against the SVD polar factor.

    Muon's default 5 steps stop with singular values in about [0.87, 1.14] on
    this matrix, by design; 8 steps converge to float32 round-off (~5e-7), so
    a 1e-4 bound catches a wrong kernel or schedule without flakiness.
    """
    A = _well_conditioned(16, 48, seed=0)
    U = _svd_polar(A)
    Q = orthogonalize(A.float(), steps=8, dtype=torch.float32).double()
    err = float(torch.linalg.matrix_norm(Q - U) / torch.linalg.matrix_norm(U))
    if not err < 1e-4:
        raise AssertionError(f"relative distance to the SVD polar factor {err:.3g} >= 1e-4")
    return f"relative distance to SVD polar factor {err:.1e}"


def check_polar() -> str:
    """:func:`matrixopt.linalg.polar` (float64) reproduces A = U H with U the SVD polar factor."""
    A = _well_conditioned(24, 12, seed=1)
    res = polar(A)
    err_u = float(torch.linalg.matrix_norm(res.U - _svd_polar(A)))
    err_a = float(torch.linalg.matrix_norm(res.U @ res.H - A))
    if not (err_u < 1e-8 and err_a < 1e-8):
        raise AssertionError(f"||U - U_svd|| = {err_u:.3g}, ||UH - A|| = {err_a:.3g} (want < 1e-8)")
    return f"||U - U_svd|| = {err_u:.1e}, ||UH - A|| = {err_a:.1e}"


def check_muon_step() -> str:
    """One Muon step on a tiny model: finite, moves the weights, leaves ``p.grad`` alone."""
    from .optim import Muon

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    opt = Muon(net.parameters(), lr=0.02)
    before = [p.detach().clone() for p in net.parameters()]
    loss = torch.nn.functional.mse_loss(net(x), y)
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]  # type: ignore[union-attr]
    opt.step()
    for p, b, g in zip(net.parameters(), before, grads):
        if not torch.isfinite(p).all():
            raise AssertionError("non-finite parameter after one step")
        if torch.equal(p, b):
            raise AssertionError(f"a parameter of shape {tuple(p.shape)} did not move")
        if not torch.equal(p.grad, g):  # type: ignore[arg-type]
            raise AssertionError("step() modified p.grad")
    with torch.no_grad():
        after = torch.nn.functional.mse_loss(net(x), y).item()
    return f"loss {loss.item():.4f} -> {after:.4f}"


CHECKS: list[Check] = [
    ("orthogonalize vs SVD polar", check_orthogonalize),
    ("polar vs SVD", check_polar),
    ("Muon step", check_muon_step),
]


def run_checks(checks: Sequence[Check], out: Callable[[str], None] = print) -> bool:
    """Run ``checks``, print one ``OK``/``FAIL`` line each; True if all passed."""
    ok = True
    for name, fn in checks:
        try:
            detail = fn()
        except Exception as exc:  # noqa: BLE001  (a failing check is reported, not raised)
            ok = False
            out(f"  FAIL  {name}: {type(exc).__name__}: {exc}")
            out("".join("        " + line for line in traceback.format_exc().splitlines(True)))
        else:
            out(f"  OK    {name}: {detail}")
    return ok


def parser() -> argparse.ArgumentParser:
    """The command line: no options besides ``--help`` and ``--version``."""
    p = argparse.ArgumentParser(
        prog="python -m matrixopt",
        description="Print the matrixopt, torch and Python versions and the detected backends "
                    "(CUDA, Triton, Triton's interpreter), then run a short self-check against "
                    "float64 SVD references (orthogonalize, polar, one Muon step). Exit status: "
                    "0 if every check passes, 1 otherwise.")
    p.add_argument("--version", action="version", version=f"matrixopt {__version__}")
    return p


def main(argv: Sequence[str] | None = None, checks: Sequence[Check] = CHECKS) -> int:
    """Parse ``argv`` (``--help`` prints usage and exits), print versions and backends,
    run the self-check; return the exit status."""
    parser().parse_args(argv)
    width = max(len(name) for name, _ in backends())
    for name, desc in backends():
        print(f"{name:<{width}}  {desc}")
    print("self-check:")
    ok = run_checks(checks)
    print("self-check: " + ("OK" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
