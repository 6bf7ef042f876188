"""A transformed model trains under DistributedDataParallel and FSDP2: 2 gloo processes on the loopback."""

from __future__ import annotations

import contextlib
import io
import logging
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
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.resnet import BasicBlock

import fxblur
from support import needs_torch

WORLD_SIZE = 2
STEPS = 3
GLOBAL_BATCH = 8
TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def blurred_net(options: dict) -> nn.Module:
    """The same transformed network in every process (no BatchNorm: its statistics are per process)."""
    return fxblur.transform(plain_net(), verbose=False, **options)


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
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


def blurred_resnet() -> nn.Module:
    """ResNet-18 rewritten by fxblur, in eval mode: BatchNorm statistics are not per process."""
    torch.manual_seed(0)
    return fxblur.transform(torchvision.models.resnet18(num_classes=10), past_nonlinearity=True, verbose=False).eval()


def global_batches(steps: int = STEPS, size: int = 24) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(steps):
        x = torch.randn(GLOBAL_BATCH, 3, size, size, generator=generator)
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


def _connect(rank: int, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    torch.set_num_threads(1)


def _published(options: dict) -> tuple[str, list[str]]:
    """What a verbose rewrite prints, and what it logs to the ``fxblur`` logger, in this process."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("fxblur")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            fxblur.transform(plain_net(), **options)
    finally:
        logger.removeHandler(handler)
    return printed.getvalue(), records


def _ddp_worker(rank: int, port: int, out: str, options: dict) -> None:
    _connect(rank, port)
    try:
        printed, logged = _published(options)
        model = DistributedDataParallel(blurred_net(options))
        grads, params = train(model, global_batches(), rank, WORLD_SIZE)
        strip = len("module.")
        torch.save(
            {
                "grads": [{name[strip:]: g for name, g in step.items()} for step in grads],
                "params": {name[strip:]: p for name, p in params.items()},
                "printed": printed,
                "logged": logged,
            },
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _connect(rank, port)
    try:
        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        model = blurred_resnet()
        for module in model.modules():  # the standard recipe: every block, then the root
            if isinstance(module, BasicBlock):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in global_batches(steps=2, size=32):
            shard = slice(rank * len(x) // WORLD_SIZE, (rank + 1) * len(x) // WORLD_SIZE)
            optimizer.zero_grad()
            F.cross_entropy(model(x[shard]), y[shard]).backward()
            optimizer.step()
        params = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
        torch.save({"params": params}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(worker, tmp_path: Path, *args) -> list[dict]:
    context = mp.start_processes(
        worker, args=(_free_port(), str(tmp_path), *args), nprocs=WORLD_SIZE, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"ranks did not finish within {TIMEOUT_S}s")
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("options", [{}, {"polyphase": True}], ids=["blur", "polyphase"])
def test_ddp_on_two_gloo_ranks_matches_a_single_process_run(tmp_path, options):
    ranks = _run_ranks(_ddp_worker, tmp_path, options)  # polyphase: each sample's phase is its own

    for name, value in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][name], value), name  # DDP keeps the replicas identical
    report = str(fxblur.report(blurred_net(options)))
    assert (ranks[0]["printed"], ranks[0]["logged"]) == (report + "\n", [report])  # rank 0 speaks for the job
    assert (ranks[1]["printed"], ranks[1]["logged"]) == ("", [])

    single = blurred_net(options)
    assert any(change.action != "skipped" for change in fxblur.changes(single))
    grads, params = train(single, global_batches())
    for step in range(STEPS):
        for name, grad in grads[step].items():
            for rank in ranks:
                torch.testing.assert_close(rank["grads"][step][name], grad, rtol=1e-5, atol=1e-6)
    for name, value in params.items():
        torch.testing.assert_close(ranks[0]["params"][name], value, rtol=1e-5, atol=1e-6)


@needs_torch((2, 6), "torch.distributed.fsdp.fully_shard on CPU (torch 2.4.1's FSDP2 initialises CUDA)")
def test_fsdp2_sharding_every_block_matches_a_single_process_run(tmp_path):
    ranks = _run_ranks(_fsdp_worker, tmp_path)
    single = blurred_resnet()
    assert isinstance(single.layer2[0], BasicBlock) and isinstance(single.layer2[0], torch.fx.GraphModule)
    _, params = train(single, global_batches(steps=2, size=32))
    for name, value in params.items():
        for rank in ranks:
            torch.testing.assert_close(rank["params"][name], value, rtol=1e-4, atol=1e-4)
