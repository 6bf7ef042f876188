"""python -m fxblur.inspect: the preview command, in-process and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fxblur.inspect import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxblur.inspect", *args], capture_output=True, text=True, timeout=300)


def in_directory(path, monkeypatch) -> None:
    """Run from ``path``, as ``python -m`` there would: its files importable, until the test ends."""
    monkeypatch.chdir(path)
    monkeypatch.syspath_prepend(str(path))


def lines_of(output: str) -> dict[str, str]:
    """Table lines keyed by their first cell."""
    return {line.split()[0]: line for line in output.splitlines() if line.strip()}


def test_resnet50_table_through_a_subprocess():
    result = run("resnet50")
    assert result.returncode == 0, result.stderr
    lines = lines_of(result.stdout)
    for target in ("layer2.0.conv2", "layer3.0.conv2", "maxpool"):
        assert "blur_before" in lines[target]
    for target in ("layer2.0.downsample.0", "layer4.0.downsample.0"):
        assert "subsample_before" in lines[target]
    assert "56x56 -> 28x28" in lines["layer2.0.conv2"] and "112x112 -> 56x56" in lines["maxpool"]
    assert "skipped: in_channels 3 < min_channels 16" in lines["conv1"]
    assert "ResNet: 7 blurred, 1 skipped" in result.stdout
    # hand computation: 4 blurs at stride 1, 3 MACs per element along H and again along W;
    # 3 subsampling blurs: 3 MACs per element of the half-height map, then of the quarter map
    stride_one = 6 * sum(c * s * s for c, s in ((64, 112), (128, 56), (256, 28), (512, 14)))
    subsampling = sum(3 * c * s * s // 2 + 3 * c * s * s // 4 for c, s in ((256, 56), (512, 28), (1024, 14)))
    assert f"({(stride_one + subsampling) / 4_089_184_256:+.2%})" in result.stdout


def test_json_holds_the_same_records_and_blur_last_costs_more(capsys):
    assert main(["resnet50", "--format", "json"]) == 0
    default = json.loads(capsys.readouterr().out)
    assert main(["resnet50", "--format", "json", "--blur-last"]) == 0
    blur_last = json.loads(capsys.readouterr().out)
    targets = [r["target"] for r in default["records"]]
    assert targets == [r["target"] for r in blur_last["records"]]
    actions = {r["target"]: r["action"] for r in blur_last["records"]}
    assert actions["layer2.0.conv2"] == actions["maxpool"] == "blur_after"
    assert actions["layer2.0.downsample.0"] == "subsample_before"  # a 1x1 conv commutes with the blur
    assert blur_last["overhead"] > 0.2 > 0.01 > default["overhead"] > 0
    layer = next(r for r in blur_last["records"] if r["target"] == "layer2.0.conv2")
    assert layer["extra_macs"] == 128 * 56 * 56 * 128 * 9 * 3 // 4 + 128 * 28 * 56 * 3 + 128 * 28 * 28 * 3


def test_googlenet_stride_one_pools_are_not_blurred_and_inception_functional_pools_are(capsys):
    assert main(["googlenet", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    pools = {r["target"]: r["action"] for r in records if r["op"] == "max_pool2d"}
    assert pools == dict.fromkeys(["maxpool1", "maxpool2", "maxpool3", "maxpool4"], "blur_before")  # not the 3x3/1 ones
    assert main(["inception_v3", "--input-size", "299", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    functional = {r["target"]: r["action"] for r in records if "max_pool2d" in r["target"]}
    assert functional == dict.fromkeys(["Mixed_6a.max_pool2d", "Mixed_7a.max_pool2d"], "blur_before")


def test_a_model_from_a_local_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def small_cnn():
                return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(32, 64, 3, stride=2, padding=1))
            """
        )
    )
    in_directory(tmp_path, monkeypatch)
    assert main(["mynets:small_cnn", "--input-size", "33"]) == 0
    lines = lines_of(capsys.readouterr().out)
    assert "blur_before" in lines["2"] and "33x33 -> 16x16" in lines["2"]
    assert "blur_before" in lines["3"] and "16x16 -> 8x8" in lines["3"]


def test_unknown_model_exits_2_with_suggestions(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["resnt50"])
    assert exited.value.code == 2
    result = capsys.readouterr()
    assert result.err.strip().splitlines() == [
        "python -m fxblur.inspect: error: unknown model 'resnt50'; did you mean resnet50, resnet152, resnet101, "
        "fcn_resnet50, resnet34?"
    ]
    assert result.out == ""


