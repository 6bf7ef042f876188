"""examples/train_loop.py runs as a user would run it, and learns."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "train_loop.py"


def test_method_card_training_loop_blurs_and_learns():
    command = [sys.executable, str(EXAMPLE), "--epochs", "2", "--images", "128"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert "ResNet: 7 blurred, 1 skipped" in run.stdout  # transform printed its report
    losses = [float(loss) for loss in re.findall(r"epoch \d+: loss ([\d.]+)", run.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0]
    accuracy = float(re.search(r"held-out accuracy: ([\d.]+)", run.stdout).group(1))
    assert accuracy > 0.8  # chance is 1/3
