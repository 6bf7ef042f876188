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


# fxblur.lightning needs the optional pytorch-lightning; without it, its doctest is not collected.
collect_ignore = [] if importlib.util.find_spec("pytorch_lightning") else ["fxblur/lightning.py"]
