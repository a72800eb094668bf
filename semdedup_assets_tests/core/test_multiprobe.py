"""Multi-probe SemDeDup: exact against a dense oracle for P = 2 and 3; P = 1 is the single-cluster rule."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from semdedup_assets.core.cluster.assign import assign
from semdedup_assets.core.dedup.buckets import dedup_table
from semdedup_assets.core.dedup.multiprobe import dense_multiprobe, global_rank, multiprobe_bucket, probe_clusters
from semdedup_assets.core.io.schemas import assignments_schema
from semdedup_assets.core.io.tables import embedding_array
from semdedup_assets_tests.fixtures import make_planted

K = 7


def _assignments(n: int = 300, d: int = 8, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    x = make_planted(n, d, dup_every=3, seed=seed, noise=0.05)
    rng = np.random.default_rng(seed + 1)
    cents = rng.normal(size=(K, d)).astype(np.float32)
    cents /= np.linalg.norm(cents, axis=1, keepdims=True)
    clusters, sims = assign(x, cents)
    table = pa.table(
        {
            "id": [f"i{j:04d}" for j in range(n)],
            "shard": ["s"] * n,
            "cluster": clusters,
            "sim_to_centroid": sims,
            "embedding": embedding_array(x),
        },
        schema=assignments_schema(d),
    )
    return table.sort_by([("cluster", "ascending"), ("id", "ascending")]), cents


def _reader(table: pa.Table):
    def read(clusters: list[int]) -> pa.Table:
        return table.filter(pc.is_in(table.column("cluster"), pa.array(clusters, pa.int32())))

    return read


@pytest.mark.parametrize("probes", [2, 3])
@pytest.mark.parametrize("strategy", ["hard", "easy", "random"])
def test_multiprobe_equals_the_dense_oracle(probes: int, strategy: str) -> None:
    table, cents = _assignments()
    x = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    own = table.column("cluster").to_numpy().astype(np.int64)
    ids = np.asarray(table.column("id").to_pylist(), dtype=object)
    rank = global_rank(ids, table.column("sim_to_centroid").to_numpy(), strategy, seed=3)
    expected_m, expected_dup = dense_multiprobe(x, rank, own, probe_clusters(x, cents, own, probes))
    got: dict[str, tuple[float, str | None]] = {}
    for first, end in ((0, 3), (3, 5), (5, K)):  # three buckets, each reading the clusters it probes
        bucket = table.filter(
            pc.and_(pc.greater_equal(table.column("cluster"), first), pc.less(table.column("cluster"), end))
        )
        result, _ = multiprobe_bucket(bucket, _reader(table), cents, probes, strategy, seed=3, block_size=16)
        got.update(
            zip(
                result.column("id").to_pylist(),
                zip(result.column("max_sim").to_pylist(), result.column("duplicate_of").to_pylist()),
            )
        )
    assert len(got) == len(ids)
    m = np.array([got[i][0] for i in ids])
    np.testing.assert_allclose(m, expected_m, atol=1e-5)
    assert [got[i][1] for i in ids] == [ids[j] if j >= 0 else None for j in expected_dup]
    cross = sum(
        1
        for i, j in zip(ids, expected_dup)
        if j >= 0 and own[list(ids).index(i)] != own[j] and expected_m[list(ids).index(i)] > 0.9
    )
    assert cross > 0  # the probes find duplicates across cluster borders


def test_more_probes_only_ever_raise_max_sim() -> None:
    table, cents = _assignments(seed=5)
    runs = [multiprobe_bucket(table, _reader(table), cents, p, "hard", 0, 32)[0] for p in (1, 2, 3)]
    m = [r.sort_by("id").column("max_sim").to_numpy() for r in runs]
    first = [r.sort_by("id").column("rank").to_numpy() == 0 for r in runs]
    assert (m[1] >= m[0] - 1e-7)[~first[0]].all() and (m[2] >= m[1] - 1e-7)[~first[0]].all()


def test_probes_1_through_the_multiprobe_path_equals_the_single_cluster_rule() -> None:
    # (`semantic_duplicates` never takes this path for P = 1; it shows the rule reduces to the paper's.
    # Differently shaped tiles may round a cosine by one float32 ulp, hence the tolerance.)
    table, cents = _assignments(seed=9)
    single, sizes = dedup_table(table, "hard", 0, 16, "cpu")
    multi, msizes = multiprobe_bucket(table, _reader(table), cents, 1, "hard", 0, 16)
    assert sizes == msizes
    for col in ("id", "shard", "cluster", "rank", "sim_to_centroid", "duplicate_of"):
        assert single.column(col).equals(multi.column(col)), col
    np.testing.assert_allclose(single.column("max_sim").to_numpy(), multi.column("max_sim").to_numpy(), atol=2.5e-7)


def test_probe_clusters_put_the_own_cluster_first() -> None:
    table, cents = _assignments()
    x = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    own = table.column("cluster").to_numpy().astype(np.int64)
    p = probe_clusters(x, cents, own, 3)
    assert (p[:, 0] == own).all() and all(len(set(r)) == 3 for r in p.tolist())
    dense = np.argsort(-(x.astype(np.float64) @ cents.T.astype(np.float64)), axis=1, kind="stable")[:, :3]
    assert (np.sort(p, axis=1) == np.sort(dense, axis=1)).mean() > 0.99


@pytest.mark.parametrize("strategy", ["hard", "easy", "random"])
def test_global_rank_from_arrow_ids_equals_the_numpy_order(strategy: str) -> None:
    """The Arrow sort (multi-probe pools) and `cluster_order`'s lexsort give the same global order, ties included."""
    rng = np.random.default_rng(3)
    ids = [f"i{j}" for j in rng.permutation(500)] + ["é", "z", "Z", "a-b", "ab"]
    sims = np.round(rng.uniform(-1, 1, len(ids)), 1)  # many exact ties: the id decides them
    sims[:3] = [0.0, -0.0, 0.0]
    expected = global_rank(np.asarray(ids, dtype=object), sims, strategy, 0)
    np.testing.assert_array_equal(global_rank(pa.array(ids), sims, strategy, 0), expected)
    np.testing.assert_array_equal(global_rank(pa.chunked_array([ids[:100], ids[100:]]), sims, strategy, 0), expected)


def test_the_numpy_tile_epilogue_equals_torch_s() -> None:
    """`max_over_earlier` on the CPU (numpy mask/max) gives the torch epilogue's values and first argmax, ties too."""
    import torch

    from semdedup_assets.core.dedup import pairwise

    rng = np.random.default_rng(4)
    x = torch.from_numpy(np.round(rng.normal(size=(300, 8)), 1).astype(np.float32))
    x[50:60] = x[10]  # exact ties across and within tiles
    q, pos = x[[5, 11, 70, 200, 299]], torch.tensor([5, 11, 70, 200, 299])
    host = pairwise.max_over_earlier(q, pos, x, 64)
    best = torch.full((5,), float("-inf"))
    best_idx = torch.full((5,), -1, dtype=torch.int64)
    for i0 in range(0, 299, 64):  # the torch epilogue, spelled out as before the numpy one
        tile = q @ x[i0 : min(i0 + 64, 299)].T
        tile.masked_fill_(torch.arange(i0, min(i0 + 64, 299))[None, :] >= pos[:, None], float("-inf"))
        val, arg = tile.max(dim=1)
        better = val > best
        best, best_idx = torch.where(better, val, best), torch.where(better, arg + i0, best_idx)
    assert torch.equal(host[0], best) and torch.equal(host[1], best_idx)
