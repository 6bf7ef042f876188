"""fxblur.draw and ``inspect --draw``: the rewritten graph as a picture, the rewrite picked out."""

from __future__ import annotations

import shutil
import sys

import pytest
import torchvision

import fxblur
from fxblur.draw import ADDED, BLURRED, GROUP_COLOURS, SKIPPED
from fxblur.inspect import main

pydot = pytest.importorskip("pydot")
# pydot's DOT parser calls pyparsing's pre-3.0 names, which warn
pytestmark = pytest.mark.filterwarnings("ignore:.* deprecated - use:DeprecationWarning")


def drawn_nodes(path) -> dict[str, dict[str, str]]:
    """Node name -> Graphviz attributes of a written .dot file."""
    (graph,) = pydot.graph_from_dot_data(path.read_text())
    return {node.get_name().strip('"'): node.get_attributes() for node in graph.get_nodes()}


def colour(attributes: dict[str, str]) -> str:
    return attributes["fillcolor"].strip('"')


def test_blurred_ops_and_added_nodes_are_picked_out(tmp_path):
    gm = fxblur.transform(torchvision.models.resnet18(), past_nonlinearity=True, verbose=False)
    nodes = drawn_nodes(fxblur.draw(gm, tmp_path / "resnet18.dot"))
    decisions = fxblur.changes(gm)
    blurred = [c for c in decisions if c.action != "skipped"]
    assert len(blurred) == 7
    assert sum(len(c.added_nodes) for c in blurred) == 3  # a blur past layer2-4's first BatchNorm and ReLU
    for change in blurred:  # the others carry their blur in their module (fxblur.ops.blurred)
        assert colour(nodes[change.node]) == BLURRED, change.target
        for added in change.added_nodes:
            assert colour(nodes[added]) == ADDED and nodes[added]["peripheries"] == "2", added
    (stem,) = [c for c in decisions if c.action == "skipped"]
    assert colour(nodes[stem.node]) == SKIPPED
    assert colour(nodes["layer1_0_conv1"]) not in {ADDED, BLURRED, SKIPPED}  # untouched: torch.fx's own colours


def test_each_phase_group_has_a_colour_of_its_own(tmp_path):
    gm = fxblur.transform(torchvision.models.resnet18(), polyphase=True, circular_padding=True, verbose=False)
    nodes = drawn_nodes(fxblur.draw(gm, tmp_path / "polyphase.dot"))
    by_group: dict[str, set[str]] = {}
    for change in fxblur.changes(gm):
        for name in (change.node, *change.added_nodes):
            by_group.setdefault(change.phase_group, set()).add(colour(nodes[name]))
    assert len(by_group) == 5  # the stem conv, the max pool, and layer2-4, whose two strided convs share a phase
    assert all(len(colours) == 1 for colours in by_group.values())  # one colour per group...
    colours = [colours.pop() for colours in by_group.values()]
    assert len(set(colours)) == 5 and set(colours) <= set(GROUP_COLOURS)  # ...and no two groups alike


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz's dot program")
def test_an_svg_names_every_blurred_op(tmp_path):
    gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    svg = fxblur.draw(gm, tmp_path / "resnet18.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    for change in fxblur.changes(gm):
        assert change.node in svg


@pytest.mark.skipif(shutil.which("dot") is not None, reason="Graphviz is installed")
def test_a_rendered_format_without_graphviz_says_what_to_install(tmp_path):
    gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    with pytest.raises(RuntimeError, match=r"needs Graphviz's dot program .* a \.dot path"):
        fxblur.draw(gm, tmp_path / "resnet18.svg")


def test_without_pydot_the_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pydot", None)
    gm = fxblur.transform(torchvision.models.resnet18(), verbose=False)
    with pytest.raises(ImportError, match="pip install pydot"):
        fxblur.draw(gm, tmp_path / "resnet18.dot")


def test_a_model_transform_did_not_return_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"not returned by fxblur\.transform"):
        fxblur.draw(torchvision.models.resnet18(), tmp_path / "resnet18.dot")


def test_inspect_draws_alongside_the_report(tmp_path, capsys):
    path = tmp_path / "resnet18.dot"
    assert main(["resnet18", "--polyphase", "--draw", str(path)]) == 0
    captured = capsys.readouterr()
    assert "shift invariance" in captured.out and f"drew the rewritten graph to {path}" in captured.err
    assert "roll_to_phase" in drawn_nodes(path)
