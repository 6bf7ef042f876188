"""Where the change report goes: the ``fxblur`` logger, and the screen with ``verbose=True``, on rank 0 only.

Under ``torch.distributed`` every rank rewrites its own copy of the model, and every rank's
report is the same: printing it eight times on eight ranks says nothing the first did not.
So the report is published by the process of rank 0 alone (every process where no process
group is initialised): logged at ``INFO`` to the ``fxblur`` logger, where a training
script's logging configuration takes it, and printed as well with ``verbose=True``.

Example:
    >>> import logging
    >>> logging.getLogger("fxblur").isEnabledFor(logging.INFO)  # quiet until configured
    False
    >>> publish(lambda: "ResNet: 7 blurred, 1 skipped", verbose=True)
    ResNet: 7 blurred, 1 skipped
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.distributed as dist

LOGGER = logging.getLogger("fxblur")


def is_rank_zero() -> bool:
    """Whether this process speaks for the job: rank 0, or any process outside a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def publish(make_text: Callable[[], str], verbose: bool) -> None:
    """Log ``make_text()`` to the ``fxblur`` logger, and print it if ``verbose``: on rank 0 only, made if needed."""
    if not is_rank_zero() or not (verbose or LOGGER.isEnabledFor(logging.INFO)):
        return
    text = make_text()
    LOGGER.info("%s", text)
    if verbose:
        print(text)
