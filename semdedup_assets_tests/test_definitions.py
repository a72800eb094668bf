"""The Definitions load, and `dagster definitions validate` accepts the workspace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.definitions import build_definitions, load_definitions

REPO = Path(__file__).resolve().parents[1]
ASSETS = {
    "raw_shards",
    "embeddings",
    "centroids",
    "cluster_assignments",
    "semantic_duplicates",
    "keep_lists",
    "deduplicated",
    "contaminated",
    "pruned_prototypes",
    "pruned_d4",
    "pruned_dbp",
    "pruned_outliers",
    "pruned_representatives",
    "robustness",
}


def test_definitions_load(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SEMDEDUP_STORAGE", str(tmp_path))
    defs = load_definitions()
    dg.Definitions.validate_loadable(defs)
    keys = {spec.key.to_user_string() for spec in defs.resolve_all_asset_specs()}
    assert keys == ASSETS
    # Each job covers one partitioning of the graph: its assets, and their partitions.
    jobs = {}
    for name in (
        "ingest_job",
        "centroids_job",
        "assign_job",
        "dedup_job",
        "keep_lists_job",
        "export_job",
        "prune_job",
        "robustness_job",
    ):
        job = defs.resolve_job_def(name)
        partitions = job.partitions_def
        jobs[name] = (
            sorted(k.to_user_string() for k in job.asset_layer.selected_asset_keys),
            partitions.name
            if isinstance(partitions, dg.DynamicPartitionsDefinition)
            else partitions and partitions.get_partition_keys(),
        )
    buckets = defs.resolve_assets_def("semantic_duplicates").partitions_def.get_partition_keys()
    assert jobs == {
        "ingest_job": (["embeddings", "raw_shards"], "shards"),
        "centroids_job": (["centroids"], None),
        "assign_job": (["cluster_assignments"], "shards"),
        "dedup_job": (["semantic_duplicates"], buckets),
        "keep_lists_job": (["contaminated", "keep_lists"], None),
        "export_job": (["deduplicated"], "shards"),
        "prune_job": (
            ["pruned_d4", "pruned_dbp", "pruned_outliers", "pruned_prototypes", "pruned_representatives"],
            None,
        ),
        "robustness_job": (["robustness"], None),
    }
    with pytest.raises(dg.DagsterInvariantViolationError, match="Could not find job"):
        defs.resolve_job_def("no_such_job")
    for sensor in ("shard_sensor", "bucket_sensor", "automation_sensor"):
        assert defs.resolve_sensor_def(sensor).default_status == dg.DefaultSensorStatus.STOPPED
    assert defs.resolve_schedule_def("retrain_centroids_schedule").cron_schedule == "0 3 * * 0"


def test_the_code_locations_steps_fork_from_a_forkserver_and_the_launchpad_keeps_its_choices(
    tmp_path: Path, monkeypatch
) -> None:
    """Every job of the code location (the asset job too) starts its steps from a forkserver unless the run
    config picks a start method; `in_process` and the other executor options of Dagster's default stay valid."""
    from dagster._core.system_config.objects import ResolvedRunConfig

    monkeypatch.setenv("SEMDEDUP_STORAGE", str(tmp_path))
    defs = load_definitions()
    for name in ("ingest_job", "dedup_job", "__ASSET_JOB"):
        job = defs.resolve_job_def(name)

        def engine(config: dict | None, job=job) -> dict:
            return ResolvedRunConfig.build(
                job, {"execution": {"config": config}} if config else {}
            ).execution.execution_engine_config

        forkserver = {
            "forkserver": {
                "preload_modules": [
                    "semdedup_assets.definitions",
                    "dagster._utils.test",
                    "matplotlib.backends.backend_agg",
                ]
            }
        }
        assert engine(None)["multiprocess"]["start_method"] == forkserver, name
        assert engine({"multiprocess": {"max_concurrent": 2}})["multiprocess"] == {
            "max_concurrent": 2,
            "start_method": forkserver,
            "retries": {"enabled": {}},
        }
        assert engine({"multiprocess": {"start_method": {"spawn": {}}}})["multiprocess"]["start_method"] == {
            "spawn": {}
        }
        assert set(engine({"in_process": {}})) == {"in_process"}
    # A user's project with the component keeps Dagster's default (its own executor, if any, is not overridden).
    plain = build_definitions(Settings(storage=str(tmp_path))).resolve_job_def("ingest_job")
    assert "start_method" not in ResolvedRunConfig.build(plain, {}).execution.execution_engine_config["multiprocess"]


