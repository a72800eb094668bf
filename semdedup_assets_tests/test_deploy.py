"""The production stack on real servers: the Dagster instance on PostgreSQL, input and storage in S3.

A PostgreSQL cluster (initdb/pg_ctl in a temporary folder) and moto's S3 server
(`moto_server`, real HTTP, signatures checked against an IAM key) run on 127.0.0.1 for
the whole module; each test takes its own database and buckets. Endpoint and credentials
reach botocore/s3fs only through AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and
AWS_SECRET_ACCESS_KEY. The tests skip (with the reason) only when the servers are not
installed here; `make test` installs them (`server-deps`, the test and deploy extras).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from semdedup_assets.instance import instance_yaml
from semdedup_assets_tests.fixtures import write_embedding_shards, write_text_shards
from semdedup_assets_tests.servers import (
    PostgresServer,
    S3Server,
    moto_missing,
    postgres_missing,
    postgres_server,
    s3_server,
)
from semdedup_assets_tests.webserver import (
    BACKFILL_QUERY,
    LAUNCH_BACKFILL,
    REPO,
    TEST_DAEMON_LOOP_S,
    dagster_dev,
    describe_runs,
    platform_env,
    runs,
)

ARTIFACTS = REPO / "test-artifacts"
_missing = postgres_missing() or moto_missing()
pytestmark = pytest.mark.skipif(_missing is not None, reason=f"production-stack servers unavailable: {_missing}")


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with s3_server(ARTIFACTS / "deploy-moto.log") as server:
        yield server


def _name(prefix: str) -> str:
    """A fresh bucket or database name."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _postgres_home(home: Path, pg: PostgresServer) -> Path:
    """DAGSTER_HOME with a dagster.yaml whose run, event-log and schedule storage is a new Postgres database."""
    url = pg.create_database(_name("dagster").replace("-", "_"))
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(instance_yaml(1) + f"storage:\n  postgres:\n    postgres_url: {url}\n")
    return home


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEMDEDUP_", "AWS_")) and k != "DAGSTER_HOME"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _stack_env(tmp: Path, pg: PostgresServer, s3: S3Server, **extra: str) -> dict[str, str]:
    """The CLI's environment on the stack: Postgres DAGSTER_HOME, S3 credentials, a local catalog file."""
    env = _base_env()
    env.update(s3.env())
    env.update(DAGSTER_HOME=str(_postgres_home(tmp / "home", pg)), SEMDEDUP_CATALOG=str(tmp / "catalog.duckdb"))
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "semdedup_assets.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _upload(s3: S3Server, folder: Path, url: str) -> None:
    """Put every file of a local folder under an s3:// prefix."""
    fs = s3.filesystem()
    for path in sorted(folder.iterdir()):
        fs.put_file(str(path), f"{url.removeprefix('s3://')}/{path.name}")


def _keep_lists_local(storage: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((storage / "keep_lists").glob("*.parquet"))}


def _keep_lists_s3(s3: S3Server, url: str) -> dict[str, bytes]:
    fs = s3.filesystem()
    return {
        p.rsplit("/", 1)[1]: fs.cat_file(p)
        for p in sorted(fs.glob(f"{url.removeprefix('s3://')}/keep_lists/*.parquet"))
    }


def _objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    fs = s3.filesystem()
    return {p: fs.cat_file(p) for p in fs.find(bucket)}


def _assert_no_secret(secret: str, blobs: dict[str, bytes | str]) -> None:
    leaks = [name for name, blob in blobs.items() if (secret.encode() if isinstance(blob, bytes) else secret) in blob]
    assert not leaks, f"the secret key appears in: {leaks}"


