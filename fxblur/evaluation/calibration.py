"""BatchNorm statistics from one batch, for models with random weights that are measured in eval mode.

A randomly initialised network in eval mode normalises by running statistics of 0 and 1
that fit no input: deep ones (GoogLeNet, MobileNet) then compute outputs of 1e-10 that
hardly depend on the input, which hides how far they move. One train-mode pass with a
cumulative average sets every BatchNorm's statistics from a batch, as training would.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    >>> calibrate_batch_norms(model, torch.randn(8, 3, 16, 16) * 5 + 2)
    >>> model.training, bool(model[1].running_var.mean() > 1.5)
    (False, True)
"""

from __future__ import annotations

import torch
from torch import nn


def calibrate_batch_norms(model: nn.Module, images: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics from ``images`` (one train-mode pass); ``model`` ends in eval mode."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average: one batch sets the statistics
            module.reset_running_stats()
    with torch.no_grad():
        model.train()(images)
    model.eval()
