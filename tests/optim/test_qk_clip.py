"""QKClip: recorded maxima vs a float64 reference, the clip brings them to min(S, τ),
heads under τ and every other weight untouched; MHA, a custom attention, Hugging Face
(Llama with GQA + RoPE, GPT-2 Conv1D), any optimizer, Muon wiring, checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matrixopt.optim import Muon, QKClip

TAU = 4.0


class Attn(nn.Module):
    """A custom attention with SDPA and the one-line record call."""

    def __init__(self, d: int = 16, heads: int = 4, kv_heads: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        self.h, self.kv = heads, kv_heads or heads
        self.hd = d // heads
        self.q = nn.Linear(d, d, bias=bias)
        self.k = nn.Linear(d, self.kv * self.hd, bias=bias)
        self.v = nn.Linear(d, self.kv * self.hd, bias=False)
        self.clip: QKClip | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(B, T, self.kv, self.hd).transpose(1, 2)
        if self.clip is not None:
            self.clip.record(self, q, k, causal=True)
        if self.kv != self.h:
            k = k.repeat_interleave(self.h // self.kv, 1)
            v = v.repeat_interleave(self.h // self.kv, 1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def ref_max(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor | None, wk: torch.Tensor,
            bk: torch.Tensor | None, h: int, kv: int) -> torch.Tensor:
    """Per-head max causal logit in float64, written from the definition."""
    x, wq, wk = x.detach().double(), wq.detach().double(), wk.detach().double()
    q = x @ wq.T + (bq.detach().double() if bq is not None else 0)
    k = x @ wk.T + (bk.detach().double() if bk is not None else 0)
    hd = wq.shape[0] // h
    B, T, _ = x.shape
    q = q.view(B, T, h, hd).transpose(1, 2)
    k = k.view(B, T, kv, hd).transpose(1, 2).repeat_interleave(h // kv, 1)
    logits = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(hd)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, -math.inf).amax(dim=(0, 2, 3))


def _inflate(m: Attn, heads: list[int], factor: float) -> None:
    with torch.no_grad():
        for h in heads:
            m.q.weight[h * m.hd:(h + 1) * m.hd] *= factor
            g = h // (m.h // m.kv)
            m.k.weight[g * m.hd:(g + 1) * m.hd] *= factor


@pytest.mark.parametrize("kv", [4, 2])
def test_custom_attention_clip_matches_float64(kv: int) -> None:
    torch.manual_seed(0)
    m = Attn(kv_heads=kv)
    _inflate(m, [0, 2] if kv == 4 else [0], 12.0)
    clip = QKClip(tau=TAU)
    clip.register(m, m.q, m.k, 4, n_kv_heads=kv)
    m.clip = clip
    x = torch.randn(2, 6, 16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    S = ref_max(x, m.q.weight, m.q.bias, m.k.weight, m.k.bias, 4, kv)
    m(x)
    torch.testing.assert_close(clip._layers[m].max.double(), S, rtol=1e-5, atol=1e-5)
    assert (S > TAU).any() and (S < TAU).any()
    clip.step()
    torch.testing.assert_close(clip.last_max["attn0"].double(), S, rtol=1e-5, atol=1e-5)
    after = ref_max(x, m.q.weight, m.q.bias, m.k.weight, m.k.bias, 4, kv)
    torch.testing.assert_close(after, S.clamp(max=TAU), rtol=1e-5, atol=1e-6)
    hd = m.hd
    for h in range(4):  # heads under τ: their q rows bitwise unchanged
        rows = slice(h * hd, (h + 1) * hd)
        same = torch.equal(m.q.weight[rows], before["q.weight"][rows])
        assert same == bool(S[h] <= TAU), h
    assert torch.equal(m.v.weight, before["v.weight"])
    if kv != 4:  # GQA: keys untouched, the query side takes the whole factor
        assert torch.equal(m.k.weight, before["k.weight"])
        assert torch.equal(m.k.bias, before["k.bias"])
    # maxima were reset; a second clip on the clipped weights changes them by rounding only
    assert torch.isneginf(clip._layers[m].max).all()
    m(x)
    w = m.q.weight.clone()
    clip.step()
    torch.testing.assert_close(m.q.weight, w, rtol=1e-6, atol=0)


def test_observe_and_eval_mode_skip() -> None:
    torch.manual_seed(0)
    m = Attn()
    clip = QKClip(tau=TAU)
    clip.register(m, m.q, m.k, 4)
    logits = torch.randn(2, 4, 5, 5)
    clip.observe(m, logits)
    torch.testing.assert_close(clip._layers[m].max, logits.amax(dim=(0, 2, 3)))
    m.eval()
    clip.observe(m, logits + 100)
    torch.testing.assert_close(clip._layers[m].max, logits.amax(dim=(0, 2, 3)))
    with pytest.raises(ValueError, match=r"logits must be \[\.\.\., 4, T, S\]"):
        m.train()
        clip.observe(m, torch.randn(2, 3, 5, 5))


def test_mha_masks_and_clip() -> None:
    torch.manual_seed(0)
    E, H = 16, 4
    mha = nn.MultiheadAttention(E, H, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight[:E] *= 6  # q of every head
        mha.in_proj_weight[E:2 * E] *= 6
    clip = QKClip(tau=TAU).attach(nn.Sequential(mha))
    x = torch.randn(3, 7, E)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, -2:] = True  # two padded keys in sample 0

    def reference() -> torch.Tensor:
        W, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
        q = (x.double() @ W[:E].T + b[:E]).view(3, 7, H, E // H).transpose(1, 2)
        k = (x.double() @ W[E:2 * E].T + b[E:2 * E]).view(3, 7, H, E // H).transpose(1, 2)
        logits = q @ k.transpose(-1, -2) / math.sqrt(E // H)
        keep = ~causal[None, None] & ~pad[:, None, None, :]
        return logits.masked_fill(~keep, -math.inf).amax(dim=(0, 2, 3))

    S = reference()
    mha(x, x, x, attn_mask=causal, key_padding_mask=pad)
    torch.testing.assert_close(clip._layers[mha].max.double(), S, rtol=1e-5, atol=1e-5)
    assert (S > TAU).all()
    out_proj = mha.out_proj.weight.clone()
    v_rows = mha.in_proj_weight[2 * E:].clone()
    clip.step()
    torch.testing.assert_close(reference(), torch.full((H,), TAU, dtype=torch.float64),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(mha.out_proj.weight, out_proj)
    assert torch.equal(mha.in_proj_weight[2 * E:], v_rows)


def test_mha_separate_weights_bias_slices() -> None:
    torch.manual_seed(1)
    E, H = 8, 2
    mha = nn.MultiheadAttention(E, H, kdim=6, vdim=6)  # q/k/v_proj_weight, fused bias [3E]
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.q_proj_weight.mul_(8)
        mha.k_proj_weight.mul_(8)
    clip = QKClip(tau=TAU).attach(nn.Sequential(mha))
    q_in, kv_in = torch.randn(5, 2, E), torch.randn(4, 2, 6)  # (T, B, E): batch_first=False

    def reference() -> torch.Tensor:
        b = mha.in_proj_bias.double()
        q = (q_in.double() @ mha.q_proj_weight.double().T + b[:E]).view(5, 2, H, 4)
        k = (kv_in.double() @ mha.k_proj_weight.double().T + b[E:2 * E]).view(4, 2, H, 4)
        return torch.einsum("tbhd,sbhd->bhts", q, k).amax(dim=(0, 2, 3)) / 2.0

    S = reference()
    mha(q_in, kv_in, kv_in)
    torch.testing.assert_close(clip._layers[mha].max.double(), S, rtol=1e-5, atol=1e-5)
    v_bias = mha.in_proj_bias[2 * E:].clone()
    clip.step()
    torch.testing.assert_close(reference(), S.clamp(max=TAU), rtol=1e-5, atol=1e-6)
    assert torch.equal(mha.in_proj_bias[2 * E:], v_bias)


def _hf_clip_roundtrip(model: nn.Module, ids: torch.Tensor) -> None:
    """Record S, set τ between the heads' maxima, clip: the same batch's maxima are min(S, τ)
    (one layer: clipping a layer changes the input of the next)."""
    clip = QKClip(tau=1e9).attach(model)
    model(ids)
    S = torch.cat([lay.max for lay in clip._layers.values()]).clone()
    assert torch.isfinite(S).all()
    clip.tau = float(S.min() + S.max()) / 2
    assert clip.tau > 0
    assert (S > clip.tau).any() and (S < clip.tau).any()
    clip.step()
    model(ids)
    after = torch.cat([lay.max for lay in clip._layers.values()])
    torch.testing.assert_close(after, S.clamp(max=clip.tau), rtol=1e-4, atol=1e-5)


def test_hf_llama_gqa_rope() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=16)
    model = transformers.LlamaModel(cfg).train()
    k_before = [lay.self_attn.k_proj.weight.clone() for lay in model.layers]
    _hf_clip_roundtrip(model, torch.randint(0, 40, (2, 9)))
    for lay, kb in zip(model.layers, k_before):  # GQA: the query side only
        assert torch.equal(lay.self_attn.k_proj.weight, kb)


def test_hf_gpt2_conv1d() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                  attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg).train()
    with torch.no_grad():
        for blk in model.h:
            blk.attn.c_attn.bias.normal_(0.0, 0.1)
    v_before = [blk.attn.c_attn.weight[:, 64:].clone() for blk in model.h]
    _hf_clip_roundtrip(model, torch.randint(0, 40, (2, 9)))
    for blk, vb in zip(model.h, v_before):
        assert torch.equal(blk.attn.c_attn.weight[:, 64:], vb)


def test_any_optimizer_hook_and_checkpoint() -> None:
    torch.manual_seed(0)
    m = Attn()
    _inflate(m, [1], 12.0)
    clip = QKClip(tau=TAU)
    clip.register(m, m.q, m.k, 4, name="block")
    m.clip = clip
    opt = torch.optim.AdamW(m.parameters(), lr=0.0)
    clip.hook(opt)
    x = torch.randn(2, 6, 16)
    m(x).backward()
    opt.step()  # lr 0: only the clip moves weights
    S = clip.last_max["block"]
    assert S[1] > TAU
    after = ref_max(x, m.q.weight, m.q.bias, m.k.weight, m.k.bias, 4, 4)
    assert after[1] == pytest.approx(TAU, rel=1e-5)
    m(x)  # maxima in flight are part of the state
    sd = opt.state_dict()
    assert set(sd["qk_clip"]["max"]) == {"block"}
    m2 = Attn()
    clip2 = QKClip(tau=1.0)
    clip2.register(m2, m2.q, m2.k, 4, name="block")
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.0)
    clip2.hook(opt2)
    opt2.load_state_dict(sd)
    assert clip2.tau == TAU and int(clip2.clipped) == int(clip.clipped) == 1
    torch.testing.assert_close(clip2._layers[m2].max, clip._layers[m].max)
    torch.testing.assert_close(clip2.last_max["block"], S)
    bad = QKClip()
    bad.register("other", m2.q, m2.k, 4)
    with pytest.raises(ValueError, match=r"saved layers \['block'\] differ"):
        bad.load_state_dict(clip.state_dict())


def test_muon_wiring() -> None:
    torch.manual_seed(0)
    m = Attn()
    _inflate(m, [3], 12.0)
    clip = QKClip(tau=TAU)
    clip.register(m, m.q, m.k, 4)
    m.clip = clip
    opt = Muon(m.parameters(), lr=0.0, weight_decay=0.0, qk_clip=clip)
    x = torch.randn(2, 6, 16)
    m(x).backward()
    opt.step()
    after = ref_max(x, m.q.weight, m.q.bias, m.k.weight, m.k.bias, 4, 4)
    assert float(after.max()) == pytest.approx(TAU, rel=1e-5)
    assert "qk_clip" in opt.state_dict()


def test_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"tau must be a number > 0 \(inf: record only\), got -1"):
        QKClip(tau=-1)
    clip = QKClip()
    lin = nn.Linear(8, 8)
    with pytest.raises(ValueError, match=r"n_heads=3 must be a positive multiple of "
                                         r"n_kv_heads=2"):
        clip.register("a", lin, lin, 3, n_kv_heads=2)
    with pytest.raises(ValueError, match=r"4 heads of 4 features from offset 0 do not fit"):
        clip.register("a", lin, lin, 4, head_dim=4)
    with pytest.raises(KeyError, match=r"'b' is not registered"):
        clip.record("b", torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
    clip.register("a", lin, lin, 2)
    with pytest.raises(ValueError, match=r"q must be \[B, 2, T, d\]"):
        clip.record("a", torch.zeros(1, 3, 3, 4), torch.zeros(1, 3, 3, 4))
    with pytest.raises(ValueError, match=r"no nn.MultiheadAttention"):
        clip.attach(nn.Linear(2, 2))
