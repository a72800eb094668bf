"""The platform for real: `dagster dev` (webserver + daemon) in a subprocess, GraphQL, and a browser.

Each test starts its own `dagster dev` on a free port with a temporary DAGSTER_HOME,
storage and landing folder (bring-your-own embeddings: no model), and always kills its
whole process group at the end. Screenshots and the `dagster dev` logs go to
`test-artifacts/` at the repository root.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.cluster.assign import touched_buckets
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.io.storage import Storage
from semdedup_assets.instance import ensure_instance_config
from semdedup_assets_tests.fixtures import write_embedding_shards
from semdedup_assets_tests.webserver import (
    BACKFILL_QUERY,
    FAILED,
    FINISHED,
    LAUNCH_BACKFILL,
    PARTITION_STATUS_QUERY,
    REPO,
    TEST_DAEMON_LOOP_S,
    DagsterDev,
    dagster_dev,
    describe_runs,
    platform_env,
    run_partitions,
    runs,
)

ARTIFACTS = REPO / "test-artifacts"
ASSETS = ("raw_shards", "embeddings", "centroids", "cluster_assignments", "semantic_duplicates", "keep_lists")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _log_path(name: str) -> Path:
    """Where a test's `dagster dev` log goes (kept after the test, for CI artifacts)."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS / f"{name}-dagster-dev.log"


def _register_shards(home: str, keys: list[str]) -> None:
    """Add `shards` partitions in the instance at DAGSTER_HOME=home, before the server starts."""
    ensure_instance_config(home)
    with dg.DagsterInstance.from_config(home) as instance:
        instance.add_dynamic_partitions("shards", keys)


def _in_range(run: dict, key: str) -> bool:
    """Whether a run's partition (or partition range) covers a shard key (keys sort as registered here)."""
    tags = run["tags"]
    if "dagster/partition" in tags:
        return tags["dagster/partition"] == key
    start, end = tags.get("dagster/asset_partition_range_start"), tags.get("dagster/asset_partition_range_end")
    return bool(start) and start <= key <= end


def _fail_on_failed_runs(dev: DagsterDev) -> list[dict]:
    """All runs; raises (at once, in a poll) when one of them failed or was canceled."""
    all_runs = runs(dev)
    failed = [r for r in all_runs if r["status"] in FAILED]
    assert not failed, f"run(s) failed: {[(r['runId'], r['jobName'], run_partitions(r)) for r in failed]}"
    return all_runs


