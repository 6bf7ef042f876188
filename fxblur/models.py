"""Models by name, for the command-line tools: nothing is ever downloaded.

A model spec is one of:

- a torchvision model name: ``resnet50``, ``deeplabv3_resnet50``, ``r3d_18``, ...
- ``timm:NAME`` for a timm model, when timm is installed;
- ``package.module:factory`` for your own model: the factory is called with no arguments;
  the module is imported from the current directory as well as from the installed packages
  (every tool reads it so, wherever the tool itself lives).

Models are built with random weights. Torchvision and timm models are built on the
``meta`` device when they allow it (fast, and enough for shapes and costs), else on CPU.

Example:
    >>> build("resnet18", device="cpu").fc.out_features
    1000
    >>> suggestions("resnt50")[:2]
    ['resnet50', 'resnet152']
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable

import torch
import torchvision.models as tvm
from torch import nn

TASKS = {
    "classification": tvm,
    "segmentation": tvm.segmentation,
    "video": tvm.video,
    "detection": tvm.detection,
    "optical flow": tvm.optical_flow,
}
_WITH_BACKBONE = {*tvm.list_models(module=tvm.segmentation), *tvm.list_models(module=tvm.detection)}


class ModelSpecError(ValueError):
    """The spec names no model fxblur can build; the message says what to try instead."""


def torchvision_names() -> dict[str, list[str]]:
    """The torchvision models by task (quantized int8 models are left out)."""
    return {task: tvm.list_models(module=module) for task, module in TASKS.items()}


def timm_available() -> bool:
    return importlib.util.find_spec("timm") is not None


def suggestions(spec: str) -> list[str]:
    """Known model names close to ``spec``, best first."""
    names = [name for names in torchvision_names().values() for name in names]
    if spec.startswith("timm:") and timm_available():
        import timm

        names = [f"timm:{name}" for name in timm.list_models()]
    return difflib.get_close_matches(spec, names, n=5, cutoff=0.6)


def build(spec: str, device: str | None = None) -> nn.Module:
    """The model ``spec`` names, with random weights, in eval mode.

    Args:
        spec: see the module docstring.
        device: ``"meta"`` or ``"cpu"`` to force one; by default torchvision and timm
            models are built on ``meta`` when their constructor allows it.

    Raises:
        ModelSpecError: unknown name, module or factory, or a factory that returns no module.
    """
    if spec.startswith("timm:"):
        return _on_device(lambda: _timm_factory(spec.removeprefix("timm:"))(), device)
    if ":" in spec:
        model = _user_factory(spec)()
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
        return model.eval()
    if spec not in tvm.list_models():
        hint = suggestions(spec)
        raise ModelSpecError(f"unknown model {spec!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    kwargs = {"weights_backbone": None} if spec in _WITH_BACKBONE else {}
    return _on_device(lambda: tvm.get_model(spec, weights=None, **kwargs), device)


def _on_device(make: Callable[[], nn.Module], device: str | None) -> nn.Module:
    if device is None:
        try:
            with torch.device("meta"):
                return make().eval()
        except Exception:  # constructors that compute with tensors (RegNet) need real ones
            device = "cpu"
    with torch.device(device):
        return make().eval()


def _timm_factory(name: str) -> Callable[[], nn.Module]:
    if not timm_available():
        raise ModelSpecError("timm:NAME needs timm: pip install timm")
    import timm

    if not timm.is_model(name):
        hint = suggestions(f"timm:{name}")
        raise ModelSpecError(f"unknown timm model {name!r}" + (f"; did you mean {', '.join(hint)}?" if hint else ""))
    return lambda: timm.create_model(name, pretrained=False)


def _user_factory(spec: str) -> Callable[[], nn.Module]:
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:  # ``python tools/x.py`` puts tools/ there, ``python -m`` the current directory
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ModelSpecError(f"cannot import {module_name!r} for {spec}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ModelSpecError(f"{module_name} has no callable {attribute!r}")
    return factory
