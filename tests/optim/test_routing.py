"""Routing rules, selectors and warnings (issue 15, items 1-4).

Architectures built from configs are in test_routing_architectures.py; this
file covers the rules one at a time on small models, the split update against
a float64 SVD reference, the 3-D ``matrix_view="auto"`` warning and GaLore's
rank warnings.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import matrixopt
from matrixopt.optim import GaLoreAdafactor, GaLoreAdamW, Muon
from matrixopt.optim.routing import galore_param_groups, muon_param_groups


def _where(groups) -> dict[str, str]:
    return {r.name: r.group for r in groups.routes}


def _no_warnings():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    return ctx


# ------------------------------------------------------------------- item 1
def test_issue_repro_hidden_layers_reach_muon():
    m = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64), nn.GELU(), nn.LayerNorm(64),
                      nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = muon_param_groups(m)
    where = _where(groups)
    assert where["1.weight"] == where["4.weight"] == "muon"
    assert where["6.weight"] == "adamw" and where["0.weight"] == "adamw"
    assert "output head (last Linear in module order)" in groups.report


def test_sequential_cnn_classifier_is_the_head():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 32, 3), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    where = _where(muon_param_groups(m))
    assert where["6.weight"] == "adamw"
    assert where["0.weight"] == where["2.weight"] == "muon_flatten"


def test_no_parameter_reaches_muon_warns():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    with pytest.warns(UserWarning, match="no parameter reaches muon"):
        muon_param_groups(m)


def test_more_than_one_head_warns():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 8)
            self.a = nn.Linear(8, 3)
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.a(h) + self.b(h)

    with pytest.warns(UserWarning, match=r"found 2 output heads \(a, b"):
        groups = muon_param_groups(TwoHeads(), example_inputs=torch.randn(2, 8))
    assert _where(groups) == {"body.weight": "muon", "body.bias": "adamw_no_decay",
                              "a.weight": "adamw", "a.bias": "adamw_no_decay",
                              "b.weight": "adamw", "b.bias": "adamw_no_decay"}


def test_two_modules_tied_to_embeddings_warn():
    emb1, emb2 = nn.Embedding(20, 8), nn.Embedding(30, 8)
    h1, h2 = nn.Linear(8, 20, bias=False), nn.Linear(8, 30, bias=False)
    h1.weight, h2.weight = emb1.weight, emb2.weight
    m = nn.ModuleDict({"emb1": emb1, "emb2": emb2, "body": nn.Linear(8, 8), "h1": h1, "h2": h2})
    with pytest.warns(UserWarning, match="found 2 output heads"):
        groups = muon_param_groups(m)
    assert groups.heads == ["h1", "h2"]


def test_tied_by_storage_not_parameter_object():
    emb = nn.Embedding(30, 8)
    head = nn.Linear(8, 30, bias=False)
    head.weight = nn.Parameter(emb.weight.data)  # another Parameter over the same storage
    m = nn.ModuleDict({"emb": emb, "body": nn.Linear(8, 8), "out": head, "later": nn.Linear(8, 8)})
    groups = muon_param_groups(m)
    assert groups.heads == ["out"]
    where = _where(groups)
    assert where["out.weight"] == "adamw" and where["later.weight"] == "muon"


def test_functional_tied_head_found_by_trace():
    class NanoTied(nn.Module):  # logits = h @ wte.T with no head module
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(50, 16)
            self.fc = nn.Linear(16, 16)

        def forward(self, idx):
            return torch.nn.functional.linear(torch.tanh(self.fc(self.wte(idx))),
                                              self.wte.weight)

    model = NanoTied()
    with pytest.warns(UserWarning, match="no parameter reaches muon"):
        assert muon_param_groups(model).heads == ["fc"]  # module order cannot see the tie
    groups = muon_param_groups(model, example_inputs=torch.randint(0, 50, (2, 5)))
    assert groups.heads == ["wte"]
    assert _where(groups)["fc.weight"] == "muon"


def test_trace_passes_parameter_free_ops_and_stops_at_a_final_norm():
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Dropout(0.5),
                        nn.LogSoftmax(-1))
    assert muon_param_groups(seq, example_inputs=torch.randn(3, 8)).heads == ["2"]
    normed = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16))
    groups = muon_param_groups(normed, example_inputs=torch.randn(3, 8))
    assert groups.heads == []  # the output is a normalised representation: no head
    assert _where(groups)["2.weight"] == "muon"


def test_hf_style_output_uses_logits():
    class Out(dict):
        pass

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.aux, self.cls = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 3)

        def forward(self, x):
            h = self.body(x)
            return Out(aux=self.aux(h), logits=self.cls(h))

    groups = muon_param_groups(M(), example_inputs={"x": torch.randn(2, 4)})
    assert groups.heads == ["cls"]


def test_head_selector_names_patterns_and_predicate():
    m = nn.ModuleDict({"emb": nn.Embedding(10, 8), "proj": nn.Linear(8, 8),
                       "out_a": nn.Linear(8, 3), "out_b": nn.Linear(8, 3)})
    assert muon_param_groups(m, head="proj").heads == ["proj"]
    assert muon_param_groups(m, head="out_*").heads == ["out_a", "out_b"]
    groups = muon_param_groups(m, head=lambda name, mod: getattr(mod, "out_features", 0) == 3)
    assert groups.heads == ["out_a", "out_b"]
    assert _where(groups)["proj.weight"] == "muon"
    assert "output head (head=)" in groups.report
    with pytest.raises(ValueError, match="head=.*matches no module"):
        muon_param_groups(m, head=["lm_head"])


def test_exclude_selector():
    m = nn.ModuleDict({"a": nn.Linear(8, 8), "router": nn.Linear(8, 4), "b": nn.Linear(8, 8),
                       "out": nn.Linear(8, 2)})
    m.register_parameter("gate", nn.Parameter(torch.randn(4, 4)))
    where = _where(muon_param_groups(m, exclude=["router", "gate"]))
    assert where["router.weight"] == "adamw" and where["gate"] == "adamw"
    assert where["a.weight"] == where["b.weight"] == "muon"
    where = _where(muon_param_groups(m, exclude=lambda n, mod: n == "a"))
    assert where["a.weight"] == "adamw" and where["router.weight"] == "muon"
    with pytest.raises(ValueError, match="exclude pattern.*'nope'"):
        muon_param_groups(m, exclude="nope")


def test_broadcast_tables_and_vector_shaped_matrices_go_to_adamw():
    m = nn.Module()
    m.cls_token = nn.Parameter(torch.zeros(1, 1, 16))
    m.pos_embed = nn.Parameter(torch.zeros(1, 9, 16))
    m.experts = nn.Parameter(torch.randn(4, 16, 8))
    m.body = nn.Linear(16, 16)
    m.value = nn.Linear(16, 1)  # the last Linear: the head
    where = _where(muon_param_groups(m))
    assert where["cls_token"] == where["pos_embed"] == "adamw"
    assert where["experts"] == "muon" and where["body.weight"] == "muon"


def test_muon_groups_pass_matrix_view_explicitly_so_nothing_warns():
    m = nn.Module()
    m.experts = nn.Parameter(torch.randn(4, 16, 8))
    m.conv = nn.Conv1d(8, 8, 3)
    m.body, m.out = nn.Linear(8, 8), nn.Linear(8, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = Muon(muon_param_groups(m), lr=1e-2)
    views = {g["name"]: g["matrix_view"] for g in opt.param_groups if g["algorithm"] == "muon"}
    assert views == {"muon": "batch", "muon_flatten": "flatten"}


# ------------------------------------------------------------------- item 2
def test_conv1d_under_model_parameters_warns_and_the_explicit_view_silences_it():
    conv = nn.Conv1d(4, 6, 3)
    with pytest.warns(UserWarning, match=r"param_groups\[0\].*\(6, 4, 3\).*Conv1d.*flatten"):
        Muon(conv.parameters(), lr=1e-2)
    for view in ("flatten", "batch"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Muon(conv.parameters(), lr=1e-2, matrix_view=view)
    with warnings.catch_warnings():  # adamw-only groups are never orthogonalised
        warnings.simplefilter("error")
        Muon(conv.parameters(), lr=1e-2, algorithm="adamw")


def _one_update(opt_params, model_params, grads):
    """``p_before - p_after`` after one step with the given gradients."""
    opt, params = opt_params, model_params
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()
    return [b - p.detach() for b, p in zip(before, params)]


def test_conv1d_routed_update_is_the_flattened_polar_factor():
    """muon_param_groups flattens Conv1d: the update is U Vᵀ of the [out, in·k] gradient."""
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 6, 3, bias=False).double()
    m = nn.ModuleDict({"conv": conv, "out": nn.Linear(4, 2).double()})
    groups = muon_param_groups(m)
    assert _where(groups)["conv.weight"] == "muon_flatten"
    opt = Muon(groups, lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0,
               adjust_lr="none", ns_dtype=torch.float64, ns_steps=30)
    G = torch.randn(6, 4, 3, dtype=torch.float64)
    upd = _one_update(opt, [conv.weight], [G])[0]
    U, _, Vh = torch.linalg.svd(G.reshape(6, 12), full_matrices=False)
    torch.testing.assert_close(upd, (U @ Vh).reshape(6, 4, 3), atol=1e-10, rtol=0)


# ------------------------------------------------------------------- item 3
def _polar(X: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(X, full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("normuon", [False, True])
@pytest.mark.parametrize("split,shape,blocks", [
    (3, (12, 5), lambda G: [G[0:4], G[4:8], G[8:12]]),
    ((3, "rows"), (12, 5), lambda G: [G[0:4], G[4:8], G[8:12]]),
    ((3, "cols"), (5, 12), lambda G: [G[:, 0:4], G[:, 4:8], G[:, 8:12]]),
    ((2, "cols"), (2, 3, 8), lambda G: [G[e][:, s] for e in range(2)
                                        for s in (slice(0, 4), slice(4, 8))]),
], ids=["rows-int", "rows", "cols", "cols-batched"])
def test_split_update_orthogonalises_each_block(split, shape, blocks, normuon):
    torch.manual_seed(1)
    p = nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0, adjust_lr="none",
               ns_dtype=torch.float64, ns_steps=30, split=split, matrix_view="batch",
               normuon=normuon)
    G = torch.randn(*shape, dtype=torch.float64)
    upd = _one_update(opt, [p], [G])[0]
    ref = torch.zeros_like(G)
    ref_blocks = blocks(ref)
    for gb, rb in zip(blocks(G), ref_blocks):
        O = _polar(gb)
        if normuon:  # first step: v = (1 - β2)·rowmean(O²); rows rescaled, Frobenius kept
            v = (1 - 0.95) * O.square().mean(-1, keepdim=True)
            N = O / (v.sqrt() + 1e-8)
            O = N * (O.norm() / N.norm())
        rb.copy_(O)
    # NorMuon's row statistic runs in float32 (Muon._normuon): float32 round-off then
    torch.testing.assert_close(upd, ref, atol=1e-6 if normuon else 1e-9, rtol=0)


def test_split_update_scale_comes_from_the_block_shape():
    p = nn.Parameter(torch.randn(8, 96, dtype=torch.float64))
    opt = Muon([p], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0,
               ns_dtype=torch.float64, ns_steps=30, split=(3, "cols"))  # match_rms_adamw
    G = torch.randn(8, 96, dtype=torch.float64)
    upd = _one_update(opt, [p], [G])[0]
    block = upd[:, :32]
    # each 8x32 block: s = 0.2·sqrt(max(8, 32)) times a matrix with singular values 1
    torch.testing.assert_close(torch.linalg.svdvals(block),
                               torch.full((8,), 0.2 * math.sqrt(32), dtype=torch.float64))


@pytest.mark.parametrize("bad", [0, (3, "diag"), (3,), "3", (True, "rows"), 2.5])
def test_bad_split_fails_at_construction(bad):
    p = nn.Parameter(torch.randn(6, 6))
    with pytest.raises(ValueError, match=r"Muon: param_groups\[0\]: split must be None"):
        Muon([p], split=bad)


def test_split_must_divide_the_chosen_side():
    p = nn.Parameter(torch.randn(6, 8))
    Muon([p], split=(4, "cols"))
    with pytest.raises(ValueError, match=r"split=\(4, 'cols'\) does not divide the 6 cols"):
        Muon([nn.Parameter(torch.randn(8, 6))], split=(4, "cols"))
    with pytest.raises(ValueError, match="does not divide the 6 rows"):
        Muon([p], split=4)


def test_split_patterns_in_muon_param_groups():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24)
            self.proj = nn.Linear(8, 8)

    m = nn.ModuleDict({"blk": Attn(), "mha": nn.MultiheadAttention(8, 2), "out": nn.Linear(8, 2)})
    groups = muon_param_groups(m, split={"*.qkv": 3, "mha": (3, "rows")})
    where = _where(groups)
    assert where["blk.qkv.weight"] == where["mha.in_proj_weight"] == "muon_split3"
    assert where["blk.proj.weight"] == "muon"
    assert "split in 3 rows" in groups.report
    g = next(g for g in groups if g["name"] == "muon_split3")
    assert g["split"] == 3
    with pytest.raises(ValueError, match=r"split pattern '\*\.kqv' matches no module"):
        muon_param_groups(m, split={"*.kqv": 3})
    with pytest.raises(ValueError, match="5 does not divide the 24 rows of blk.qkv.weight"):
        muon_param_groups(m, split={"*.qkv": 5})
    # legacy flag still gives the MultiheadAttention its own group
    assert _where(muon_param_groups(m, split_fused_qkv=True))["mha.in_proj_weight"] == "muon_qkv"


def test_split_group_survives_a_state_dict_round_trip(tmp_path):
    p = nn.Parameter(torch.randn(4, 12))
    opt = Muon([p], lr=1e-2, split=(3, "cols"))
    p.grad = torch.randn(4, 12)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    opt2 = Muon([p], lr=1e-2, split=(3, "cols"))
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    p.grad = torch.randn(4, 12)
    opt2.step()
    assert torch.isfinite(p).all()


# ------------------------------------------------------------------- item 4
def test_galore_without_any_rank_warns_once_naming_the_group():
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match=r"no parameter group sets rank.*param_groups\[0\]") as rec:
        opt = GaLoreAdamW(m.parameters(), lr=1e-3)
    assert len([w for w in rec if "sets rank" in str(w.message)]) == 1
    with warnings.catch_warnings(record=True) as rec2:  # once per optimizer
        warnings.simplefilter("always")
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))]})
    assert not [w for w in rec2 if "sets rank" in str(w.message)]
    with pytest.warns(UserWarning, match="GaLoreAdafactor runs as plain Adafactor"):
        GaLoreAdafactor(m.parameters())


def test_galore_usual_recipe_does_not_warn():
    m = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
    mats = [p for p in m.parameters() if p.ndim == 2]
    rest = [p for p in m.parameters() if p.ndim < 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaLoreAdamW([{"params": rest}, {"params": mats, "rank": 8}], lr=1e-3)
        GaLoreAdamW(galore_param_groups(m, rank=8), lr=1e-3)


def test_galore_add_param_group_without_rank_warns_once():
    bias = nn.Parameter(torch.zeros(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no matrix yet, then a matrix with a rank: fine
        opt = GaLoreAdamW([bias], lr=1e-3)
        opt.add_param_group({"params": [nn.Parameter(torch.randn(8, 8))], "rank": 4})
    opt2 = GaLoreAdamW([bias], lr=1e-3)
    with pytest.warns(UserWarning, match=r"none of the 1 matrices \(param_groups\[1\]"):
        opt2.add_param_group({"params": [nn.Parameter(torch.randn(8, 8))]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per optimizer
        opt2.add_param_group({"params": [nn.Parameter(torch.randn(8, 8))]})


def test_galore_rank_above_min_dim_warns_naming_group_and_shape():
    small = nn.Parameter(torch.randn(6, 20))
    big = nn.Parameter(torch.randn(40, 40))
    with pytest.warns(UserWarning, match=r"param_groups\[1\]: rank=16 exceeds min\(m, n\) of 1 "
                                         r"matrix\(es\) \(e\.g\. shape \(6, 20\), min\(m, n\) = 6"):
        GaLoreAdamW([{"params": [big], "rank": 16}, {"params": [small], "rank": 16}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaLoreAdamW([{"params": [big, small], "rank": 6}])


def test_galore_param_groups_conv_and_stacks():
    m = nn.Module()
    m.conv = nn.Conv2d(3, 8, 3)
    m.experts = nn.Parameter(torch.randn(4, 16, 8))
    m.body, m.out = nn.Linear(8, 8), nn.Linear(8, 2)
    groups = galore_param_groups(m, rank=2, update_proj_gap=5)
    where = _where(groups)
    assert where == {"conv.weight": "galore_flatten", "conv.bias": "adamw_no_decay",
                     "experts": "galore", "body.weight": "galore", "body.bias": "adamw_no_decay",
                     "out.weight": "adamw", "out.bias": "adamw_no_decay"}
    by = {g["name"]: g for g in groups}
    assert by["galore"]["rank"] == 2 and by["galore"]["update_proj_gap"] == 5
    assert by["galore_flatten"]["matrix_view"] == "flatten"
    assert "rank" not in by["adamw"] and by["adamw_no_decay"]["weight_decay"] == 0.0
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0"):
        galore_param_groups(m, rank=0)
    with pytest.warns(UserWarning, match="no parameter reaches GaLore"):
        galore_param_groups(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5)), rank=2)


def test_exports():
    assert matrixopt.optim.galore_param_groups is galore_param_groups
    assert matrixopt.galore_param_groups is galore_param_groups


# ------------------------------------------------------------------- README
def test_readme_first_example_routes_a_model_the_old_size_heuristic_got_wrong():
    """The README's first block, run as written (warnings are errors): its model is the
    issue's, where every Linear's out_features equals the vocabulary size."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Swap AdamW for Muon"):]
    code = re.search(r"^```python\n(.*?)^```", section, flags=re.DOTALL | re.MULTILINE)
    assert code is not None
    ns: dict = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(code.group(1), "README.md", "exec"), ns)  # noqa: S102
    groups = ns["groups"]
    assert {r.name for r in groups.routes if r.group == "muon"} == {"1.weight", "4.weight"}
    assert groups.heads == ["6"]
    vocab = ns["model"][0].num_embeddings
    assert all(m.out_features == vocab for m in ns["model"] if isinstance(m, nn.Linear))
