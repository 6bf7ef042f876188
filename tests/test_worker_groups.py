"""The suite's time rests on tests that share an expensive fixture running in one xdist worker."""

import os

import pytest


@pytest.mark.xdist_group("worker_groups")
def test_grouped_tests_reach_the_scheduler_as_a_group(request):
    if os.environ.get("PYTEST_XDIST_WORKER") is None or not getattr(request.config.option, "loadgroup", False):
        pytest.skip("runs under pytest-xdist's loadgroup scheduling (the suite's default)")
    # the scheduler sends tests whose node ids share the "@group" suffix to one worker
    assert request.node.nodeid.endswith("@worker_groups")


def test_parameters_of_a_module_scoped_fixture_share_a_group(request):
    items = [
        item
        for item in request.session.items
        if "test_compat.py::" in item.nodeid and "pair" in item.fixturenames and "[resnet50" in item.nodeid
    ]
    if not items:
        pytest.skip("test_compat.py is not in this run")
    groups = {tuple(mark.args) for item in items for mark in item.iter_markers("xdist_group")}
    assert groups == {("test_compat.pair=resnet50",)}
