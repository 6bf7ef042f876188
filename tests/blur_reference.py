"""The blur as its definition reads, in float64: the reference every implementation is tested against."""

from __future__ import annotations

import torch

PASCAL = {
    1: [1],
    2: [1, 1],
    3: [1, 2, 1],
    4: [1, 3, 3, 1],
    5: [1, 4, 6, 4, 1],
    6: [1, 5, 10, 10, 5, 1],
    7: [1, 6, 15, 20, 15, 6, 1],
}


def source_index(j: int, before: int, after: int, n: int, mode: str) -> int | None:
    """Which input sample padded position ``j`` holds (``None``: a zero)."""
    i = j - before
    if mode == "reflect" and max(before, after) >= n:
        mode = "replicate"  # documented fallback on maps too small to reflect (circular padding wraps around)
    if 0 <= i < n:
        return i
    if mode == "zeros":
        return None
    if mode == "replicate":
        return min(max(i, 0), n - 1)
    if mode == "reflect":
        return -i if i < 0 else 2 * (n - 1) - i
    return i % n


def reference_blur(x: torch.Tensor, stride, sizes, mode: str) -> torch.Tensor:
    """out[i] = sum_a f[a] * padded[i * s + a], one spatial axis at a time, in float64."""
    x = x.double()
    for axis, (s, k) in enumerate(zip(stride, sizes, strict=True)):
        dim = 2 + axis
        n = x.shape[dim]
        before, after = (k - 1) // 2, k - 1 - (k - 1) // 2
        taps = torch.tensor(PASCAL[k], dtype=torch.float64) / sum(PASCAL[k])
        outputs = (n + before + after - k) // s + 1
        slices = []
        for o in range(outputs):
            acc = torch.zeros_like(x.select(dim, 0))
            for a in range(k):
                source = source_index(o * s + a, before, after, n, mode)
                if source is not None:
                    acc = acc + taps[a] * x.select(dim, source)
            slices.append(acc)
        x = torch.stack(slices, dim)
    return x
