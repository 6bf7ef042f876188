"""The change report: decisions, sizes and costs, checked against hand computations."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from tabulate import tabulate_formats

import fxblur
from fxblur.costs import blur_macs
from fxblur.models import build


def resnet50_report(**options) -> fxblur.Report:
    gm = fxblur.transform(build("resnet50"), verbose=False, **options)
    return fxblur.report(gm, (1, 3, 224, 224))


def test_rows_follow_the_decisions_with_sizes():
    rows = {row.target: row for row in resnet50_report().rows}
    assert rows["conv1"].action == "skipped" and rows["conv1"].reason == "in_channels 3 < min_channels 16"
    assert (rows["conv1"].input_size, rows["conv1"].output_size) == ((224, 224), (112, 112))
    assert (rows["maxpool"].input_size, rows["maxpool"].output_size) == ((112, 112), (56, 56))
    for stage, size in ((2, 56), (3, 28), (4, 14)):
        placements = {f"layer{stage}.0.conv2": "blur_before", f"layer{stage}.0.downsample.0": "subsample_before"}
        for name, action in placements.items():
            assert rows[name].action == action
            assert (rows[name].input_size, rows[name].output_size) == ((size, size), (size // 2, size // 2))


def test_blur_before_costs_match_a_hand_computation():
    row = next(r for r in resnet50_report().rows if r.target == "layer2.0.conv2")
    # a 3-tap blur along H, then along W, at stride 1 over 128 x 56 x 56 (float32)
    assert row.extra_macs == 128 * 56 * 56 * 3 * 2
    assert row.extra_bytes == 128 * 56 * 56 * 4


def test_blur_after_costs_match_a_hand_computation():
    row = next(r for r in resnet50_report(blur_first=False).rows if r.target == "layer2.0.conv2")
    conv_at_stride_one = 128 * 56 * 56 * 128 * 9
    extra_conv = conv_at_stride_one * 3 // 4  # three of every four outputs are new
    blur = 128 * 28 * 56 * 3 + 128 * 28 * 28 * 3  # H pass subsamples first, then W
    assert row.extra_macs == extra_conv + blur
    assert row.extra_bytes == 128 * 56 * 56 * 4  # the stride-1 map; the blur's output replaces the old one
    assert blur_macs((1, 128, 56, 56), (3, 3), (2, 2)) == blur


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("resnet18", 224),
        ("resnet50", 224),
        ("googlenet", 224),
        ("inception_v3", 299),
        ("vgg16", 224),
        ("densenet121", 224),
        ("vit_b_16", 224),
    ],
)
def test_macs_before_match_torchvisions_published_counts(name, size):
    gm = fxblur.transform(build(name), verbose=False)
    published = torchvision.models.get_model_weights(name).DEFAULT.meta["_ops"]  # GMACs, 3 decimals
    assert round(fxblur.report(gm, (1, 3, size, size)).macs_before / 1e9, 3) == pytest.approx(published, abs=1e-3)


def test_a_module_called_whole_still_counts_its_macs():
    whole = fxblur.transform(build("resnet18"), leaf_modules=["layer2"], verbose=False)
    published = torchvision.models.get_model_weights("resnet18").DEFAULT.meta["_ops"]
    assert round(fxblur.report(whole, (1, 3, 224, 224)).macs_before / 1e9, 3) == pytest.approx(published, abs=1e-3)


def test_summary_totals_are_the_sum_of_rows():
    for options in ({}, {"blur_first": False}):
        report = resnet50_report(**options)
        assert report.macs_after - report.macs_before == sum(r.extra_macs for r in report.rows if r.extra_macs)
    assert resnet50_report(blur_first=False).overhead > 10 * resnet50_report().overhead > 0
    assert "MACs at 1x3x224x224: 4.09G -> 4.10G (+0.30%)" in resnet50_report().summary()
    assert "MACs at 1x3x224x224: 4.09G -> 5.14G (+25.60%)" in resnet50_report(blur_first=False).summary()


def test_every_tabulate_format_and_json():
    report = resnet50_report()
    for fmt in tabulate_formats:
        assert "layer2.0.downsample.0" in report.render(fmt)
    data = json.loads(report.render("json"))
    assert data["records"] == report.records()
    assert data["macs_before"] == report.macs_before and data["blurred"] == 7 and data["skipped"] == 1


def test_without_input_shape_rows_carry_decisions_only():
    report = fxblur.report(fxblur.transform(torchvision.models.resnet18(), verbose=False))
    assert report.macs_before is None and all(r.extra_macs is None and r.input_size is None for r in report.rows)
    assert "extra MACs" not in report.table()


def test_nothing_to_blur_is_explained():
    gm = fxblur.transform(build("vit_b_16"), verbose=False)
    summary = fxblur.report(gm, (1, 3, 224, 224)).summary()
    assert "0 blurred, 1 skipped - nothing blurred (in_channels 3 < min_channels 16)" in summary
    with pytest.warns(fxblur.NoEffectWarning):
        empty = fxblur.report(fxblur.transform(torch.nn.Sequential(torch.nn.Linear(2, 2)), verbose=False))
    assert str(empty) == "Sequential: no strided conv or pool of the kinds the options blur, nothing to blur"


def test_report_leaves_the_model_usable():
    gm = fxblur.transform(torchvision.models.resnet18().eval(), verbose=False)
    x = torch.randn(1, 3, 64, 64)
    before = gm(x)
    fxblur.report(gm, (2, 3, 97, 97))
    torch.testing.assert_close(gm(x), before)


def test_the_report_is_logged_to_the_fxblur_logger_and_printed_only_when_verbose(caplog, capsys):
    import logging

    with caplog.at_level(logging.INFO, logger="fxblur"):
        gm = fxblur.transform(build("resnet18"), verbose=False)
    assert [record.getMessage() for record in caplog.records] == [str(fxblur.report(gm))]
    assert capsys.readouterr().out == ""


def test_the_version_is_the_installed_packages():
    from importlib.metadata import version

    assert fxblur.__version__ == version("fxblur")
