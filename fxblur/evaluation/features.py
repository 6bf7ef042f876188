"""The features a classifier computes before its last layer, caught with forward hooks.

By default the features are the input of the last ``nn.Linear`` the forward pass calls:
the pooled features the classifier reads (the global average of the last feature map in
a ResNet, fc7 in a VGG, the class token in a ViT), flattened to one vector per image.
Hooks see every ``nn.Linear``; the last call in the pass wins, whatever the order in
which the modules were registered.

``layer="NAME"`` takes the output of that module instead, averaged over its spatial axes
when it has any. A model rewritten by fxblur calls the same modules as the original
(``layer="layer4"`` works on both); in a flat one (``transform(flatten=True)``) only leaf
modules are called, so name one of those (``"layer4.1.relu"``). Past the nonlinearity
(``past_nonlinearity=True``), the BatchNorm and activations before a moved blur return a
larger map than the original's.

Example:
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    >>> with penultimate_features(model) as features:
    ...     logits = model(torch.randn(4, 3, 16, 16))
    >>> features.value.shape
    torch.Size([4, 8])
    >>> with penultimate_features(model, layer="1") as features:
    ...     logits = model(torch.randn(4, 3, 16, 16))
    >>> features.take().shape  # the ReLU's output, averaged over its 14x14 map
    torch.Size([4, 8])
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator

import torch
from torch import nn


class Features:
    """What the hooks caught in the latest forward pass: ``value`` is an (N, D) tensor."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._value: torch.Tensor | None = None

    @property
    def value(self) -> torch.Tensor:
        if self._value is None:
            hint = "name a module whose output to pool instead (feature_layer, --feature-layer)"
            raise ValueError(f"the forward pass did not call {self.source}; {hint}")
        return self._value

    def take(self) -> torch.Tensor:
        """``value``, forgotten at once, so that a pass that catches nothing cannot reuse it."""
        value, self._value = self.value, None
        return value

    def catch(self, tensor: torch.Tensor) -> None:
        self._value = tensor.flatten(1)

    def catch_pooled(self, tensor: torch.Tensor) -> None:
        self._value = tensor.flatten(2).mean(-1) if tensor.dim() > 2 else tensor.flatten(1)


@contextlib.contextmanager
def penultimate_features(model: nn.Module, layer: str | None = None) -> Iterator[Features]:
    """Catch features while the block runs: the last ``nn.Linear``'s input, or ``layer``'s pooled output.

    Raises:
        ValueError: ``layer`` names no module of ``model``, or (on reading ``value``) the
            forward pass called no ``nn.Linear`` / not ``layer``.
    """
    if layer is None:
        features = Features("any nn.Linear")
        modules = [m for m in model.modules() if isinstance(m, nn.Linear)]
        handles = [m.register_forward_pre_hook(lambda m, args: features.catch(args[0])) for m in modules]
    else:
        names = dict(model.named_modules())
        if layer not in names:
            close = difflib.get_close_matches(layer, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"no module {layer!r} in the model{hint}")
        features = Features(f"module {layer!r}")
        handles = [names[layer].register_forward_hook(lambda m, args, out: features.catch_pooled(out))]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()
