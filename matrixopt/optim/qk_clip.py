r"""QK-clip (MuonClip, Kimi K2 report, arXiv 2507.20534): keep attention logits under τ.

During the forward pass the largest pre-softmax logit of every attention head is
recorded,

.. math:: S^h_{\max} = \max_{b,\,i,\,j \text{ unmasked}} \; s\,\langle q^h_{b,i}, k^h_{b,j}\rangle

(``s`` the attention's scale, usually :math:`1/\sqrt{d_h}`; the signed maximum of
the logits the softmax exponentiates, masks applied). After ``optimizer.step()``
every head with :math:`S^h_{\max} > \tau` is rescaled with
:math:`\gamma_h = \tau / S^h_{\max}`:

* multi-head attention (one key head per query head): the rows of :math:`W_q`
  and :math:`W_k` that produce head ``h`` (and their biases) are multiplied by
  :math:`\sqrt{\gamma_h}` each (K2 Algorithm 1), so the same batch's logits of
  that head become :math:`\gamma_h S`, at most τ. Rotary embeddings are linear in
  q and k, so this holds with RoPE too.
* grouped-query / multi-query attention (a key head serves several query heads):
  only the query rows of head ``h`` are multiplied by :math:`\gamma_h` (scaling a
  shared key head would change its other query heads; the K2 report does not say
  what it does for GQA -- REFERENCE-NEXT §5 marks it unverified).

Heads at or under τ are not touched (factor exactly 1), nothing else in the model
or in the optimizer's state changes. The control is lagged by one step, as in
K2: the maxima of this step's forward decide the clip after this step's update.

Cost: recording recomputes the logits of each attention, :math:`O(B\,H\,T\,S\,d_h)`
flops and a ``B×H×T×S`` float32 temporary (the attention's own cost), under
``no_grad``; the clip is one multiplication per q/k row. No host read: the
factors are computed on the device with ``torch.where``. Under DDP/FSDP2 the
maxima of all layers go through **one** ``all_reduce(MAX)`` per step.

Three ways to record:

* :meth:`QKClip.attach` hooks every :class:`torch.nn.MultiheadAttention` of a
  model and every Hugging Face attention module (those that call
  ``ALL_ATTENTION_FUNCTIONS``: Llama, GPT-2, Mistral, Qwen2, ...; the recorded q
  and k are the ones the attention function receives, after RoPE).
* a custom attention: :meth:`QKClip.register` the module's q/k weights once, then
  one line in its ``forward``: ``clip.record(self, q, k, causal=True)``
  (or ``clip.observe(self, logits)`` with the logits already computed).
* ``clip.hook(optimizer)`` (any ``torch.optim.Optimizer``) or
  ``Muon(..., qk_clip=clip)`` runs :meth:`QKClip.step` after every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._qk_hf import HF_IMPL, install_hf_interface, is_hf_attention

__all__ = ["QKClip"]


@dataclass
class _Proj:
    """``heads × head_dim`` consecutive output features of a projection weight (and bias)."""

    weight: Tensor
    bias: Tensor | None
    dim: int  # the output-feature axis of ``weight`` (0: nn.Linear, 1: HF Conv1D)
    start: int
    heads: int
    head_dim: int
    bias_start: int = -1  # the bias's first feature (default: ``start``)

    def __post_init__(self) -> None:
        if self.bias_start < 0:
            self.bias_start = self.start

    def scale_(self, s: Tensor) -> None:
        """Multiply the features of head ``h`` by ``s[h]`` (in place, DTensor shards too)."""
        for t, dim, start in ((self.weight, self.dim, self.start), (self.bias, 0, self.bias_start)):
            if t is None:
                continue
            feat = s.to(t.dtype).repeat_interleave(self.head_dim)
            size = t.shape[dim]
            full = torch.ones(size, dtype=t.dtype, device=s.device)
            full[start:start + feat.numel()] = feat
            local, offset = _local_with_offset(t, dim)
            part = full[offset:offset + local.shape[dim]].to(local.device)
            shape = [1] * local.ndim
            shape[dim] = -1
            local.mul_(part.view(shape))


def _local_with_offset(t: Tensor, dim: int) -> tuple[Tensor, int]:
    """The local tensor and the global index of its first element along ``dim``."""
    from ._distributed import _is_dtensor

    if not _is_dtensor(t):
        return t, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local(), int(offset[dim])


@dataclass
class _Layer:
    name: str
    q: _Proj
    k: _Proj
    extra_k: list[Tensor] = field(default_factory=list)  # MHA bias_k: scaled with the k rows
    max: Tensor | None = None
    last: Tensor | None = None

    @property
    def gqa(self) -> bool:
        return self.k.heads != self.q.heads


def _proj_of(x: nn.Module | Tensor, what: str) -> tuple[Tensor, Tensor | None]:
    if isinstance(x, nn.Module):
        w = getattr(x, "weight", None)
        if not isinstance(w, Tensor):
            raise TypeError(f"QKClip.register: {what} must be a tensor or a module with a "
                            f".weight, got {type(x).__name__}")
        b = getattr(x, "bias", None)
        return w, b if isinstance(b, Tensor) else None
    if not isinstance(x, Tensor):
        raise TypeError(f"QKClip.register: {what} must be a tensor or a module with a .weight, "
                        f"got {type(x).__name__}")
    return x, None


def _keep_of(mask: Tensor) -> Tensor:
    """SDPA mask convention: bool True = attend; float = additive (−inf / dtype min = masked)."""
    if mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def _head_max(logits: Tensor, keep: Tensor | None) -> Tensor:
    """Per-head max of ``[B, H, T, S]`` logits over the kept entries (−inf if none)."""
    if keep is not None:
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits.amax(dim=(0, 2, 3))


class QKClip:
    r"""Per-head QK-clip (MuonClip) for any optimizer; see the module docstring.

    Args:
        tau: the logit threshold τ > 0 (K2: 100); ``math.inf`` records the maxima
            (``last_max``, :meth:`max_logit`) without ever clipping.
        process_group: the group whose ranks see different data (DDP/FSDP2) and
            hold the same heads; the maxima are all-reduced (MAX) over it once
            per step. ``None`` (default): the default group when
            ``torch.distributed`` is initialised with more than one rank, else no
            collective.

    Attributes:
        last_max: ``{layer name: per-head max logit}`` of the last :meth:`step`
            (after the all-reduce, before the clip; device tensors).
        clipped: number of (layer, head) clips applied so far (a device tensor).
    """

    def __init__(self, tau: float = 100.0, *, process_group: Any | None = None) -> None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"QKClip: tau must be a number > 0 (inf: record only), got {tau!r}")
        self.tau = float(tau)
        self.process_group = process_group
        self._layers: dict[Any, _Layer] = {}
        self.clipped: Tensor = torch.zeros((), dtype=torch.int64)

    # ----------------------------------------------------------- registration
    def register(self, key: nn.Module | str, q: nn.Module | Tensor, k: nn.Module | Tensor,
                 n_heads: int, *, n_kv_heads: int | None = None, head_dim: int | None = None,
                 q_bias: Tensor | None = None, k_bias: Tensor | None = None,
                 q_offset: int = 0, k_offset: int = 0, feature_dim: int = 0,
                 name: str | None = None) -> None:
        """Declare an attention whose logits :meth:`record` / :meth:`observe` will see.

        Args:
            key: the attention module (or any hashable name) passed to ``record``.
            q, k: the query/key projections: modules with ``.weight`` (and
                ``.bias``) or weight tensors. Head ``h`` is the output features
                ``offset + h·head_dim ... offset + (h+1)·head_dim``.
            n_heads: query heads; ``n_kv_heads`` key heads (default ``n_heads``).
            head_dim: features per head (default: ``q``'s output features / n_heads).
            q_bias, k_bias: biases when ``q``/``k`` are bare tensors.
            q_offset, k_offset: first feature of the heads (fused QKV weights).
            feature_dim: the weight axis of the output features: 0 for
                ``nn.Linear`` (``[out, in]``), 1 for Hugging Face ``Conv1D``.
            name: the name in :meth:`state_dict` (default: ``key`` if a string,
                else ``"attn{i}"`` in registration order).
        """
        qw, qb = _proj_of(q, "q")
        kw, kb = _proj_of(k, "k")
        qb = q_bias if q_bias is not None else qb
        kb = k_bias if k_bias is not None else kb
        n_kv = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv < 1 or n_heads % n_kv:
            raise ValueError(f"QKClip.register: n_heads={n_heads} must be a positive multiple "
                             f"of n_kv_heads={n_kv}")
        if feature_dim not in (0, 1) or qw.ndim != 2 or kw.ndim != 2:
            raise ValueError(f"QKClip.register: q/k weights must be 2-D with feature_dim 0 or 1, "
                             f"got shapes {tuple(qw.shape)}, {tuple(kw.shape)} and "
                             f"feature_dim={feature_dim}")
        hd = head_dim if head_dim is not None else (qw.shape[feature_dim] - q_offset) // n_heads
        for w, off, h, what in ((qw, q_offset, n_heads, "q"), (kw, k_offset, n_kv, "k")):
            if hd < 1 or off < 0 or off + h * hd > w.shape[feature_dim]:
                raise ValueError(f"QKClip.register: {what}: {h} heads of {hd} features from "
                                 f"offset {off} do not fit its weight of shape "
                                 f"{tuple(w.shape)} (feature_dim={feature_dim})")
        if name is None:
            name = key if isinstance(key, str) else f"attn{len(self._layers)}"
        if any(layer.name == name for k_, layer in self._layers.items() if k_ is not key):
            raise ValueError(f"QKClip.register: the name {name!r} is already registered")
        self._layers[key] = _Layer(
            name=name, q=_Proj(qw, qb, feature_dim, q_offset, n_heads, hd),
            k=_Proj(kw, kb, feature_dim, k_offset, n_kv, hd),
            max=torch.full((n_heads,), float("-inf"), device=qw.device))

    def attach(self, model: nn.Module) -> QKClip:
        """Register and hook every ``nn.MultiheadAttention`` and Hugging Face attention
        module of ``model`` (names: their qualified names). Returns ``self``.

        Raises ``ValueError`` for attentions whose logits the clip cannot bound: QK-norm
        (``q_norm``/``k_norm``), or a model with none of these modules.
        """
        found = 0
        for qual, m in model.named_modules():
            if isinstance(m, nn.MultiheadAttention):
                self._attach_mha(qual, m)
                found += 1
            elif is_hf_attention(m):
                self._attach_hf(qual, m)
                found += 1
        if not found:
            raise ValueError(f"QKClip.attach: no nn.MultiheadAttention or Hugging Face "
                             f"attention module in {type(model).__name__}; for a custom "
                             f"attention use register() and record()")
        return self

    def _attach_mha(self, qual: str, m: nn.MultiheadAttention) -> None:
        E, H = m.embed_dim, m.num_heads
        b = m.in_proj_bias
        if m._qkv_same_embed_dim:
            self.register(m, m.in_proj_weight, m.in_proj_weight, H, head_dim=E // H,
                          q_bias=b, k_bias=b, k_offset=E, name=qual)
        else:  # separate q/k weights, one fused bias [3E]
            self.register(m, m.q_proj_weight, m.k_proj_weight, H, head_dim=E // H,
                          q_bias=b, k_bias=b, name=qual)
            self._layers[m].k.bias_start = E
        if m.bias_k is not None:
            self._layers[m].extra_k.append(m.bias_k)
        m.register_forward_pre_hook(self._mha_pre_hook, with_kwargs=True)

    def _attach_hf(self, qual: str, m: Any) -> None:
        if getattr(m, "q_norm", None) is not None or getattr(m, "k_norm", None) is not None:
            raise ValueError(f"QKClip.attach: {qual} ({type(m).__name__}) normalises q and k "
                             f"(QK-norm): rescaling W_q/W_k does not change its logits")
        cfg = m.config  # type: ignore[union-attr]
        H = int(getattr(cfg, "num_attention_heads", 0) or m.num_heads)
        hd = int(m.head_dim)
        if hasattr(m, "q_proj") and hasattr(m, "k_proj"):
            n_kv = int(getattr(cfg, "num_key_value_heads", None) or H)
            self.register(m, m.q_proj, m.k_proj, H, n_kv_heads=n_kv, head_dim=hd, name=qual)
        elif hasattr(m, "c_attn"):  # GPT-2 Conv1D [in, 3·E]
            if getattr(m, "is_cross_attention", False):
                raise ValueError(f"QKClip.attach: {qual}: GPT-2 cross-attention is not supported")
            E = H * hd
            self.register(m, m.c_attn.weight, m.c_attn.weight, H, head_dim=hd,
                          q_bias=m.c_attn.bias, k_bias=m.c_attn.bias, k_offset=E,
                          feature_dim=1, name=qual)
        else:
            raise ValueError(f"QKClip.attach: {qual} ({type(m).__name__}): cannot find its q/k "
                             f"projections (q_proj/k_proj or c_attn); use register()")
        m._matrixopt_qkclip = self  # type: ignore[assignment]
        install_hf_interface()
        impl = getattr(cfg, "_attn_implementation", None) or "eager"
        if impl != HF_IMPL:
            m._matrixopt_qkclip_impl = impl  # type: ignore[assignment]
            cfg._attn_implementation = HF_IMPL

    # -------------------------------------------------------------- recording
    def _layer(self, key: Any) -> _Layer:
        try:
            return self._layers[key]
        except (KeyError, TypeError):
            what = key if isinstance(key, str) else type(key).__name__
            raise KeyError(f"QKClip: {what!r} is not registered; call register() or attach() "
                           f"first") from None

    @torch.no_grad()
    def observe(self, key: nn.Module | str, logits: Tensor) -> None:
        """Record the per-head max of pre-softmax ``logits`` ``[..., H, T, S]`` (masked
        entries already −inf). Skipped when ``key`` is a module in eval mode."""
        if isinstance(key, nn.Module) and not key.training:
            return
        layer = self._layer(key)
        x = logits.detach().float()
        if x.ndim < 3 or x.shape[-3] != layer.q.heads:
            raise ValueError(f"QKClip.observe({layer.name!r}): logits must be [..., "
                             f"{layer.q.heads}, T, S], got shape {tuple(logits.shape)}")
        m = x.reshape(-1, *x.shape[-3:]).amax(dim=(0, 2, 3))
        self._update(layer, m)

    @torch.no_grad()
    def record(self, key: nn.Module | str, q: Tensor, k: Tensor, *, scale: float | None = None,
               causal: bool = False, mask: Tensor | None = None) -> None:
        """Record the per-head max logit ``scale·q·kᵀ`` of one attention call.

        ``q`` is ``[B, H, T, d]``, ``k`` is ``[B, H_kv, S, d]`` (or without ``B``) as
        given to :func:`torch.nn.functional.scaled_dot_product_attention`; ``scale``
        defaults to ``1/√d``; ``causal`` and ``mask`` as in SDPA (bool ``True`` =
        attend, float = additive). Skipped when ``key`` is a module in eval mode.
        """
        if isinstance(key, nn.Module) and not key.training:
            return
        layer = self._layer(key)
        if q.ndim == 3:
            q, k = q.unsqueeze(0), k.unsqueeze(0)
        if q.ndim != 4 or k.ndim != 4 or q.shape[1] != layer.q.heads or (
                k.shape[1] != layer.k.heads):
            raise ValueError(f"QKClip.record({layer.name!r}): q must be [B, {layer.q.heads}, T, "
                             f"d] and k [B, {layer.k.heads}, S, d], got {tuple(q.shape)} and "
                             f"{tuple(k.shape)}")
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        qf, kf = q.detach().float(), k.detach().float()
        if layer.gqa:
            kf = kf.repeat_interleave(layer.q.heads // layer.k.heads, dim=1)
        logits = torch.matmul(qf, kf.transpose(-1, -2)) * s
        T, S = logits.shape[-2:]
        keep = None
        if mask is not None:
            keep = _keep_of(mask.detach())
        if causal:  # SDPA's is_causal: top-left aligned
            tri = torch.ones(T, S, dtype=torch.bool, device=logits.device).tril()
            keep = tri if keep is None else keep & tri
        self._update(layer, _head_max(logits, keep))

    def _update(self, layer: _Layer, m: Tensor) -> None:
        assert layer.max is not None
        if layer.max.device != m.device:
            layer.max = layer.max.to(m.device)
        torch.maximum(layer.max, m, out=layer.max)

    def _mha_pre_hook(self, m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> None:
        if not m.training:
            return
        assert isinstance(m, nn.MultiheadAttention)
        names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                 "average_attn_weights", "is_causal")
        a = dict(zip(names, args), **kwargs)
        query, key = a["query"], a["key"]
        layer = self._layers[m]
        E, H, hd = m.embed_dim, m.num_heads, m.head_dim
        with torch.no_grad():
            unbatched = query.ndim == 2
            if unbatched:
                query, key = query.unsqueeze(1), key.unsqueeze(1)
            if m.batch_first and not unbatched:
                query, key = query.transpose(0, 1), key.transpose(0, 1)
            # [T, B, E] -> projections
            q = F.linear(query, *_weight(layer.q))
            k = F.linear(key, *_weight(layer.k))
            B = q.shape[1]
            if m.bias_k is not None:
                k = torch.cat([k, m.bias_k.expand(1, B, E)], dim=0)
            if m.add_zero_attn:
                k = torch.cat([k, k.new_zeros(1, B, E)], dim=0)
            qh = q.reshape(q.shape[0], B, H, hd).permute(1, 2, 0, 3)
            kh = k.reshape(k.shape[0], B, H, hd).permute(1, 2, 0, 3)
            logits = torch.matmul(qh.float(), kh.float().transpose(-1, -2)) / math.sqrt(hd)
            T, S = logits.shape[-2:]
            keep = torch.ones(B, H, T, S, dtype=torch.bool, device=logits.device)
            attn_mask, kpm = a.get("attn_mask"), a.get("key_padding_mask")
            if attn_mask is None and a.get("is_causal"):
                keep &= torch.ones(T, S, dtype=torch.bool, device=keep.device).tril()
            if attn_mask is not None:  # MHA convention: bool True = masked
                am = ~attn_mask if attn_mask.dtype == torch.bool else _keep_of(attn_mask)
                am = am.reshape(-1, T, am.shape[-1])
                am = F.pad(am, (0, S - am.shape[-1]), value=True)
                keep &= am.reshape(B, H, T, S) if am.shape[0] == B * H else am[0]
            if kpm is not None:
                kp = ~kpm if kpm.dtype == torch.bool else _keep_of(kpm)
                kp = F.pad(kp.reshape(B, -1), (0, S - kp.shape[-1]), value=True)
                keep &= kp[:, None, None, :]
            self._update(layer, _head_max(logits, keep))

    # --------------------------------------------------------------- clipping
    @torch.no_grad()
    def step(self) -> None:
        """All-reduce the recorded maxima (MAX, once per device), rescale the q/k rows of
        every head above τ, and reset the maxima. Call after ``optimizer.step()``."""
        by_device: dict[torch.device, list[_Layer]] = {}
        for layer in self._layers.values():
            assert layer.max is not None
            by_device.setdefault(layer.max.device, []).append(layer)
        for dev, layers in by_device.items():
            maxes = torch.cat([layer.max for layer in layers])  # type: ignore[misc]
            group = self._group()
            if group is not None:
                import torch.distributed as dist
                dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=group)
            gamma = torch.where(maxes > self.tau, self.tau / maxes, torch.ones_like(maxes))
            self.clipped = self.clipped.to(dev) + (maxes > self.tau).sum()
            for layer, g, mx in zip(layers, gamma.split([lay.q.heads for lay in layers]),
                                    maxes.split([lay.q.heads for lay in layers])):
                layer.last = mx.clone()
                if layer.gqa:
                    layer.q.scale_(g)
                else:
                    root = g.sqrt()
                    layer.q.scale_(root)
                    layer.k.scale_(root)
                    for t in layer.extra_k:  # [1, 1, E]: one k row per feature
                        t.view(-1).mul_(root.to(t.dtype).repeat_interleave(layer.k.head_dim))
                layer.max.fill_(float("-inf"))  # type: ignore[union-attr]

    def _group(self) -> Any | None:
        import torch.distributed as dist
        if self.process_group is not None:
            return self.process_group
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def hook(self, optimizer: torch.optim.Optimizer) -> QKClip:
        """Run :meth:`step` after every ``optimizer.step()`` and keep this clip's state in
        the optimizer's ``state_dict`` (key ``"qk_clip"``). Returns ``self``."""
        optimizer.register_step_post_hook(lambda _opt, _a, _k: self.step())

        def save(_opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
            sd["qk_clip"] = self.state_dict()
            return sd

        def load(_opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
            sd = dict(sd)
            if "qk_clip" in sd:
                self.load_state_dict(sd.pop("qk_clip"))
            return sd

        optimizer.register_state_dict_post_hook(save)
        optimizer.register_load_state_dict_pre_hook(load)
        return self

    # ------------------------------------------------------------ inspection
    @property
    def last_max(self) -> dict[str, Tensor]:
        return {layer.name: layer.last for layer in self._layers.values()
                if layer.last is not None}

    def max_logit(self) -> Tensor | None:
        """The largest per-head max of the last :meth:`step` over all layers (a device
        scalar), ``None`` before the first step."""
        last = [t for t in self.last_max.values()]
        return torch.stack([t.max() for t in last]).max() if last else None

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """``tau``, the clip count, and per layer the maxima being recorded and the last ones."""
        return {"tau": self.tau, "clipped": self.clipped.clone(),
                "max": {lay.name: lay.max.clone() for lay in self._layers.values()},  # type: ignore[union-attr]
                "last_max": {k: v.clone() for k, v in self.last_max.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`; the layers must have the same names and head counts."""
        names = {lay.name: lay for lay in self._layers.values()}
        saved = state.get("max", {})
        if set(saved) != set(names):
            raise ValueError(f"QKClip.load_state_dict: saved layers {sorted(saved)} differ "
                             f"from registered layers {sorted(names)}")
        for n, t in saved.items():
            if t.shape != names[n].max.shape:  # type: ignore[union-attr]
                raise ValueError(f"QKClip.load_state_dict: layer {n!r} has "
                                 f"{names[n].q.heads} heads, the checkpoint {tuple(t.shape)}")
        tau = state["tau"]
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 0:
            raise ValueError(f"QKClip.load_state_dict: tau must be > 0, got {tau!r}")
        self.tau = float(tau)
        for n, t in saved.items():
            lay = names[n]
            lay.max = t.detach().to(lay.max.device, torch.float32, copy=True)  # type: ignore[union-attr]
        for n, t in state.get("last_max", {}).items():
            if n in names:
                names[n].last = t.detach().to(names[n].max.device, copy=True)  # type: ignore[union-attr]
        self.clipped = state["clipped"].detach().clone()


def _weight(p: _Proj) -> tuple[Tensor, Tensor | None]:
    """The ``heads·head_dim × in`` slice of a projection weight and of its bias, as
    :func:`torch.nn.functional.linear` wants them."""
    n = p.heads * p.head_dim
    w = p.weight.narrow(p.dim, p.start, n)
    b = p.bias.narrow(0, p.bias_start, n) if p.bias is not None else None
    return (w if p.dim == 0 else w.t()), b
