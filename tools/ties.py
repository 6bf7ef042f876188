"""Polyphase sampling on images where components tie: how often a shift leaves the logits where they were.

On a random image every polyphase component has a norm of its own; on real images they
tie: a filled shape on a flat background, a saturated region, an image resized up (CIFAR at
ImageNet size). There the choice of phase must still follow the shift. For each model and
each norm (``polyphase_norm``), the model is rewritten with ``polyphase=True,
circular_padding=True`` (random weights, BatchNorm statistics from one batch, eval mode, in
float32, or ``--dtype float64``) and run on the structured inputs of ``fxblur.evaluation.structured`` and on their
circular shifts; a pair (image, shift) holds when the image's logits move by at most
``--tolerance`` (1e-4) of their largest magnitude. The table gives the share of pairs that
hold, and the worst movement, per model, norm and kind of input.

Examples:
    python tools/ties.py resnet18 efficientnet_b0 --threads 1
    python tools/ties.py resnet18 --norms l2 --image-size 128 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch
from tabulate import tabulate
from torch import nn

import fxblur
from fxblur.evaluation.calibration import calibrate_batch_norms
from fxblur.evaluation.invariance import default_shifts
from fxblur.evaluation.structured import structured_inputs
from fxblur.models import build

NORMS = ("l2", "l1", "linf")


def pairs_held(model: nn.Module, images: torch.Tensor, shifts: list[tuple[int, ...]], tolerance: float):
    """(pairs that held, pairs, worst relative movement) of ``images`` under ``shifts``."""
    held, worst = 0, 0.0
    with torch.no_grad():
        logits = model(images)
        scale = logits.abs().amax(1).clamp_min(torch.finfo(logits.dtype).tiny)
        for shift in shifts:
            moved = (model(torch.roll(images, shift, (-2, -1))) - logits).abs().amax(1) / scale
            held += int((moved <= tolerance).sum())
            worst = max(worst, moved.max().item())
    return held, len(shifts) * images.shape[0], worst


def measure(name: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    size = args.image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = build(name, device="cpu").eval()
    calibrate_batch_norms(original, torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(args.seed)))
    shifts = default_shifts((size, size))
    dtype = getattr(torch, args.dtype)
    original.to(dtype)
    inputs = [(kind, images.to(dtype)) for kind, images in structured_inputs((args.images, 3, size, size), args.seed)]
    rows = []
    for norm in args.norms:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fxblur.transform(original, polyphase=True, circular_padding=True, polyphase_norm=norm,
                                     verbose=False)  # fmt: skip
        total_held = total = 0
        for kind, images in inputs:
            held, pairs, worst = pairs_held(model, images, shifts, args.tolerance)
            total_held, total = total_held + held, total + pairs
            rows.append({"model": name, "norm": norm, "input": kind, "held": held, "pairs": pairs, "worst": worst})
        rows.append({"model": name, "norm": norm, "input": "all", "held": total_held, "pairs": total, "worst": None})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model specs (fxblur.models)")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--images", type=int, default=4, help="images of each kind (default 4)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="float64 separates a phase that does not follow the shift from float32 rounding")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for name in args.models for row in measure(name, args)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    shown = [
        {"model": r["model"], "norm": r["norm"], "input": r["input"], "held": f"{r['held']}/{r['pairs']}",
         "share": f"{r['held'] / r['pairs']:.1%}", "worst": "" if r["worst"] is None else f"{r['worst']:.1e}"}
        for r in rows
    ]  # fmt: skip
    print(tabulate(shown, headers="keys", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
