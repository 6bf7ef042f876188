"""A transformed model trains under DistributedDataParallel: 2 gloo processes on the loopback."""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fxblur

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 8
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def blurred_net() -> nn.Module:
    """The same transformed network in every process (no BatchNorm: its statistics are per process)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.GroupNorm(4, 32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return fxblur.transform(net, verbose=False)


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, 3, 24, 24, generator=generator)
        batches.append((x, torch.randint(0, 10, (GLOBAL_BATCH,), generator=generator)))
    return batches


def train(model: nn.Module, batches, rank: int = 0, world_size: int = 1) -> tuple[list[dict], dict]:
    """Three SGD steps; each rank takes its slice of the global batch. Gradients per step and final parameters."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads = []
    for x, y in batches:
        shard = slice(rank * len(x) // world_size, (rank + 1) * len(x) // world_size)
        optimizer.zero_grad()
        F.cross_entropy(model(x[shard]), y[shard]).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
    return grads, {name: p.detach().clone() for name, p in model.named_parameters()}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        torch.set_num_threads(1)
        model = DistributedDataParallel(blurred_net())
        grads, params = train(model, global_batches(), rank, WORLD_SIZE)
        strip = len("module.")
        torch.save(
            {
                "grads": [{name[strip:]: g for name, g in step.items()} for step in grads],
                "params": {name[strip:]: p for name, p in params.items()},
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_on_two_gloo_ranks_matches_a_single_process_run(tmp_path):
    context = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"DDP ranks did not finish within {TIMEOUT_S}s")
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    for name, value in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][name], value), name  # DDP keeps the replicas identical

    single = blurred_net()
    assert any(change.action != "skipped" for change in fxblur.changes(single))
    grads, params = train(single, global_batches())
    for step in range(STEPS):
        for name, grad in grads[step].items():
            for rank in ranks:
                torch.testing.assert_close(rank["grads"][step][name], grad, rtol=1e-5, atol=1e-6)
    for name, value in params.items():
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-5, atol=1e-6)
