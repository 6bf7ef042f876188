"""Circular padding: every conv, pool and blur a graph calls pads by wrapping around, at the same sizes.

A conv or pool that pads with zeros (or ``-inf``) treats the border differently from the
interior, so a network that pads so is not exactly equivariant to circular shifts;
polyphase sampling then makes it invariant only away from the borders. With
``circular_padding=True``, after the blur or polyphase passes, this pass makes

- every conv module pad circularly (``padding_mode="circular"``: its own ``forward`` pads;
  torch.nn's own conv classes become ``fxblur.ops.circular`` ones, which wrap around as
  often as a dilated conv on a small map needs), and a functional conv read a circularly
  padded input at ``padding=0``;
- every pool with padding, or with ``ceil_mode`` windows that reach past its input, read an
  input padded circularly to the same extent (``fxblur.ops.ceil_mode.pad_window_circularly``)
  at ``padding=0``, so that its output keeps its size; a pool run at stride 1 whose
  ``ceil_mode`` windows were kept with ``-inf`` samples wraps around instead;

(blurs pad circularly through ``padding_mode``). Layers of other libraries that pad
with zeros whatever ``padding_mode`` says (``fxblur.known_layers``: timm's ``StdConv2d``)
read a circularly padded input at ``padding=0``, and those that pad 'same' at run time
(timm's ``Conv2dSame``, ``MaxPool2dSame``) read one padded 'same' circularly
(``pad_same_circularly``) and pad nothing themselves. A padding layer that pads otherwise
(``nn.ConstantPad2d``, ``nn.ReflectionPad2d``) and only feeds convs and pools pads
circularly instead (``fxblur.ops.circular.CircularPad``), as their own padding would. A
conv that crops (``padding=0`` with a kernel above 1, or ``"valid"``) is left as it is,
and so is a module that code outside the graph also calls; the equivariance analysis
(``fxblur.analysis.equivariance``) then names each where it stops a model from being
exactly equivariant.

Example:
    >>> from torch.fx.passes.infra.pass_manager import PassManager
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.MaxPool2d(3, 1, 1))
    >>> gm = fx.symbolic_trace(net)
    >>> _ = PassManager([CircularPadding()])(gm)
    >>> type(gm.get_submodule("0")).__name__, gm.get_submodule("0").padding_mode, gm.get_submodule("1").padding
    ('CircularConv2d', 'circular', 0)
    >>> x = torch.randn(1, 4, 6, 6)
    >>> torch.allclose(gm(torch.roll(x, 2, 3)), torch.roll(gm(x), 2, 3), atol=1e-6)
    True
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from fxblur.analysis.window_ops import WindowOp, base_class, read_window_op, set_call_argument
from fxblur.known_layers import pads_same_at_run_time, pads_with_zeros, same_padding_switch
from fxblur.ops.ceil_mode import pad_for_ceil_mode, pad_same_circularly, pad_window_circularly
from fxblur.ops.circular import CIRCULAR_CLASSES, OTHER_PADDING_LAYERS, circular_conv, circular_padding_layer
from fxblur.passes.context import RewriteContext
from fxblur.passes.edit import insert_before, replace_uses, strided_as
from fxblur.record import logged
from fxblur.trace.cloning import share_tensors


class CircularPadding(PassBase):
    """Make the convs and pools of a graph pad circularly (see the module docstring).

    Args:
        context: shared by the passes over every graph of one model (modules change when it
            is installed); a pass run on a single GraphModule on its own makes one for it.
    """

    def __init__(self, context: RewriteContext | None = None) -> None:
        self.context = context

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        context = self.context or RewriteContext([graph_module])
        modified = False
        added = {name for change in logged(graph_module, "decisions") for name in change.added_nodes}
        for node in list(graph_module.graph.nodes):
            padding = _padding_layer(node, graph_module, context.frozen)
            if padding is not None:
                if not _feeds_window_ops(node, graph_module):
                    behind = _window_op_behind(node, graph_module, added)
                    if behind is None:
                        continue
                    moved = insert_before(behind.node, node.target, (behind.input,))  # pad what the op reads
                    replace_uses(behind.input, moved, only=[behind.node])
                    replace_uses(node, node.args[0])
                    graph_module.graph.erase_node(node)
                context.replace(node.target, padding, lambda m=padding: circular_padding_layer(share_tensors(m)))
                modified = True
                continue
            op = read_window_op(node, graph_module)
            was = strided_as(node)
            if op is None:
                continue
            if op.module is not None and pads_same_at_run_time(op.module):
                if id(op.module) not in context.frozen:
                    self._pad_same_before(op, was, context)
                    modified = True
                continue
            if not (was or _pads(op)) or _left_as_it_is(op, context.frozen, was):
                continue
            if was and _is_ceil_mode_padding(op.input):  # wrap around instead of -inf samples
                ceil_padding = op.input
                replace_uses(ceil_padding, ceil_padding.args[0], only=[op.node])
                graph_module.graph.erase_node(ceil_padding)
            if op.kind == "conv" and op.module is not None and _same(op) and type(op.module) in CIRCULAR_CLASSES:
                context.replace(op.target, op.module, lambda op=op: circular_conv(share_tensors(op.module)))
            elif op.kind == "conv" and op.module is not None and _same(op) and not pads_with_zeros(type(op.module)):
                context.configure(op.module, padding_mode="circular")
            else:
                self._pad_before(op, was, context)
            modified = True
        if self.context is None:
            context.install(graph_module)
        return PassResult(graph_module, modified)

    def _pad_same_before(self, op: WindowOp, was: tuple | None, context: RewriteContext) -> None:
        """Feed ``op``, a layer that pads 'same' at run time, an input padded so circularly; it then pads nothing."""
        stride = was[0] if was else op.stride
        geometry = (list(op.kernel_size), list(stride), list(op.dilation), was is not None)
        pad = insert_before(op.node, pad_same_circularly, (op.input, *geometry))
        replace_uses(op.input, pad, only=[op.node])
        switch = same_padding_switch(op.module)
        if switch is not None:
            context.configure(op.module, **{switch: False})
        else:
            context.replace(op.target, op.module, lambda: _as_base_class(op))

    def _pad_before(self, op: WindowOp, was: tuple | None, context: RewriteContext) -> None:
        """Feed ``op`` a circularly padded input and make it pad nothing itself."""
        zeros = [0] * op.dims
        stride, ceil_mode = was or (op.stride, op.ceil_mode)
        geometry = (list(op.kernel_size), list(stride), list(op.padding), list(op.dilation), ceil_mode)
        pad = insert_before(op.node, pad_window_circularly, (op.input, *geometry, was is not None))
        replace_uses(op.input, pad, only=[op.node])
        if op.module is None:
            if op.kind != "lp_pool":  # LP pools have no padding
                set_call_argument(op.node, "padding", zeros)
            if op.ceil_mode:
                set_call_argument(op.node, "ceil_mode", False)
        else:
            settings = {"ceil_mode": False} if op.kind != "conv" else {}
            if hasattr(op.module, "padding"):  # LP pools have none
                settings["padding"] = tuple(zeros) if isinstance(op.module.padding, tuple) else 0
            context.configure(op.module, **settings)


def _padding_layer(node: fx.Node, graph_module: fx.GraphModule, frozen: frozenset[int]) -> nn.Module | None:
    """The torch.nn padding layer that does not wrap around which ``node`` calls, if it may change; else ``None``."""
    if node.op != "call_module" or not node.users:
        return None
    module = graph_module.get_submodule(node.target)
    return module if isinstance(module, OTHER_PADDING_LAYERS) and id(module) not in frozen else None


def _feeds_window_ops(node: fx.Node, graph_module: fx.GraphModule) -> bool:
    """Whether every user of ``node`` is a conv or pool."""
    return all(read_window_op(user, graph_module) is not None for user in node.users)


def _window_op_behind(node: fx.Node, graph_module: fx.GraphModule, added: set[str]) -> WindowOp | None:
    """The conv or pool that ``node`` feeds only through nodes a rewrite added, else ``None``.

    BiT's stem pads with an ``nn.ConstantPad2d`` before its max pool; once the pool is
    blurred (and its phase chosen), the padding feeds the blur. Padding the blurred map
    circularly would wrap it around its padded size, not the map's; so the padding moves
    to the pool's input, where it pads as the pool's own padding would.
    """
    through, reached, frontier = set(), set(), list(node.users)
    while frontier:
        user = frontier.pop()
        if user.name in added:
            if user not in through:
                through.add(user)
                frontier.extend(user.users)
        else:
            reached.add(user)
    if len(reached) != 1:
        return None
    op = read_window_op(next(iter(reached)), graph_module)
    return op if op is not None and op.input in through else None


def _as_base_class(op: WindowOp) -> nn.Module:
    """A copy of ``op``'s module as its torch.nn base class, which pads as ``padding`` says: by nothing here."""
    module = share_tensors(op.module)
    module.__class__ = base_class(module)
    return module


