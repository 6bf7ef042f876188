"""Test helpers: zoo models on the meta device, per-layer output shapes, state snapshots, a two-graph model."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from hypothesis import settings
from torch import nn
from torchvision.models.regnet import BlockParams

from fxblur.ops.folded import FoldedLayer

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def needs_torch(version: tuple[int, int], why: str) -> pytest.MarkDecorator:
    """Skip a check that fails on the declared minimum, torch 2.4.1, for a reason of torch's own."""
    return pytest.mark.skipif(version > TORCH_VERSION, reason=f"needs torch >= {version[0]}.{version[1]}: {why}")


def examples(count: int) -> settings:
    """Hypothesis settings for a property: ``count`` examples under the ``ci`` profile, ten times that under
    ``thorough`` (``python -m pytest --hypothesis-profile thorough``; ``tests/conftest.py``)."""
    return settings(max_examples=count * settings.default.max_examples // 40, deadline=None)


def _has_cpu_half_reflect_padding() -> bool:
    try:
        F.pad(torch.zeros(1, 1, 2, 2, dtype=torch.float16), (1, 1, 1, 1), mode="reflect")
    except RuntimeError:
        return False
    return True


needs_cpu_half_padding = pytest.mark.skipif(
    not _has_cpu_half_reflect_padding(), reason="this torch has no float16 reflect padding on CPU (torch 2.4)"
)

IMAGE_ZOO = tvm.list_models(module=tvm) + tvm.list_models(module=tvm.segmentation)
VIDEO_ZOO = tvm.list_models(module=tvm.video)

# Models whose own forward accepts a single spatial size (fixed position embeddings).
FIXED_SIZE = {"vit_b_16", "vit_b_32", "vit_h_14", "vit_l_16", "vit_l_32", "maxvit_t", "mvit_v1_b", "mvit_v2_s", "s3d"}

_OBSERVED = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.Hardswish,
    nn.GELU,
    nn.Sigmoid,
    nn.Hardsigmoid,
)


def input_sizes(name: str) -> list[tuple[int, ...]]:
    """An even and an odd input size the original model accepts (one for fixed-size models)."""
    if name in VIDEO_ZOO:
        sizes = [(1, 3, 16, 224, 224)] if name in FIXED_SIZE else [(1, 3, 16, 64, 64), (1, 3, 9, 65, 65)]
    else:
        sizes = [(1, 3, 224, 224)] if name in FIXED_SIZE else [(1, 3, 224, 224), (1, 3, 97, 97)]
    return sizes


@contextlib.contextmanager
def _regnet_params_on_cpu():
    """RegNet's builder turns tensors into lists, which meta tensors cannot do."""
    original = BlockParams.from_init_params.__func__

    def on_cpu(cls, *args, **kwargs):
        with torch.device("cpu"):
            return original(cls, *args, **kwargs)

    BlockParams.from_init_params = classmethod(on_cpu)
    try:
        yield
    finally:
        BlockParams.from_init_params = classmethod(original)


def meta_model(name: str) -> nn.Module:
    """A torchvision model with meta parameters: built in milliseconds, runs shapes only."""
    kwargs = {"weights_backbone": None} if name in tvm.list_models(module=tvm.segmentation) else {}
    with warnings.catch_warnings(), _regnet_params_on_cpu(), torch.device("meta"):
        warnings.simplefilter("ignore")  # GoogLeNet/Inception init-weights notices
        return tvm.get_model(name, weights=None, **kwargs).eval()


# On meta tensors BatchNorm and LayerNorm run as Python decompositions, most of a meta
# forward's time; a norm's output has its input's shape, so for shapes they return it.
_SHAPE_ONLY_NORMS = (F.batch_norm, F.layer_norm)


def _shape_only(norm):
    def shape_only(input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.empty_like(input) if input.is_meta else norm(input, *args, **kwargs)

    return shape_only


def layer_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, list[tuple[int, ...]]]:
    """Output shapes of every norm and activation module, per call, keyed by module path.

    Only torch.nn's own classes are observed (and layers a rewrite folded a chain into,
    ``fxblur.assemble.fold``, which stand for one): subclasses defined elsewhere (ConvNeXt's
    LayerNorm2d) are traced through, so a GraphModule never calls them as modules.
    """
    shapes: dict[str, list[tuple[int, ...]]] = {}
    handles = [
        module.register_forward_hook(lambda m, i, out, name=name: shapes.setdefault(name, []).append(tuple(out.shape)))
        for name, module in model.named_modules()
        if isinstance(module, _OBSERVED)
        and (type(module).__module__.startswith("torch.nn") or isinstance(module, FoldedLayer))
    ]
    try:
        with contextlib.ExitStack() as stack:
            for norm in _SHAPE_ONLY_NORMS:  # torch.nn.functional's, which the norm modules call
                stack.enter_context(mock.patch.object(F, norm.__name__, _shape_only(norm)))
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def snapshot(model: nn.Module) -> dict:
    """Everything transform must leave alone: modules, tensors (identity and values), modes, hooks."""
    return {
        "modules": [(name, id(m), type(m), m.training, dict(vars(m))) for name, m in model.named_modules()],
        "parameters": [(name, id(p), p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()],
        "buffers": [(name, id(b), b.clone()) for name, b in model.named_buffers()],
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert [m[:4] for m in before["modules"]] == [m[:4] for m in after["modules"]]
    for (name, _, _, _, attrs), (_, _, _, _, attrs_after) in zip(before["modules"], after["modules"], strict=True):
        assert attrs.keys() == attrs_after.keys(), name
        for key in attrs:
            assert attrs[key] is attrs_after[key] or attrs[key] == attrs_after[key], (name, key)
    for (name, i, value, grad), (_, i2, value2, grad2) in zip(before["parameters"], after["parameters"], strict=True):
        assert (i, grad) == (i2, grad2) and torch.equal(value, value2), name
    for (name, i, value), (_, i2, value2) in zip(before["buffers"], after["buffers"], strict=True):
        assert i == i2 and torch.equal(value, value2), name


class TrainOnlyHead(nn.Module):
    """A strided auxiliary output in train mode only: ``transform`` gives it one graph per mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Conv2d(16, 4, 1)
        self.aux = nn.Conv2d(16, 4, 3, stride=2)

    def forward(self, x):
        y = self.conv(x)
        out = self.head(y).mean((2, 3))
        if self.training:
            return out, self.aux(y).mean((2, 3))
        return out


def load_tool(name: str):
    """The script ``tools/<name>.py`` as a module (tools are scripts, not a package)."""
    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
