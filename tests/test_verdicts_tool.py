"""tools/verdicts.py: the analysis's verdicts against measurement, grouped by what breaks them."""

from __future__ import annotations

import json

from support import load_tool

verdicts = load_tool("verdicts")


def test_an_exact_model_and_a_broken_one_are_told_apart_and_measured(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert verdicts.main(["resnet18", "alexnet", "--image-size", "64", "--json", str(out)]) == 0
    rows = {row["model"]: row for row in json.loads(out.read_text())}
    assert rows["resnet18"]["verdict"] == "exact" and rows["resnet18"]["moves"] < 1e-9
    assert 0 <= rows["resnet18"]["floor"] < 1e-12
    alexnet = rows["alexnet"]
    assert alexnet["verdict"] == "not exact" and alexnet["moves"] > 1e-6
    assert alexnet["group"] == "size" and alexnet["breaks"].startswith("features.0 (conv2d)"), alexnet
    printed = capsys.readouterr().out
    assert "| exact     | 1" in printed and "| size      | 1" in printed


def test_a_model_called_exact_that_moves_is_flagged():
    rows = [
        {"model": "a", "verdict": "exact", "group": "exact", "moves": 3e-15, "floor": 1e-16},
        {"model": "b", "verdict": "exact", "group": "exact", "moves": 2e-3, "floor": 1e-15},
        {"model": "c", "verdict": "not exact", "group": "padding", "moves": 5e-2, "floor": 1e-15},
        {"model": "deep", "verdict": "exact", "group": "exact", "moves": 6e-9, "floor": 5e-9},  # rounding, amplified
    ]
    assert [row["model"] for row in verdicts.unsound(rows)] == ["b"]
    groups = {row["verdict"]: row for row in verdicts.summary(rows)}
    assert groups["exact"]["models"] == 3 and groups["exact"]["logits move by"] == "3e-15 to 2e-03"


def test_a_model_that_cannot_be_built_is_a_row_not_a_crash():
    row = verdicts.verdict_of("no_such_model", 64, 0)
    assert row["verdict"] == "failed" and row["moves"] is None and "no_such_model" in row["breaks"]
    assert verdicts.unsound([row]) == []