def _local_run(tmp: Path, input_dir: Path, *flags: str) -> dict[str, bytes]:
    """The reference: the same run on local input, local storage and the default SQLite instance."""
    storage = tmp / "local-storage"
    proc = _cli("run", "--input", str(input_dir), "--storage", str(storage), *flags, env=_base_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return _keep_lists_local(storage)


# --------------------------------------------------------------------------------------
# The whole graph with the instance on Postgres and input + storage in the bucket.
# --------------------------------------------------------------------------------------


@pytest.mark.timeout(600)
@pytest.mark.parametrize("modality", ["embedding", pytest.param("text", marks=pytest.mark.slow)])
def test_whole_graph_on_postgres_and_s3_matches_local(
    tmp_path: Path, pg: PostgresServer, s3: S3Server, modality: str
) -> None:
    input_dir = tmp_path / "input"
    if modality == "text":
        write_text_shards(input_dir, n_shards=2)
        flags = ("--modality", "text", "--clusters", "3", "--buckets", "2", "--eps", "0.01,0.05,0.1")
    else:
        write_embedding_shards(input_dir, n_shards=3, per_shard=200, d=16)
        flags = ("--modality", "embedding", "--clusters", "5", "--buckets", "3")
    bucket_in, bucket_store = _name("input"), _name("store")
    s3.create_bucket(bucket_in)
    s3.create_bucket(bucket_store)
    _upload(s3, input_dir, f"s3://{bucket_in}/landing")
    storage = f"s3://{bucket_store}/semdedup"

    env = _stack_env(tmp_path, pg, s3)
    proc = _cli("run", "--input", f"s3://{bucket_in}/landing", "--storage", storage, *flags, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    remote = _keep_lists_s3(s3, storage)
    local = _local_run(tmp_path, input_dir, *flags)
    assert remote and remote == local, "keep-lists differ from the local run"

    # The runs are in Postgres, not in a SQLite file under DAGSTER_HOME.
    database = pg.dump(_db_of(env))
    assert "keep_lists_job" in database
    assert not list(Path(env["DAGSTER_HOME"]).rglob("*.db"))

    # The DuckDB catalog over S3: views over the bucket, credentials from the environment only.
    sql = _cli("sql", "SELECT count(*) AS n, count(DISTINCT shard) AS s FROM items", "--storage", storage, env=env)
    assert sql.returncode == 0, sql.stderr
    n_items = 21 if modality == "text" else 600
    assert f"{n_items}" in sql.stdout.splitlines()[-1]
    catalog = Path(env["SEMDEDUP_CATALOG"]).read_bytes()
    assert f"s3://{bucket_store}/semdedup/semantic_duplicates".encode() in catalog

    # No secret anywhere: the bucket (semdedup.json, Parquet), the catalog, the Postgres database
    # (runs, run tags, event logs, materialization metadata), DAGSTER_HOME's files, the CLI output.
    assert f"{bucket_store}/semdedup/semdedup.json" in _objects(s3, bucket_store)
    blobs: dict[str, bytes | str] = {
        **_objects(s3, bucket_store),
        "catalog": catalog,
        "postgres": database,
        "stdout": proc.stdout,
        "stderr": proc.stderr,
    }
    blobs.update({str(p): p.read_bytes() for p in Path(env["DAGSTER_HOME"]).rglob("*") if p.is_file()})
    _assert_no_secret(s3.secret_key, blobs)


def _db_of(env: dict[str, str]) -> str:
    """The database name in a DAGSTER_HOME's postgres_url."""
    text = (Path(env["DAGSTER_HOME"]) / "dagster.yaml").read_text()
    (url,) = [line.split("postgres_url:", 1)[1].strip() for line in text.splitlines() if "postgres_url:" in line]
    return url.rsplit("/", 1)[1]


# --------------------------------------------------------------------------------------
# The daemon on this instance: a shard object lands, the sensors carry it to the catalog;
# Postgres restarts under the daemon, which carries on; a UI-style backfill runs.
# --------------------------------------------------------------------------------------


def _catalog_counts(storage: str, shard: str) -> tuple[int, int, list]:
    from semdedup_assets.core.io.catalog import query
    from semdedup_assets.core.io.storage import Storage

    store = Storage(storage)
    _, [(new, total)] = query(store, f"SELECT count(*) FILTER (shard = '{shard}'), count(*) FROM items")
    _, curve = query(store, "SELECT DISTINCT kept + removed FROM eps_curve")
    return new, total, curve


@pytest.mark.timeout(600)
def test_daemon_on_postgres_and_s3_survives_a_postgres_restart(
    tmp_path: Path, pg: PostgresServer, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semdedup_assets_tests.test_webserver import _fail_on_failed_runs

    staging = tmp_path / "staging"
    write_embedding_shards(staging, n_shards=3, per_shard=100, d=16, dup_every=10)
    bucket_in, bucket_store = _name("landing"), _name("store")
    s3.create_bucket(bucket_in)
    s3.create_bucket(bucket_store)
    fs = s3.filesystem()
    for key in ("part-00", "part-01"):
        fs.put_file(str(staging / f"{key}.parquet"), f"{bucket_in}/{key}.parquet")
    storage, landing = f"s3://{bucket_store}/semdedup", f"s3://{bucket_in}"

    env = platform_env(tmp_path, sensors=True, interval=3, clusters=2, buckets=1)
    env.update(_stack_env(tmp_path, pg, s3), SEMDEDUP_STORAGE=storage, SEMDEDUP_INPUT=landing)
    proc = _cli(
        "run",
        "--input",
        landing,
        "--storage",
        storage,
        "--modality",
        "embedding",
        "--clusters",
        "2",
        "--buckets",
        "1",
        env=env,
    )  # one bucket: one dedup run per new shard
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The test's own catalog queries: the same bucket and credentials, another catalog file.
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("SEMDEDUP_CATALOG", str(tmp_path / "test-catalog.duckdb"))

    with dagster_dev(env, ARTIFACTS / "deploy-daemon-dagster-dev.log", daemon_loop_s=TEST_DAEMON_LOOP_S) as dev:

        def settled(shard: str, total: int):
            def probe() -> bool:
                all_runs = _fail_on_failed_runs(dev)
                if any(r["status"] not in ("SUCCESS", "FAILURE", "CANCELED") for r in all_runs):
                    return False
                new, n, curve = _catalog_counts(storage, shard)
                return new == 100 and n == total and curve == [(total,)]

            return probe

        # PostgreSQL restarts under the running daemon and webserver; both carry on, and the
        # next shard object flows through the sensors into the catalog.
        pg.stop()
        time.sleep(3)  # sensor ticks and daemon heartbeats hit the dead server
        pg.start()
        t0 = time.monotonic()
        fs.put_file(str(staging / "part-02.parquet"), f"{bucket_in}/part-02.parquet")
        dev.wait_for(
            "part-02 to reach the catalog after the Postgres restart",
            settled("part-02", 300),
            timeout=400,
            interval=2,
            describe=lambda: describe_runs(dev),
        )
        flow = time.monotonic() - t0

        # A partition backfill through GraphQL, as the UI launches it.
        keys = [f"part-{i:02d}" for i in range(3)]
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

        def backfill_done() -> dict | None:
            b = dev.graphql(BACKFILL_QUERY, {"backfillId": result["backfillId"]})["partitionBackfillOrError"]
            assert b["__typename"] == "PartitionBackfill", b
            assert b["status"] not in ("FAILED", "COMPLETED_FAILED", "CANCELED", "CANCELING", "FAILING"), b
            return b if b["status"] in ("COMPLETED", "COMPLETED_SUCCESS") else None

        b = dev.wait_for(
            "the backfill to complete", backfill_done, timeout=240, interval=2, describe=lambda: describe_runs(dev)
        )
        assert b["runs"] and all(r["status"] == "SUCCESS" for r in b["runs"])
        all_runs = runs(dev)
        log = dev.log_tail(100000)
    print(f"\nnew shard -> catalog after the Postgres restart: {flow:.0f} s; runs: {len(all_runs)}")
    assert any(
        r["tags"].get("dagster/sensor_name") == "shard_sensor" and r["tags"].get("dagster/partition") == "part-02"
        for r in all_runs
    )
    # No secret in the runs' tags, the Postgres database, the catalogs, the bucket or the server log.
    blobs: dict[str, bytes | str] = {
        **_objects(s3, bucket_store),
        "postgres": pg.dump(_db_of(env)),
        "dagster dev log": log,
        "run tags": json.dumps([r["tags"] for r in all_runs]),
        "catalog": Path(env["SEMDEDUP_CATALOG"]).read_bytes(),
    }
    _assert_no_secret(s3.secret_key, blobs)


# --------------------------------------------------------------------------------------
# Object-store faults: a clear error naming the bucket or key, nothing published.
# --------------------------------------------------------------------------------------


def _small_input(tmp: Path, s3: S3Server) -> tuple[Path, str]:
    input_dir = tmp / "input"
    write_embedding_shards(input_dir, n_shards=2, per_shard=100, d=8)
    bucket = _name("input")
    s3.create_bucket(bucket)
    _upload(s3, input_dir, f"s3://{bucket}/in")
    return input_dir, f"s3://{bucket}/in"


@pytest.mark.timeout(300)
def test_missing_bucket_and_wrong_credentials_are_named(tmp_path: Path, pg: PostgresServer, s3: S3Server) -> None:
    _, source = _small_input(tmp_path, s3)
    flags = ("--modality", "embedding", "--clusters", "2", "--buckets", "1")
    env = _stack_env(tmp_path, pg, s3)

    missing = _name("absent")
    proc = _cli("run", "--input", source, "--storage", f"s3://{missing}/semdedup", *flags, env=env, timeout=120)
    assert proc.returncode == 1 and f"bucket {missing!r} does not exist" in proc.stderr, proc.stderr
    assert missing not in s3.filesystem().ls(""), "a missing storage bucket was created"

    store = _name("store")
    s3.create_bucket(store)
    proc = _cli(
        "run", "--input", f"s3://{missing}/in", "--storage", f"s3://{store}/semdedup", *flags, env=env, timeout=120
    )
    assert proc.returncode == 1 and f"input s3://{missing}/in: bucket {missing!r} does not exist" in proc.stderr, (
        proc.stderr
    )
    assert _objects(s3, store) == {}, "something was published without input"

    wrong = dict(env, AWS_SECRET_ACCESS_KEY="not-the-secret")
    proc = _cli("run", "--input", source, "--storage", f"s3://{store}/semdedup", *flags, env=wrong, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "access to bucket" in proc.stderr and "refused" in proc.stderr and store in proc.stderr, proc.stderr
    assert "not-the-secret" not in proc.stdout + proc.stderr
    assert _objects(s3, store) == {}, "something was published with refused credentials"


def test_object_deleted_between_discovery_and_reading(
    tmp_path: Path, s3: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    from semdedup_assets.core.io.shards import ShardError, discover_shards, read_shard

    _, source = _small_input(tmp_path, s3)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    shards = discover_shards(source)
    assert [s.key for s in shards] == ["part-00", "part-01"]
    s3.filesystem().rm_file(f"{source.removeprefix('s3://')}/part-01.parquet")
    assert read_shard(shards[0], "embedding", "embedding").table.num_rows == 100
    with pytest.raises(ShardError) as err:
        read_shard(shards[1], "embedding", "embedding")
    assert "part-01" in str(err.value) and "part-01.parquet" in str(err.value)


@pytest.mark.timeout(600)
def test_s3_stopped_mid_run_then_rerun_equals_uninterrupted(tmp_path: Path, pg: PostgresServer, s3: S3Server) -> None:
    input_dir = tmp_path / "input"
    write_embedding_shards(input_dir, n_shards=6, per_shard=200, d=16)
    flags = ("--modality", "embedding", "--clusters", "6", "--buckets", "3")
    bucket_in, bucket_store = _name("input"), _name("store")
    storage = f"s3://{bucket_store}/semdedup"

    def prepare() -> dict[str, str]:
        s3.create_bucket(bucket_in)
        s3.create_bucket(bucket_store)
        _upload(s3, input_dir, f"s3://{bucket_in}/in")
        return dict(env, **s3.env())

    env = _stack_env(tmp_path, pg, s3)
    env = prepare()
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "semdedup_assets.cli",
            "run",
            "--input",
            f"s3://{bucket_in}/in",
            "--storage",
            storage,
            *flags,
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    fs = s3.filesystem()
    deadline = time.monotonic() + 240
    while not fs.glob(f"{bucket_store}/semdedup/cluster_assignments/*.parquet"):
        assert run.poll() is None, "the run ended before the S3 server could be stopped: " + run.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no cluster assignments appeared"
        time.sleep(0.1)
    s3.stop()  # mid-run: the embeddings and centroids are written, the buckets not yet
    stopped = time.monotonic()
    out, err = run.communicate(timeout=240)
    failed_after = time.monotonic() - stopped
    assert run.returncode == 1, out[-2000:] + err[-2000:]
    assert "semdedup: error:" in err and f"127.0.0.1:{s3.port}/{bucket_store}" in err, err[-3000:]
    assert failed_after < 120, f"the run took {failed_after:.0f} s to fail after the S3 server stopped"

    # The server comes back (moto keeps buckets in memory: they are recreated and the input
    # uploaded again, with a new key), and the same command is run again on the same instance.
    s3.start()
    env = prepare()
    proc = _cli("run", "--input", f"s3://{bucket_in}/in", "--storage", storage, *flags, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _keep_lists_s3(s3, storage) == _local_run(tmp_path, input_dir, *flags)
    print(f"\nthe run failed {failed_after:.1f} s after the S3 server stopped")
