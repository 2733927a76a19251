"""One argument list per optimizer family: a class that combines two families (GaLoreAdafactor:
Adafactor's arguments and GaLore's) takes its signature from theirs instead of repeating it.

:func:`combined_signature` builds the explicit ``__init__`` signature from the parameters of
other ``__init__`` methods, in a given order; :func:`bind` checks a call against it (the
``TypeError`` of an ordinary function for an unknown or duplicated argument) and returns every
argument with its default filled in. ``help()`` and :func:`inspect.signature` show the combined
signature, every argument named, with its annotation and default.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["combined_signature", "bind"]


def combined_signature(sources: Sequence[tuple[Callable[..., Any], Sequence[str]]]
                       ) -> inspect.Signature:
    """``(self, params, ...)``: the named parameters of each source ``__init__`` in the order
    given (the first source's ``self`` and ``params`` first); kinds and defaults as in the
    source (a positional-or-keyword parameter after a keyword-only one becomes keyword-only)."""
    first = inspect.signature(sources[0][0]).parameters
    out = [first["self"], first["params"]]
    keyword_only = False
    for fn, names in sources:
        params = inspect.signature(fn).parameters
        for name in names:
            p = params[name]
            keyword_only = keyword_only or p.kind is inspect.Parameter.KEYWORD_ONLY
            out.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if keyword_only else p)
    return inspect.Signature(out, return_annotation=inspect.signature(sources[0][0])
                             .return_annotation)


def bind(signature: inspect.Signature, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arguments of a call against ``signature``, defaults applied (``TypeError`` as for a
    function with that signature)."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
