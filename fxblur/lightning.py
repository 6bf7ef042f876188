"""``BlurPoolCallback``: BlurPool for a PyTorch Lightning model, applied when the Trainer sets up.

PyTorch Lightning is optional (``pip install '.[lightning]'`` from a clone); ``import fxblur`` never
imports it, only ``import fxblur.lightning`` does.

The callback rewrites the networks a ``LightningModule`` holds in its ``setup`` hook,
which the Trainer calls before ``configure_optimizers`` and before moving the model to its
device or wrapping it for distributed training: the point at which Composer applies its
BlurPool algorithm (``Event.INIT``). The attributes are replaced by their rewrite, whose
``state_dict()`` keys are the original's, so checkpoints load with or without the
callback. It runs at every stage (fit, validate, test, predict), so that a model restored
from a checkpoint is evaluated with the architecture it was trained with, and it leaves an
attribute that is already rewritten alone.

Networks built in ``LightningModule.setup`` or ``configure_model`` do not exist yet when
the callback runs (the Trainer calls callbacks first): build them in ``__init__``.

Example:
    >>> import pytorch_lightning as pl
    >>> class Classifier(pl.LightningModule):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.model = torchvision.models.resnet18(num_classes=10)
    >>> classifier = Classifier()
    >>> callback = BlurPoolCallback("model", blur_first=False)  # then pl.Trainer(callbacks=[callback])
    >>> callback.setup(trainer=None, pl_module=classifier, stage="fit")  # what the Trainer calls
    >>> [str(c.action) for c in fxblur.changes(classifier.model)][:3]
    ['skipped', 'blur_after', 'blur_after']
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from fxblur.record import record_of
from fxblur.report import report
from fxblur.transform import check_options, transform


class BlurPoolCallback(pl.Callback):
    """Anti-alias the networks of a ``LightningModule`` before its optimizers are configured.

    Args:
        attributes: the ``LightningModule`` attribute (or attributes) holding the networks to
            rewrite, such as ``"model"`` or ``("encoder", "decoder")``.
        verbose: log each change report (on global rank 0).
        **options: options of ``fxblur.transform`` (``blur_first``, ``min_channels``,
            ``preset``, ``strict``, ...), checked when the callback is created.
    """

    def __init__(self, attributes: str | Iterable[str] = "model", verbose: bool = True, **options: Any) -> None:
        super().__init__()
        self.attributes = (attributes,) if isinstance(attributes, str) else tuple(attributes)
        if not self.attributes or not all(isinstance(name, str) and name for name in self.attributes):
            raise ValueError(f"attributes must name LightningModule attributes, got {attributes!r}")
        check_options(**options)  # a bad option fails here, not at setup
        self.verbose = verbose
        self.options = options

    def setup(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule, stage: str) -> None:
        for name in self.attributes:
            network = getattr(pl_module, name, None)
            if not isinstance(network, nn.Module):
                raise ValueError(
                    f"{type(pl_module).__name__}.{name} is {type(network).__name__}, not a module: BlurPoolCallback "
                    "rewrites networks that exist when the Trainer sets up (build them in __init__)"
                )
            if record_of(network) is not None:
                continue  # already rewritten
            blurred = transform(network, verbose=False, **self.options)
            setattr(pl_module, name, blurred)
            if self.verbose:
                rank_zero_info(f"BlurPoolCallback rewrote {name}:\n{report(blurred)}")
