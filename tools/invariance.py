"""How far a model's logits move under circular shifts of its input, for the original and its rewrites.

Every model is built with random weights (torchvision names; nothing is downloaded), its
BatchNorm statistics set from one batch of random images (``fxblur.evaluation.calibration``),
in eval mode, and run on a batch of random images and on the same images rolled circularly by
random shifts of up to ``--max-shift`` pixels along both axes. For each variant the table
gives the largest change of the logits relative to their largest magnitude, over the
shifts, and whether every image kept its top-1 class. A network made exactly invariant by
polyphase sampling (with circular padding and a global head, on sizes every stride divides)
moves by float rounding only; the verdict column is the report's line for it.

Variants: original; blurpool (fxblur's default); polyphase, polyphase-last and
polyphase-past (polyphase=True with circular_padding=True, in the three placements).

Examples:
    python tools/invariance.py resnet18 --image-size 64
    python tools/invariance.py resnet18 resnet50 mobilenet_v3_large --shifts 8 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch
from tabulate import tabulate
from torch import nn

import fxblur
from fxblur.evaluation.calibration import calibrate_batch_norms
from fxblur.models import build

VARIANTS: dict[str, dict | None] = {
    "original": None,
    "blurpool": {},
    "polyphase": {"polyphase": True, "circular_padding": True},
    "polyphase-last": {"polyphase": True, "circular_padding": True, "blur_first": False},
    "polyphase-past": {"polyphase": True, "circular_padding": True, "past_nonlinearity": True},
}


def movement(model: nn.Module, images: torch.Tensor, shifts: torch.Tensor) -> tuple[float, bool]:
    """The largest relative change of the logits over ``shifts``, and whether every top-1 class held."""
    with torch.no_grad():
        logits = model(images)
        worst, kept = 0.0, True
        for shift in shifts.tolist():
            moved = model(torch.roll(images, shift, (-2, -1)))
            worst = max(worst, ((moved - logits).abs().max() / logits.abs().max()).item())
            kept &= torch.equal(moved.argmax(1), logits.argmax(1))
    return worst, kept


def measure(name: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init-weights notices; nothing to blur
        original = build(name, device="cpu").eval()
    generator = torch.Generator().manual_seed(args.seed)
    calibrate_batch_norms(original, torch.randn(8, 3, args.image_size, args.image_size, generator=generator))
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    shifts = torch.randint(-args.max_shift, args.max_shift + 1, (args.shifts, 2), generator=generator)
    rows = []
    for variant in args.variants:
        options = VARIANTS[variant]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = original if options is None else fxblur.transform(original, verbose=False, **options)
        start = time.perf_counter()
        worst, kept = movement(model, images, shifts)
        verdict = fxblur.report(model, images.shape).verdict if options else None
        rows.append({
            "model": name, "variant": variant, "relative change": worst, "top-1 kept": kept,
            "verdict": "" if verdict is None else verdict.line(),
            "seconds": round(time.perf_counter() - start, 1),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="torchvision names")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="NAME")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--shifts", type=int, default=6, help="random shifts per model (default 6)")
    p.add_argument("--max-shift", type=int, default=32, help="largest shift along each axis (default 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for name in args.models for row in measure(name, args)]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        table = [{**row, "relative change": f"{row['relative change']:.1e}"} for row in rows]
        print(tabulate(table, headers="keys", disable_numparse=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
