"""BlurPoolCallback in a real Trainer.fit: the network is rewritten before optimizers exist, and it learns."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fxblur

pl = pytest.importorskip("pytorch_lightning")
from fxblur.lightning import BlurPoolCallback  # noqa: E402  (needs pytorch_lightning)


def colour_cast_images(count: int, classes: int = 3, size: int = 16) -> TensorDataset:
    """Noise images tinted towards one colour channel; the label is the channel: learnable in a few steps."""
    labels = torch.randint(0, classes, (count,))
    images = torch.randn(count, 3, size, size)
    images[torch.arange(count), labels] += 1.0
    return TensorDataset(images, labels)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 3),
        )
        self.losses: list[float] = []
        self.models_given_to_optimizers: list[nn.Module] = []  # a list: not registered as a submodule

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self):
        self.models_given_to_optimizers.append(self.model)
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def trainer(**kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def test_trainer_fit_blurs_before_optimizers_and_the_loss_decreases():
    classifier = Classifier()
    keys = list(classifier.state_dict())
    original = classifier.model
    fit = trainer(max_steps=40, callbacks=[BlurPoolCallback("model", verbose=False)])
    fit.fit(classifier, DataLoader(colour_cast_images(320), batch_size=16, shuffle=True))

    blurred = classifier.model
    assert classifier.models_given_to_optimizers == [blurred]  # rewritten in setup, before
    assert {c.target: c.action for c in fxblur.changes(blurred)} == {"3": "blur_before", "4": "blur_before"}
    assert list(classifier.state_dict()) == keys  # checkpoints stay compatible
    assert blurred.get_submodule("4").weight is original[4].weight  # shared: the original trained too
    losses = classifier.losses
    assert len(losses) == 40
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10


def test_every_stage_sees_the_rewritten_model_once():
    classifier = Classifier()
    callback = BlurPoolCallback(verbose=False)
    callback.setup(None, classifier, "fit")
    blurred = classifier.model
    callback.setup(None, classifier, "validate")  # a rewritten network is left as it is
    assert classifier.model is blurred
    data = DataLoader(colour_cast_images(32), batch_size=16)
    classifier.validation_step = lambda batch, batch_idx: F.cross_entropy(classifier.model(batch[0]), batch[1])
    trainer(callbacks=[callback]).validate(classifier, data, verbose=False)
    assert classifier.model is blurred


def test_bad_options_and_missing_attributes_are_clear_errors():
    with pytest.raises(ValueError, match="filter_size"):
        BlurPoolCallback(filter_size=0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'blur_frist'"):
        BlurPoolCallback(blur_frist=False)
    assert BlurPoolCallback(concrete_args={"flag": True}).options == {"concrete_args": {"flag": True}}
    with pytest.raises(ValueError, match=r"Classifier\.backbone is NoneType, not a module"):
        BlurPoolCallback("backbone").setup(None, Classifier(), "fit")


def test_importing_fxblur_does_not_import_lightning():
    code = "import sys, fxblur; assert not {'pytorch_lightning', 'lightning'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
