"""Train a small ResNet with and without fxblur, then compare accuracy and shift consistency.

Every variant starts from the same initial weights and sees the same images in the same
order (per seed): only the placement of the blur differs. Training follows the functional
loop of Composer's BlurPool method card; fxblur.transform comes after the optimizer is
built, which works because the rewritten model shares the original's parameters.

Data: fxblur.evaluation.synthetic.SyntheticShapes, 40x40 images of six kinds of textured shapes on
1/f noise (new images for each seed), trained on random 32x32 crops with Adam and a
one-cycle learning rate; tested on a separate split with two protocols
(fxblur.evaluation.consistency.shift_metrics): Zhang's, two crops at random diagonal offsets
0-8 per image, and circular shifts, the centred crop rolled by the difference of two such
offsets. The polyphase variants pad circularly: under circular shifts they cannot move.

Run (from the repository root):
    python examples/train_compare.py             # 3 seeds x 6 variants, about half an hour on 2 CPU cores
    python examples/train_compare.py --quick     # a few seconds: checks the pipeline, not the result
    python examples/train_compare.py --seeds 5 --epochs 12 --json
    python examples/train_compare.py --variants baseline "polyphase, circular"
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from typing import TextIO

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.utils.data import TensorDataset

import fxblur
from fxblur.evaluation.consistency import shift_metrics
from fxblur.evaluation.progress import ProgressBar
from fxblur.evaluation.synthetic import SHAPES, SyntheticShapes

IMAGE_SIZE, CROP_SIZE = 40, 32
METRICS = ("accuracy", "consistency", "sensitivity", "circular_consistency", "circular_sensitivity", "train_seconds")
VARIANTS: dict[str, dict | None] = {
    "baseline": None,
    "blur first (default)": {},
    "blur_first=False": {"blur_first": False},
    "past_nonlinearity=True": {"past_nonlinearity": True},
    "polyphase, circular": {"polyphase": True, "circular_padding": True},
    "polyphase published, circular": {"polyphase": True, "blur_first": False, "circular_padding": True},
}


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a shortcut; the first conv and a 1x1 shortcut stride."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 32x32 inputs: stem, max pool /2, then three stages, two of them strided.

    Down-sampling ops for fxblur: the max pool, two strided 3x3 convs and two strided 1x1
    shortcuts; the stem keeps the full resolution.
    """

    def __init__(self, num_classes: int = len(SHAPES), width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride=2)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.maxpool(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class RandomCrops:
    """Batches of random ``size`` crops of in-memory images, reshuffled each epoch from ``seed``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, batch_size: int, seed: int) -> None:
        self.images, self.labels, self.size, self.batch_size = images, labels, size, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.images), generator=self.generator)
        room = self.images.shape[-1] - self.size + 1
        corners = torch.randint(0, room, (len(self.images), 2), generator=self.generator)
        for batch, offsets in zip(order.split(self.batch_size), corners.split(self.batch_size), strict=True):
            corner_of = zip(batch.tolist(), offsets.tolist(), strict=True)
            crops = [self.images[i, :, y : y + self.size, x : x + self.size] for i, (y, x) in corner_of]
            yield torch.stack(crops), self.labels[batch]


def training_loop(
    model: nn.Module, train_loader: RandomCrops, epochs: int, blur: dict | None, bar: ProgressBar
) -> nn.Module:
    """The method card's loop, with ``fxblur.transform(model, **blur)`` for ``apply_blurpool``; the trained model."""
    opt = torch.optim.Adam(model.parameters())
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=epochs * len(train_loader))
    if blur is not None:  # after the optimizer: the rewritten model trains the same parameters
        model = fxblur.transform(model, **blur, verbose=False)
    loss_fn = F.cross_entropy
    model.train()
    for _ in range(epochs):
        for X, y in train_loader:
            y_hat = model(X)
            loss = loss_fn(y_hat, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            schedule.step()
            bar.update()
    return model


def in_memory(data: SyntheticShapes) -> tuple[torch.Tensor, torch.Tensor]:
    items = [data[i] for i in range(len(data))]
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items])


