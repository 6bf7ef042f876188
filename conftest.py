"""Names the docstring examples in fxblur/ and passes/ use without importing them."""

import importlib.util

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
import torchvision
from torch import nn

import fxblur
from fxblur.options import BlurOptions


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace):
    doctest_namespace.update(
        torch=torch, torchvision=torchvision, nn=nn, F=F, fx=fx, fxblur=fxblur, BlurOptions=BlurOptions
    )


# fxblur.lightning and fxblur.composer need optional packages; without them, their doctests are not collected.
OPTIONAL = {"fxblur/lightning.py": "pytorch_lightning", "fxblur/composer.py": "composer"}
collect_ignore = [path for path, package in OPTIONAL.items() if importlib.util.find_spec(package) is None]
