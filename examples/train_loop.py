"""The BlurPool method card's functional training loop, with ``fxblur.transform``.

Composer's card rewrites the model in place and hands the optimizer to
``cf.apply_blurpool(model, optimizers=opt, ...)`` so that it can be fixed up. fxblur
returns a new model that shares the original's parameters, so the optimizer built
first trains it as it is; only the name ``model`` has to follow the new object.

The data is synthetic (a colour cast per class, under noise), so this runs in seconds
on a CPU and needs no download.

Run: python examples/train_loop.py [--epochs N] [--images N]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import fxblur


def training_loop(model: torch.nn.Module, train_loader: DataLoader, epochs: int = 10) -> torch.nn.Module:
    opt = torch.optim.Adam(model.parameters())

    # the optimizer built above keeps working: the rewrite shares model's parameters
    model = fxblur.transform(model, replace_convs=True, replace_maxpools=True, blur_first=True)

    loss_fn = F.cross_entropy
    model.train()

    for epoch in range(epochs):
        total = 0.0
        for X, y in train_loader:
            y_hat = model(X)
            loss = loss_fn(y_hat, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            total += loss.item()
        print(f"epoch {epoch + 1}: loss {total / len(train_loader):.4f}")
    return model


def colour_cast_images(count: int, classes: int = 3, size: int = 32, seed: int = 0) -> TensorDataset:
    """Noise images tinted towards one colour channel; the label is the channel."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (count,), generator=generator)
    images = torch.randn(count, 3, size, size, generator=generator)
    images[torch.arange(count), labels] += 0.5
    return TensorDataset(images, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--images", type=int, default=256, help="training images (and as many held out)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)  # random weights: nothing is downloaded
    train_loader = DataLoader(colour_cast_images(args.images), batch_size=32, shuffle=True)
    model = training_loop(model, train_loader, epochs=args.epochs)

    model.eval()
    images, labels = colour_cast_images(args.images, seed=1).tensors
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    print(f"held-out accuracy: {accuracy:.2f} (chance: 0.33)")


if __name__ == "__main__":
    main()
