"""Layers from other libraries that fxblur knows: conv and pool subclasses it may run at stride 1, blur layers.

Conv and pool subclasses with a ``forward`` of their own (timm's ``Conv2dSame`` pads 'same'
at run time; ``StdConv2d`` standardises its weight first) are blurred *before* in any case:
a stride-1 blur in front of an op needs nothing from its ``forward``. Running one at stride 1
(``blur_first=False``, the paper's placement, polyphase selection after it) needs a
``forward`` that honours the module's ``stride`` attribute: the classes named in
``TRUSTED_FORWARDS`` do, and ``trust_forward`` declares your own.

How such a subclass pads matters for circular padding and the equivariance analysis:
timm's ``StdConv2d`` family pads with zeros by ``padding`` whatever ``padding_mode`` says
(``PADS_WITH_ZEROS``), and its ``*Same`` layers pad 'same' at run time
(``PADS_SAME_AT_RUN_TIME``); ``circular_padding=True`` pads their input instead.

Layers that already anti-alias (a blur with a stride: timm's ``BlurPool2d``,
antialiased-cnns' ``BlurPool``, kornia's ``BlurPool2D`` and ``MaxBlurPool2D``, Composer's
blur layers) are called whole, never traced into and never blurred again; an op they feed
at stride 1 counts as blurred already.

Classes are matched by module and name, so that ``import fxblur`` imports none of these
libraries.

Example:
    >>> class Standardised(nn.Conv2d):
    ...     def forward(self, x):
    ...         w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
    ...         return F.conv2d(x, w, self.bias, self.stride, self.padding)
    >>> trusts_forward(Standardised)
    False
    >>> trust_forward(Standardised); trusts_forward(Standardised)
    True
"""

from __future__ import annotations

from torch import nn

TRUSTED_FORWARDS = {
    "timm.layers.conv2d_same.Conv2dSame",
    "timm.layers.std_conv.StdConv2d",
    "timm.layers.std_conv.StdConv2dSame",
    "timm.layers.std_conv.ScaledStdConv2d",
    "timm.layers.std_conv.ScaledStdConv2dSame",
    "timm.layers.pool2d_same.MaxPool2dSame",
    "timm.layers.pool2d_same.AvgPool2dSame",
    "fxblur.ops.circular.CircularConv1d",
    "fxblur.ops.circular.CircularConv2d",
    "fxblur.ops.circular.CircularConv3d",
}

ANTI_ALIASING = {
    "timm.layers.blur_pool.BlurPool2d": "timm BlurPool2d",
    "antialiased_cnns.blurpool.BlurPool": "antialiased-cnns BlurPool",
    "antialiased_cnns.blurpool.BlurPool1D": "antialiased-cnns BlurPool1D",
    "kornia.filters.blur_pool.BlurPool2D": "kornia BlurPool2D",
    "kornia.filters.blur_pool.MaxBlurPool2D": "kornia MaxBlurPool2D",
    "composer.algorithms.blurpool.blurpool_layers.BlurPool2d": "Composer BlurPool2d",
    "composer.algorithms.blurpool.blurpool_layers.BlurMaxPool2d": "Composer BlurMaxPool2d",
    "composer.algorithms.blurpool.blurpool_layers.BlurConv2d": "Composer BlurConv2d",
}

# Conv subclasses with a forward of their own that pad as ``padding`` and ``padding_mode`` say,
# circular padding included (what the equivariance analysis needs to trust their borders).
PADS_AS_CONFIGURED: set[str] = {
    "fxblur.ops.circular.CircularConv1d",
    "fxblur.ops.circular.CircularConv2d",
    "fxblur.ops.circular.CircularConv3d",
    "fxblur.ops.max_pool.StrideOneMaxPool1d",
    "fxblur.ops.max_pool.StrideOneMaxPool2d",
    "fxblur.ops.max_pool.StrideOneMaxPool3d",
}

# Conv subclasses whose forward pads with zeros by ``padding`` whatever ``padding_mode`` says
# (timm's weight-standardised convs): circular padding pads their input instead.
PADS_WITH_ZEROS: set[str] = {
    "timm.layers.std_conv.StdConv2d",
    "timm.layers.std_conv.StdConv2dSame",
    "timm.layers.std_conv.ScaledStdConv2d",
    "timm.layers.std_conv.ScaledStdConv2dSame",
}

