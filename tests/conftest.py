"""pytest hooks and fixtures; the shared helpers live in tests/fixtures.py."""

from __future__ import annotations

import pytest

from tests.fixtures import ROOT, run_cli, tiny_model_cfg  # noqa: F401 (re-exported)


@pytest.fixture
def cfg():
    return tiny_model_cfg()


# The longest tests (minutes on 2 cores) start first, so `pytest -n 2` does not end with
# one worker running a long test alone.
LONG_FIRST = ("test_adam8bit_within_2_percent_of_adamw_every_logged_step_tiny_config",
              "test_walkthrough_runs_verbatim", "test_ablation_grid_runs_tabulates_and_resumes")


def pytest_collection_modifyitems(config, items):
    del config
    items.sort(key=lambda item: item.name not in LONG_FIRST)  # stable: others keep order
