"""What the rewrite should do: the options every pass reads, checked once at the call.

The names follow Composer's ``apply_blurpool`` (``replace_convs``, ``replace_maxpools``,
``blur_first``, ``min_channels``), so its users find the knobs they know. Presets are named
sets of options; options given explicitly override the preset's.

Placement, per kind of op:

- strided convs: ``blur_first=True`` blurs at stride 1 before the conv (cheapest);
  ``blur_first=False`` runs the conv at stride 1 and lets a blur subsample after it;
  ``past_nonlinearity=True`` (which takes precedence) moves that blur down the chain of
  per-channel ops that follows the conv (BatchNorm, activations, dropout), as the paper
  does. A 1x1 conv without padding gets its blur-and-subsample before it instead, at a
  quarter of the cost, in every placement where that computes the same: always with
  ``blur_first``, and after it unless the conv has a bias and the blur pads with zeros
  (see ``fxblur.passes.BlurStridedConvs``).
- pools: ``pool_blur_first`` (``blur_first`` unless set) chooses between blurring before
  the pool and running the pool at stride 1 followed by a subsampling blur (MaxBlurPool).

Polyphase sampling (``polyphase=True``, see ``fxblur.passes.PolyphaseSampling``): every
downsampling op subsamples by adaptive polyphase selection in the same placements, the
blur (stride 1) optional; unless given, ``min_channels`` becomes 0, and ``replace_avgpools``
and ``replace_subsampling`` ``True``, so that no downsampling op is left out.
``circular_padding=True`` makes convs, pools and blurs pad circularly (``padding_mode``
becomes ``"circular"``), which exact invariance to circular shifts needs.

Filters: with ``adaptive_filter=True`` the ``filter_size``-tap binomial is applied only
along the axes an op subsamples, and widens for strides above 2 (see ``filter_taps``);
``adaptive_filter=False`` applies ``filter_size`` taps along every spatial axis whatever the
stride, as Composer and antialiased-cnns do.

Example:
    >>> BlurOptions(blur_first=False, exclude=("layer4.*",)).excluded("layer4.0.conv2")
    'layer4.*'
    >>> resolve("zhang2019", filter_size=3).filter_size, resolve("zhang2019").padding_mode
    (3, 'reflect')
    >>> BlurOptions().filter_taps((2, 1)), BlurOptions().filter_taps((4, 4))
    ((3, 1), (5, 5))
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fxblur.ops.filters import MAX_FILTER_SIZE
from fxblur.ops.padding import check_padding_mode
from fxblur.ops.polyphase import NORMS


@dataclass(frozen=True)
class BlurOptions:
    """Options of the blur passes (see ``fxblur.transform`` for what each one does)."""

    replace_convs: bool = True
    replace_maxpools: bool = True
    replace_avgpools: bool = False
    replace_subsampling: bool = False
    blur_first: bool = True
    past_nonlinearity: bool = False
    pool_blur_first: bool | None = None
    min_channels: int = 16
    filter_size: int = 3
    adaptive_filter: bool = True
    padding_mode: str = "reflect"
    exclude: tuple[str, ...] = ()
    polyphase: bool = False
    polyphase_norm: str = "l2"
    circular_padding: bool = False

    def __post_init__(self) -> None:
        flags = ("replace_convs", "replace_maxpools", "replace_avgpools", "replace_subsampling", "blur_first",
                 "past_nonlinearity")  # fmt: skip
        for name in (*flags, "adaptive_filter", "polyphase", "circular_padding"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.pool_blur_first is not None and not isinstance(self.pool_blur_first, bool):
            raise ValueError(f"pool_blur_first must be True, False or None, got {self.pool_blur_first!r}")
        if not _is_int(self.min_channels) or self.min_channels < 0:
            raise ValueError(f"min_channels must be an int >= 0, got {self.min_channels!r}")
        if not _is_int(self.filter_size) or not 1 <= self.filter_size <= MAX_FILTER_SIZE:
            raise ValueError(f"filter_size must be an int from 1 to {MAX_FILTER_SIZE}, got {self.filter_size!r}")
        check_padding_mode(self.padding_mode)
        if self.circular_padding and self.padding_mode != "circular":
            mode = self.padding_mode
            raise ValueError(f"circular_padding=True pads blurs circularly: padding_mode {mode!r} conflicts")
        if self.polyphase_norm not in NORMS:
            raise ValueError(f"polyphase_norm must be one of {NORMS}, got {self.polyphase_norm!r}")
        object.__setattr__(self, "exclude", _patterns(self.exclude))

    @property
    def pools_blur_first(self) -> bool:
        return self.blur_first if self.pool_blur_first is None else self.pool_blur_first

    def excluded(self, name: str) -> str | None:
        """The first ``exclude`` pattern that matches ``name``, or ``None``."""
        return next((p for p in self.exclude if fnmatch.fnmatchcase(name, p)), None)

    def filter_taps(self, stride: tuple[int, ...]) -> tuple[int, ...]:
        """Binomial taps per axis for an op of ``stride``.

        Adaptive: none (1) along axes the op does not subsample; ``filter_size`` at stride
        2; ``1 + (filter_size - 1) * ceil(stride / 2)`` above, at most 7, so that the
        filter's width keeps pace with the stride (a 3-tap filter leaves most of what a
        stride of 4 aliases).
        """
        if not self.adaptive_filter:
            return (self.filter_size,) * len(stride)
        return tuple(
            1 if s == 1 else min(MAX_FILTER_SIZE, 1 + (self.filter_size - 1) * math.ceil(s / 2)) for s in stride
        )


PRESETS: dict[str, dict[str, Any]] = {
    # Composer's BlurPool: a 3x3 binomial with zero padding before strided convs, and max
    # pools run at stride 1 followed by a subsampling blur.
    "composer": {
        "blur_first": True,
        "pool_blur_first": False,
        "filter_size": 3,
        "adaptive_filter": False,
        "padding_mode": "zeros",
    },
    # Zhang (2019) as in the antialiased-cnns package: strided convs run at stride 1 with
    # the blur past their BatchNorm and ReLU, 1x1 shortcuts blurred first, MaxBlurPool,
    # 4-tap filters with reflect padding.
    "zhang2019": {
        "blur_first": False,
        "past_nonlinearity": True,
        "pool_blur_first": False,
        "filter_size": 4,
        "adaptive_filter": False,
        "padding_mode": "reflect",
    },
    # Adaptive polyphase sampling as in the APS ResNets (Chaman & Dokmanic 2021): circular
    # padding, each strided conv at stride 1 with the selection past its BatchNorm and ReLU,
    # 1x1 shortcuts selecting first with the main branch's phase, max pools at stride 1 then
    # selected, l2 norm, no blur (``filter_size`` 2 to 7 gives their APS with a low-pass filter).
    "aps": {
        "polyphase": True,
        "circular_padding": True,
        "blur_first": False,
        "past_nonlinearity": True,
        "pool_blur_first": False,
        "filter_size": 1,
        "adaptive_filter": False,
    },
}

# What polyphase sampling and circular padding change in the defaults, below explicit values and presets.
_POLYPHASE_DEFAULTS = {"min_channels": 0, "replace_avgpools": True, "replace_subsampling": True}
_CIRCULAR_DEFAULTS = {"padding_mode": "circular"}


def resolve(preset: str | None = None, **explicit: Any) -> BlurOptions:
    """The options of ``preset`` (or the defaults) with every explicit value on top.

    ``None`` values in ``explicit`` mean "not given".
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
    given = {name: value for name, value in explicit.items() if value is not None}
    unknown = set(given) - {f.name for f in dataclasses.fields(BlurOptions)}
    if unknown:
        raise ValueError(f"unknown options: {sorted(unknown)}")
    chosen = {**PRESETS.get(preset, {}), **given}
    implied = {
        **(_POLYPHASE_DEFAULTS if chosen.get("polyphase") else {}),
        **(_CIRCULAR_DEFAULTS if chosen.get("circular_padding") else {}),
    }
    return BlurOptions(**{**implied, **chosen})


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
