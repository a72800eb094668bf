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


@pytest.fixture(autouse=True)
def _no_dagster_state_storage_from_an_earlier_test() -> Iterator[None]:
    """Each test resolves definitions with no defs state, whatever earlier tests left behind.

    Entering a DagsterInstance sets a process-wide context variable (`DefsStateStorage.get()`) that a
    new `DefinitionsLoadContext` reads when `Definitions` are resolved. In the full suite it was once
    left pointing at the storage of an instance whose temporary folder was gone, so later tests failed
    with "unable to open database file" / "undefined DagsterInstance weakref" (CI of 5d9ef01, and once
    mid-test in a subset: which test leaves it was not found). Our definitions hold no state-backed
    components, so each test gets a load context without defs state, made before anything can leak.
    """
    from dagster._core.definitions.definitions_load_context import DefinitionsLoadContext, DefinitionsLoadType
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    previous = DefinitionsLoadContext._instance
    with set_defs_state_storage(None):
        DefinitionsLoadContext.set(DefinitionsLoadContext(load_type=DefinitionsLoadType.INITIALIZATION))
        try:
            yield
        finally:
            DefinitionsLoadContext._instance = previous