# Layers that pad 'same' at run time as TensorFlow does (from the input's size, fewer samples
# before than after), with zeros or -inf: by class, the attribute that turns it on (``None``:
# always on; the layer is then its torch.nn base class after that padding).
PADS_SAME_AT_RUN_TIME: dict[str, str | None] = {
    "timm.layers.conv2d_same.Conv2dSame": None,
    "timm.layers.std_conv.StdConv2dSame": "same_pad",
    "timm.layers.std_conv.ScaledStdConv2dSame": "same_pad",
    "timm.layers.pool2d_same.MaxPool2dSame": None,
    "timm.layers.pool2d_same.AvgPool2dSame": None,
}

# Norms with an activation that other libraries fuse into one module: called whole, since
# their forward updates buffers in place while it runs (timm's BatchNormAct2d counts batches
# with num_batches_tracked.add_(1), which a trace would run on the model's own buffer and not
# record). By what they normalise over: "batch" (per channel, as a BatchNorm), "group" (groups
# of channels and space), "channels" (the channels at each position) or "last" (the last dim).
NORM_ACT: dict[str, str] = {
    "timm.layers.norm_act.BatchNormAct2d": "batch",
    "timm.layers.norm_act.SyncBatchNormAct": "batch",
    "timm.layers.norm_act.FrozenBatchNormAct2d": "batch",
    "timm.layers.norm_act.GroupNormAct": "group",
    "timm.layers.norm_act.GroupNorm1Act": "group",
    "timm.layers.norm_act.LayerNormAct2d": "channels",
    "timm.layers.norm_act.LayerNormAct2dFp32": "channels",
    "timm.layers.norm_act.RmsNormAct2d": "channels",
    "timm.layers.norm_act.RmsNormAct2dFp32": "channels",
    "timm.layers.norm_act.LayerNormAct": "last",
    "timm.layers.norm_act.LayerNormActFp32": "last",
    "timm.layers.norm_act.RmsNormAct": "last",
    "timm.layers.norm_act.RmsNormActFp32": "last",
}

_trusted: set[type] = set()


def trust_forward(cls: type[nn.Module]) -> None:
    """Declare that ``cls``, a conv or pool subclass, honours its ``stride`` attribute in ``forward``.

    fxblur may then run it at stride 1 (set ``stride`` to 1 on a copy) in every placement,
    as it does for torch.nn's own classes and the known ones in ``TRUSTED_FORWARDS``.
    """
    if not (isinstance(cls, type) and issubclass(cls, (nn.modules.conv._ConvNd, nn.modules.pooling._MaxPoolNd,
                                                         nn.modules.pooling._AvgPoolNd))):  # fmt: skip
        raise TypeError(f"trust_forward takes a conv or pool subclass, got {cls!r}")
    _trusted.add(cls)


def trusts_forward(cls: type) -> bool:
    """Whether fxblur may run ``cls`` at stride 1 although it overrides ``forward``."""
    return cls in _trusted or _name(cls) in TRUSTED_FORWARDS


def pads_as_configured(cls: type) -> bool:
    """Whether ``cls``'s own ``forward`` pads as its ``padding`` and ``padding_mode`` say (``PADS_AS_CONFIGURED``)."""
    return _name(cls) in PADS_AS_CONFIGURED


def pads_with_zeros(cls: type) -> bool:
    """Whether ``cls``'s own ``forward`` pads with zeros by ``padding``, whatever its ``padding_mode``."""
    return _name(cls) in PADS_WITH_ZEROS


def pads_same_at_run_time(module: nn.Module) -> bool:
    """Whether ``module`` pads 'same' at run time, TensorFlow's way (``PADS_SAME_AT_RUN_TIME``)."""
    name = _name(type(module))
    if name not in PADS_SAME_AT_RUN_TIME:
        return False
    switch = PADS_SAME_AT_RUN_TIME[name]
    return switch is None or bool(getattr(module, switch))


def same_padding_switch(module: nn.Module) -> str | None:
    """The attribute that turns off ``module``'s run-time 'same' padding, or ``None`` where only its base class can."""
    return PADS_SAME_AT_RUN_TIME[_name(type(module))]


def norm_act(module: nn.Module) -> str | None:
    """What a known norm-with-activation module normalises over (``NORM_ACT``), or ``None``."""
    return next((kind for cls in type(module).__mro__ if (kind := NORM_ACT.get(_name(cls)))), None)


def anti_aliasing(module: nn.Module) -> str | None:
    """What ``module`` is, if it is a known anti-aliasing layer (``"timm BlurPool2d"``), else ``None``."""
    return ANTI_ALIASING.get(_name(type(module)))


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
