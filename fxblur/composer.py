"""``BlurPool``: fxblur's rewrite as a MosaicML Composer algorithm.

A drop-in for ``composer.algorithms.BlurPool``: the same arguments and defaults, the same
event (``Event.INIT``, before the Trainer wraps the model for distributed training) and the
same logged hyperparameters, with fxblur's rewrite in place of Composer's module surgery.
It replaces the network a ``ComposerModel`` holds (``ComposerClassifier.module``,
``HuggingFaceModel.model``) by its rewrite, whose ``state_dict()`` keys are the original's
and which shares the original's parameters, so the Trainer's optimizers train it.

Composer pins its own torch (``pip install mosaicml`` in an environment of its own);
``import fxblur`` never imports it, only ``import fxblur.composer`` does.
``tools/composer_check.sh`` trains with it in a fresh environment.

Example:
    >>> from composer import Trainer
    >>> from composer.models import ComposerClassifier
    >>> model = ComposerClassifier(torchvision.models.resnet18(num_classes=10), num_classes=10)
    >>> algorithm = BlurPool(blur_first=False)  # then Trainer(model=model, algorithms=[algorithm], ...)
    >>> algorithm
    BlurPool(replace_convs=True,replace_maxpools=True,blur_first=False,min_channels=16)
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from torch import nn

from fxblur.functional import apply_blurpool
from fxblur.record import Action, changes, record_of
from fxblur.report import report
from fxblur.transform import check_options

try:
    from composer.core import Algorithm, Event, State
    from composer.loggers import Logger
except ModuleNotFoundError as error:  # pragma: no cover - the message is the point
    raise ImportError(
        "fxblur.composer needs MosaicML Composer: pip install mosaicml (it pins its own torch; "
        "tools/composer_check.sh builds such an environment)"
    ) from error

log = logging.getLogger(__name__)

# The networks of Composer's model wrappers: ComposerClassifier, then HuggingFaceModel.
NETWORK_ATTRIBUTES = ("module", "model")


class BlurPool(Algorithm):
    """Anti-alias a Composer model's network at ``Event.INIT``, as ``composer.algorithms.BlurPool`` does.

    Args:
        replace_convs: blur strided convolutions.
        replace_maxpools: blur strided max pools.
        blur_first: blur before a strided conv, which keeps its stride; ``False`` runs it
            at stride 1 and lets the blur subsample.
        min_channels: leave convs with fewer input channels alone (an RGB stem).
        attribute: the ``ComposerModel`` attribute holding the network; by default
            ``"module"`` (``ComposerClassifier``) or else ``"model"`` (``HuggingFaceModel``).
        **fxblur_options: any other option of ``fxblur.transform`` (``preset``,
            ``polyphase``, ``exclude``...), checked when the algorithm is created. The
            numerics default to ``preset="composer"``.

    Raises:
        ValueError: both ``replace_convs`` and ``replace_maxpools`` are off (as in
            Composer), or an option ``fxblur.transform`` rejects.
    """

    def __init__(
        self,
        replace_convs: bool = True,
        replace_maxpools: bool = True,
        blur_first: bool = True,
        min_channels: int = 16,
        attribute: str | None = None,
        **fxblur_options: Any,
    ) -> None:
        if not replace_convs and not replace_maxpools:
            raise ValueError("replace_convs and replace_maxpools are both False: BlurPool would not change the model")
        self.replace_convs = replace_convs
        self.replace_maxpools = replace_maxpools
        self.blur_first = blur_first
        self.min_channels = min_channels
        self.attribute = attribute
        self.fxblur_options = fxblur_options
        check_options(**self._options())  # a bad option fails here, not at INIT

    def __repr__(self) -> str:
        extra = "".join(f",{name}={value!r}" for name, value in self.fxblur_options.items())
        return (
            f"{type(self).__name__}(replace_convs={self.replace_convs},replace_maxpools={self.replace_maxpools},"
            f"blur_first={self.blur_first},min_channels={self.min_channels}{extra})"
        )

    @staticmethod
    def required_on_load() -> bool:
        """A checkpoint trained with BlurPool loads into the rewritten architecture (its keys are the original's)."""
        return True

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        name = self._network_attribute(state.model)
        network = getattr(state.model, name)
        if record_of(network) is not None:
            return  # already rewritten
        blurred = apply_blurpool(network, optimizers=state.optimizers, **self._options())
        setattr(state.model, name, blurred)
        log.info("BlurPool rewrote %s.%s:\n%s", type(state.model).__name__, name, report(blurred))
        logger.log_hyperparameters(layer_counts(blurred))

    def _options(self) -> dict[str, Any]:
        return {
            "replace_convs": self.replace_convs,
            "replace_maxpools": self.replace_maxpools,
            "blur_first": self.blur_first,
            "min_channels": self.min_channels,
            **self.fxblur_options,
        }

    def _network_attribute(self, model: nn.Module) -> str:
        candidates = (self.attribute,) if self.attribute else NETWORK_ATTRIBUTES
        for name in candidates:
            if isinstance(getattr(model, name, None), nn.Module):
                return name
        raise ValueError(
            f"{type(model).__name__} has no network at {' or '.join(candidates)}: "
            "name the attribute holding it with BlurPool(attribute=...)"
        )


def layer_counts(blurred: nn.Module) -> dict[str, int]:
    """Composer's BlurPool hyperparameters (blurred max pools, blurred convs) for fxblur's rewrite.

    Example:
        >>> gm = fxblur.transform(torchvision.models.resnet18(), preset="composer", verbose=False)
        >>> layer_counts(gm)
        {'blurpool/num_blurpool_layers': 1, 'blurpool/num_blurconv_layers': 6}
    """
    blurred_ops = Counter(change.op for change in changes(blurred) if change.action != Action.SKIPPED)
    return {
        "blurpool/num_blurpool_layers": blurred_ops["max_pool2d"],
        "blurpool/num_blurconv_layers": blurred_ops["conv2d"],
    }
