"""pytest fixtures: a test Dagster instance. The data helpers live in fixtures.py (tests and bench import them)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The tests' temporary files live in memory (/dev/shm) where the machine has it. Every Dagster run commits its
# run records and events to SQLite, which syncs each commit to disk: on this project's machine a commit took
# ~9 ms and a connection's close ~5 ms on disk, a quarter of an in-process CLI test's time, and ~0 on tmpfs.
# What a test checks does not depend on it: a killed process loses nothing from either (the page cache
# survives it), and no test simulates a power cut. Set TMPDIR yourself (e.g. TMPDIR=/tmp) to choose the folder;
# child processes and xdist's workers inherit it. pytest's own temporary folders (tmp_path) follow TMPDIR.
MEMORY_TMP = Path("/dev/shm")
MEMORY_TMP_MIN_FREE = 4 << 30  # the whole suite writes well under 1 GiB; leave the rest of memory alone


def use_memory_for_temporary_files() -> None:
    """Point TMPDIR at /dev/shm when the user set none and it exists, is writable and has room."""
    if "TMPDIR" in os.environ or not (MEMORY_TMP.is_dir() and os.access(MEMORY_TMP, os.W_OK | os.X_OK)):
        return
    if shutil.disk_usage(MEMORY_TMP).free < MEMORY_TMP_MIN_FREE:
        return
    os.environ["TMPDIR"] = str(MEMORY_TMP)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


use_memory_for_temporary_files()

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
# The fast tier's longest modules follow (in `make test-fast` they come first), by their summed test times in a
# `make test-fast` run on 2026-12-08 (two workers, load ~20): stale_and_prefixed 499 s, files_per_shard 407,
# consistency 378, no_silent_results 295, pipeline 226, demo_data 187, incremental 145, operations 143, export
# 120, memory_budget 105, prune 98, library 81; user_errors and examples run child processes besides. Left in
# file order, test_stale_and_prefixed (the longest) would be handed out near the end of the fast tier.
LONGEST_FIRST = (
    DAEMON_GROUP,
    "semdedup_assets_tests/test_bench_smoke.py",
    "semdedup_assets_tests/test_faults.py",
    "semdedup_assets_tests/test_ray_engine.py",
    *(
        f"semdedup_assets_tests/{name}.py"
        for name in (
            "test_stale_and_prefixed",
            "test_files_per_shard",
            "test_consistency",
            "test_no_silent_results",
            "test_user_errors",
            "test_examples",
            "test_pipeline",
            "test_demo_data",
            "test_incremental",
            "test_operations",
            "test_export",
            "test_memory_budget",
            "test_prune",
            "test_library",
        )
    ),
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


# Test tiers (docs/testing.md), by what a test starts. `make test-fast` runs `-m "pure or dagster"`.
PURE, DAGSTER, SUBPROCESS, SERVERS = "pure", "dagster", "subprocess", "servers"
TIERS = (PURE, DAGSTER, SUBPROCESS, SERVERS)
FAST_TIERS = (PURE, DAGSTER)
# Whole modules whose tests start servers, daemons or Ray (`dg dev`, Postgres, moto, a Ray cluster, `make ui`,
# the bench scripts with Ray), and modules whose tests run the CLI or `dg` as subprocesses. Every other module
# is fast by default: core/ is pure, the rest in-process Dagster; a module that mixes tiers marks its exceptions
# (`@pytest.mark.subprocess`), and a mis-tiered test fails (fast_tier_guard below).
SERVER_MODULES = (*DAEMON_MODULES, "test_ray_engine", "test_ui", "test_bench_smoke")
SUBPROCESS_MODULES = (
    "test_cli",
    "test_cli_progress_status",
    "test_component",
    "test_catalog_readers",
    "test_faults",
    "test_bad_state",  # its module fixture `ran` runs the CLI
    "test_faults_robustness",
    "test_examples",  # each example runs the CLI (or a project's Definitions) in a child process
    "test_user_errors",  # the CLI with a closed pipe, as a user's shell runs it
)


def default_tier(item: pytest.Item) -> str:
    """The tier of a test that carries no tier mark: by its module, and by the Dagster instance it asks for."""
    path = Path(item.nodeid.split("::", 1)[0])
    if path.stem in SERVER_MODULES:
        return SERVERS
    if path.stem in SUBPROCESS_MODULES:
        return SUBPROCESS
    if path.parent.name == "core" and "instance" not in getattr(item, "fixturenames", ()):
        return PURE
    return DAGSTER


def tier_of(item: pytest.Item) -> str:
    """The closest tier mark of a test (its own before its module's), else default_tier."""
    for mark in item.iter_markers():
        if mark.name in TIERS:
            return mark.name
    return default_tier(item)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test gets its tier mark; then the longest groups first (a stable sort keeps the order within one)."""
    for item in items:
        if not any(mark.name in TIERS for mark in item.iter_markers()):
            item.add_marker(default_tier(item))
    rank = {g: i for i, g in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(suite_group(it.nodeid), len(rank)))


# The fast tier checks itself: while a pure or in-process Dagster test is set up or runs, starting a process
# (subprocess.Popen, which subprocess.run and asyncio use too, os.system, os.posix_spawn) fails that test.
# An audit hook sees every such start, also one made by a library or one whose error the code swallows.
# Allowed: multiprocessing and os.fork (the code under test's own worker pools, e.g. core/run/parallel.py): they
# start no program; and the two helpers with which Dagster's in-process execution captures a step's output
# (dagster/_core/execution/compute_logs.py): `tail -F <...compute_logs/...>` and its watch_orphans.py, part
# of in-process Dagster, not a program under test. Teardown is not checked: a module's fixtures are torn
# down after its last test, whatever that test's tier.
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.posix_spawn", "os.spawn", "os.exec"})
# Short system probes that libraries run while loading (ctypes.util.find_library runs `ldconfig -p`; matplotlib
# runs `fc-list` once per machine, when it builds its font cache: on a fresh machine inside the first plot).
LIBRARY_PROBES = frozenset({"ldconfig", "uname", "fc-list"})


def allowed_in_fast_tier(event: str, args: tuple[object, ...]) -> bool:
    """The starts allowed: a library's system probe, Dagster's compute-log capture (`tail -F`, watch_orphans.py)."""
    if event != "subprocess.Popen" or len(args) < 2 or not isinstance(args[1], (list, tuple)):
        return False
    argv = [str(a) for a in args[1]]
    if argv and Path(argv[0]).name in LIBRARY_PROBES:
        return True
    tail = argv[:2] == ["tail", "-F"] and "compute_logs" in argv[-1]
    watch = len(argv) > 1 and argv[1].replace("\\", "/").endswith("dagster/_core/execution/scripts/watch_orphans.py")
    return tail or watch


class StartedAProcess(RuntimeError):
    """A fast-tier test started a process: it belongs in the subprocess or servers tier."""


class FastTierGuard:
    """The audit hook's state: the fast-tier test now running (None outside one) and what it started."""

    current: str | None = None
    started: list[str] = []  # noqa: RUF012  one guard per process: a class used as a namespace

    @classmethod
    def audit(cls, event: str, args: tuple[object, ...]) -> None:
        if cls.current is None or event not in PROCESS_EVENTS or allowed_in_fast_tier(event, args):
            return
        what = f"{event}{args[:2]!r}"
        cls.started.append(what)
        raise StartedAProcess(
            f"{cls.current} is in the fast tier but started a process: {what}. "
            f"Mark it @pytest.mark.{SUBPROCESS} (or {SERVERS}); see docs/testing.md"
        )


sys.addaudithook(FastTierGuard.audit)  # at import: an audit hook cannot be removed, so one for the session


def guarded(item: pytest.Item) -> Iterator[None]:
    """Run one phase of a test under the guard when the test is in the fast tier; fail it if it started a process."""
    if tier_of(item) not in FAST_TIERS:
        return (yield)
    FastTierGuard.current, FastTierGuard.started = item.nodeid, []
    try:
        result = yield
    finally:
        FastTierGuard.current = None
    if FastTierGuard.started:
        pytest.fail(f"fast-tier test started a process: {FastTierGuard.started[0]} (mark it {SUBPROCESS} or {SERVERS})")
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    return (yield from guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    return (yield from guarded(item))


NO_COMPUTE_LOGS = {
    "compute_logs": {"module": "dagster._core.storage.noop_compute_log_manager", "class": "NoOpComputeLogManager"}
}


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """An ephemeral-directory Dagster instance (a temporary DAGSTER_HOME), without compute-log capture.

    Its default compute-log manager starts two `tail -F` and two Python `watch_orphans.py` processes for every
    step of every run, and no test reads a step's captured output.
    """
    with dg.instance_for_test(overrides=NO_COMPUTE_LOGS) as inst:
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
