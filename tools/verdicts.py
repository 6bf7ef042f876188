"""Does the report's claim hold? The equivariance analysis against measurement, model by model.

Every model is built with random weights (nothing is downloaded; parameters initialised to
zero, such as torchvision ViT's head, get random values too: an output that cannot move
proves nothing), its BatchNorm statistics set from one batch of random images
(``fxblur.evaluation.calibration``), and rewritten with
``polyphase=True, circular_padding=True``. For each, the tool gives

- the analysis's verdict at the input size: exact, or the first op that breaks the claim
  on each path to the output, with the kind of break (``fxblur.analysis.equivariance.BreakKind``);
- the measured movement: ``fxblur.check_invariance`` in float64 on random inputs, the largest
  change of the output under circular shifts relative to its largest magnitude.

- the rounding floor: how far the same output moves when the input is scaled by 1 ± 1e-15,
  a change at the size of float64 rounding. A deep network amplifies rounding (timm-sized
  EfficientNetV2s by 1e6 and more), and a shifted input is computed with other roundings.

The summary groups the models by verdict (exact, or the kind of the first break and the op
that makes it), with the range of movement in each group. A model called exact whose output
moves by more than 1e-9 and by more than 100 times its rounding floor would be a claim the
code cannot prove: the tool lists it and exits 1.

Models: torchvision names, ``timm:NAME``, ``package.module:factory`` (``fxblur.models``);
``--torchvision`` adds every torchvision classification model and ``--timm-sample`` a sample
of timm families. Transformers are built for the input size where they take one (``img_size``);
the torchvision models that need another size get it (``SIZES``).

Examples:
    python tools/verdicts.py resnet18 swin_t timm:nfnet_l0 --threads 1
    python tools/verdicts.py --torchvision --timm-sample --image-size 64 --threads 1 --json verdicts.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from collections import defaultdict

import torch
from tabulate import tabulate
from torch import nn

import fxblur
from fxblur.evaluation.calibration import calibrate_batch_norms
from fxblur.evaluation.invariance import check_invariance
from fxblur.models import build, timm_available, torchvision_names

TOLERANCE = 1e-9  # float64 rounding through most networks stays far below this
FLOOR_MARGIN = 100  # ... and through the deepest, within this many times their rounding floor
TIMM_SAMPLE = (
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "maxvit_nano_rw_256",
    "mobilevit_xxs", "nfnet_l0", "dm_nfnet_f0", "skresnet18", "dpn68", "tf_efficientnet_b0", "tf_mixnet_s",
    "efficientnet_b0", "resnetv2_50", "resnetv2_50x1_bit", "convnext_atto", "regnetx_002", "resnet18",
    "ghostnet_100", "rexnet_100", "hrnet_w18_small", "cspresnet50", "densenet121", "mixnet_s",
    "mobilenetv3_small_100", "efficientvit_b0", "fastvit_t8", "coatnet_nano_rw_224", "levit_128s",
)  # fmt: skip
SIZES = {"vit_b_16": 224, "vit_b_32": 224, "maxvit_t": 224, "inception_v3": 299}  # torchvision's fixed or least sizes
LARGEST_FIRST = ("vit_h_14", "vit_l_16", "vit_l_32", "regnet_y_128gf")  # float64 copies of several GB: opt in


def build_for(spec: str, size: int) -> nn.Module:
    """The model behind ``spec`` on CPU in eval mode; a timm transformer built for ``size``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # init-weights notices
        if spec.startswith("timm:"):
            import timm

            try:
                return timm.create_model(spec[5:], pretrained=False, num_classes=10, img_size=size).eval()
            except TypeError:  # a CNN: it takes any size
                return timm.create_model(spec[5:], pretrained=False, num_classes=10).eval()
        return build(spec, device="cpu").eval()