def _pads(op: WindowOp) -> bool:
    """Whether the op pads, reaches past its input (ceil mode), or drops its border (a crop)."""
    return op.ceil_mode or op.padding == "same" or _crops(op) or (not isinstance(op.padding, str) and any(op.padding))


def _left_as_it_is(op: WindowOp, frozen: frozenset[int], was: tuple | None) -> bool:
    """Whether ``op`` keeps its padding: it crops, pads 'same'/'valid' itself, or code outside the graph calls it."""
    called_outside = op.module is not None and id(op.module) in frozen
    return (not was and _crops(op)) or isinstance(op.padding, str) or called_outside


def _crops(op: WindowOp) -> bool:
    """Whether the op's output misses part of its input's border (so no padding can keep every size)."""
    if op.padding == "same" or op.ceil_mode or op.kernel_size is None:
        return False
    padding = (0,) * op.dims if op.padding == "valid" else op.padding
    axes = zip(op.kernel_size, op.stride, padding, op.dilation, strict=True)
    return any(d * (k - 1) > 2 * p + s - 1 for k, s, p, d in axes)


def _same(op: WindowOp) -> bool:
    """A conv whose padding exactly makes up for its kernel: its own circular padding keeps every size."""
    spans = [d * (k - 1) for k, d in zip(op.kernel_size, op.dilation, strict=True)]
    return all(2 * p == span for p, span in zip(op.padding, spans, strict=True))


def _is_ceil_mode_padding(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is pad_for_ceil_mode and len(node.users) == 1
