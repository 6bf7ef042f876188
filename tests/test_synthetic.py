"""fxblur.evaluation.synthetic: deterministic images, balanced labels, valid arguments only."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from fxblur.evaluation.synthetic import SHAPES, SyntheticShapes


def test_same_arguments_give_identical_tensors_in_any_access_order():
    first, second = SyntheticShapes(10, image_size=32, seed=7), SyntheticShapes(10, image_size=32, seed=7)
    backwards = {i: second[i] for i in reversed(range(10))}
    for i in range(10):
        image, label = first[i]
        assert torch.equal(image, backwards[i][0]) and label == backwards[i][1]


def test_seed_and_split_each_change_every_image():
    base = SyntheticShapes(6, image_size=32, seed=0)
    for other in (SyntheticShapes(6, image_size=32, seed=1), SyntheticShapes(6, image_size=32, seed=0, split="test")):
        for i in range(6):
            assert not torch.allclose(base[i][0], other[i][0]), i
            assert base[i][1] == other[i][1]  # labels follow the index, not the seed


def test_images_are_float_rgb_of_the_requested_size_with_unit_scale():
    data = SyntheticShapes(24, image_size=48, num_classes=4)
    images = torch.stack([data[i][0] for i in range(len(data))])
    assert images.shape == (24, 3, 48, 48) and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert 0.7 < images.std() < 1.5 and abs(images.mean()) < 0.2
    assert data.classes == ["disk", "square", "triangle", "cross"]
    assert {data[i][1] for i in range(len(data))} == {0, 1, 2, 3}


@pytest.mark.parametrize(("count", "num_classes"), [(60, 6), (61, 6), (7, 2)])
def test_labels_are_balanced(count, num_classes):
    data = SyntheticShapes(count, image_size=16, num_classes=num_classes)
    counts = Counter(data[i][1] for i in range(count))
    assert sorted(counts) == list(range(num_classes))
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == len(data) == count


def test_iteration_ends_at_the_last_image():
    data = SyntheticShapes(3, image_size=16)
    assert [label for _, label in data] == [0, 1, 2]
    with pytest.raises(IndexError):
        data[3]


def test_images_differ_within_a_class():
    data = SyntheticShapes(4 * len(SHAPES), image_size=32)
    disks = [data[i][0] for i in range(0, len(data), len(SHAPES))]
    assert all(not torch.allclose(disks[0], other) for other in disks[1:])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"num_classes": len(SHAPES) + 1}, "num_classes"),
        ({"image_size": 30, "border": 11}, "border"),
        ({"image_size": 8}, "image_size"),
        ({"seed": -1}, "seed"),
        ({"count": -1}, "count"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SyntheticShapes(**kwargs)
