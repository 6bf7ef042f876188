"""transform(strict=False): models torch.fx cannot trace whole are rewritten in parts."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN

import fxblur
from support import assert_same_snapshot, snapshot

# Few proposals and small images: the detector runs in milliseconds on CPU.
SMALL_DETECTOR = {
    "weights": None,
    "weights_backbone": None,
    "min_size": 64,
    "max_size": 64,
    "rpn_pre_nms_top_n_train": 50,
    "rpn_post_nms_top_n_train": 20,
    "rpn_pre_nms_top_n_test": 50,
    "rpn_post_nms_top_n_test": 20,
    "rpn_batch_size_per_image": 32,
    "box_batch_size_per_image": 16,
    "box_detections_per_img": 10,
}
IMAGES = [torch.rand(3, 64, 80), torch.rand(3, 56, 64)]
TARGETS = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1])} for _ in IMAGES]


def blurred(model) -> set[str]:
    return {change.target for change in fxblur.changes(model) if change.action != "skipped"}


@pytest.fixture(scope="module")
def detector():
    return torchvision.models.detection.fasterrcnn_resnet50_fpn(**SMALL_DETECTOR).eval()


def test_faster_rcnn_backbone_is_blurred_and_the_detector_runs(detector):
    before = snapshot(detector)
    with pytest.raises(fxblur.UntraceableModelError):
        fxblur.transform(detector, verbose=False)  # strict by default
    model = fxblur.transform(detector, strict=False, verbose=False)
    assert_same_snapshot(before, snapshot(detector))

    assert type(model) is FasterRCNN and model is not detector
    assert type(model.backbone) is type(detector.backbone)  # only what has something to rewrite changes
    assert type(model.backbone.body.layer2[0].conv2).__name__ == "BlurredConv2d"
    extra_level = model.backbone.fpn.extra_blocks  # its forward calls F.max_pool2d: it got a graph of its own
    assert isinstance(extra_level, type(detector.backbone.fpn.extra_blocks)) and "fxblur" in extra_level.code
    assert model.backbone.out_channels == detector.backbone.out_channels == 256  # heads are built from it
    assert model.rpn is not detector.rpn and model.rpn.head.cls_logits.weight is detector.rpn.head.cls_logits.weight
    body = {f"backbone.body.{name}" for name in ("maxpool", "layer2.0.conv2", "layer3.0.conv2", "layer4.0.conv2")}
    shortcuts = {f"backbone.body.layer{i}.0.downsample.0" for i in (2, 3, 4)}
    extra = "backbone.fpn.extra_blocks.max_pool2d"  # the FPN's extra level: F.max_pool2d(x, 1, 2, 0)
    assert blurred(model) == body | shortcuts | {extra}
    parts = fxblur.report(model).parts
    assert parts.rewritten == ("backbone",)
    assert [(u.path, u.module) for u in parts.untraced] == [
        ("transform", "GeneralizedRCNNTransform"),
        ("rpn.anchor_generator", "AnchorGenerator"),
    ]
    assert list(model.state_dict()) == list(detector.state_dict())
    model.load_state_dict(detector.state_dict(), strict=True)

    with torch.no_grad():
        expected, got = detector(IMAGES), model(IMAGES)
    assert [{k: (v.dtype, v.dim()) for k, v in d.items()} for d in got] == [
        {k: (v.dtype, v.dim()) for k, v in d.items()} for d in expected
    ]
    model.train()
    losses = model(IMAGES, TARGETS)
    assert losses.keys() == detector.train()(IMAGES, TARGETS).keys()
    detector.eval()
    sum(losses.values()).backward()
    assert detector.backbone.body.layer2[0].conv2.weight.grad is not None  # the shared parameter trained
    detector.zero_grad(set_to_none=True)


def test_with_a_one_tap_filter_the_detector_computes_exactly_what_the_original_does(detector):
    # A 1-tap blur is the identity, so any difference would come from the partial rewrite
    # itself. The 1x1 shortcuts are left out: subsampling before them is exact arithmetic
    # but not exact rounding, and detection's top-k and NMS turn rounding into other boxes.
    model = fxblur.transform(detector, strict=False, filter_size=1, exclude="*.downsample.0", verbose=False)
    exact = {"rtol": 0, "atol": 0}
    with torch.no_grad():
        for expected, got in zip(detector(IMAGES), model(IMAGES), strict=True):
            torch.testing.assert_close(got, expected, **exact)
    detector.train()
    model.train()
    torch.manual_seed(0)
    expected = detector(IMAGES, TARGETS)
    torch.manual_seed(0)
    torch.testing.assert_close(model(IMAGES, TARGETS), expected, **exact)
    detector.eval()


class Gated(nn.Module):
    """Untraceable at the top (data-dependent branch), with traceable parts of each kind."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2))
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.MaxPool2d(2))
        self.pool = nn.MaxPool2d(2)  # a strided op directly under the untraceable module
        self.flat = nn.Conv2d(16, 16, 1)  # traceable, nothing to blur

    def forward(self, x):
        y = self.head(self.features(x))
        y = self.flat(self.pool(y) if y.sum() > 0 else y[..., ::2, ::2])
        return y


