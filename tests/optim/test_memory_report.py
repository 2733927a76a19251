"""memory_report against sizes computed by hand."""

from __future__ import annotations

import torch

from matrixopt.optim import GaLoreAdamW, Muon, memory_report


def _step(opt, params):
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()


def test_muon_fp32_and_int8_state_bytes_by_hand():
    W = torch.zeros(128, 64, requires_grad=True)      # 8192 entries: Muon
    b = torch.zeros(64, requires_grad=True)           # AdamW, small
    E = torch.zeros(64, 128, requires_grad=True)      # AdamW, 8192 entries
    for sd, mom, adam_big in ((None, 8192 * 4, 2 * 8192 * 4),
                              ("int8", 8192 + 32 * 4, 2 * (8192 + 32 * 4))):
        opt = Muon([{"params": [W]}, {"params": [b, E], "algorithm": "adamw"}], lr=0.0,
                   state_dtype=sd, ns_dtype=torch.bfloat16)
        _step(opt, [W, b, E])
        r = memory_report(opt)
        cnt = 8  # each parameter's int64 nonfinite_count (nonfinite="skip")
        assert r.groups[0].state_bytes == mom + cnt
        # b: step(4) + 2·64·4 fp32; E: step(4) + moments
        assert r.groups[1].state_bytes == 4 + 2 * 64 * 4 + 4 + adam_big + 2 * cnt
        assert r.state_bytes == mom + 4 + 2 * 64 * 4 + 4 + adam_big + 3 * cnt
        assert r.param_bytes == (8192 * 2 + 64) * 4
        if sd == "int8":
            assert r.by_dtype == {"int8": 3 * 8192, "float32": 3 * 32 * 4 + 8 + 2 * 64 * 4,
                                  "int64": 3 * cnt}
        # orthogonalisation of one 128×64 matrix in bf16: directions 8192·4, input
        # 4·8192, bf16 iterates 2·2·8192 and Gram products 2·2·64²
        ortho = 8192 * 4 + 4 * 8192 + 2 * (2 * 8192 + 2 * 64 * 64)
        if sd == "int8":
            ortho += 4 * 8192
        assert r.workspace["orthogonalisation"] == ortho
        assert r.workspace_bytes == max(r.workspace.values())
        assert "MiB" in str(r)


def test_galore_state_and_refresh_workspace_by_hand():
    W = torch.zeros(256, 96, requires_grad=True)
    opt = GaLoreAdamW([{"params": [W], "rank": 8, "projector": "warm"}], lr=0.0)
    _step(opt, [W])
    r = memory_report(opt)
    # the basis (96 × 8) spans the short side, the moments are 256 × 8 each (fp32),
    # plus Adam's fp32 step, 4 int64 counters and the int64 nonfinite_count
    assert r.by_dtype["float32"] == 2 * 8 * 256 * 4 + 96 * 8 * 4 + 4
    assert r.by_dtype["int64"] == 5 * 8
    assert r.workspace["projected_step"] == 2 * 4 * 8 * 256
    assert r.workspace["refresh"] == 4 * 3 * 8 * (256 + 96)


def test_galore_int8_basis_adds_its_dequantised_copy_to_the_step_workspace():
    W = torch.zeros(512, 128, requires_grad=True)
    opt = GaLoreAdamW([{"params": [W], "rank": 64}], lr=0.0, state_dtype="int8")
    _step(opt, [W])
    r = memory_report(opt)
    assert opt.state[W]["projector"].dtype == torch.int8  # 128 × 64 basis, quantised
    assert r.workspace["projected_step"] == 2 * 4 * 64 * 512 + 4 * 64 * 128


def test_torch_adamw_is_counted_too():
    p = torch.zeros(10, 10, requires_grad=True)
    opt = torch.optim.AdamW([p])
    _step(opt, [p])
    r = memory_report(opt)
    assert r.state_bytes == 2 * 100 * 4 + 4 and r.workspace["adamw"] == 400
