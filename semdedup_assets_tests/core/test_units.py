"""The core's units of work, called as plain functions (no Dagster), equal the asset graph's output."""

from __future__ import annotations

import ast
import pickle
import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from semdedup_assets.core.cluster.assign import assign_shard, bucket_keys
from semdedup_assets.core.cluster.centroids import MissingCentroidsError, load_centroids
from semdedup_assets.core.config import Settings
from semdedup_assets.core.embed.shard import embed_shard
from semdedup_assets.core.ingest.stage import DuplicateIdsError, publish_shards
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.io.shards import discover_shards
from semdedup_assets.core.run import loop as run_loop
from semdedup_assets.core.run.loop import ingest_shards
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards

REPO = Path(__file__).resolve().parents[2]
# What an asset module may import: Dagster, the standard library and this package (the core does the work).
# Dagster and its integrations (dagster_ray) adapt; numeric work (numpy, pyarrow, torch, faiss) belongs in core.
ASSET_IMPORTS_ALLOWED = {
    "dagster",
    "dagster_ray",
    "semdedup_assets",
    "__future__",
    "time",
    "collections",
    "contextlib",
    "warnings",
}


def _settings(tmp_path: Path, storage: str, **kw) -> Settings:
    return Settings(
        storage=str(tmp_path / storage),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=5,
        buckets=3,
        eps=(0.001, 0.01, 0.1),
        block_size=32,
        **kw,
    )


def run_units(settings: Settings) -> list:
    """The whole pipeline as the core's units of work, in plain Python (the core's run loop); returns every result."""
    return run_loop.run_units(settings).all()


@pytest.mark.dagster
def test_units_without_dagster_write_the_graphs_files(tmp_path: Path) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=120, d=8, dup_every=6)
    units = _settings(tmp_path, "units")
    results = run_units(units)
    graph = _settings(tmp_path, "graph")
    with dg.instance_for_test() as instance:
        run_pipeline(graph, instance, log=lambda m: None)
    for stage in (st.KEEP_LISTS, st.GROUPS, st.SEMANTIC_DUPLICATES, st.CLUSTER_ASSIGNMENTS, st.CENTROIDS):
        ours = {p.name: p.read_bytes() for p in units.storage_root().stage_files(stage)}
        theirs = {p.name: p.read_bytes() for p in graph.storage_root().stage_files(stage)}
        assert ours and ours == theirs, stage
    # The catalog's typed placeholders for stages without files (from schemas.py) match the real files.
    empty = Settings(storage=str(tmp_path / "empty")).storage_root()
    for view in ("items", "embeddings", "eps_curve", "groups", "raw_items", "cluster_assignments", "centroid_vectors"):
        real, placeholder = (
            [(r[0], re.sub(r"\[\d+\]", "[]", r[1])) for r in query(s, f"DESCRIBE {view}")[1]]
            for s in (units.storage_root(), empty)
        )  # FLOAT[8] and FLOAT[] alike
        assert real == placeholder, view
    keep = results[-1]
    assert keep.items == 360 and keep.distinct_ids == 360 and sum(keep.cluster_sizes) == 360
    assert [r["eps"] for r in keep.eps_curve] == [0.001, 0.01, 0.1]
    # Plain results: they survive a pickle round trip (they cross process boundaries on other engines).
    for r in results:
        assert pickle.loads(pickle.dumps(r)) == r
    assigned = [r for r in results if type(r).__name__ == "AssignShardResult"]
    assert sum(r.rows for r in assigned) == 360 and all(not r.problems for r in assigned)
    assert set().union(*(r.buckets_touched for r in assigned)) <= set(bucket_keys(3))


def test_embed_shard_reuses_a_valid_cached_file(tmp_path: Path) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=1, per_shard=50, d=8)
    settings = _settings(tmp_path, "s")
    [shard] = discover_shards(settings.input)
    ingest_shards(settings, [shard])
    first = embed_shard(settings, shard.key, shard)
    path = Path(first.path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    again = embed_shard(settings, shard.key, shard)
    assert not first.cached and again.cached
    assert (again.rows, again.dim, again.problems) == (50, 8, [])
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    other = embed_shard(settings.replace(embedding_dtype="float16"), shard.key, shard)  # other settings: re-embedded
    assert not other.cached and path.stat().st_mtime_ns != before[1]


def test_unit_errors_name_what_is_wrong(tmp_path: Path) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=20, d=8)
    settings = _settings(tmp_path, "s")
    with pytest.raises(MissingCentroidsError, match="no centroids yet"):
        load_centroids(settings.storage_root())
    shards = discover_shards(settings.input)
    ingest_shards(settings, shards[:1])
    # The second shard repeats the first's ids under another name: refused, nothing published.
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "part-09.parquet").write_bytes(Path(shards[0].path.path).read_bytes())
    with pytest.raises(
        DuplicateIdsError, match="id 's0-00000' is in shard 'part-00' row 0 and in shard 'part-09' row 0"
    ):
        ingest_shards(settings, discover_shards(str(twin)))
    assert not settings.storage_root().shard_file(st.RAW, "part-09").exists()
    with pytest.raises(ValueError, match="k=4 but 3 centroids"):
        assign_shard(settings, "part-00", np.eye(3, 8, dtype=np.float32), 4)


STAGE_IN_ANOTHER_PROCESS = """
import pickle, sys
from semdedup_assets.core.ingest.stage import stage_shard
settings, shard = pickle.loads(sys.stdin.buffer.read())
sys.stdout.buffer.write(pickle.dumps(stage_shard(settings, shard)))
"""


