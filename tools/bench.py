"""Benchmark fxblur against the plain model and a Composer-style BlurPool, in one process.

Every variant of the model is timed in the same process, interleaved (one step of each,
round after round, so that drift in clock speed or load hits all alike), after warm-up;
the report gives the median step time, its ratio to the plain model (the median of the
per-round ratios) and the spread of that ratio (interquartile range over rounds).

Variants:
    plain          the model as built
    fxblur         fxblur.transform with default options (blur before strided ops)
    fxblur-after   blur_first=False
    fxblur-paper   preset="zhang2019" (the paper's placement)
    polyphase      polyphase=True: the phase chosen on each op's input, the input rolled (the cheap form)
    polyphase-after  polyphase=True, blur_first=False: ops at stride 1, blurred, then selected (APS as published)
    composer       a Composer-style BlurPool implemented here from its method card: a
                   depthwise 3x3 binomial F.conv2d (zero padding) before every strided
                   conv with >= 16 input channels (after it, with --blur-last), max pools
                   at stride 1 followed by that blur at the pool's stride

Usage:
    python tools/bench.py                              # ResNet-50, batch 8, 224, train + inference, both formats
    python tools/bench.py --model resnet18 --modes train --formats nchw --repeats 5
    python tools/bench.py --compile                    # also under torch.compile
    python tools/bench.py --micro                      # the blur op alone against a copy
    python tools/bench.py --transform-time             # fxblur.transform itself
    python tools/bench.py --variants plain polyphase polyphase-after --modes train --formats nchw
    python tools/bench.py --device cuda --amp          # on a GPU, under autocast
    python tools/bench.py --json                       # machine-readable
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision
from tabulate import tabulate
from torch import nn

import fxblur
from fxblur.models import build
from fxblur.ops.depthwise import depthwise_blur
from fxblur.ops.filters import binomial_kernel
from fxblur.ops.max_pool import max_pool_stride_one
from fxblur.ops.polyphase import phase_of, roll_to_phase, select_phase

# ---------------------------------------------------------------- Composer-style reference


def _method_card_blur(x: torch.Tensor, stride: int | tuple[int, int], filt: torch.Tensor) -> torch.Tensor:
    """Composer's blur_2d: a depthwise 3x3 binomial conv with zero padding."""
    channels = x.shape[1]
    return F.conv2d(x, filt.expand(channels, 1, 3, 3), stride=stride, padding=1, groups=channels)


class ComposerBlurConv2d(nn.Module):
    def __init__(self, conv: nn.Conv2d, blur_first: bool):
        super().__init__()
        self.conv, self.blur_first, self.stride = conv, blur_first, conv.stride
        row = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (row[:, None] * row[None, :] / 16)[None, None], persistent=False)
        if not blur_first:
            conv.stride = (1, 1)

    def forward(self, x):
        if self.blur_first:
            return self.conv(_method_card_blur(x, 1, self.filt))
        return _method_card_blur(self.conv(x), self.stride, self.filt)


class ComposerBlurMaxPool2d(nn.Module):
    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.pool = pool
        row = torch.tensor([1.0, 2.0, 1.0])
        self.register_buffer("filt", (row[:, None] * row[None, :] / 16)[None, None], persistent=False)

    def forward(self, x):
        p = self.pool
        stride = p.stride if p.stride is not None else p.kernel_size
        maxs = F.max_pool2d(x, p.kernel_size, 1, p.padding, p.dilation, p.ceil_mode)
        return _method_card_blur(maxs, stride, self.filt)


def composer_blurpool(model: nn.Module, blur_first: bool = True, min_channels: int = 16) -> nn.Module:
    """Module surgery as Composer's apply_blurpool does it, on the model in place."""
    for name, child in model.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= min_channels:
            setattr(model, name, ComposerBlurConv2d(child, blur_first))
        elif isinstance(child, nn.MaxPool2d):
            setattr(model, name, ComposerBlurMaxPool2d(child))
        else:
            composer_blurpool(child, blur_first, min_channels)
    return model


# ---------------------------------------------------------------------------- timing


