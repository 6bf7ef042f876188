"""Fixtures for every test; shared helpers live in support.py."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
