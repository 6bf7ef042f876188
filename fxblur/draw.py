"""``fxblur.draw``: a picture of the rewritten graph, with what the rewrite added picked out.

The graph is drawn by torch.fx's ``FxGraphDrawer`` (which needs ``pydot``: ``pip install
'.[draw]'`` from a clone); a ``.dot`` file is its Graphviz text, any other suffix (``.svg``,
``.png``, ``.pdf``) is rendered by Graphviz's ``dot`` program, which must be installed
(``apt install graphviz``, ``brew install graphviz``).

Colours: a blurred conv or pool is blue (most carry their blur in their module,
``fxblur.ops.blurred``); every node a rewrite inserted (a blur past a nonlinearity, padding,
the phase selection) is orange with a double outline; a skipped op is grey. With
polyphase sampling, the ops of a phase group and the nodes added for them share one colour
per group, so the groups that follow one phase can be told apart.

Example:
    >>> import tempfile, pathlib
    >>> gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    >>> path = fxblur.draw(gm, pathlib.Path(tempfile.mkdtemp()) / "resnet18.dot")
    >>> [line.split()[0] for line in path.read_text().splitlines() if BLURRED in line][:3]
    ['maxpool', 'layer2_0_conv1', 'layer2_0_downsample_0']
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from fxblur.record import Action, changes, flat_graph_module

ADDED = "#ffb703"  # orange: a node the rewrite inserted
BLURRED = "#8ecae6"  # blue: a conv or pool that is blurred now
SKIPPED = "#d9d9d9"  # grey: a strided op left as it was
# one colour per phase group, repeating past the tenth (Tableau's 10, lightened)
GROUP_COLOURS = (
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5",
    "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#e7ba52",
)  # fmt: skip


def draw(gm: nn.Module, path: str | Path) -> Path:
    """Write a picture of ``gm``'s rewritten graph (of its current mode) to ``path`` and return the path.

    Args:
        gm: what ``fxblur.transform`` returned.
        path: ``NAME.dot`` for Graphviz text; ``NAME.svg``, ``.png``, ``.pdf`` (any format
            Graphviz writes) for a rendered picture.

    Raises:
        ImportError: ``pydot`` is not installed (the ``draw`` extra).
        RuntimeError: a rendered format was asked for and Graphviz's ``dot`` is not installed.
        ValueError: ``gm`` was not returned by ``fxblur.transform``, or has no single graph
            (``strict=False`` on a model traced in parts: draw each part).
    """
    try:
        import pydot  # noqa: F401  # FxGraphDrawer is a stub without it
        from torch.fx.passes.graph_drawer import FxGraphDrawer
    except ImportError as error:
        raise ImportError("fxblur.draw needs pydot: pip install pydot (the 'draw' extra)") from error
    decisions = changes(gm)  # ValueError for a module transform did not return
    graph = flat_graph_module(gm)
    if graph is None:
        raise ValueError(f"{type(gm).__name__} was rewritten in parts (strict=False): draw each part's GraphModule")
    path = Path(path)
    dot = FxGraphDrawer(graph, type(gm).__name__, ignore_parameters_and_buffers=True).get_main_dot_graph()
    for name, style in node_styles(decisions).items():
        for node in dot.get_node(name):
            for key, value in style.items():
                node.set(key, value)
    if path.suffix == ".dot":
        path.write_text(dot.to_string())
        return path
    try:
        rendered = dot.create(format=path.suffix.lstrip(".") or "svg")
    except FileNotFoundError as error:
        raise RuntimeError(
            f"rendering {path.suffix or 'a picture'} needs Graphviz's dot program (apt install graphviz, "
            "brew install graphviz); a .dot path writes the graph's text without it"
        ) from error
    path.write_bytes(rendered)
    return path


def node_styles(decisions: list) -> dict[str, dict[str, str]]:
    """Graphviz attributes by node name for the nodes the rewrite decided about (see the module's colours)."""
    groups = list(dict.fromkeys(c.phase_group for c in decisions if c.phase_group))
    styles = {}
    for change in decisions:
        if change.action == Action.SKIPPED:
            styles[change.node] = {"fillcolor": SKIPPED}
            continue
        colour = GROUP_COLOURS[groups.index(change.phase_group) % len(GROUP_COLOURS)] if change.phase_group else None
        styles[change.node] = {"fillcolor": colour or BLURRED, "penwidth": "2"}
        for added in change.added_nodes:
            styles[added] = {"fillcolor": colour or ADDED, "peripheries": "2", "penwidth": "2"}
    return styles
