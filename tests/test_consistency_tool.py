"""tools/consistency.py: a checkpoint through a real subprocess, options and errors in-process."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fxblur.evaluation.checkpoints import save_checkpoint
from fxblur.evaluation.consistency import shift_metrics
from fxblur.evaluation.synthetic import SyntheticShapes

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "consistency.py"
SMALL = "examples.train_compare:SmallResNet"  # 16-64 channels, 5 strided ops fxblur blurs
TINY = ["--images", "6", "--image-size", "40", "--crop-size", "32"]


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tool():
    return load_script(TOOL)


def test_a_checkpoint_measured_through_a_subprocess(tmp_path):
    model = load_script(ROOT / "examples" / "train_compare.py").SmallResNet()
    with torch.no_grad():
        model.stem[0].weight.neg_()  # not the weights a fresh build would draw
    save_checkpoint(model, SMALL, tmp_path / "small.pt")
    expected = shift_metrics(model, SyntheticShapes(6, image_size=40, border=8, seed=0), 32, seed=0)
    result = subprocess.run(
        [sys.executable, str(TOOL), str(tmp_path / "small.pt"), *TINY, "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["images"], report["crop_size"], report["max_shift"]) == (6, 32, 8)
    rows = {row["variant"]: row for row in report["rows"]}
    blurs = ["default", "blur-last", "past-nonlinearity", "composer", "zhang2019"]
    polyphase = ["polyphase", "polyphase-last", "polyphase-past", "aps"]
    assert list(rows) == ["original", *blurs, *polyphase]
    assert rows["original"]["blurred"] == 0
    assert rows["original"]["consistency"] == expected.consistency
    assert rows["original"]["sensitivity"] == pytest.approx(expected.sensitivity, rel=1e-4)
    assert all(rows[v]["blurred"] == 5 for v in [*blurs, *polyphase])
    for row in rows.values():
        assert 0 <= row["consistency"] <= 1 and 0 <= row["accuracy"] <= 1 and 0 < row["sensitivity"] < 2
    assert len({row["sensitivity"] for row in rows.values()}) > 1  # each variant is its own model


def test_table_for_two_models_and_selected_variants(capsys):
    assert tool().main([SMALL, "resnet18", *TINY, "--variants", "original", "blur-last"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["model", "variant", "blurred", "consistency"]
    assert [line.split()[:3] for line in lines[2:6]] == [
        [SMALL, "original", "0"], [SMALL, "blur-last", "5"],
        ["resnet18", "original", "0"], ["resnet18", "blur-last", "7"],
    ]  # fmt: skip
    assert "crop_size 32, max_shift 8" in lines[-1]


def test_an_image_folder_resized_cropped_and_subsampled(tmp_path, capsys):
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200)}
    for name, colour in colours.items():
        (tmp_path / name).mkdir()
        for i in range(3):
            Image.new("RGB", (50 + 10 * i, 44), colour).save(tmp_path / name / f"{i}.png")
    argv = [SMALL, "--data", str(tmp_path), "--image-size", "40", "--crop-size", "32", "--variants", "original"]
    assert tool().main([*argv, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 6
    assert tool().main([*argv, "--images", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["images"], report["data"]) == (4, str(tmp_path))
    assert report["rows"][0]["consistency"] == 1.0  # plain colours look the same from every offset


def test_plot_of_consistency_against_shift(tmp_path, capsys):
    plot = tmp_path / "shifts.png"
    assert tool().main([SMALL, *TINY, "--variants", "original", "default", "--plot", str(plot), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [list(row["consistency_by_shift"]) for row in rows] == [[str(s) for s in range(1, 9)]] * 2
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_plot_without_matplotlib_is_a_usage_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_:
        tool().main([SMALL, *TINY, "--plot", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    assert "pip install -e '.[plot]'" in capsys.readouterr().err


def test_unknown_model_is_a_usage_error_with_close_names(capsys):
    with pytest.raises(SystemExit) as exit_:
        tool().main(["resnet5O", *TINY])
    assert exit_.value.code == 2
    assert "did you mean resnet50" in capsys.readouterr().err


def test_a_bare_state_dict_is_refused_with_what_to_save(tmp_path, capsys):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "bare.pt")
    assert tool().main([str(tmp_path / "bare.pt"), *TINY]) == 1
    assert "save {'model': SPEC, 'state_dict': model.state_dict()}" in capsys.readouterr().err


def test_a_model_without_logits_fails_with_a_message(capsys):
    assert tool().main(["fcn_resnet50", *TINY, "--variants", "original"]) == 1
    assert "expected (N, classes) logits" in capsys.readouterr().err


def test_circular_shifts_leave_a_polyphase_model_where_it_was(tmp_path):
    model = load_script(ROOT / "examples" / "train_compare.py").SmallResNet()
    save_checkpoint(model, SMALL, tmp_path / "small.pt")
    result = subprocess.run(
        [sys.executable, str(TOOL), str(tmp_path / "small.pt"), "--images", "6", "--image-size", "48",
         "--shift", "circular", "--variants", "original", "polyphase", "--json", "--threads", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert (report["shift"], report["crop_size"], report["max_shift"]) == ("circular", 32, 16)
    rows = {row["variant"]: row for row in report["rows"]}
    assert rows["polyphase"]["consistency"] == 1.0 and rows["polyphase"]["sensitivity"] < 1e-6
    assert rows["original"]["sensitivity"] > 1e-4