def test_untraceable_model_exits_1_with_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "gated.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            class Gated(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.conv = nn.Conv2d(16, 16, 3, stride=2)

                def forward(self, x):
                    return self.conv(x) if x.mean() > 0 else x
            """
        )
    )
    in_directory(tmp_path, monkeypatch)
    assert main(["gated:Gated"]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert "could not trace Gated" in stderr and "concrete_args" in stderr
    assert "--partial" in stderr  # the flag that rewrites what can be traced


def test_partial_previews_a_detectors_backbone_as_the_detection_guide_shows(capsys):
    guide = (Path(__file__).resolve().parent.parent / "docs" / "detection.md").read_text()
    excerpt = guide.split("```\n$ python -m fxblur.inspect fasterrcnn_resnet50_fpn --partial\n")[1].split("```")[0]
    assert main(["fasterrcnn_resnet50_fpn", "--partial"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for line in excerpt.strip().splitlines():
        assert line == "..." or line in printed, line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["resnet50", "--blur-lst"], "unrecognized arguments: --blur-lst (did you mean --blur-last"),
        (["resnet50", "--filter-size", "9"], "filter_size must be an int from 1 to 7"),
        (["resnet50", "--input-size", "1", "2", "3"], "--input-size takes one or two"),
        (["vgg11", "--input-size", "1"], "vgg11 cannot run on a 1x3x1x1 input"),
        (["resnet50", "--format", "nope"], "invalid choice: 'nope'"),
        (["nosuchpackage.nets:model"], "cannot import 'nosuchpackage.nets'"),
        ([], "required: model"),
    ],
)
def test_bad_options_exit_2_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1


def test_list_names_every_task(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for line in (
        "torchvision classification (80):",
        "  resnet50",
        "  googlenet",
        "torchvision video",
        "timm:NAME",
        "package.module:factory",
    ):
        assert line in out


def test_vit_explains_that_nothing_is_blurred(capsys):
    assert main(["vit_b_16"]) == 0
    out = capsys.readouterr().out
    assert "conv_proj" in out and "skipped: in_channels 3 < min_channels 16" in out
    assert "nothing blurred (in_channels 3 < min_channels 16)" in out


def test_show_code_diff_and_full(capsys):
    assert main(["resnet18", "--show-code"]) == 0
    out = capsys.readouterr().out
    assert "# maxpool: MaxPool2d -> BlurredMaxPool2d, blur_before" in out
    assert "# the forward itself is unchanged" in out  # every blur lives in its op's module
    assert main(["resnet18", "--past-nonlinearity", "--show-code"]) == 0
    out = capsys.readouterr().out
    assert "+++ rewritten forward" in out
    assert '+    layer2_0_fxblur_conv1 = getattr(self.layer2, "0").fxblur.conv1(layer2_0_relu)' in out
    assert main(["resnet18", "--show-code", "full", "--format", "json"]) == 0
    assert "def forward" in json.loads(capsys.readouterr().out)["code"]


def test_options_reach_the_rewrite(capsys):
    assert main(["resnet18", "--no-maxpools", "--exclude", "layer4.*", "--min-channels", "0", "--format", "json"]) == 0
    records = {r["target"]: r for r in json.loads(capsys.readouterr().out)["records"]}
    assert "maxpool" not in records and records["conv1"]["action"] == "blur_before"
    assert records["layer4.0.conv1"]["reason"] == "excluded by 'layer4.*'"


def test_a_warning_is_one_line_in_words(capsys):
    assert main(["resnet18", "--exclude", "nothing.here"]) == 0
    err = capsys.readouterr().err
    assert err == "warning: exclude pattern 'nothing.here' matches no strided conv or pool; it has no effect\n"


def test_presets_and_placement_flags(capsys):
    def actions(*args: str) -> dict[str, str]:
        assert main([*args, "--format", "json"]) == 0
        return {r["target"]: r["action"] for r in json.loads(capsys.readouterr().out)["records"]}

    zhang = actions("resnet50", "--preset", "zhang2019")
    assert zhang["layer2.0.conv2"] == "blur_past_nonlinearity" and zhang["maxpool"] == "blur_after"
    assert zhang["layer2.0.downsample.0"] == "subsample_before"
    overridden = actions("resnet50", "--preset", "zhang2019", "--no-maxpools")
    assert "maxpool" not in overridden and overridden["layer2.0.conv2"] == "blur_past_nonlinearity"
    densenet = actions("densenet121", "--avg-pools", "--pool-blur-last")
    assert densenet["features.transition1.pool"] == densenet["features.pool0"] == "blur_after"


def test_polyphase_shows_phase_groups_and_invariance(capsys):
    assert main(["resnet50", "--polyphase"]) == 0
    out = capsys.readouterr().out
    assert "phase group" in out and out.count("layer2.0.conv2") == 3  # its row, its group, its shortcut's group
    assert "shift invariance: not exact at 1x3x224x224: conv1 (Blur): pads by reflection" in out
    assert main(["resnet50", "--polyphase", "--circular-padding", "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["verdict"]["breaks"] == [] and data["verdict"]["outputs"][0]["kind"] == "invariant"
    assert {r["action"] for r in data["records"]} == {
        "phase_before",
        "phase_subsample_before",
    }