def steady_allocator() -> None:
    """Keep freed memory in the process (glibc only), as PyTorch's GPU allocator does.

    By default glibc hands large freed blocks back to the OS, so every new activation
    pays page faults whose cost swings from run to run (a 25 MB copy measured 0.5 ms or
    5 ms). Keeping the blocks makes every variant, and the copy baseline, steady alike.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 * 2**20)  # M_MMAP_THRESHOLD: serve blocks up to 32 MB from the heap
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap back


def _variants(name: str, blur_last: bool) -> dict[str, Callable[[], nn.Module]]:
    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return build(name, device="cpu")

    return {
        "plain": fresh,
        "fxblur": lambda: fxblur.transform(fresh(), verbose=False),
        "fxblur-after": lambda: fxblur.transform(fresh(), blur_first=False, verbose=False),
        "fxblur-paper": lambda: fxblur.transform(fresh(), preset="zhang2019", verbose=False),
        "polyphase": lambda: fxblur.transform(fresh(), polyphase=True, verbose=False),
        "polyphase-after": lambda: fxblur.transform(fresh(), polyphase=True, blur_first=False, verbose=False),
        "composer": lambda: composer_blurpool(fresh(), blur_first=not blur_last),
    }


VARIANTS = ["plain", "fxblur", "fxblur-after", "fxblur-paper", "polyphase", "polyphase-after", "composer"]


def _step(model: nn.Module, x: torch.Tensor, mode: str, amp: bool) -> Callable[[], None]:
    """One inference or train step of ``model``, waiting for the device; under autocast with ``amp``."""
    device = x.device.type
    autocast = functools.partial(torch.autocast, device, enabled=amp, dtype=AMP_DTYPES[device])
    if mode == "inference":
        model.eval()

        def run() -> None:
            with torch.no_grad(), autocast():
                model(x)
            _synchronize(device)

        return run
    model.train()
    target = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)

    def step() -> None:
        for p in model.parameters():
            p.grad = None
        with autocast():
            out = model(x)
            logits = out if isinstance(out, torch.Tensor) else out[0]
            loss = F.cross_entropy(logits.flatten(1), target)
        loss.backward()
        _synchronize(device)

    return step


AMP_DTYPES = {"cpu": torch.bfloat16, "cuda": torch.float16}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def interleaved(steps: dict[str, Callable[[], None]], baseline: str, warmup: int, repeats: int) -> dict[str, dict]:
    """Time the callables round-robin; per callable the median ms and its ratio to ``baseline``.

    The ratio is the median over rounds of the time divided by the baseline's in the same
    round, so that slow drift in the machine's speed cancels out; ``spread`` is the
    interquartile range of those per-round ratios.
    """
    for _ in range(warmup):
        for run in steps.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, run in steps.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    results = {}
    for name, values in times.items():
        ratios = [value / base for value, base in zip(values, times[baseline], strict=True)]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        results[name] = {
            "ms": statistics.median(values) * 1e3,
            "ratio": statistics.median(ratios),
            "spread": quartiles[2] - quartiles[0],
        }
    return results


def model_benchmark(args: argparse.Namespace) -> list[dict]:
    rows = []
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    for fmt in args.formats:
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, device=args.device).contiguous(memory_format=memory_format)
        for compiled in [False, True] if args.compile else [False]:
            models, differences = {}, {}
            for variant, make in _variants(args.model, args.blur_last).items():
                if variant in args.variants:
                    model = make().to(device=args.device, memory_format=memory_format)
                    models[variant] = torch.compile(model) if compiled else model
                    if compiled:
                        differences[variant] = _max_difference(models[variant], model, x)
            for mode in args.modes:
                steps = {variant: _step(model, x, mode, args.amp) for variant, model in models.items()}
                timings = interleaved(steps, "plain", args.warmup, args.repeats)
                for variant, timing in timings.items():
                    rows.append({
                        "model": args.model, "device": args.device, "amp": args.amp, "mode": mode, "format": fmt,
                        "compiled": compiled, "variant": variant, **timing, DIFFERENCE: differences.get(variant),
                    })  # fmt: skip
    return rows


DIFFERENCE = "max |compiled - eager|"


def _max_difference(compiled: Callable, eager: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute difference between the compiled and the eager model's eval outputs."""
    eager.eval()
    with torch.no_grad():
        difference = (compiled(x) - eager(x)).abs().max().item()
    return difference