def verdict_of(spec: str, size: int, seed: int) -> dict:
    """One model's row: its verdict, its first breaks and its measured movement."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    shape = (1, 3, size, size)
    try:
        model = build_for(spec, size)
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.numel() and not parameter.any():
                    parameter.normal_(std=0.02)
        calibrate_batch_norms(model, torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(seed)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rewritten = fxblur.transform(model, polyphase=True, circular_padding=True, verbose=False)
        verdict = fxblur.report(rewritten, shape).verdict
        moves = check_invariance(rewritten, shape, structured=False, samples=1, seed=seed).worst
        floor = rounding_floor(rewritten, shape, seed)
    except Exception as error:  # a model fxblur cannot rewrite, or that does not run at this size
        return {"model": spec, "verdict": "failed", "group": "failed", "breaks": str(error).splitlines()[0][:160],
                "moves": None, "floor": None, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    if verdict.exact:
        group, breaks = "exact", ""
    elif verdict.breaks:
        group = verdict.breaks[0].kind.value
        breaks = "; ".join(f"{b.where}: {b.reason}" for b in verdict.breaks)
    elif verdict.fixed:
        group, breaks = "fixed phase", "; ".join(b.where for b in verdict.fixed)
    else:
        group, breaks = "not analysed" if verdict.error else "phases kept", verdict.error
    return {"model": spec, "verdict": "exact" if verdict.exact else "not exact", "group": group, "breaks": breaks,
            "moves": moves, "floor": floor, "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def rounding_floor(model: nn.Module, shape: tuple[int, ...], seed: int) -> float:
    """How far ``model``'s float64 output moves, relative to its largest value, for its input scaled by 1 ± 1e-15."""
    model = copy.deepcopy(model).double().eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
        moved = [(model(x * (1 + sign * 1e-15)) - reference).abs().max() for sign in (1, -1)]
    return (max(moved) / reference.abs().max()).item()


def summary(rows: list[dict]) -> list[dict]:
    """Models per verdict group, with the range of their movement and a few of them."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        groups[row["group"]].append(row)
    table = []
    for group, members in sorted(groups.items(), key=lambda item: (item[0] != "exact", -len(item[1]))):
        moved = [row["moves"] for row in members if row["moves"] is not None]
        span = f"{min(moved):.0e} to {max(moved):.0e}" if moved else ""
        names = ", ".join(row["model"] for row in members[:6]) + (", ..." if len(members) > 6 else "")
        table.append({"verdict": group, "models": len(members), "logits move by": span, "for example": names})
    return table


def unsound(rows: list[dict]) -> list[dict]:
    """Rows the analysis calls exact whose output moved beyond float rounding (``TOLERANCE``, ``FLOOR_MARGIN``)."""
    return [
        row for row in rows
        if row["verdict"] == "exact" and row["moves"] > max(TOLERANCE, FLOOR_MARGIN * row["floor"])
    ]  # fmt: skip


def specs(args: argparse.Namespace) -> list[str]:
    found = list(args.models)
    if args.torchvision:
        found += [name for name in torchvision_names()["classification"] if name not in LARGEST_FIRST]
    if args.timm_sample:
        if not timm_available():
            raise SystemExit("--timm-sample needs timm: pip install timm")
        found += [f"timm:{name}" for name in TIMM_SAMPLE]
    return list(dict.fromkeys(found))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__[__doc__.index("Examples:") :],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="*", metavar="MODEL", help="model specs (fxblur.models)")
    p.add_argument("--torchvision", action="store_true", help="every torchvision classification model")
    p.add_argument("--timm-sample", action="store_true", help="a sample of timm families")
    p.add_argument("--image-size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads")
    p.add_argument("--json", metavar="PATH", help="also write every row to PATH")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = specs(args)
    if not names:
        p.error("name models, or --torchvision / --timm-sample")
    rows = []
    for name in names:
        rows.append(verdict_of(name, SIZES.get(name, args.image_size), args.seed))
        print(f"{name}: {rows[-1]['verdict']} {rows[-1]['group']}", file=sys.stderr, flush=True)
    shown = [
        {**row, **{key: "" if row[key] is None else f"{row[key]:.1e}" for key in ("moves", "floor")}} for row in rows
    ]
    print(tabulate(shown, headers="keys", disable_numparse=True, maxcolwidths=[None, None, None, 70, None, None, None]))
    print()
    print(tabulate(summary(rows), headers="keys", disable_numparse=True, tablefmt="github"))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(rows, file, indent=2)
    wrong = unsound(rows)
    for row in wrong:
        print(f"UNSOUND: {row['model']} is called exact but moves by {row['moves']:.1e} "
              f"(rounding floor {row['floor']:.1e})", file=sys.stderr)  # fmt: skip
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
