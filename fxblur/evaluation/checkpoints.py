"""Trained models in one file: the model spec and its weights, loaded without running pickled code.

A checkpoint is the dict ``{"model": SPEC, "state_dict": model.state_dict()}`` saved with
``torch.save``, where SPEC is a model spec of ``fxblur.models`` (a torchvision name or
``package.module:factory``). ``load_checkpoint`` reads it with ``torch.load(weights_only=True)``
(plain tensors, strings and dicts only: opening a file cannot run code), builds the model
the spec names, and loads the weights strictly. A model that needs constructor arguments
(``resnet18(num_classes=10)``) is saved with the spec of a factory that passes them.

A model rewritten by ``fxblur.transform`` has the original's ``state_dict`` keys, so its
weights are saved with the original model's spec.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "resnet18.pt"
    >>> model = torchvision.models.resnet18()
    >>> save_checkpoint(fxblur.transform(model, verbose=False), "resnet18", path)
    >>> loaded = load_checkpoint(path)
    >>> torch.equal(loaded.fc.weight, model.fc.weight), loaded.training
    (True, False)
"""

from __future__ import annotations

from os import PathLike

import torch
from torch import nn

from fxblur.models import build


class CheckpointError(ValueError):
    """The file is not a checkpoint fxblur can load; the message says what it should hold."""


def save_checkpoint(model: nn.Module, spec: str, path: str | PathLike) -> None:
    """Save ``model``'s weights with the ``spec`` that builds its architecture."""
    torch.save({"model": spec, "state_dict": model.state_dict()}, path)


def load_checkpoint(path: str | PathLike) -> nn.Module:
    """The model a checkpoint describes, on the CPU, in eval mode.

    Raises:
        CheckpointError: the file does not hold ``{"model": SPEC, "state_dict": ...}``
            (a bare ``state_dict``, say), or its weights do not fit the model SPEC builds.
        fxblur.models.ModelSpecError: SPEC names no model.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read {path} as a weights-only torch checkpoint: {error}") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), str) and "state_dict" in checkpoint):
        raise CheckpointError(
            f"{path} is not an fxblur checkpoint: save {{'model': SPEC, 'state_dict': model.state_dict()}}, "
            "with SPEC a torchvision name or package.module:factory "
            "(fxblur.evaluation.checkpoints.save_checkpoint does)"
        )
    model = build(checkpoint["model"], device="cpu")
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"the weights in {path} do not fit {checkpoint['model']}: {error}") from None
    return model.eval()
