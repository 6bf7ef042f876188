"""examples/train_compare.py: its model gives fxblur work, its loader is seeded, quick mode runs."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

import fxblur


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_script(Path(__file__).resolve().parent.parent / "examples" / "train_compare.py")


@pytest.mark.parametrize("options", [{}, {"blur_first": False}, {"past_nonlinearity": True}, {"polyphase": True}])
def test_small_resnet_has_five_strided_ops_to_blur(options):
    changes = fxblur.changes(fxblur.transform(example.SmallResNet(), verbose=False, **options))
    blurred = [c.target for c in changes if c.action != "skipped"]
    assert blurred == ["maxpool", "layer2.conv1", "layer2.shortcut.0", "layer3.conv1", "layer3.shortcut.0"]
    assert len(changes) == len(blurred)  # the stem conv has stride 1: nothing to consider


def test_random_crops_cover_every_image_once_per_epoch_and_repeat_with_the_seed():
    images = torch.arange(10.0)[:, None, None, None].expand(10, 3, 8, 8) + torch.rand(10, 3, 8, 8) / 2
    labels = torch.arange(10)
    batches = list(example.RandomCrops(images, labels, size=5, batch_size=4, seed=1))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert Counter(torch.cat([y for _, y in batches]).tolist()) == Counter(range(10))
    for crops, y in batches:
        assert crops.shape[1:] == (3, 5, 5)
        assert torch.equal(crops.floor()[:, 0, 0, 0], y.float())  # each crop comes from its own image
    again = list(example.RandomCrops(images, labels, size=5, batch_size=4, seed=1))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, again, strict=True))


def test_summary_gives_mean_and_sample_spread_per_variant():
    rows = [
        {"variant": v, "accuracy": a, "train_seconds": 5.0}
        | {key: 0.5 for key in ("consistency", "sensitivity", "circular_consistency", "circular_sensitivity")}
        for v in example.VARIANTS
        for a in (0.8, 0.9, 1.0)
    ]
    baseline = example.summary(rows)[0]
    assert baseline["variant"] == "baseline" and baseline["seeds"] == 3
    assert baseline["accuracy"] == pytest.approx(0.9) and baseline["accuracy_std"] == pytest.approx(0.1)
    assert baseline["consistency_std"] == 0
    assert example.summary(rows[:1])[0]["accuracy_std"] is None


def test_quick_mode_trains_and_measures_every_variant(capsys):
    assert example.main(["--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [entry["variant"] for entry in result["summary"]] == list(example.VARIANTS)
    assert len(result["runs"]) == len(example.VARIANTS) and result["settings"]["seeds"] == 1
    for run in result["runs"]:
        assert 0 <= run["accuracy"] <= 1 and 0 <= run["consistency"] <= 1 and 0 < run["sensitivity"] < 2
        if run["variant"].startswith("polyphase"):  # circular padding: circular shifts cannot move the features
            assert run["circular_consistency"] == 1 and run["circular_sensitivity"] < 1e-6
        else:
            assert run["circular_sensitivity"] > 1e-4
    assert len({run["sensitivity"] for run in result["runs"]}) == len(example.VARIANTS)


def test_variants_can_be_chosen(capsys):
    assert example.main(["--quick", "--json", "--variants", "baseline", "polyphase, circular"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [entry["variant"] for entry in result["summary"]] == ["baseline", "polyphase, circular"]
