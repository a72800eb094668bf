"""A SIGKILL inside the `robustness` step of a real `semdedup sweep`, then the re-run (as test_faults.py).

The kill is placed by waiting for the step's own log line, never by timing, and the test
checks that it landed inside the step (its run still STARTED). The re-run must then leave
robustness files byte-identical to an uninterrupted computation from the same storages,
no temporary file, and storages that `semdedup verify` finds clean.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import dagster as dg

from semdedup_assets.core.select.robustness import ROBUSTNESS, build_robustness
from semdedup_assets.core.settings_store import load_settings
from semdedup_assets_tests.fixtures import write_embedding_shards
from semdedup_assets_tests.test_faults import Child, instance_of

# Printed by core.select.robustness.build_robustness once the comparison is made: the plot and the writes follow.
KILL_LINE = r"robustness: \d+ items, \d+ eps: drawing the eps curves"


def _sweep(input_dir: Path, root: Path) -> Child:
    return Child(
        "sweep",
        "-v",
        "--input",
        str(input_dir),
        "--storage",
        str(root),
        "--modality",
        "embedding",
        "--clusters",
        "3,12",
        "--eps",
        "0.01,0.1",
        "--buckets",
        "2",
    )


def _robustness_files(storage: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((storage / ROBUSTNESS).iterdir())}


def _robustness_runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(filters=dg.RunsFilter(job_name="robustness_job")))


def test_sigkill_inside_robustness_then_rerun_is_byte_identical(tmp_path: Path) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=100, d=8, dup_every=5)
    root = tmp_path / "S"
    first = root / "k=3"  # the sweep materializes `robustness` in its first sub-storage
    child = _sweep(tmp_path / "input", root)
    child.wait_for(KILL_LINE)
    child.signal(signal.SIGKILL)
    child.wait()

    [killed] = _robustness_runs(instance_of(first))
    assert killed.status == dg.DagsterRunStatus.STARTED  # the kill landed inside the step

    rerun = _sweep(tmp_path / "input", root)
    assert rerun.wait() == 0, rerun.output
    assert f"run {killed.run_id}" in rerun.output and "is gone" in rerun.output
    instance = instance_of(first)
    assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
    assert [r.status for r in _robustness_runs(instance)] == [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
    assert not instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED]))

    after = _robustness_files(first)
    assert sorted(after) == ["configurations.parquet", "eps_curves.png", "pairs.parquet"]  # no temporary file
    assert not list(root.rglob(".*.tmp"))
    # An uninterrupted computation from the same storages writes the same bytes.
    shutil.rmtree(first / ROBUSTNESS)
    build_robustness(load_settings(str(first)))
    assert _robustness_files(first) == after
    for sub in (first, root / "k=12"):
        verify = Child("verify", "--storage", str(sub))
        assert verify.wait() == 0, verify.output
