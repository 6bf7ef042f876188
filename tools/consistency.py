"""Shift consistency of a model and of its fxblur rewrites, side by side.

For each model, the original and each fxblur placement are measured on the same images
with the same random diagonal shifts (fxblur.evaluation.consistency.shift_metrics): Zhang's
classification consistency, the accuracy, and the feature sensitivity (1 - cosine
similarity of the pooled features of two shifted crops).

Models: a torchvision name (random weights; nothing is downloaded), package.module:factory,
or a checkpoint file: {"model": SPEC, "state_dict": ...} saved with torch.save, read with
torch.load(weights_only=True) (fxblur.evaluation.checkpoints explains it). Random weights are drawn
from --seed.

Data: an ImageFolder directory (--data DIR; images resized and centre-cropped to
--image-size, normalised with the ImageNet mean and std), or by default --images synthetic
images (fxblur.evaluation.synthetic.SyntheticShapes, objects kept whole in every crop). Crops are
--crop-size pixels (default 7/8 of the image, as Zhang's 224 of 256), at diagonal offsets
from 0 to image size - crop size.

Variants (--variants): original, default (blur first), blur-last (blur_first=False),
past-nonlinearity (past_nonlinearity=True), composer and zhang2019 (the presets), and
polyphase sampling with circular padding: polyphase (phase chosen before each op),
polyphase-last (blur_first=False), polyphase-past (past_nonlinearity=True), aps (the preset).

Shifts (--shift): crop (Zhang's protocol: two crops at random diagonal offsets) or circular
(the centred crop, rolled by the two offsets: nothing new enters the image). For circular
shifts the crop defaults to a multiple of 32 pixels, so that every stride of a network that
downsamples 32 times divides it (exact invariance needs that).

Examples:
    python tools/consistency.py resnet18 --images 256
    python tools/consistency.py resnet50 vgg16 --images 32 --image-size 128 --crop-size 112
    python tools/consistency.py resnet50 --shift circular --variants original default polyphase
    python tools/consistency.py run/model.pt --data ~/imagenet/val --images 1000 --plot shifts.png
    python tools/consistency.py mypackage.nets:small_cnn --min-channels 0 --json

Exit status: 0 on success; 2 for a bad option or an unknown model; 1 when a model cannot
be built, loaded or traced, or does not return class logits.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision
from tabulate import tabulate
from torch import nn
from torch.utils.data import Dataset, Subset

import fxblur
from fxblur.evaluation.checkpoints import load_checkpoint
from fxblur.evaluation.consistency import SHIFTS, consistency_by_shift, shift_metrics
from fxblur.evaluation.progress import ProgressBar
from fxblur.evaluation.synthetic import SyntheticShapes
from fxblur.models import ModelSpecError, build

VARIANTS: dict[str, dict | None] = {
    "original": None,
    "default": {},
    "blur-last": {"blur_first": False},
    "past-nonlinearity": {"past_nonlinearity": True},
    "composer": {"preset": "composer"},
    "zhang2019": {"preset": "zhang2019"},
    "polyphase": {"polyphase": True, "circular_padding": True},
    "polyphase-last": {"polyphase": True, "circular_padding": True, "blur_first": False},
    "polyphase-past": {"polyphase": True, "circular_padding": True, "past_nonlinearity": True},
    "aps": {"preset": "aps"},
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class Failure(Exception):
    """A model that cannot be built, loaded, traced or measured: exit status 1."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python tools/consistency.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="torchvision name, package.module:factory or a .pt file")
    data = p.add_argument_group("data")
    data.add_argument("--data", type=Path, metavar="DIR", help="an ImageFolder directory (default: synthetic images)")
    data.add_argument("--images", type=int, metavar="N", help="images to measure (default: all of DIR, or 256)")
    data.add_argument("--classes", type=int, default=6, metavar="K", help="synthetic classes, 2 to 6 (default 6)")
    data.add_argument("--image-size", type=int, metavar="S", help="default 256 for DIR, 64 for synthetic images")
    data.add_argument("--crop-size", type=int, metavar="C", help="default 7/8 of the image size (circular: a "
                      "multiple of 32 below that)")  # fmt: skip
    run = p.add_argument_group("measurement")
    run.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME",
                     help=f"any of {', '.join(VARIANTS)} (default: all)")  # fmt: skip
    run.add_argument("--shift", choices=SHIFTS, default="crop", help="crop (default) or circular")
    run.add_argument("--min-channels", type=int, metavar="N", help="fxblur's min_channels (default 16)")
    run.add_argument("--feature-layer", metavar="NAME", help="module whose pooled output is the feature (default: "
                     "the input of the last nn.Linear)")  # fmt: skip
    run.add_argument("--seed", type=int, default=0, help="random weights, synthetic images and shifts (default 0)")
    run.add_argument("--batch-size", type=int, default=32, metavar="N", help="images per forward pass (default 32)")
    run.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads (default: torch's)")
    output = p.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print JSON instead of a table")
    output.add_argument("--plot", type=Path, metavar="FILE", help="plot consistency against shift (needs matplotlib; "
                        "runs every offset on every image)")  # fmt: skip
    output.add_argument("--quiet", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = 64 if args.data is None else 256
    if args.images is None and args.data is None:
        args.images = 256
    if args.crop_size is None and args.shift == "circular":  # a multiple of 32: every stride of most nets divides it
        args.crop_size = max(32, args.image_size * 7 // 8 // 32 * 32)
    if args.crop_size is None:
        args.crop_size = args.image_size * 7 // 8
    if (
        not 0 < args.crop_size <= args.image_size
        or (args.images is not None and args.images < 1)
        or args.batch_size < 1
    ):
        p.error("need 0 < --crop-size <= --image-size, and --images and --batch-size >= 1")
    if args.min_channels is not None and args.min_channels < 0:
        p.error("--min-channels must be >= 0")
    if args.data is not None and not args.data.is_dir():
        p.error(f"--data {args.data} is not a directory")
    pyplot = _pyplot(p) if args.plot else None
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        dataset = _dataset(args)
    except ValueError as error:  # synthetic images that cannot be made: too small, too many classes
        p.error(str(error))
    try:
        results = [result for spec in args.models for result in _measure(spec, dataset, args)]
    except ModelSpecError as error:
        p.error(str(error))
    except (Failure, ValueError) as error:  # checkpoints, tracing, models that return no logits
        print(f"{p.prog}: {error}", file=sys.stderr)
        return 1
    setting = {
        "data": str(args.data) if args.data else f"synthetic shapes ({args.classes} classes)",
        "images": len(dataset), "image_size": args.image_size, "crop_size": args.crop_size,
        "max_shift": args.image_size - args.crop_size, "shift": args.shift, "seed": args.seed,
        "features": f"output of {args.feature_layer}, pooled" if args.feature_layer else "input of the last nn.Linear",
    }  # fmt: skip
    if pyplot is not None:
        _plot(pyplot, results, args.plot)
    if args.json:
        print(json.dumps({**setting, "rows": results}, indent=2))
    else:
        print(_table(results))
        print(", ".join(f"{key} {value}" for key, value in setting.items()))
    return 0


def _dataset(args: argparse.Namespace) -> Dataset:
    if args.data is None:
        border = min(args.image_size - args.crop_size, args.image_size // 3)
        return SyntheticShapes(
            args.images, image_size=args.image_size, num_classes=args.classes, border=border, seed=args.seed
        )
    transforms = torchvision.transforms
    folder = torchvision.datasets.ImageFolder(
        str(args.data),
        transform=transforms.Compose([
            transforms.Resize(args.image_size),
            transforms.CenterCrop(args.image_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]),
    )  # fmt: skip
    if args.images is None or args.images >= len(folder):
        return folder
    chosen = torch.randperm(len(folder), generator=torch.Generator().manual_seed(args.seed))[: args.images]
    return Subset(folder, sorted(chosen.tolist()))


def _model(spec: str, seed: int) -> nn.Module:
    if Path(spec).is_file():
        return load_checkpoint(spec)
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torchvision's init-weights notices
            return build(spec, device="cpu")
    except ModelSpecError:
        raise
    except Exception as error:  # the user's own factory failed
        raise Failure(f"could not build {spec}: {type(error).__name__}: {error}") from None


def _measure(spec: str, dataset: Dataset, args: argparse.Namespace) -> list[dict]:
    """One row per variant of the model ``spec``, each measured on the same images and shifts."""
    original = _model(spec, args.seed)
    stream = sys.stderr if sys.stderr.isatty() and not args.quiet else None
    rows = []
    for variant in args.variants:
        options = VARIANTS[variant]
        if options is None:
            model, blurred = original, 0
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", fxblur.NoEffectWarning)  # the "blurred" column says it
                model = fxblur.transform(original, min_channels=args.min_channels, verbose=False, **options)
            blurred = sum(change.action != "skipped" for change in fxblur.changes(model))
        start = time.perf_counter()
        with ProgressBar(len(dataset), f"{spec} {variant}", stream=stream) as bar:
            metrics = shift_metrics(
                model, dataset, args.crop_size, seed=args.seed, batch_size=args.batch_size,
                feature_layer=args.feature_layer, progress=bar.update, shift=args.shift,
            )  # fmt: skip
        row = {"model": spec, "variant": variant, "blurred": blurred, **dataclasses.asdict(metrics)}
        row["seconds"] = round(time.perf_counter() - start, 2)
        if args.plot:
            with ProgressBar(len(dataset), f"{spec} {variant} by shift", stream=stream) as bar:
                by_shift = consistency_by_shift(
                    model, dataset, args.crop_size, batch_size=args.batch_size, progress=bar.update, shift=args.shift
                )
            row["consistency_by_shift"] = by_shift
        rows.append(row)
    return rows


def _table(rows: list[dict]) -> str:
    lines = [
        [row["model"], row["variant"], row["blurred"], f"{100 * row['consistency']:.2f}",
         f"{100 * row['accuracy']:.2f}", f"{row['sensitivity']:.2e}", f"{row['seconds']:.1f}"]
        for row in rows
    ]  # fmt: skip
    headers = ["model", "variant", "blurred", "consistency %", "accuracy %", "sensitivity (1 - cos)", "seconds"]
    return tabulate(lines, headers=headers, disable_numparse=True)


def _pyplot(p: argparse.ArgumentParser):
    """matplotlib's pyplot on a file backend; a usage error if matplotlib is missing."""
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        p.error("--plot needs matplotlib: pip install -e '.[plot]' from a clone")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _plot(pyplot, rows: list[dict], path: Path) -> None:
    figure, axes = pyplot.subplots(figsize=(6, 4))
    for row in rows:
        shifts = row["consistency_by_shift"]
        label = row["variant"] if len({r["model"] for r in rows}) == 1 else f"{row['model']} {row['variant']}"
        axes.plot(list(shifts), [100 * c for c in shifts.values()], marker="o", label=label)
    axes.set_xlabel("diagonal shift (pixels)")
    axes.set_ylabel("consistency (%)")
    axes.set_title("Two crops classified alike, against their diagonal shift")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


if __name__ == "__main__":
    sys.exit(main())