def micro_benchmark(args: argparse.Namespace) -> list[dict]:
    """The blur op alone on (8, 256, 56, 56) against a copy of its input (the memory floor).

    Also timed: forward + backward (with a dense gradient, as in training), the blur as
    reflect padding plus a depthwise conv (``fxblur.ops.depthwise``, the path ``fxblur.blur``
    takes where it does not take shifted views), for scale the method card's zero-padded
    depthwise conv, the stride-1 3x3 max pool that a pool
    blurred after runs, PyTorch's kernel against ``fxblur.ops.max_pool``, and the ops of
    polyphase sampling (``fxblur.ops.polyphase``) at stride 2.
    """
    rows = []
    for fmt in ("nchw", "channels_last"):
        memory_format = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
        x = torch.randn(8, 256, 56, 56).contiguous(memory_format=memory_format)
        grad_x = x.clone().requires_grad_()
        steps = {"copy": lambda x=x: x.clone()}
        kernel = binomial_kernel((3, 3), torch.float32)
        for stride in (1, 2):
            blur = fxblur.Blur(filter_size=3, stride=stride)
            grad = torch.randn_like(blur(x))
            steps[f"blur s{stride}"] = lambda blur=blur, x=x: blur(x)
            steps[f"blur s{stride} fwd+bwd"] = lambda blur=blur, x=grad_x, grad=grad: blur(x).backward(grad)
            conv = functools.partial(depthwise_blur, kernel=kernel, stride=[stride, stride], padding_mode="reflect")
            steps[f"pad + depthwise conv s{stride}"] = lambda conv=conv, x=x: conv(x)
            steps[f"pad + depthwise conv s{stride} fwd+bwd"] = lambda conv=conv, x=grad_x, g=grad: conv(x).backward(g)
        filt = torch.tensor([[[[1.0, 2.0, 1.0]]]]).mT @ torch.tensor([[[[1.0, 2.0, 1.0]]]]) / 16
        for stride in (1, 2):
            steps[f"method card conv s{stride}"] = lambda x=x, filt=filt, s=stride: _method_card_blur(x, s, filt)
        g = torch.randn_like(x)
        for name, pool in (("PyTorch", lambda x: F.max_pool2d(x, 3, 1, 1)), ("fxblur", _stride_one_max_pool)):
            steps[f"max pool 3x3 s1 {name}"] = lambda x=x, pool=pool: pool(x)
            steps[f"max pool 3x3 s1 {name} fwd+bwd"] = lambda x=grad_x, pool=pool, g=g: pool(x).backward(g)
        phase = phase_of(x, [2, 2])
        steps["phase_of l2 s2"] = lambda x=x: phase_of(x, [2, 2])
        steps["roll_to_phase"] = lambda x=x, phase=phase: roll_to_phase(x, phase)
        steps["select_phase s2"] = lambda x=x, phase=phase: select_phase(x, phase, [2, 2])
        timings = interleaved(steps, "copy", args.warmup * 5, args.repeats * 4)  # the allocator settles slowly
        for name, timing in timings.items():
            rows.append({"format": fmt, "op": name, "ms": timing["ms"], "x copy": timing["ratio"]})
    return rows


def _stride_one_max_pool(x: torch.Tensor) -> torch.Tensor:
    return max_pool_stride_one(x, [3, 3], [1, 1], [1, 1])


def transform_time(args: argparse.Namespace) -> list[dict]:
    model = build(args.model, device="cpu")
    fxblur.transform(model, verbose=False)  # warm caches (imports, first trace)
    times = []
    for _ in range(args.repeats * 2):
        start = time.perf_counter()
        fxblur.transform(model, verbose=False)
        times.append(time.perf_counter() - start)
    return [{"model": args.model, "transform ms": statistics.median(times) * 1e3, "runs": len(times)}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", help="torchvision name (default resnet50)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--modes", nargs="+", default=["train", "inference"], choices=["train", "inference"])
    p.add_argument("--formats", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    p.add_argument("--variants", nargs="+", default=["plain", "fxblur", "fxblur-after", "composer"], choices=VARIANTS)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run (default cpu)")
    p.add_argument("--amp", action="store_true", help="autocast: bfloat16 on cpu, float16 on cuda")
    p.add_argument("--blur-last", action="store_true", help="the composer reference blurs after convs")
    p.add_argument("--compile", action="store_true", help="also time every variant under torch.compile")
    p.add_argument("--micro", action="store_true", help="only the blur op against a copy")
    p.add_argument("--transform-time", action="store_true", help="only the time fxblur.transform takes")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if "plain" not in args.variants:
        args.variants.insert(0, "plain")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda needs a CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    steady_allocator()
    if args.micro:
        rows = micro_benchmark(args)
    elif args.transform_time:
        rows = transform_time(args)
    else:
        rows = model_benchmark(args)
    env = {"torch": torch.__version__, "torchvision": torchvision.__version__, "threads": torch.get_num_threads()}
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    if args.json:
        print(json.dumps({"environment": env, "rows": rows}, indent=2))
    else:
        table = [{**row, DIFFERENCE: f"{row[DIFFERENCE]:.1e}"} if row.get(DIFFERENCE) else row for row in rows]
        columns = list(rows[0]) if rows else []
        as_written = [columns.index(DIFFERENCE)] if DIFFERENCE in columns else False  # not 0.000
        print(tabulate(table, headers="keys", floatfmt=".3f", disable_numparse=as_written))
        print(", ".join(f"{k} {v}" for k, v in env.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
