"""pytest fixtures: a test Dagster instance. The data helpers live in fixtures.py (tests and bench import them)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import dagster as dg
import pytest

# Names the tests imported from here before the helpers moved to fixtures.py.
from semdedup_assets_tests.fixtures import (BASE_SENTENCES, NEAR_COPIES, make_planted,  # noqa: F401
                                            text_rows, write_embedding_shards, write_text_shards)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """An ephemeral-directory Dagster instance (a temporary DAGSTER_HOME)."""
    with dg.instance_for_test() as inst:
        yield inst
