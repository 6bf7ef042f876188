"""A layer running a chain of rewrite ops before or after its own forward: what ``fxblur.assemble.fold`` makes.

``Folded[MaxPool2d]`` is a subclass of the layer's class: its parameters, buffers, hooks
and attributes are the layer's, and its child ``fxblur`` (a ``ModuleDict``) holds the
chain to run ``"before"`` its forward, ``"after"`` it, or both, each a small GraphModule of
one input (a blur, a polyphase roll, circular padding).

Example:
    >>> import torch.fx as fx
    >>> pool = nn.MaxPool2d(2)
    >>> pool.__class__ = folded_class(nn.MaxPool2d)
    >>> pool.fxblur = nn.ModuleDict({"before": fx.symbolic_trace(nn.Identity())})
    >>> type(pool).__name__, isinstance(pool, nn.MaxPool2d), pool(torch.ones(1, 1, 4, 4)).shape
    ('Folded[MaxPool2d]', True, torch.Size([1, 1, 2, 2]))
    >>> import pickle
    >>> type(pickle.loads(pickle.dumps(pool))).__name__
    'Folded[MaxPool2d]'
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn


class FoldedLayer:
    """Mixed into a layer's class: the folded chain (``fxblur["before"]`` or ``fxblur["after"]``) around its forward."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        chain = self._modules["fxblur"]
        if "before" in chain:
            args = (chain["before"](args[0]), *args[1:])
        output = self._fxblur_layer_forward(*args, **kwargs)
        return chain["after"](output) if "after" in chain else output

    def __reduce_ex__(self, protocol: int) -> tuple:
        """Pickled and copied as its layer's class and state: ``Folded[...]`` is made anew on load."""
        return _rebuild, (type(self).__mro__[2], self.__dict__)


def _rebuild(layer_class: type[nn.Module], state: dict[str, Any]) -> nn.Module:
    module = object.__new__(folded_class(layer_class))
    module.__dict__.update(state)
    return module


@functools.cache
def folded_class(cls: type[nn.Module]) -> type[nn.Module]:
    """``Folded[cls]``: ``cls`` running its folded chain around its own forward."""
    return type(f"Folded[{cls.__name__}]", (FoldedLayer, cls), {"_fxblur_layer_forward": cls.forward,
                                                                "__module__": __name__})  # fmt: skip


