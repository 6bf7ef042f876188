"""What the rewrite should do: the options every pass reads, checked once at the call.

The names follow Composer's ``apply_blurpool`` (``replace_convs``, ``replace_maxpools``,
``blur_first``, ``min_channels``), so its users find the knobs they know.

Example:
    >>> BlurOptions(blur_first=False, exclude=("layer4.*",)).excluded("layer4.0.conv2")
    'layer4.*'
    >>> BlurOptions(filter_size=9)
    Traceback (most recent call last):
    ...
    ValueError: filter_size must be an int from 1 to 7, got 9
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass

from fxblur.blur import check_padding_mode
from fxblur.filters import MAX_FILTER_SIZE


@dataclass(frozen=True)
class BlurOptions:
    """Options of the blur passes (see ``fxblur.transform`` for what each one does)."""

    replace_convs: bool = True
    replace_maxpools: bool = True
    blur_first: bool = True
    min_channels: int = 16
    filter_size: int = 3
    padding_mode: str = "reflect"
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("replace_convs", "replace_maxpools", "blur_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not _is_int(self.min_channels) or self.min_channels < 0:
            raise ValueError(f"min_channels must be an int >= 0, got {self.min_channels!r}")
        if not _is_int(self.filter_size) or not 1 <= self.filter_size <= MAX_FILTER_SIZE:
            raise ValueError(f"filter_size must be an int from 1 to {MAX_FILTER_SIZE}, got {self.filter_size!r}")
        check_padding_mode(self.padding_mode)
        object.__setattr__(self, "exclude", _patterns(self.exclude))

    def excluded(self, name: str) -> str | None:
        """The first ``exclude`` pattern that matches ``name``, or ``None``."""
        return next((p for p in self.exclude if fnmatch.fnmatchcase(name, p)), None)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _patterns(exclude: str | Iterable[str]) -> tuple[str, ...]:
    patterns = (exclude,) if isinstance(exclude, str) else exclude
    try:
        patterns = tuple(patterns)
    except TypeError:
        raise ValueError(f"exclude must be glob patterns (strings), got {exclude!r}") from None
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"exclude must be glob patterns (strings), got {exclude!r}")
    return patterns
