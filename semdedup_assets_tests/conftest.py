"""pytest fixtures: a test Dagster instance. The data helpers live in fixtures.py (tests and bench import them)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# `make test` runs the suite on two pytest-xdist workers (`-n 2 --dist loadgroup --no-loadscope-reorder`),
# scheduled here by group: a test module is one group, so its module-scoped fixtures (a pipeline
# run, a distilled model, servers) are built once, on one worker. The modules that start `dg dev`
# with its daemon, or a Postgres cluster and moto, share one group: they run one after another,
# never two daemons at once, since their waits are the suite's most load-sensitive.
# (xdist's own loadgroup puts the group into `item._nodeid`, which pytest 9 no longer reads, so
# its xdist_group marks group nothing; pytest_xdist_make_scheduler is xdist's hook for a scheduler.)
DAEMON_MODULES = ("test_deploy", "test_webserver", "test_ray_launcher")
DAEMON_GROUP = "daemons"
# Longest groups first (measured), so that the two workers end close together: the groups are
# handed out in the order of their first test.
LONGEST_FIRST = (
    DAEMON_GROUP,
    "semdedup_assets_tests/test_bench_smoke.py",
    "semdedup_assets_tests/test_faults.py",
    "semdedup_assets_tests/test_ray_engine.py",
)


def suite_group(nodeid: str) -> str:
    """The worker group of a test: the daemon group for the daemon/server modules, else its module file."""
    path = nodeid.split("::", 1)[0]
    return DAEMON_GROUP if Path(path).stem in DAEMON_MODULES else path


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without pytest-xdist installed pytest never calls it
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object | None:
    """`--dist loadgroup`: xdist's scope scheduler, with suite_group as the scope of each test."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SuiteGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return suite_group(nodeid)

    return SuiteGroups(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest groups first; the order within a group is kept (a stable sort)."""
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(suite_group(it.nodeid), len(rank)))


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
