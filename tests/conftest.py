"""Fixtures for every test, the hypothesis profiles and the threads of each worker; shared helpers live in support.py.

Hypothesis runs the ``ci`` profile by default (sized for the suite's time on two cores);
``--hypothesis-profile thorough`` runs ten times as many examples of every property.
Under pytest-xdist each worker runs torch on one thread, so that two workers share two
cores without oversubscribing them.
"""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=40, deadline=None)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile("ci")

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the groups into node ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of one parameter of a module-scoped fixture share a worker, so that it is built once."""
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        for name, definitions in item._fixtureinfo.name2fixturedefs.items():
            if params and name in params and definitions[-1].scope == "module":
                item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{name}={params[name]}"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
