"""Row-aligned int8 blocks (``quantize_blockwise(rows=True)``, Adafactor's momentum): every
row its own blocks, so any dim-0 shard quantises exactly as the whole tensor; old flat-layout
Adafactor checkpoints are converted on load."""

from __future__ import annotations

import pytest
import torch

from matrixopt.optim import Adafactor
from matrixopt.optim._quant import dequantize_blockwise, quantize_blockwise, to_row_blocks

SHAPES = [(10, 300), (7, 512), (3, 4, 100), (64, 64), (1, 5000), (0, 300)]


def _x(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("signed", [True, False])
def test_row_blocks_are_each_rows_flat_blocks(shape: tuple[int, ...], signed: bool) -> None:
    x = _x(shape)
    codes, absmax = quantize_blockwise(x, signed, rows=True)
    row = x[0].numel() if shape[0] else 300
    assert absmax.shape == (shape[0], -(-row // 256)) and codes.shape == x.shape
    # reference: each row quantised alone in the flat layout
    for i in range(shape[0]):
        c, a = quantize_blockwise(x[i], signed)
        assert torch.equal(codes[i], c) and torch.equal(absmax[i], a)
    d = dequantize_blockwise(codes, absmax, signed)
    for i in range(shape[0]):
        assert torch.equal(d[i], dequantize_blockwise(*quantize_blockwise(x[i], signed), signed))
    # written in place through out= (the stored state): the same codes
    out = (torch.empty_like(codes), torch.empty_like(absmax))
    quantize_blockwise(x, signed, out=out)
    assert torch.equal(out[0], codes) and torch.equal(out[1], absmax)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_any_row_shard_quantises_as_the_whole_tensor(world: int) -> None:
    x = _x((11, 300))
    codes, absmax = quantize_blockwise(x, True, rows=True)
    for r, part in enumerate(x.chunk(world)):
        c, a = quantize_blockwise(part, True, rows=True)
        lo = r * (-(-11 // world))
        assert torch.equal(c, codes[lo:lo + part.shape[0]])
        assert torch.equal(a, absmax[lo:lo + part.shape[0]])
    # the flat layout would cut blocks across the shards: not the same scales
    flat = quantize_blockwise(x[:6], True)[1]
    assert flat.numel() != absmax[:6].numel() or not torch.equal(flat, absmax[:6].reshape(-1))


def test_to_row_blocks_is_exact_for_rows_of_whole_blocks() -> None:
    x = _x((6, 512))
    c, a = quantize_blockwise(x, True)
    rc, ra = to_row_blocks(c, a, True)
    assert rc is c and torch.equal(ra.reshape(-1), a) and ra.shape == (6, 2)
    y = _x((6, 300))
    rc, ra = to_row_blocks(*quantize_blockwise(y, True), True)
    assert ra.shape == (6, 2)
    # requantised: within the code's rounding of the flat values (≤ 0.7 % of a block max each)
    assert (dequantize_blockwise(rc, ra, True) - y).abs().max() <= 0.02 * y.abs().max()


def test_adafactor_converts_a_flat_int8_checkpoint_on_load() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(40, 300))
    opt = Adafactor([w], lr=1e-2, relative_step=False, beta1=0.9, state_dtype="int8")
    w.grad = torch.randn_like(w)
    opt.step()
    st = opt.state[w]
    assert st["exp_avg_absmax"].shape == (40, 2)
    before = dequantize_blockwise(st["exp_avg"], st["exp_avg_absmax"], True)
    sd = opt.state_dict()
    # an older checkpoint: the same momentum in the flat layout
    old = sd["state"][0]
    old["exp_avg"], old["exp_avg_absmax"] = quantize_blockwise(before, True)
    assert old["exp_avg_absmax"].dim() == 1
    opt2 = Adafactor([w], lr=1e-2, relative_step=False, beta1=0.9, state_dtype="int8")
    opt2.load_state_dict(sd)
    st2 = opt2.state[w]
    assert st2["exp_avg_absmax"].shape == (40, 2)
    after = dequantize_blockwise(st2["exp_avg"], st2["exp_avg_absmax"], True)
    assert (after - before).abs().max() <= 0.02 * before.abs().max()
    opt2.step()  # and it steps on
    assert torch.isfinite(w).all()
