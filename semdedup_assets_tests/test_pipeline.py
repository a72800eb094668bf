"""The whole asset graph, materialized through Dagster on small data in a temporary DAGSTER_HOME."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.cluster.assign import bucket_of
from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.pairwise import dense_max_sim
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets.definitions import build_definitions
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME
from semdedup_assets.pipeline import PipelineError, run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards


def _settings(tmp_path: Path, **kw) -> Settings:
    base = dict(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=6,
        buckets=3,
        eps=(0.0001, 0.001, 0.01, 0.1),
        block_size=64,
    )
    base.update(kw)
    return Settings(**base)


def _execute(defs: dg.Definitions, job: str, instance: dg.DagsterInstance, partition_key: str | None = None):
    result = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=partition_key)
    assert result.success
    return result


def test_whole_graph_finds_planted_duplicates(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    x = write_embedding_shards(tmp_path / "input", n_shards=4, per_shard=250, d=16, dup_every=10)
    settings = _settings(tmp_path)
    result = run_pipeline(settings, instance, log=lambda m: None)
    assert result.shards == ["part-00", "part-01", "part-02", "part-03"]
    storage = settings.storage_root()

    # Every item lands in exactly one bucket row; the planted copies (100) are the duplicates.
    _, [(n, distinct, dups)] = query(
        storage, "SELECT count(*), count(DISTINCT id), count(*) FILTER (max_sim > 1 - 0.01) FROM items"
    )
    assert n == distinct == len(x)
    assert dups == 100
    # duplicate_of points at the planted partner (same shard, neighbouring row).
    _, pairs = query(storage, "SELECT id, duplicate_of FROM items WHERE max_sim > 0.99 ORDER BY id")
    for a, b in pairs:
        sa, ia = a.split("-")
        sb, ib = b.split("-")
        assert sa == sb and abs(int(ia) - int(ib)) == 1
    # The eps curve and the keep-list files agree with the SQL rule.
    _, curve = query(storage, "SELECT eps, kept, removed FROM eps_curve ORDER BY eps")
    for eps, kept, removed in curve:
        _, [(sql_kept,)] = query(storage, f"SELECT count(*) FROM items WHERE max_sim <= 1 - {eps!r}")
        assert kept == sql_kept and kept + removed == len(x)
        assert pq.read_metadata(str(storage.keep_list_file(eps))).num_rows == kept
    # One row group per bucket in every assignments file, so a bucket read touches only its rows.
    for shard in result.shards:
        meta = pq.read_metadata(str(storage.shard_file(st.CLUSTER_ASSIGNMENTS, shard)))
        spans = [
            (meta.row_group(g).column(2).statistics.min, meta.row_group(g).column(2).statistics.max)
            for g in range(meta.num_row_groups)
        ]
        assert meta.num_row_groups == 3
        assert [bucket_of(np.array(span), 6, 3).tolist() for span in spans] == [[0, 0], [1, 1], [2, 2]]


def test_bucket_results_equal_dense_rule_per_cluster(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=200, d=8, dup_every=7)
    settings = _settings(tmp_path, block_size=16)
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    _, rows = query(
        storage,
        "SELECT i.cluster, i.id, i.max_sim, e.embedding FROM items i JOIN embeddings e USING (id) "
        "ORDER BY i.cluster, i.sim_to_centroid, i.id",
    )
    by_cluster: dict[int, list] = {}
    for c, i, m, e in rows:
        by_cluster.setdefault(c, []).append((i, m, e))
    assert len(by_cluster) == 6
    for members in by_cluster.values():  # hard order = ascending sim_to_centroid, ties by id
        emb = np.asarray([e for _, _, e in members], dtype=np.float32)
        expected, _ = dense_max_sim(emb)
        np.testing.assert_allclose([m for _, m, _ in members], expected, atol=1e-6)


def test_keep_lists_are_byte_identical_whatever_the_partition_order(tmp_path: Path) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=3, per_shard=200, d=12, dup_every=5)
    outputs = []
    for order, name in ((False, "a"), (True, "b")):
        settings = _settings(tmp_path, storage=str(tmp_path / f"storage-{name}"), keep="random", seed=7)
        defs = build_definitions(settings)
        with dg.instance_for_test() as inst:
            from semdedup_assets.core.settings_store import save_settings

            save_settings(settings)
            shards = ["part-00", "part-01", "part-02"]
            inst.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, sorted(shards, reverse=order))
            keys = sorted(shards, reverse=order)
            for k in keys:
                _execute(defs, "ingest_job", inst, k)
            _execute(defs, "centroids_job", inst)
            for k in keys:
                _execute(defs, "assign_job", inst, k)
            for b in sorted(["000", "001", "002"], reverse=order):
                _execute(defs, "dedup_job", inst, b)
            result = _execute(defs, "keep_lists_job", inst)
            checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
            assert checks == {
                "kept_fraction_monotone": True,
                "every_item_in_one_bucket": True,
                "files_match_partitions": True,
            }
        storage = settings.storage_root()
        outputs.append(
            {
                p.name: p.read_bytes()
                for p in storage.stage_files(st.KEEP_LISTS) + storage.stage_files(st.SEMANTIC_DUPLICATES)
            }
        )
    assert outputs[0].keys() == outputs[1].keys() and len(outputs[0]) == 4 + 1 + 3
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], name


def test_checks_pass_and_are_recorded(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=100, d=8)
    settings = _settings(tmp_path)
    run_pipeline(settings, instance, log=lambda m: None)
    for key, names in {
        "raw_shards": ["ids_unique_across_shards"],
        "embeddings": ["embeddings_finite_unit_norm"],
        "cluster_assignments": ["assigned_exactly_once"],
        "semantic_duplicates": ["bucket_items_exactly_once"],
        "keep_lists": ["kept_fraction_monotone", "every_item_in_one_bucket", "files_match_partitions"],
    }.items():
        for name in names:
            record = instance.event_log_storage.get_latest_asset_check_execution_by_key(
                [dg.AssetCheckKey(dg.AssetKey(key), name)]
            )[dg.AssetCheckKey(dg.AssetKey(key), name)]
            assert record.status.value == "SUCCEEDED", (key, name)


def test_unregistered_or_foreign_shards_are_refused(tmp_path: Path, instance: dg.DagsterInstance) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=50, d=8)
    instance.add_dynamic_partitions(SHARDS_PARTITIONS_NAME, ["elsewhere/part-09"])
    with pytest.raises(PipelineError, match="not under"):
        run_pipeline(_settings(tmp_path), instance, log=lambda m: None)


def test_low_precision_kernel_and_float16_storage_through_the_graph(tmp_path: Path) -> None:
    """fp16/bf16 tiles keep fp32's keep-lists byte for byte; float16 storage halves the embedding bytes."""
    import pyarrow as pa

    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=300, d=32, dup_every=7)
    variants = {
        "fp32": {},
        "fp16": {"precision": "fp16"},
        "bf16": {"precision": "bf16"},
        "float16": {"embedding_dtype": "float16"},
    }
    roots: dict[str, st.Storage] = {}
    for name, kw in variants.items():
        settings = _settings(tmp_path, storage=str(tmp_path / f"storage-{name}"), **kw)
        with dg.instance_for_test() as inst:
            run_pipeline(settings, inst, log=lambda m: None)
            event = inst.get_latest_materialization_event(dg.AssetKey("semantic_duplicates"))
            meta = event.asset_materialization.metadata
            assert meta["precision"].value == settings.precision
            if settings.precision != "fp32":
                assert meta["error_bound"].value > 0
        roots[name] = settings.storage_root()

    def keep_bytes(root: st.Storage) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in root.stage_files(st.KEEP_LISTS)}

    assert keep_bytes(roots["fp16"]) == keep_bytes(roots["fp32"])
    assert keep_bytes(roots["bf16"]) == keep_bytes(roots["fp32"])

    # float16 storage: half-float embedding columns in the embeddings and the assignments.
    half = pa.list_(pa.field("element", pa.float16(), nullable=False), 32)
    for stage in (st.EMBEDDINGS, st.CLUSTER_ASSIGNMENTS):
        assert pq.read_schema(str(roots["float16"].shard_file(stage, "part-00"))).field("embedding").type == half
    size = {n: roots[n].shard_file(st.EMBEDDINGS, "part-00").stat().st_size for n in ("fp32", "float16")}
    assert size["float16"] < 0.6 * size["fp32"]
    # max_sim values move by float16 rounding only (which member of a near-copy pair comes first
    # may change, so compare them sorted); the same number of duplicates; SQL sees FLOAT[] embeddings.
    q = "SELECT max_sim FROM items ORDER BY max_sim"
    _, a = query(roots["fp32"], q)
    _, b = query(roots["float16"], q)
    np.testing.assert_allclose([r[0] for r in b], [r[0] for r in a], atol=2e-3)
    _, [(dups32,)] = query(roots["fp32"], "SELECT count(*) FROM items WHERE max_sim > 0.99")
    _, [(dups16,)] = query(roots["float16"], "SELECT count(*) FROM items WHERE max_sim > 0.99")
    assert dups16 == dups32 > 0
    _, [(dim,)] = query(roots["float16"], "SELECT len(embedding) FROM embeddings LIMIT 1")
    assert dim == 32
