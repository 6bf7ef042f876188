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
        ("transform", "GeneralizedRCNNTransform"),  # the detector also calls its postprocess()
        ("rpn.anchor_generator", "AnchorGenerator"),
    ]
    assert "postprocess()" in parts.untraced[0].reason and "could not trace" in parts.untraced[1].reason
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


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x):
        return self.pool(self.conv(x))


class CallsLayersDirectly(nn.Module):
    """Untraceable, and calls its encoder's layers itself: the encoder's own forward never runs."""

    def __init__(self):
        super().__init__()
        self.enc = Encoder()

    def forward(self, x):
        y = self.enc.pool(self.enc.conv(x))
        return y if y.sum() > 0 else -y


class ResNetAsLayers(nn.Module):
    """Untraceable, and runs a ResNet's stem and first two stages itself."""

    def __init__(self):
        super().__init__()
        self.b = torchvision.models.resnet18()

    def forward(self, x):
        y = self.b.maxpool(self.b.relu(self.b.bn1(self.b.conv1(x))))
        y = self.b.layer2(self.b.layer1(y))
        return y if y.sum() > 0 else -y


def claimed_and_ran(model: nn.Module, x: torch.Tensor) -> tuple[set[str], set[str]]:
    """The blurs the report claims, and the blurs a forward pass runs."""
    claimed = {change.blur for change in fxblur.changes(model) if change.action != "skipped"}
    ran: set[str] = set()
    blurs = [(path, module) for path, module in model.named_modules() if isinstance(module, fxblur.Blur)]
    handles = [module.register_forward_hook(lambda *args, path=path: ran.add(path)) for path, module in blurs]
    model(x)
    for handle in handles:
        handle.remove()
    return claimed, ran


@pytest.mark.parametrize("blur_first", [True, False])
def test_a_part_whose_parent_calls_its_layers_is_not_replaced_but_its_layers_are(blur_first):
    model = CallsLayersDirectly().eval()
    out = fxblur.transform(model, strict=False, blur_first=blur_first, verbose=False)
    x = torch.randn(1, 16, 8, 8)
    assert out(x).shape == model(x).shape == (1, 16, 4, 4)  # the pool's blur subsamples where the parent calls it
    claimed, ran = claimed_and_ran(out, x)
    assert claimed == ran == {"enc.pool.fxblur"}
    assert not torch.allclose(out(x), model(x))
    untraced = {u.path: u.reason for u in fxblur.report(out).parts.untraced}
    assert untraced["enc"] == "its caller reaches into it (conv, pool): its own forward is not what runs"


def test_a_resnet_used_as_a_bag_of_layers_is_rewritten_layer_by_layer():
    model = ResNetAsLayers().eval()
    out = fxblur.transform(model, strict=False, verbose=False)
    x = torch.randn(1, 3, 32, 32)
    assert out(x).shape == model(x).shape == (1, 128, 4, 4)
    claimed, ran = claimed_and_ran(out, x)
    assert claimed == ran == {"b.maxpool.fxblur", "b.layer2.0.conv1.fxblur", "b.layer2.0.downsample.0.fxblur"}
    parts = fxblur.report(out).parts
    assert parts.rewritten == ("b.maxpool", "b.layer2")
    assert {u.path for u in parts.untraced} >= {"b.layer3", "b.layer4"}  # never called: nothing claimed there


class HandsItsBlockOn(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2))
        self.head = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2))

    def forward(self, x):
        y = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return self.head(y if y.sum() > 0 else -y)


def test_a_module_handed_to_other_code_is_left_whole_with_the_reason():
    out = fxblur.transform(HandsItsBlockOn(), strict=False, verbose=False)
    assert {c.target for c in fxblur.changes(out) if c.action != "skipped"} == {"head.0"}
    untraced = {u.path: u.reason for u in fxblur.report(out).parts.untraced}
    assert untraced["block"] == "HandsItsBlockOn.forward uses self.block other than by calling it"
    assert type(out.block[0]) is nn.Conv2d
