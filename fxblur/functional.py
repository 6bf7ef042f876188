"""``apply_blurpool``: Composer's functional BlurPool call, answered by fxblur's rewrite.

A Composer user changes one line: ``cf.apply_blurpool(model, optimizers=opt)`` (which edits
``model`` in place) becomes ``model = fxblur.apply_blurpool(model, optimizers=opt)``, which
returns a new model and leaves ``model`` as it was. The arguments and their defaults are
Composer's, and so are the numerics (``preset="composer"``: a 3x3 binomial with zero padding,
max pools at stride 1 followed by a subsampling blur); any other option of
``fxblur.transform`` may follow.

The rewrite shares the original's Parameter objects, so an optimizer built before the call
trains the result as it is: ``optimizers`` is checked, not edited.

Example:
    >>> model = torchvision.models.resnet18(num_classes=10)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> model = fxblur.apply_blurpool(model, optimizers=opt)
    >>> [c.target for c in fxblur.changes(model) if c.action != "skipped"][:2]
    ['maxpool', 'layer2.0.conv1']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fxblur.transform import transform


def apply_blurpool(
    model: nn.Module,
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    replace_convs: bool = True,
    replace_maxpools: bool = True,
    blur_first: bool = True,
    min_channels: int = 16,
    **fxblur_options: Any,
) -> nn.Module:
    """Return ``model`` with BlurPool applied, as Composer's ``apply_blurpool`` would make it.

    Unlike Composer's, this never modifies ``model``: use the result
    (``model = fxblur.apply_blurpool(model, optimizers=opt)``). The result keeps the
    original's ``state_dict()`` keys, so checkpoints load into either.

    Args:
        model: the network to anti-alias.
        optimizers: optimizers built over ``model``'s parameters before this call. The
            result shares those Parameter objects, so they keep training it; each is
            checked, and a parameter the result does not hold is an error.
        replace_convs: blur strided convolutions.
        replace_maxpools: blur strided max pools (MaxBlurPool).
        blur_first: blur before a strided conv, which keeps its stride (cheapest);
            ``False`` runs it at stride 1 and lets the blur subsample.
        min_channels: leave convs with fewer input channels alone (an RGB stem).
        **fxblur_options: any other option of ``fxblur.transform`` (``preset`` to start
            from other numerics, ``polyphase``, ``exclude``, ``verbose``...). The report is
            logged to the ``fxblur`` logger; ``verbose`` (default ``False``) prints it too.

    Raises:
        ValueError: an optimizer holds a parameter the result does not (it was built over
            another model, or ``copy=True`` gave the result parameters of its own).
        TypeError: ``optimizers`` holds something that is not a ``torch.optim.Optimizer``.
    """
    given = _optimizers(optimizers)
    options = {"preset": "composer", "verbose": False, **fxblur_options}
    result = transform(
        model,
        replace_convs=replace_convs,
        replace_maxpools=replace_maxpools,
        blur_first=blur_first,
        min_channels=min_channels,
        **options,
    )
    check_optimizers(result, given, original=model)
    return result


def check_optimizers(result: nn.Module, optimizers: list[torch.optim.Optimizer], original: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter of ``optimizers`` that ``result`` does not hold."""
    held = {id(parameter) for parameter in result.parameters()}
    names = {id(parameter): name for name, parameter in original.named_parameters()}
    for index, optimizer in enumerate(optimizers):
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                if id(parameter) in held:
                    continue
                name = names.get(id(parameter))
                what = f"the original model's {name!r}" if name else f"a parameter of shape {tuple(parameter.shape)}"
                raise ValueError(
                    f"optimizer {index} ({type(optimizer).__name__}) holds {what}, which the rewritten model does not: "
                    "it would not train the result. Build the optimizer over the model passed in and leave copy=False "
                    "(the result then shares its parameters), or build it after this call from the result's parameters"
                )


def _optimizers(optimizers: Any) -> list[torch.optim.Optimizer]:
    if optimizers is None:
        return []
    listed = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
    for optimizer in listed:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizers must be torch.optim.Optimizer objects, got {type(optimizer).__name__}")
    return listed
