"""The Hugging Face bridge of :class:`~matrixopt.optim.QKClip`: an attention function
registered in ``transformers``' ``ALL_ATTENTION_FUNCTIONS`` that records q·kᵀ of an
attached module, then runs the module's original implementation."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

HF_IMPL = "matrixopt_qkclip"


def is_hf_attention(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (mod.startswith("transformers.models.") and type(m).__name__.endswith("Attention")
            and hasattr(m, "config") and hasattr(m, "head_dim"))


def _hf_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                  attention_mask: Tensor | None, *args: Any, **kwargs: Any) -> Any:
    """The attention function installed for attached modules: record, then run the
    module's original implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    clip = getattr(module, "_matrixopt_qkclip", None)
    impl = getattr(module, "_matrixopt_qkclip_impl", "eager")
    if clip is not None and module in clip._layers:
        causal = attention_mask is None and query.shape[2] > 1 and bool(
            getattr(module, "is_causal", False))
        mask = attention_mask[..., : key.shape[-2]] if attention_mask is not None else None
        clip.record(module, query, key, scale=kwargs.get("scaling"), causal=causal, mask=mask)
    if impl == "eager":
        fn: Callable[..., Any] = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[impl]
    return fn(module, query, key, value, attention_mask, *args, **kwargs)


def install_hf_interface() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if HF_IMPL not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(HF_IMPL, _hf_attention)