@pytest.mark.subprocess
def test_shards_staged_in_other_processes_publish_together_or_not_at_all(tmp_path: Path) -> None:
    """Ingest as an engine runs it: each shard validated and staged in another process (as a Ray task does), the
    batch checked and published by this one; the raw files equal in-process ingest's bytes, and a batch with a
    repeated id publishes nothing and leaves no staged file behind."""
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=40, d=8)
    local = _settings(tmp_path, "local")
    shards = discover_shards(local.input)
    ingest_shards(local, shards)
    staged_settings = _settings(tmp_path, "staged")

    def stage_elsewhere(settings: Settings, shard) -> object:
        out = subprocess.run(
            [sys.executable, "-c", STAGE_IN_ANOTHER_PROCESS],
            input=pickle.dumps((settings, shard)),
            capture_output=True,
            check=True,
            cwd=REPO,
        )
        return pickle.loads(out.stdout)

    staged = [stage_elsewhere(staged_settings, s) for s in shards]
    raw = staged_settings.storage_root().stage_files(st.RAW)
    assert not raw, "a staged shard is not visible before its batch is published"
    assert len(list((tmp_path / "staged" / "raw").glob(".*.tmp"))) == 3
    result = publish_shards(staged_settings, staged)
    assert [s.rows for s in result.shards] == [40, 40, 40]
    theirs = {p.name: p.read_bytes() for p in staged_settings.storage_root().stage_files(st.RAW)}
    assert theirs == {p.name: p.read_bytes() for p in local.storage_root().stage_files(st.RAW)}
    assert not list((tmp_path / "staged").rglob(".*.tmp"))

    # A repeated id across two staged shards of one batch: neither is published, no staged file stays.
    twin = tmp_path / "twin"
    twin.mkdir()
    for name in ("part-08.parquet", "part-09.parquet"):
        (twin / name).write_bytes(Path(shards[0].path.path).read_bytes())
    fresh = _settings(tmp_path, "fresh")
    batch = [stage_elsewhere(fresh, s) for s in discover_shards(str(twin))]
    with pytest.raises(DuplicateIdsError, match="in shard 'part-08' row 0 and in shard 'part-09' row 0"):
        publish_shards(fresh, batch)
    assert not fresh.storage_root().stage_files(st.RAW) and not list((tmp_path / "fresh").rglob(".*.tmp"))


KILLED_MID_WRITE = """
import os, sys
import pyarrow as pa
from semdedup_assets.core.io import storage as st
table = pa.table({"id": ["a"]})
writer = st.AtomicParquetWriter(st.UPath(sys.argv[1]), table.schema)
writer.write(table)
os._exit(9)
"""
STAGE_THEN_PUBLISH_ON_CUE = """
import pickle, sys
from semdedup_assets.core.ingest.stage import publish_shards, stage_shard
settings, shards = pickle.loads(bytes.fromhex(sys.stdin.readline().strip()))
staged = [stage_shard(settings, s) for s in shards]
print("staged", flush=True)
sys.stdin.readline()  # the other run has published and swept meanwhile
print(len(publish_shards(settings, staged).shards), flush=True)
"""


@pytest.mark.subprocess
def test_a_run_leaves_the_files_another_running_command_staged(tmp_path: Path) -> None:
    """Regression (CI, test_two_concurrent_runs_on_one_storage): two runs on one storage ingest the same
    shards. The one that published first swept every staged file of those shards, the other's too, and
    the other failed reading its own (`No files found that match ... raw/.part-00.parquet.<uuid>.tmp`).
    A sweep now leaves the files of a process that is still running; those of a process that has
    gone are still removed."""
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=20, d=8)
    settings = _settings(tmp_path, "storage")
    shards = discover_shards(settings.input)
    other = subprocess.Popen(
        [sys.executable, "-c", STAGE_THEN_PUBLISH_ON_CUE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        other.stdin.write(pickle.dumps((settings, shards)).hex() + "\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "staged"
        raw = tmp_path / "storage" / "raw"
        theirs = sorted(raw.glob(".*.tmp"))
        assert len(theirs) == 2
        ingest_shards(settings, shards)  # publishes, then sweeps what killed writers of these shards left
        assert sorted(raw.glob(".*.tmp")) == theirs
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.stdout.readline().strip() == "2"
        assert other.wait(timeout=60) == 0
    finally:
        other.kill()
        other.wait()
    assert not list(raw.glob(".*.tmp"))
    # The file of a writer killed mid-write (its process has gone) is a leftover: the next sweep removes it.
    subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(raw / "part-00.parquet")], check=False, cwd=REPO)
    (leftover,) = raw.glob(".*.tmp")
    assert st.live_writer(st.UPath(str(leftover))) is None
    path = st.UPath(str(raw / "part-00.parquet"))
    st.remove_temporaries([path])
    assert not leftover.exists() and path.exists()


def test_asset_modules_only_adapt() -> None:
    # No numeric or file work in the Dagster layer: an asset module imports no numpy, pyarrow, torch, ...
    for path in sorted((REPO / "semdedup_assets" / "assets").glob("*.py")):
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert roots <= ASSET_IMPORTS_ALLOWED, (path.name, roots - ASSET_IMPORTS_ALLOWED)


@pytest.mark.subprocess
def test_core_units_import_no_dagster() -> None:
    code = (
        "import sys; import semdedup_assets.core.embed.shard, semdedup_assets.core.cluster.assign, semdedup_assets.core.dedup.buckets, "
        "semdedup_assets.core.dedup.keep, semdedup_assets.core.ingest.stage, semdedup_assets.core.cluster.centroids, "
        "semdedup_assets.core.run.loop; "
        "print('dagster' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
