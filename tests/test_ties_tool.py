"""tools/ties.py: shifts of images whose polyphase components tie, counted pair by pair."""

from __future__ import annotations

import json

import torch
from torch import nn

from support import load_tool

ties = load_tool("ties")


class CornerReader(nn.Module):
    """Reads the top-left pixel: any shift that moves it moves the output."""

    def forward(self, x):
        return x[:, :, 0, 0]


def test_pairs_are_counted_per_image_and_shift():
    images = torch.zeros(3, 1, 4, 4)
    images[0, :, 0, 0] = 1.0  # moves under every shift
    images[1] = 1.0  # flat: nothing moves
    images[2, :, 1, 1] = 1.0
    images[2, :, 0, 0] = 2.0  # moves
    held, pairs, worst = ties.pairs_held(CornerReader(), images, [(0, 1), (1, 0)], 1e-4)
    assert (held, pairs, worst) == (2, 6, 1.0)


def test_resnet18_keeps_its_logits_on_every_structured_pair(capsys):
    assert ties.main(["resnet18", "--norms", "l2", "--images", "1", "--image-size", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    every = next(row for row in rows if row["input"] == "all")
    assert every["held"] == every["pairs"] > 0