def test_parts_are_the_largest_traceable_modules_and_options_use_full_paths():
    model = Gated()
    x = torch.randn(2, 16, 40, 40)
    out = fxblur.transform(model, strict=False, exclude="features.2", leaf_modules=["head"], verbose=False)
    assert {c.target: c.reason for c in fxblur.changes(out)} == {
        "features.0": "",
        "features.2": "excluded by 'features.2'",
        "pool": "",  # a part that is itself an op carries its blur
    }
    assert fxblur.report(out).parts.rewritten == ("features", "pool")
    assert type(out.pool).__name__ == "BlurredMaxPool2d"
    assert out.head is not model.head and type(out.head) is nn.Sequential  # a leaf: left as it was
    assert type(out.flat) is nn.Conv2d  # nothing to blur: not replaced
    assert out(x).shape == model(x).shape
    assert "rewritten parts: features, pool" in str(fxblur.report(out))


def test_a_part_rewrite_copies_and_pickles_with_its_decisions():
    model = fxblur.transform(Gated(), strict=False, verbose=False)
    x = torch.randn(1, 16, 40, 40)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert fxblur.changes(clone) == fxblur.changes(model)
        assert fxblur.report(clone).parts == fxblur.report(model).parts
        torch.testing.assert_close(clone(x), model(x))


def test_rewriting_a_partial_result_again_changes_nothing():
    once = fxblur.transform(Gated(), strict=False, verbose=False)
    with pytest.warns(fxblur.NoEffectWarning):
        twice = fxblur.transform(once, strict=False, verbose=False)
    assert {c.reason for c in fxblur.changes(twice)} == {"already blurred"}
    x = torch.randn(1, 16, 40, 40)
    torch.testing.assert_close(twice(x), once(x))


def test_report_of_a_partial_result_has_no_sizes():
    model = fxblur.transform(Gated(), strict=False, verbose=False)
    with pytest.raises(ValueError, match=r"rewritten in parts \(features, head, pool\).*report\(model\.<part>"):
        fxblur.report(model, (1, 16, 40, 40))
    assert fxblur.report(model.features, (1, 16, 40, 40)).rows[0].output_size == (19, 19)


class Sign(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class AllUntraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.sign = Sign()

    def forward(self, x):
        return self.sign(x) if x.mean() > 0 else x


def test_a_model_with_nothing_traceable_warns_and_names_what_failed():
    with pytest.warns(fxblur.NoEffectWarning, match="could not trace sign"):
        out = fxblur.transform(AllUntraceable(), strict=False, verbose=False)
    parts = fxblur.report(out).parts
    assert parts.rewritten == () and [(u.path, u.module) for u in parts.untraced] == [("sign", "Sign")]
    assert "if x.sum() > 0" in parts.untraced[0].reason
