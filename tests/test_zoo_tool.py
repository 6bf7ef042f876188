"""tools/zoo.py: the reach survey classifies models and reports failures instead of raising."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "zoo.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("zoo", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


zoo = load_tool()


class FunctionalReLU(nn.Module):
    def forward(self, x):
        return F.relu(x)


class Block(nn.Module):
    """Past the nonlinearity, the blur lands after ``* 0.5``: the calls before it return larger maps."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1))  # returns its conv's map
        self.bn = nn.BatchNorm2d(32)
        self.act = FunctionalReLU()  # computes F.relu itself

    def forward(self, x):
        return self.act(self.bn(self.conv(x))) * 0.5


class Strided(nn.Module):
    """A stem below min_channels, one strided conv and one max pool fxblur must blur."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.body = Block()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.body(self.stem(x))).mean((2, 3))


class StemOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.patchify = nn.Conv2d(3, 32, 4, stride=4)

    def forward(self, x):
        return self.patchify(x)


class ReturnsIndices(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)

    def forward(self, x):
        return self.pool(self.conv(x))[0]


class Gated(nn.Module):
    """The data-dependent branch defeats torch.fx; ``features`` alone traces."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(16, 16, 3), nn.MaxPool2d(2))

    def forward(self, x):
        y = self.features(x)
        return y if y.sum() > 0 else -y


class Broken(Strided):
    def forward(self, x):
        raise RuntimeError("broken on purpose")


class Slow(Strided):
    def forward(self, x):
        time.sleep(5)
        return super().forward(x)


def local_case(factory, channels: int = 3) -> zoo.Case:
    return zoo.Case("local", factory.__name__, lambda device: factory().eval(), (channels, 32, 32))


def test_a_local_model_with_strided_ops_is_rewritten_in_every_placement():
    results = zoo.survey(local_case(Strided), list(zoo.PLACEMENTS))
    assert [r.placement for r in results] == list(zoo.PLACEMENTS)
    for r in results:
        assert r.status == "rewritten", (r.placement, r.notes)
        assert r.sizes == [[1, 3, 32, 32], [1, 3, 33, 33]] and r.device == "meta"
    assert {r.placement: r.blurred for r in results} == {
        "default": 2,
        "blur_after": 2,
        "past_nonlinearity": 2,
        "polyphase": 3,  # min_channels 0: the stem too
    }


@pytest.mark.parametrize(
    ("factory", "channels", "status", "note"),
    [
        (StemOnly, 3, "nothing to blur", "only ops with < 16 channels: patchify (3 ch)"),
        (ReturnsIndices, 16, "skipped ops", "return_indices"),
        (Gated, 16, "partial", "untraceable: Gated at"),
    ],
)
def test_local_models_get_their_status(factory, channels, status, note):
    (result,) = zoo.survey(local_case(factory, channels), ["default"])
    assert result.status == status, result.notes
    assert note in result.notes


def test_a_model_whose_forward_raises_is_reported_failed_not_raised():
    results = zoo.survey(local_case(Broken), ["default", "blur_after"])
    assert [r.status for r in results] == ["failed", "failed"]
    assert all("RuntimeError: broken on purpose" in r.notes for r in results)
    assert results[0].details["error"] == results[0].notes


def test_a_model_over_the_time_limit_is_reported_and_the_sweep_goes_on():
    start = time.monotonic()
    (result,) = zoo.survey(local_case(Slow), ["default"], timeout=0.5)
    assert result.status == "timeout" and "0.5 s" in result.notes
    assert time.monotonic() - start < 4


def test_only_calls_the_rewrite_moved_to_full_resolution_may_grow():
    expected = {"": [(1, 10)], "conv": [(1, 8, 4, 4)], "bn": [(1, 8, 4, 4), (1, 8, 2, 2)]}
    grown = {"": [(1, 10)], "conv": [(1, 8, 8, 8)], "bn": [(1, 8, 8, 8), (1, 8, 2, 2)]}
    assert zoo.first_difference(expected, grown, {("conv", 0), ("bn", 0)}) is None
    assert zoo.first_difference(expected, grown, {("conv", 0)}) == "bn (call 0): (1, 8, 4, 4) -> (1, 8, 8, 8)"
    shrunk = {**expected, "bn": [(1, 8, 4, 4), (1, 8, 1, 1)]}
    assert zoo.first_difference(expected, shrunk, {("bn", 1)}) == "bn (call 1): (1, 8, 2, 2) -> (1, 8, 1, 1)"
    missing = {"": [(1, 10)], "conv": [(1, 8, 4, 4)]}
    assert zoo.first_difference(expected, missing, set()) == "bn: called 0 times, not 2"
    assert zoo.first_difference(expected, missing, set(), inlined={"bn": "why"}) is None


def test_small_timm_models():
    pytest.importorskip("timm")
    resnet = zoo.survey(zoo.timm_case("test_resnet"), ["default", "blur_after"])
    assert [(r.placement, r.status, r.blurred, r.skipped) for r in resnet] == [
        ("default", "rewritten", 4, 1),  # the 3-channel stem stays
        ("blur_after", "rewritten", 4, 1),
    ]
    assert resnet[0].source == "timm/resnet" and resnet[0].sizes == [[1, 3, 160, 160], [1, 3, 161, 161]]
    (convnext,) = zoo.survey(zoo.timm_case("test_convnext"), ["blur_after"])
    assert (convnext.source, convnext.status, convnext.blurred) == ("timm/convnext", "rewritten", 3)


def test_one_model_per_timm_file():
    timm = pytest.importorskip("timm")
    firsts = zoo.timm_first_models()
    assert firsts.keys() == set(timm.list_modules())
    assert all(timm.is_model(name) for name in firsts.values())
    assert firsts["resnet"] in timm.list_models(module="resnet")


def test_torchvision_alone_surveys_torchvision_and_timm_joins_when_asked():
    torchvision_only = zoo.select_cases(torchvision=True)
    assert torchvision_only and all(not case.source.startswith("timm/") for case in torchvision_only)
    assert len(zoo.select_cases(files=["video"])) == len(zoo.torchvision_names()["video"])
    if zoo.timm_available():
        both = zoo.select_cases(torchvision=True, timm=True)
        assert len(both) == len(torchvision_only) + len(zoo.timm_first_models())
        assert all(case.source.startswith("timm/") for case in zoo.select_cases())


def test_the_command_line_prints_json():
    pytest.importorskip("timm")
    result = subprocess.run(
        [sys.executable, str(TOOL), "--models", "test_resnet", "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["summary"]["default"]["rewritten"] == 1 and data["summary"]["blur_after"]["rewritten"] == 1
    rows = data["results"]
    assert [(r["model"], r["placement"], r["status"]) for r in rows] == [
        ("test_resnet", "default", "rewritten"),
        ("test_resnet", "blur_after", "rewritten"),
    ]
    assert rows[0]["source"] == "timm/resnet" and rows[0]["blurred"] == 4 and rows[0]["details"]["skipped_ops"] == []