def run_seed(seed: int, args: argparse.Namespace, progress: TextIO | None) -> list[dict]:
    """Train and test every variant from one seed's initial weights, data and batch order."""
    shapes = {"image_size": IMAGE_SIZE, "border": IMAGE_SIZE - CROP_SIZE, "seed": seed}
    train = in_memory(SyntheticShapes(args.train_size, **shapes))
    test = TensorDataset(*in_memory(SyntheticShapes(args.test_size, split="test", **shapes)))
    rows = []
    for variant in args.variants:
        blur = VARIANTS[variant]
        torch.manual_seed(seed)
        model = SmallResNet(num_classes=len(SHAPES), width=args.width)
        loader = RandomCrops(*train, CROP_SIZE, args.batch_size, seed)
        start = time.perf_counter()
        with ProgressBar(args.epochs * len(loader), f"seed {seed} {variant:<22}", stream=progress) as bar:
            model = training_loop(model, loader, args.epochs, blur, bar)
        seconds = time.perf_counter() - start
        crops = shift_metrics(model, test, CROP_SIZE, seed=seed, batch_size=256)
        rolls = shift_metrics(model, test, CROP_SIZE, seed=seed, batch_size=256, shift="circular")
        rows.append({
            "seed": seed, "variant": variant, "accuracy": crops.accuracy, "consistency": crops.consistency,
            "sensitivity": crops.sensitivity, "circular_consistency": rolls.consistency,
            "circular_sensitivity": rolls.sensitivity, "train_seconds": seconds,
        })  # fmt: skip
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds, per variant (no spread from one seed)."""
    table = []
    for variant in dict.fromkeys(row["variant"] for row in rows):
        mine = [row for row in rows if row["variant"] == variant]
        entry: dict = {"variant": variant, "seeds": len(mine)}
        for key in METRICS:
            values = [row[key] for row in mine]
            entry[key] = statistics.mean(values)
            entry[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else None
        table.append(entry)
    return table


def render(table: list[dict]) -> str:
    def cell(entry: dict, key: str, scale: float, digits: int) -> str:
        std = entry[f"{key}_std"]
        mean = f"{entry[key] * scale:.{digits}f}"
        return mean if std is None else f"{mean} ± {std * scale:.{digits}f}"

    headers = [
        "variant", "accuracy %", "consistency %", "sensitivity (1 - cos)", "circular: consistency %",
        "circular: sensitivity", "train s",
    ]  # fmt: skip
    lines = [
        [e["variant"], cell(e, "accuracy", 100, 1), cell(e, "consistency", 100, 1), cell(e, "sensitivity", 1, 4),
         cell(e, "circular_consistency", 100, 1), cell(e, "circular_sensitivity", 1, 4),
         cell(e, "train_seconds", 1, 0)]
        for e in table
    ]  # fmt: skip
    return tabulate(lines, headers=headers, disable_numparse=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--train-size", type=int, default=6000, help="training images (default 6000)")
    p.add_argument("--test-size", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (default 16)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's, one per core)")
    p.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        metavar="NAME",
        help=f"variants to train (default all: {', '.join(VARIANTS)})",
    )
    p.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, 64 images: a smoke test")
    p.add_argument("--json", action="store_true", help="per-seed results and the summary as JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.train_size, args.test_size = 1, 1, 64, 32
    if min(args.seeds, args.epochs, args.train_size, args.test_size, args.width, args.batch_size) < 1:
        p.error("counts and sizes must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = sys.stderr if sys.stderr.isatty() else None
    start = time.perf_counter()
    rows = [row for seed in range(args.seeds) for row in run_seed(seed, args, progress)]
    table = summary(rows)
    settings = {
        "seeds": args.seeds, "epochs": args.epochs, "train_size": args.train_size, "test_size": args.test_size,
        "width": args.width, "batch_size": args.batch_size, "image_size": IMAGE_SIZE, "crop_size": CROP_SIZE,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip
    if args.json:
        print(json.dumps({"settings": settings, "summary": table, "runs": rows}, indent=2))
    else:
        print(render(table))
        print(", ".join(f"{key} {value}" for key, value in settings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
