"""`--probes P` through the asset graph: the stored items equal the dense multi-probe oracle."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.multiprobe import dense_multiprobe, global_rank, probe_clusters
from semdedup_assets.core.io.catalog import query
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards


@pytest.mark.parametrize("probes", [2, 3])
def test_graph_with_probes_equals_the_dense_oracle(tmp_path: Path, instance: dg.DagsterInstance, probes: int) -> None:
    write_embedding_shards(tmp_path / "input", n_shards=2, per_shard=150, d=8, dup_every=5)
    settings = Settings(
        storage=str(tmp_path / "storage"),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=6,
        buckets=3,
        eps=(0.01, 0.1),
        block_size=16,
        probes=probes,
    )
    run_pipeline(settings, instance, log=lambda m: None)
    storage = settings.storage_root()
    _, rows = query(
        storage,
        "SELECT i.id, i.cluster, i.sim_to_centroid, i.max_sim, i.duplicate_of, e.embedding "
        "FROM items i JOIN embeddings e USING (id) ORDER BY i.id",
    )
    _, cents = query(storage, "SELECT centroid FROM centroids ORDER BY cluster")
    ids = np.array([r[0] for r in rows], dtype=object)
    own = np.array([r[1] for r in rows], dtype=np.int64)
    x = np.array([r[5] for r in rows], dtype=np.float32)
    rank = global_rank(ids, np.array([r[2] for r in rows], dtype=np.float32), "hard", 0)
    m, dup = dense_multiprobe(x, rank, own, probe_clusters(x, np.array([c[0] for c in cents], np.float32), own, probes))
    np.testing.assert_allclose([r[3] for r in rows], m, atol=1e-5)
    assert [r[4] for r in rows] == [ids[j] if j >= 0 else None for j in dup]
    _, [(n,)] = query(
        storage, "SELECT count(*) FROM items i JOIN items j ON j.id = i.duplicate_of WHERE i.cluster <> j.cluster"
    )
    assert n > 0  # duplicate_of points across clusters
