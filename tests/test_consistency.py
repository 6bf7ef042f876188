"""fxblur.evaluation.consistency on cases with known answers, and on random-weight ResNet-18s."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

import fxblur
from fxblur.evaluation.consistency import consistency_by_shift, shift_metrics
from fxblur.evaluation.shifts import offset_pairs
from fxblur.evaluation.synthetic import SyntheticShapes

SIZE, CROP = 12, 8  # diagonal offsets 0..4


def periodic_images(count: int) -> TensorDataset:
    """Images with period 2 along both axes; the red channel is +s on even rows and -s on odd ones.

    An even-sized crop at any offset holds the same pixel values as the crop at 0, only
    rearranged, so anything computed from their multiset (a global mean) is exactly
    shift-invariant; the red pixel at a crop's top-left corner, row ``d`` of the image,
    is +s for even offsets ``d`` and -s for odd ones.
    """
    generator = torch.Generator().manual_seed(1)
    tiles = torch.randn(count, 3, 2, 2, generator=generator)
    strength = torch.rand(count, generator=generator) + 0.5
    tiles[:, 0] = strength[:, None, None] * torch.tensor([[1.0, 1.0], [-1.0, -1.0]])
    images = tiles.repeat(1, 1, SIZE // 2, SIZE // 2)
    return TensorDataset(images, torch.zeros(count, dtype=torch.long))


def mean_colour_classifier() -> nn.Module:
    """Global average pool over the whole crop, then a linear layer: shift-invariant on periodic images."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 5))


class TopLeftRedPixel(nn.Module):
    """Class 0 when the crop's top-left red value is positive, else class 1; the feature is that value."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Identity()
        self.fc = nn.Linear(1, 2, bias=False)
        self.fc.weight.data = torch.tensor([[1.0], [-1.0]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.image(x)[:, :1, 0, 0])


def test_a_shift_invariant_model_is_fully_consistent_with_zero_sensitivity():
    data = periodic_images(64)
    metrics = shift_metrics(mean_colour_classifier(), data, CROP, seed=3, batch_size=16)
    assert metrics.consistency == 1.0
    assert metrics.sensitivity == pytest.approx(0.0, abs=1e-6)
    assert metrics.images == 64
    assert set(consistency_by_shift(mean_colour_classifier(), data, CROP).values()) == {1.0}


def test_a_model_that_reads_one_pixel_agrees_only_for_offsets_of_equal_parity():
    data = periodic_images(64)
    pairs = offset_pairs(64, max_shift=SIZE - CROP, seed=3)
    same_parity = (pairs[:, 0] % 2 == pairs[:, 1] % 2).double()
    assert 0 < same_parity.mean() < 1  # the seed draws both kinds of pairs
    metrics = shift_metrics(TopLeftRedPixel(), data, CROP, seed=3, batch_size=16)
    assert metrics.consistency == pytest.approx(float(same_parity.mean()), abs=1e-12)
    # features +s and -s: cosine 1 for equal parity, -1 otherwise
    assert metrics.sensitivity == pytest.approx(float(2 * (1 - same_parity).mean()), abs=1e-9)
    assert consistency_by_shift(TopLeftRedPixel(), data, CROP) == {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0}


def test_accuracy_on_a_hand_made_case():
    brightest_channel = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3, bias=False))
    brightest_channel[2].weight.data = torch.eye(3)
    colours = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 2, 1]])
    images = colours[:, :, None, None].expand(5, 3, SIZE, SIZE)
    labels = torch.tensor([0, 1, 0, 2, 1])  # right, right, wrong, wrong, right
    metrics = shift_metrics(brightest_channel, TensorDataset(images, labels), CROP, batch_size=2)
    assert metrics.accuracy == pytest.approx(3 / 5)
    assert metrics.consistency == 1.0


def test_the_same_seed_gives_the_same_result_and_another_seed_other_pairs():
    data = periodic_images(32)
    first = shift_metrics(TopLeftRedPixel(), data, CROP, seed=5)
    assert shift_metrics(TopLeftRedPixel(), data, CROP, seed=5, batch_size=7) == first
    assert not torch.equal(offset_pairs(32, 4, seed=5), offset_pairs(32, 4, seed=6))


def test_runs_in_eval_mode_without_autograd_and_restores_modes():
    calls = []

    class Spy(nn.Module):
        def forward(self, x):
            calls.append((self.training, torch.is_grad_enabled()))
            return x

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Spy(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model.append(nn.Linear(4, 2))
    model[1].eval()  # a frozen BatchNorm inside a model in train mode
    running_mean = model[1].running_mean.clone()
    shift_metrics(model, periodic_images(4), CROP)
    assert calls == [(False, False)]
    assert model.training and not model[1].training and model[2].training
    assert torch.equal(model[1].running_mean, running_mean)


def test_feature_layer_takes_a_modules_output_averaged_over_space():
    data = periodic_images(16)
    pixel = shift_metrics(TopLeftRedPixel(), data, CROP, seed=2)
    whole_crop = shift_metrics(TopLeftRedPixel(), data, CROP, seed=2, feature_layer="image")
    assert pixel.sensitivity > 0.5  # the last Linear reads one pixel
    assert whole_crop.sensitivity == pytest.approx(0.0, abs=1e-6)  # the crop's mean colour does not move
    assert whole_crop.consistency == pixel.consistency
    with pytest.raises(ValueError, match="did you mean image"):
        shift_metrics(TopLeftRedPixel(), data, CROP, feature_layer="imag")


def test_errors_name_the_problem():
    data = periodic_images(4)
    with pytest.raises(ValueError, match="crop size must be from 1 to 12"):
        shift_metrics(mean_colour_classifier(), data, SIZE + 1)
    with pytest.raises(ValueError, match=r"did not call any nn\.Linear"):
        shift_metrics(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()), data, CROP)
    with pytest.raises(ValueError, match=r"expected \(N, classes\) logits"):
        shift_metrics(nn.Conv2d(3, 2, 1), data, CROP)
    with pytest.raises(ValueError, match="empty"):
        shift_metrics(mean_colour_classifier(), TensorDataset(torch.zeros(0, 3, SIZE, SIZE), torch.zeros(0)), CROP)


def test_a_model_from_fxblur_still_calls_its_blocks():
    gm = fxblur.transform(torchvision.models.resnet18(num_classes=6), verbose=False)
    data = SyntheticShapes(2, image_size=40)
    assert 0 < shift_metrics(gm, data, 32, feature_layer="layer4").sensitivity < 1
    flat = fxblur.transform(torchvision.models.resnet18(num_classes=6), flatten=True, verbose=False)
    with pytest.raises(ValueError, match="did not call module 'layer4'"):  # one flat graph calls leaves only
        shift_metrics(flat, data, 32, feature_layer="layer4")


def test_blurring_a_random_resnet18_lowers_its_feature_sensitivity():
    model = torchvision.models.resnet18(num_classes=6)
    data = SyntheticShapes(8, image_size=40, seed=0)
    original = shift_metrics(model, data, 32, seed=0)
    for options in ({}, {"blur_first": False}, {"past_nonlinearity": True}):
        blurred = shift_metrics(fxblur.transform(model, verbose=False, **options), data, 32, seed=0)
        assert 0 < blurred.sensitivity < original.sensitivity < 1, options
        assert 0 <= blurred.consistency <= 1 and blurred.images == 8