# --------------------------------------------------------------------------------------
# 1. Sensors and automation in the real daemon: a shard dropped into the landing folder
#    flows through ingest, assignment, the touched buckets and the keep-lists.
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(480)
def test_daemon_flow_new_shard_reaches_catalog(tmp_path: Path) -> None:
    env = platform_env(tmp_path, sensors=True, interval=5)
    landing, staging = tmp_path / "landing", tmp_path / "staging"
    write_embedding_shards(staging, n_shards=3, per_shard=100, d=16, dup_every=10)
    landing.mkdir()
    for key in ("part-00", "part-01"):
        shutil.move(staging / f"{key}.parquet", landing / f"{key}.parquet")

    # The initial full pipeline, in-process, on the same storage and DAGSTER_HOME.
    ensure_instance_config(env["DAGSTER_HOME"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "semdedup_assets.cli",
            "run",
            "--input",
            str(landing),
            "--storage",
            env["SEMDEDUP_STORAGE"],
            "--modality",
            "embedding",
            "--clusters",
            "4",
            "--buckets",
            "2",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    storage = Storage(env["SEMDEDUP_STORAGE"])
    assert query(storage, "SELECT count(*) FROM items")[1] == [(200,)]

    with dagster_dev(env, _log_path("daemon-flow"), daemon_loop_s=TEST_DAEMON_LOOP_S) as dev:
        dropped = time.time()
        # A new shard lands (renamed into place, as an uploader would).
        os.replace(staging / "part-02.parquet", landing / "part-02.parquet")

        def settled() -> bool:
            all_runs = _fail_on_failed_runs(dev)
            if any(r["status"] not in FINISHED for r in all_runs):
                return False  # work in flight: don't touch the catalog yet
            if not any(
                r["tags"].get("dagster/sensor_name") == "automation_sensor"
                and "keep_lists" in r["assets"]
                and r["status"] == "SUCCESS"
                for r in all_runs
            ):
                return False
            _, [(new, total)] = query(storage, "SELECT count(*) FILTER (shard = 'part-02'), count(*) FROM items")
            _, curve = query(storage, "SELECT DISTINCT kept + removed FROM eps_curve")
            return new == 100 and total == 300 and curve == [(300,)]

        dev.wait_for(
            "part-02 to reach the catalog and the keep-lists",
            settled,
            timeout=300,
            interval=3,
            describe=lambda: describe_runs(dev),
        )
        elapsed = time.time() - dropped
        all_runs = runs(dev)
        print(f"\nnew shard -> catalog in {elapsed:.0f} s; runs:\n{describe_runs(dev)}")

    def launched(by: str, target: str, key: str | None = None) -> list[dict]:
        """Successful runs a sensor launched of a job, or (automation: asset selections) of an asset."""
        return [
            r
            for r in all_runs
            if r["tags"].get("dagster/sensor_name") == by
            and r["status"] == "SUCCESS"
            and (r["jobName"] == target or target in r["assets"])
            and (key is None or _in_range(r, key))
        ]

    # shard_sensor registered the partition and launched ingest_job (raw_shards + embeddings) for it.
    # (On its first tick, with an empty cursor, it also re-requests ingest_job for part-00 and part-01,
    # which `semdedup run` already ingested; that extra work is tolerated, not asserted, here.)
    assert launched("shard_sensor", "ingest_job", "part-02")
    # Automation (eager) assigned the new shard to the existing centroids, without re-training them.
    assert launched("automation_sensor", "cluster_assignments", "part-02"), "no automated assignment of part-02"
    assert not [
        r
        for r in all_runs
        if r["tags"].get("dagster/sensor_name") and ("centroids" in r["assets"] or r["jobName"] == "centroids_job")
    ]
    # bucket_sensor re-ran (at least) every bucket the new shard's items entered, as dedup_job runs.
    clusters = pq.read_table(
        tmp_path / "storage" / "cluster_assignments" / "part-02.parquet", columns=["cluster"]
    ).column("cluster")
    touched = touched_buckets(clusters.to_numpy(), 4, 2)
    dedup = launched("bucket_sensor", "dedup_job")
    assert touched and touched <= {r["tags"]["dagster/partition"] for r in dedup}, (
        touched,
        [run_partitions(r) for r in dedup],
    )
    # Automation re-ran the keep-lists after the buckets.
    keep = launched("automation_sensor", "keep_lists")
    assert keep and max(r["creationTime"] for r in keep) > max(r["creationTime"] for r in dedup)
    # The catalog shows the new items, and the keep-lists count every item.
    _, [(n,)] = query(storage, "SELECT count(*) FROM items WHERE shard = 'part-02'")
    assert n == 100
    _, rows = query(storage, "SELECT kept, removed FROM eps_curve")
    assert rows and all(kept + removed == 300 for kept, removed in rows)


# --------------------------------------------------------------------------------------
# 2. A partition backfill launched through GraphQL exactly as the UI does (an asset
#    backfill): BackfillPolicy.multi_run(64) batches the shards into few runs.
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(360)
def test_partition_backfill_via_graphql_runs_in_batches(tmp_path: Path) -> None:
    n_shards, batch = 12, 64
    env = platform_env(tmp_path, sensors=False)
    write_embedding_shards(tmp_path / "landing", n_shards=n_shards, per_shard=20, d=8)
    keys = [f"part-{i:02d}" for i in range(n_shards)]
    _register_shards(env["DAGSTER_HOME"], keys)

    with dagster_dev(env, _log_path("backfill"), daemon_loop_s=TEST_DAEMON_LOOP_S) as dev:
        result = dev.graphql(
            LAUNCH_BACKFILL,
            {
                "backfillParams": {
                    "assetSelection": [{"path": ["raw_shards"]}, {"path": ["embeddings"]}],
                    "partitionNames": keys,
                    "fromFailure": False,
                    "tags": [],
                }
            },
        )["launchPartitionBackfill"]
        assert result["__typename"] == "LaunchBackfillSuccess", result
        backfill_id = result["backfillId"]

        def backfill() -> dict:
            data = dev.graphql(BACKFILL_QUERY, {"backfillId": backfill_id})["partitionBackfillOrError"]
            assert data["__typename"] == "PartitionBackfill", data
            return data

        def completed() -> dict | None:
            b = backfill()
            assert b["status"] not in ("FAILED", "COMPLETED_FAILED", "CANCELED", "CANCELING", "FAILING"), b
            return b if b["status"] in ("COMPLETED", "COMPLETED_SUCCESS") else None

        b = dev.wait_for(
            f"backfill {backfill_id} to complete",
            completed,
            timeout=240,
            interval=2,
            describe=lambda: json.dumps(backfill(), indent=1) + "\n" + describe_runs(dev),
        )
        statuses = {}
        for asset in ("raw_shards", "embeddings"):
            node = dev.graphql(PARTITION_STATUS_QUERY, {"assetKey": {"path": [asset]}})["assetNodeOrError"]
            statuses[asset] = node
        all_runs = runs(dev)
        backfill_runs = runs(dev, tags=[{"key": "dagster/backfill", "value": backfill_id}])

    assert b["isAssetBackfill"] and b["numPartitions"] == n_shards
    assert sorted("/".join(a["path"]) for a in b["assetSelection"]) == ["embeddings", "raw_shards"]
    # Every partition of both assets is materialized, and the files are there.
    for asset, node in statuses.items():
        assert node["partitionStats"] == {
            "numMaterialized": n_shards,
            "numPartitions": n_shards,
            "numFailed": 0,
            "numMaterializing": 0,
        }, (asset, node)
        assert sorted(node["assetPartitionStatuses"]["materializedPartitions"]) == keys, asset
    for stage in ("raw", "embeddings"):
        assert sorted(p.stem for p in (tmp_path / "storage" / stage).glob("*.parquet")) == keys, stage
    # Batched: one run per batch of <= 64 shards (per asset at most), far fewer runs than partitions.
    assert backfill_runs and all(r["status"] == "SUCCESS" for r in backfill_runs)
    assert {r["runId"] for r in backfill_runs} == {r["runId"] for r in b["runs"]} == {r["runId"] for r in all_runs}
    batches = math.ceil(n_shards / batch)
    assert len(backfill_runs) < n_shards
    assert len(backfill_runs) <= 2 * batches, [(r["runId"], r["assets"], run_partitions(r)) for r in backfill_runs]
    for r in backfill_runs:  # each run is a range run over a batch of shards, not a single partition
        assert "dagster/partition" not in r["tags"], r["tags"]
        assert r["tags"]["dagster/asset_partition_range_start"] == keys[0]
        assert r["tags"]["dagster/asset_partition_range_end"] == keys[-1]
    print(
        f"\nbackfill {backfill_id}: {n_shards} partitions x 2 assets in {len(backfill_runs)} run(s): "
        + ", ".join(f"{r['runId'][:8]} {','.join(r['assets'])} [{run_partitions(r)}]" for r in backfill_runs)
    )


# --------------------------------------------------------------------------------------
# 3. The UI in headless Chromium: the asset graph shows every asset, and one partition is
#    materialized through the Materialize dialog.
# --------------------------------------------------------------------------------------


def _browser_or_skip():
    """playwright.sync_api; skips when Debian's Chromium is absent, except in CI, where that fails."""
    if not Path(CHROMIUM).exists():
        reason = f"{CHROMIUM} is absent (apt-get install chromium, or run `make test`, which installs it)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    import playwright.sync_api  # the `test` extra's dependency (never `playwright install`)

    return playwright.sync_api


@pytest.mark.timeout(360)
def test_browser_shows_graph_and_materializes_a_partition(tmp_path: Path) -> None:
    sync_api = _browser_or_skip()
    shots = ARTIFACTS / "browser"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    env = platform_env(tmp_path, sensors=False)
    write_embedding_shards(tmp_path / "landing", n_shards=3, per_shard=20, d=8)
    keys = ["part-00", "part-01", "part-02"]
    key = "part-01"
    _register_shards(env["DAGSTER_HOME"], keys)

    with dagster_dev(env, _log_path("browser"), daemon_loop_s=TEST_DAEMON_LOOP_S) as dev:
        dev.graphql("mutation { setNuxSeen }")  # the first-visit community dialog: seen
        with sync_api.sync_playwright() as pw:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 3600, "height": 2400},
            )  # wide enough for full (unabbreviated) asset nodes of all seven groups; tall enough that the
            # expanded graph (five pruning selections stacked in the prune group) fits: Dagster renders only
            # the nodes in view, and at 1500 px the lineage's first stages fell outside it
            try:
                run_id = _drive_ui(sync_api, context.new_page(), dev, shots, key)
            finally:
                context.close()
        [run] = runs(dev, runIds=[run_id])

    assert run["status"] == "SUCCESS", run
    assert run["tags"].get("dagster/partition") == key and run["tags"].get("dagster/from_ui") == "true", run["tags"]
    assert run["assets"] == ["raw_shards"]
    assert (tmp_path / "storage" / "raw" / f"{key}.parquet").exists()
    assert not (tmp_path / "storage" / "raw" / "part-00.parquet").exists()  # only the chosen partition