@pytest.mark.subprocess
def test_the_code_location_and_the_cli_load_without_torch(tmp_path: Path) -> None:
    """Loading the code location (each run worker, step forkserver and code server does) and the CLI imports
    no torch: it costs ~2 s and ~500 MB per process, and only the stages that run a model or the pairwise rule
    need it (they import it when they run)."""
    probe = (
        "import sys, semdedup_assets.definitions as d, semdedup_assets.cli, semdedup_assets.core.dedup.buckets, "
        "semdedup_assets.core.select.decontaminate; d.load_definitions(); "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMDEDUP_")}
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "SEMDEDUP_STORAGE": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]


def test_graph_shape_pools_and_partitions() -> None:
    d = build_definitions(Settings(storage="/tmp/unused", buckets=5))
    graph = d.resolve_asset_graph()
    parents = {
        k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys} for k in graph.get_all_asset_keys()
    }
    assert parents == {
        "raw_shards": set(),
        "embeddings": {"raw_shards"},
        "centroids": {"embeddings"},
        "cluster_assignments": {"embeddings", "centroids"},
        "semantic_duplicates": {"cluster_assignments"},
        "keep_lists": {"semantic_duplicates"},
        "deduplicated": {
            "keep_lists",
            "contaminated",
            "pruned_prototypes",
            "pruned_d4",
            "pruned_dbp",
            "pruned_outliers",
            "pruned_representatives",
        },
        "contaminated": {"embeddings"},
        "pruned_prototypes": {"keep_lists"},
        "pruned_d4": {"keep_lists"},
        "pruned_dbp": {"keep_lists"},
        "pruned_outliers": {"keep_lists"},
        "pruned_representatives": {"keep_lists"},
        "robustness": {"keep_lists"},
    }
    sd = d.resolve_assets_def("semantic_duplicates")
    assert sd.partitions_def.get_partition_keys() == ["000", "001", "002", "003", "004"]
    for key in ("embeddings", "centroids", "semantic_duplicates"):
        node = graph.get(dg.AssetKey(key))
        assert node.pools == {"gpu"}, key
    assert isinstance(d.resolve_assets_def("raw_shards").partitions_def, dg.DynamicPartitionsDefinition)


def test_backfill_batch_comes_from_the_settings() -> None:
    batches = {}
    for batch in (64, 7):
        d = build_definitions(Settings(storage="/tmp/unused", backfill_batch=batch))
        batches[batch] = {
            key: d.resolve_assets_def(key).backfill_policy.max_partitions_per_run
            for key in ("raw_shards", "embeddings", "cluster_assignments")
        }
    assert batches == {b: dict.fromkeys(("raw_shards", "embeddings", "cluster_assignments"), b) for b in (64, 7)}


@pytest.mark.subprocess
def test_dagster_cli_validates_workspace(tmp_path: Path) -> None:
    env = dict(os.environ, SEMDEDUP_STORAGE=str(tmp_path / "storage"), DAGSTER_HOME=str(tmp_path))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Validation successful" in proc.stdout + proc.stderr


@pytest.mark.subprocess
def test_dg_check_and_list_defs_in_the_project(tmp_path: Path) -> None:
    """`dg` finds the code location through pyproject's [tool.dg] (the same Definitions as workspace.yaml)."""
    env = dict(
        os.environ, SEMDEDUP_STORAGE=str(tmp_path / "storage"), DAGSTER_HOME=str(tmp_path), VIRTUAL_ENV=sys.prefix
    )
    dg_bin = str(Path(sys.executable).parent / "dg")
    checked = subprocess.run([dg_bin, "check", "defs"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = checked.stdout + checked.stderr
    assert checked.returncode == 0 and "All definitions loaded successfully" in out, out
    listed = subprocess.run(
        [dg_bin, "list", "defs", "--json"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert {a["asset_key"] for a in data["assets"]} == ASSETS
    assert {"ingest_job", "pipeline_job"} <= {j["name"] for j in data["jobs"]}
    for text in (out, listed.stderr):
        assert "SupersessionWarning" not in text and "BetaWarning" not in text, text
