"""fxblur.composer's BlurPool in a Composer Trainer, against Composer's own BlurPool.

Composer pins a torch of its own, so these tests run in its environment
(``tools/composer_check.sh``); elsewhere only the missing-install error is checked.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torchvision
from torch import nn

import fxblur

if importlib.util.find_spec("composer") is None:

    def test_importing_without_composer_names_the_install():
        with pytest.raises(ImportError, match="pip install mosaicml"):
            import fxblur.composer  # noqa: F401

else:
    from composer import Callback, Trainer
    from composer.algorithms import BlurPool as ComposerBlurPool
    from composer.algorithms.blurpool import BlurConv2d, BlurMaxPool2d
    from composer.functional import apply_blurpool as composer_apply_blurpool
    from composer.models import ComposerClassifier
    from composer.utils import module_surgery
    from torch.utils.data import DataLoader, TensorDataset

    from fxblur.composer import BlurPool, layer_counts

    class LossLog(Callback):
        def __init__(self) -> None:
            self.losses: list[float] = []

        def batch_end(self, state, logger) -> None:
            self.losses.append(float(state.loss))

    class FakeState:
        """The two attributes of Composer's State that BlurPool reads."""

        def __init__(self, model: nn.Module) -> None:
            self.model, self.optimizers = model, ()

    class FakeLogger:
        def __init__(self) -> None:
            self.logged: list[dict] = []

        def log_hyperparameters(self, values: dict) -> None:
            self.logged.append(values)

    def train(algorithm, batches: int = 8):
        torch.manual_seed(0)
        model = ComposerClassifier(torchvision.models.resnet18(num_classes=4), num_classes=4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # built before the rewrite, as users do
        data = TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 4)  # one batch, seen every step
        losses = LossLog()
        trainer = Trainer(
            model=model,
            train_dataloader=DataLoader(data, batch_size=8),
            optimizers=optimizer,
            max_duration=f"{batches}ba",
            algorithms=[algorithm],
            callbacks=[losses],
            device="cpu",
            progress_bar=False,
            log_to_console=False,
            loggers=[],
        )
        trainer.fit()
        return trainer, optimizer, losses.losses

    def test_the_trainer_trains_the_rewrite():
        trainer, optimizer, losses = train(BlurPool())
        network = trainer.state.model.module
        blurred = {c.target for c in fxblur.changes(network) if c.action != "skipped"}
        assert "maxpool" in blurred and "layer2.0.conv1" in blurred
        held = {id(p) for p in network.parameters()}
        assert all(id(p) in held for group in optimizer.param_groups for p in group["params"])
        assert losses[-1] < 0.5 * losses[0]  # one batch over and over: the rewrite learns it

    def test_outputs_equal_composer_blurpool():
        torch.manual_seed(0)
        for build in (torchvision.models.resnet50, torchvision.models.mobilenet_v3_small):
            model = build().eval()
            reference = copy.deepcopy(model)
            composer_apply_blurpool(reference)
            rewritten = fxblur.apply_blurpool(model)
            x = torch.randn(2, 3, 64, 64)
            torch.testing.assert_close(rewritten(x), reference(x), rtol=1e-4, atol=1e-5)
            expected = {
                "blurpool/num_blurpool_layers": module_surgery.count_module_instances(reference, BlurMaxPool2d),
                "blurpool/num_blurconv_layers": module_surgery.count_module_instances(reference, BlurConv2d),
            }
            assert layer_counts(rewritten) == expected

    def test_arguments_and_repr_are_composers():
        ours, theirs = BlurPool(blur_first=False, min_channels=8), ComposerBlurPool(blur_first=False, min_channels=8)
        assert repr(ours) == repr(theirs)
        with pytest.raises(ValueError, match="both False"):
            BlurPool(replace_convs=False, replace_maxpools=False)
        with pytest.raises(ValueError):
            BlurPool(filter_size=0)  # fxblur's options are checked when the algorithm is made

    def test_a_model_without_a_known_network_attribute_is_a_clear_error():
        class Wrapped(ComposerClassifier):
            def __init__(self):
                super().__init__(torchvision.models.resnet18(num_classes=4), num_classes=4)
                self.net = self.module
                del self.module

            def forward(self, batch):
                return self.net(batch[0])

        state = FakeState(Wrapped())
        with pytest.raises(ValueError, match=r"no network at module or model: name the attribute"):
            BlurPool().apply(None, state, FakeLogger())
        BlurPool(attribute="net").apply(None, state, FakeLogger())
        assert fxblur.changes(state.model.net)

    def test_the_network_is_rewritten_once():
        model = ComposerClassifier(nn.Sequential(nn.Conv2d(16, 16, 3, 2, 1)), num_classes=4)
        state, logger = FakeState(model), FakeLogger()
        BlurPool().apply(None, state, logger)
        first = state.model.module
        BlurPool().apply(None, state, logger)
        assert state.model.module is first
        assert logger.logged == [{"blurpool/num_blurpool_layers": 0, "blurpool/num_blurconv_layers": 1}]