def _drive_ui(sync_api, page, dev: DagsterDev, shots: Path, key: str) -> str:
    """Asset graph -> every asset visible -> raw_shards -> Materialize one partition -> run succeeds."""
    expect = sync_api.expect
    page.set_default_timeout(60_000)
    # Safety net if the first-visit dialog still shows: dismiss it whenever it blocks an action.
    page.add_locator_handler(page.get_by_role("button", name="Skip"), lambda button: button.click())
    try:
        page.goto(f"{dev.url}/asset-groups")
        expect(page.get_by_text("Global asset lineage")).to_be_visible()
        # Several groups: the graph starts collapsed to one box per group; expand them all.
        expect(page.get_by_text("ingest", exact=True).first).to_be_visible()
        page.get_by_role("button", name="settings", exact=True).click()  # the graph's options (gear)
        page.get_by_role("menuitem", name=re.compile("Expand all groups")).click()
        page.keyboard.press("Escape")
        viewport = page.viewport_size
        for name in ASSETS:
            node = page.get_by_text(name, exact=True).first
            expect(node).to_be_visible()
            box = node.bounding_box()
            assert (
                box
                and box["x"] >= 0
                and box["x"] + box["width"] <= viewport["width"]
                and box["y"] >= 0
                and box["y"] + box["height"] <= viewport["height"]
            ), (name, box)
        page.screenshot(path=str(shots / "01-asset-graph.png"))

        # Select raw_shards in the graph and open the Materialize dialog.
        page.get_by_text("raw_shards", exact=True).first.click()
        page.get_by_role("button", name=re.compile("Materialize selected")).click()
        dialog = page.get_by_role("dialog")
        expect(dialog.get_by_text("Launch runs to materialize raw_shards")).to_be_visible()
        page.screenshot(path=str(shots / "02-materialize-dialog.png"))
        # Pick one partition in the partition selector.
        dialog.get_by_text("Select a partition or create one").click()
        page.get_by_placeholder("Filter partitions").fill(key)
        page.get_by_text(key, exact=True).locator("visible=true").first.click()
        expect(page.get_by_role("checkbox", name=key)).to_be_checked()
        dialog.get_by_text("Launch runs to materialize raw_shards").click()  # close the dropdown
        expect(dialog.get_by_text("1 partition", exact=True)).to_be_visible()
        page.screenshot(path=str(shots / "03-one-partition-selected.png"))
        dialog.get_by_role("button", name="Launch 1 run").click()
        toast = page.get_by_text(re.compile(r"Launched run [0-9a-f]{8}"))
        expect(toast).to_be_visible(timeout=30_000)
        prefix = re.search(r"[0-9a-f]{8}", toast.inner_text()).group(0)
        page.screenshot(path=str(shots / "04-launched.png"))

        # The run, found through GraphQL, succeeds; its page in the UI says so.
        run_id = dev.wait_for(
            f"run {prefix} in runsOrError",
            lambda: next((r["runId"] for r in runs(dev) if r["runId"].startswith(prefix)), None),
            timeout=30,
        )

        def succeeded() -> bool:
            [run] = runs(dev, runIds=[run_id])
            assert run["status"] not in FAILED, f"run {run_id} ended {run['status']}"
            return run["status"] == "SUCCESS"

        dev.wait_for(
            f"run {run_id} to succeed", succeeded, timeout=180, interval=2, describe=lambda: describe_runs(dev)
        )
        page.goto(f"{dev.url}/runs/{run_id}")
        expect(page.get_by_text("Success", exact=True).first).to_be_visible()
        expect(page.get_by_text(f"partition: {key}")).to_be_visible()
        expect(page.get_by_text("RUN_SUCCESS").first).to_be_visible()  # the event log has loaded
        page.screenshot(path=str(shots / "05-run-succeeded.png"))
        return run_id
    except Exception:
        page.screenshot(path=str(shots / "failure.png"))
        raise
