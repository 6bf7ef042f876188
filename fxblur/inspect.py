"""``python -m fxblur.inspect MODEL``: preview what fxblur would change in a model, and at what cost.

MODEL is a torchvision name (``resnet50``), ``timm:NAME`` or ``package.module:factory``
(see ``fxblur.models``). The model is built with random weights, rewritten with the given
options, and its change report printed: every strided conv and pool, blurred or skipped
with the reason, its feature-map sizes at the given input size, and the multiply-adds and
activation memory the rewrite adds.

Exit status: 0 on success; 2 for an unknown model or a bad option (one line, with close
names); 1 when the model cannot be built or traced (a message, no traceback).

Examples:
    python -m fxblur.inspect resnet50
    python -m fxblur.inspect resnet50 --blur-last --format github
    python -m fxblur.inspect vgg16 --preset zhang2019
    python -m fxblur.inspect resnet50 --polyphase --circular-padding
    python -m fxblur.inspect googlenet --input-size 225 --show-code
    python -m fxblur.inspect mypackage.nets:small_cnn --min-channels 0 --format json
    python -m fxblur.inspect resnet18 --polyphase --draw resnet18.svg
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import warnings
from collections.abc import Sequence

from torch import nn

from fxblur.analysis.equivariance import example_shape
from fxblur.draw import draw
from fxblur.models import ModelSpecError, build, timm_available, torchvision_names
from fxblur.ops.padding import PADDING_MODES
from fxblur.options import NORMS, PRESETS, BlurOptions
from fxblur.record import changes, flat_graph_module
from fxblur.report import FORMATS, report
from fxblur.trace import UntraceableModelError, trace
from fxblur.transform import NoEffectWarning, transform

REWRITE_OPTIONS = [f.name for f in dataclasses.fields(BlurOptions)]


class _Parser(argparse.ArgumentParser):
    """Errors as one line, with the closest option names for a mistyped one."""

    def error(self, message: str) -> None:
        if message.startswith("unrecognized arguments:"):
            options = [o for action in self._actions for o in action.option_strings]
            close = {o for word in message.split()[2:] for o in difflib.get_close_matches(word, options, n=2)}
            if close:
                message += f" (did you mean {', '.join(sorted(close))}?)"
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m fxblur.inspect",
        description="Preview the BlurPool rewrite of a model: what is blurred, skipped, and what it costs.",
    )
    p.add_argument("model", nargs="?", help="torchvision name, timm:NAME, or package.module:factory")
    p.add_argument("--list", action="store_true", help="list the model names this tool knows and exit")
    options = p.add_argument_group("rewrite options (as fxblur.transform; unset ones come from --preset)")
    options.add_argument("--preset", choices=sorted(PRESETS), help="aps, composer or zhang2019")
    flag = {"action": "store_const", "default": None}
    options.add_argument("--blur-last", const=False, dest="blur_first", **flag, help="ops at stride 1, blur after")
    options.add_argument("--past-nonlinearity", const=True, **flag, help="blur strided convs past BN/activations")
    options.add_argument("--pool-blur-last", const=False, dest="pool_blur_first", **flag, help="MaxBlurPool")
    options.add_argument("--no-convs", const=False, dest="replace_convs", **flag, help="leave strided convs alone")
    options.add_argument("--no-maxpools", const=False, dest="replace_maxpools", **flag, help="leave max pools alone")
    options.add_argument("--avg-pools", const=True, dest="replace_avgpools", **flag, help="blur strided avg pools")
    options.add_argument(
        "--subsampling", const=True, dest="replace_subsampling", **flag, help="blur strided slices, unshuffles..."
    )
    options.add_argument("--fixed-filter", const=False, dest="adaptive_filter", **flag, help="K taps on every axis")
    options.add_argument("--min-channels", type=int, metavar="N", help="skip convs with fewer inputs (16)")
    options.add_argument("--filter-size", type=int, metavar="K", help="binomial filter taps, 1 to 7 (3)")
    options.add_argument("--padding-mode", choices=PADDING_MODES, help="reflect, replicate, zeros or circular")
    options.add_argument("--exclude", action="append", metavar="PATTERN", help="glob over targets; repeat")
    options.add_argument("--polyphase", const=True, **flag, help="adaptive polyphase sampling (shows phase groups)")
    options.add_argument("--polyphase-norm", choices=NORMS, help="l2, l1 or linf (l2)")
    options.add_argument("--circular-padding", const=True, **flag, help="pad convs, pools and blurs circularly")
    options.add_argument("--leaf-module", action="append", default=[], metavar="PATH", help="call whole; repeat")
    options.add_argument(
        "--partial", action="store_true", help="rewrite the traceable parts (strict=False): detectors"
    )
    output = p.add_argument_group("output")
    output.add_argument("--input-size", type=int, nargs="+", default=[224], metavar="SIZE", help="H [W], default 224")
    output.add_argument("--frames", type=int, default=16, metavar="T", help="frames for video models (default 16)")
    output.add_argument(
        "--format", default="simple", choices=FORMATS, metavar="FORMAT", help="a tabulate format or json"
    )
    output.add_argument(
        "--show-code",
        nargs="?",
        const="diff",
        choices=["diff", "full"],
        help="the rewritten forward, as a diff or full",
    )
    output.add_argument(
        "--draw", metavar="PATH", help="also draw the rewritten graph: .dot, or .svg/.png/.pdf with Graphviz"
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.list:
        print(_model_list())
        return 0
    if args.model is None:
        p.error("the following arguments are required: model (or --list)")
    if not 1 <= len(args.input_size) <= 2 or min(args.input_size) < 1 or args.frames < 1:
        p.error("--input-size takes one or two positive sizes (H [W]); --frames a positive count")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torchvision's init-weights notices
            model = build(args.model)
    except ModelSpecError as error:
        p.error(str(error))
    except Exception as error:  # the user's own factory failed
        return _fail(f"could not build {args.model}: {type(error).__name__}: {error}")
    options = {name: getattr(args, name) for name in REWRITE_OPTIONS}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = transform(
                model, preset=args.preset, leaf_modules=args.leaf_module, strict=not args.partial, verbose=False,
                **options,
            )  # fmt: skip
        for caught_warning in caught:  # in words, without the line of fxblur that raised it
            if not issubclass(caught_warning.category, (NoEffectWarning, FutureWarning)):  # the report says the first
                print(f"warning: {caught_warning.message}", file=sys.stderr)
    except ValueError as error:
        if isinstance(error, UntraceableModelError):
            return _fail(f"{error}\nHint: --partial rewrites the parts of it that can be traced (strict=False)")
        p.error(str(error))
    shape = None if args.partial else example_shape(model, args.input_size, args.frames)
    try:
        the_report = report(gm, shape)
    except Exception as error:  # the model itself cannot run on such an input (too small, wrong channels)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        p.error(f"{args.model} cannot run on a {'x'.join(map(str, shape or ()))} input: {reason}")
    code = _code(model, gm, args.show_code, args.leaf_module) if args.show_code else None
    if args.format == "json":
        data = json.loads(the_report.json())
        print(json.dumps(data if code is None else {**data, "code": code}, indent=2))
    else:
        print(the_report.render(args.format) + ("" if code is None else f"\n\n{code}"))
    if args.draw:
        try:
            print(f"drew the rewritten graph to {draw(gm, args.draw)}", file=sys.stderr)
        except (ImportError, RuntimeError, ValueError) as error:  # pydot or Graphviz missing, a model in parts
            return _fail(str(error))
    return 0


def _code(model: nn.Module, gm: nn.Module, style: str, leaf_modules: list[str]) -> str:
    """The rewritten forward, flat (or as a diff against the original's), after the modules that carry their blur."""
    blurred = [
        f"# {change.target}: {type(model.get_submodule(change.target)).__name__} -> "
        f"{type(gm.get_submodule(change.target)).__name__}, {change.action}"
        for change in changes(gm)
        if change.blurred_module
    ]
    rewritten = flat_graph_module(gm).code
    if style == "full":
        code = rewritten
    else:
        original = trace(model, leaf_modules).graph.python_code("self").src
        diff = difflib.unified_diff(
            original.splitlines(), rewritten.splitlines(), "original forward", "rewritten forward", lineterm=""
        )
        code = "\n".join(diff) or "# the forward itself is unchanged"
    header = ["# modules that now carry their blur (fxblur.ops.blurred):", *blurred] if blurred else []
    return "\n".join([*header, code])


def _model_list() -> str:
    lines = []
    for task, names in torchvision_names().items():
        lines.append(f"torchvision {task} ({len(names)}):")
        lines.extend(f"  {name}" for name in names)
    if timm_available():
        lines.append("timm:NAME  any timm model (timm.list_models() names them)")
    else:
        lines.append("timm:NAME  any timm model, once timm is installed")
    lines.append("package.module:factory  your own model, built by calling factory()")
    return "\n".join(lines)


def _fail(message: str) -> int:
    print(f"python -m fxblur.inspect: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
