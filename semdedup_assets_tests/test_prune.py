"""Pruning selections (SSL prototypes, D4, DBP) against deliberately plain dense implementations.

The graph runs once per seed on planted bring-your-own embeddings with every pruning
selection in the `prune` knob (the `pruned_*` assets through Dagster). The references
below hold everything in memory and share no code with semdedup_assets.core: they start
from the input vectors and the stored centroids, assign, run the pairwise rule, and
prune, each step as its paper states it (D4's re-clustering calls faiss directly).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import dagster as dg
import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import main
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.select.prune import compute_pruning, parse_pruning
from semdedup_assets.definitions import build_definitions
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.fixtures import write_embedding_shards

N_SHARDS, PER_SHARD, DIM = 3, 300, 32
EPS = (0.01, 0.05, 0.2)
FRACTIONS = (0.3, 0.65)
TEMPERATURES = (0.02, 0.5, 3.0)
D4_CLUSTERS = 6
PRUNE = ";".join(
    [f"prototypes:keep-fraction={f}" for f in FRACTIONS]
    + [f"d4:eps=0.05,keep-fraction={f},clusters={D4_CLUSTERS}" for f in FRACTIONS]
    + [f"dbp:eps=0.05,keep-fraction={f},temperature={t},neighbours=4" for f in FRACTIONS for t in TEMPERATURES]
    + ["dbp:eps=0.2,keep-fraction=0.5"]  # defaults: temperature 0.5, 20 neighbours (more than the clusters)
)


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def ran(request, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp(f"prune{request.param}")
    write_embedding_shards(
        root / "input", n_shards=N_SHARDS, per_shard=PER_SHARD, d=DIM, dup_every=5, seed=request.param
    )
    settings = Settings(
        storage=str(root / "storage"),
        input=str(root / "input"),
        modality="embedding",
        clusters=10,
        buckets=3,
        eps=EPS,
        block_size=64,
        seed=request.param,
        prune=PRUNE,
    )
    with dg.instance_for_test() as instance:
        run_pipeline(settings, instance, log=lambda m: None)
        events = {
            m: instance.get_latest_materialization_event(dg.AssetKey(f"pruned_{m}"))
            for m in ("prototypes", "d4", "dbp")
        }
        metadata = {m: e.asset_materialization.metadata for m, e in events.items()}
        # The `deduplicated` asset with a pruning selection in `select` (export_job, one shard).
        label = "d4:eps=0.05,keep-fraction=0.3,clusters=6"
        export = build_definitions(settings.replace(select=label)).resolve_job_def("export_job")
        assert export.execute_in_process(instance=instance, partition_key="part-01").success
    # The stored embeddings and centroids are the references' inputs.
    stored = [pq.read_table(root / "storage" / "embeddings" / f"part-{s:02d}.parquet") for s in range(N_SHARDS)]
    ids = np.array([i for t in stored for i in t.column("id").to_pylist()])
    x = np.array([v for t in stored for v in t.column("embedding").to_pylist()], dtype=np.float32)
    centroids = np.array(
        pq.read_table(root / "storage" / "centroids" / "centroids.parquet")
        .sort_by("cluster")
        .column("centroid")
        .to_pylist(),
        dtype=np.float32,
    )
    return {"settings": settings, "x": x, "ids": ids, "centroids": centroids, "metadata": metadata}


# ---- the plain references ---------------------------------------------------------------------


def n_keep(fraction: float, total: int) -> int:
    return min(total, math.ceil(Fraction(repr(fraction)) * total))


def nearest(x: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by inner product, and the similarity to it (float64 dot rounded to float32)."""
    cluster = np.argmax(x @ c.T, axis=1)
    sim = np.array([np.dot(x[i].astype(np.float64), c[cluster[i]].astype(np.float64)) for i in range(len(x))])
    return cluster, sim.astype(np.float32).astype(np.float64)


def semdedup_survivors(x: np.ndarray, ids: np.ndarray, cluster: np.ndarray, sim: np.ndarray, eps: float) -> np.ndarray:
    """The paper's rule per cluster, hard order (ascending sim, ties by id), dense n x n: a keep mask."""
    keep = np.ones(len(x), dtype=bool)
    for c in np.unique(cluster):
        members = [i for i in sorted(np.flatnonzero(cluster == c), key=lambda i: (sim[i], ids[i]))]
        v = x[members]
        m = np.triu(v @ v.T, k=1)  # only earlier members i < j
        max_sim = np.concatenate([[0.0], m[:, 1:].max(axis=0)]) if len(members) > 1 else np.zeros(1)
        for j, i in enumerate(members):
            if j > 0 and float(max_sim[j]) > 1.0 - eps:
                keep[i] = False
    return keep


def hardest(rows: list[int], sim: np.ndarray, ids: np.ndarray, n: int) -> set[str]:
    """The n rows farthest from their centroid (smallest sim), ties by id."""
    return {ids[i] for i in sorted(rows, key=lambda i: (sim[i], ids[i]))[:n]}


def dense_prototypes(ran: dict, fraction: float) -> set[str]:
    _cluster, sim = nearest(ran["x"], ran["centroids"])
    return hardest(list(range(len(sim))), sim, ran["ids"], n_keep(fraction, len(sim)))


def dense_d4(ran: dict, eps: float, fraction: float, k: int) -> set[str]:
    x, ids, s = ran["x"], ran["ids"], ran["settings"]
    cluster, sim = nearest(x, ran["centroids"])
    alive = np.flatnonzero(semdedup_survivors(x, ids, cluster, sim, eps))
    alive = alive[np.argsort(ids[alive])]  # the k-means sample: every survivor, in id order
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=s.kmeans_iterations,
        seed=s.seed,
        spherical=True,
        max_points_per_centroid=s.max_points_per_centroid,
        min_points_per_centroid=1,
    )
    km.train(np.ascontiguousarray(x[alive]))
    _, new_sim = nearest(x[alive], km.centroids)
    order = sorted(range(len(alive)), key=lambda j: (new_sim[j], ids[alive[j]]))
    return {ids[alive[j]] for j in order[: n_keep(fraction, len(x))]}


def dense_dbp(ran: dict, eps: float, fraction: float, temperature: float, neighbours: int) -> tuple[set[str], dict]:
    x, ids, c = ran["x"], ran["ids"], ran["centroids"].astype(np.float64)
    cluster, sim = nearest(x, ran["centroids"])
    alive = semdedup_survivors(x, ids, cluster, sim, eps)
    clusters = sorted(set(cluster[alive].tolist()))
    members = {j: [i for i in np.flatnonzero(alive & (cluster == j))] for j in clusters}
    size = np.array([len(members[j]) for j in clusters], dtype=float)
    d_intra = np.array([1.0 - math.fsum(sim[members[j]].tolist()) / len(members[j]) for j in clusters])
    g = c[clusters] @ c[clusters].T
    np.fill_diagonal(g, -np.inf)
    nn = min(neighbours, len(clusters) - 1)
    d_inter = np.array([1.0 - math.fsum(sorted(row, reverse=True)[:nn]) / nn for row in g.tolist()])
    complexity = d_inter * d_intra
    w = np.exp((complexity - complexity.max()) / temperature)
    p = w / math.fsum(w.tolist())
    n = n_keep(fraction, len(x))
    lo, hi = -float(n), float(n)  # bisection on lam: sum clip(n p + lam, 0, size) = n
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.fsum(np.clip(n * p + mid, 0, size).tolist()) < n else (lo, mid)
    real = np.clip(n * p + hi, 0, size)
    quota = np.minimum(np.floor(real), size).astype(int)
    extra = sorted([j for j in range(len(clusters)) if quota[j] < size[j]], key=lambda j: (-(real[j] - quota[j]), j))
    for j in extra[: n - quota.sum()]:
        quota[j] += 1
    kept = set().union(*[hardest(members[j], sim, ids, int(q)) for j, q in zip(clusters, quota)])
    return kept, {"quota": dict(zip(clusters, quota.tolist())), "d_intra": d_intra, "d_inter": d_inter}


# ---- the tests ---------------------------------------------------------------------------------


def kept_ids(settings: Settings, label: str) -> set[str]:
    _, rows = query(settings.storage_root(), "SELECT id FROM pruned WHERE selection = ?", [label])
    return {r[0] for r in rows}


def test_prototypes_match_the_dense_reference(ran: dict) -> None:
    for f in FRACTIONS:
        label = f"prototypes:keep-fraction={f}"
        assert kept_ids(ran["settings"], label) == dense_prototypes(ran, f), label


def test_d4_matches_the_dense_reference(ran: dict) -> None:
    for f in FRACTIONS:
        label = f"d4:eps=0.05,keep-fraction={f},clusters={D4_CLUSTERS}"
        expected = dense_d4(ran, 0.05, f, D4_CLUSTERS)
        assert len(expected) == n_keep(f, len(ran["ids"]))
        assert kept_ids(ran["settings"], label) == expected, label


def test_dbp_matches_the_dense_reference_for_fractions_and_temperatures(ran: dict) -> None:
    settings = ran["settings"]
    quotas = set()
    for f in FRACTIONS:
        for t in TEMPERATURES:
            label = parse_pruning(f"dbp:eps=0.05,keep-fraction={f},temperature={t},neighbours=4", EPS).label
            expected, budget = dense_dbp(ran, 0.05, f, t, 4)
            assert kept_ids(settings, label) == expected, label
            _, rows = query(
                settings.storage_root(),
                "SELECT cluster, kept, d_intra, d_inter FROM pruned_budget WHERE selection = ? ORDER BY cluster",
                [label],
            )
            assert {r[0]: r[1] for r in rows} == budget["quota"]
            np.testing.assert_allclose([r[2] for r in rows], budget["d_intra"], rtol=0, atol=1e-12)
            np.testing.assert_allclose([r[3] for r in rows], budget["d_inter"], rtol=0, atol=1e-12)
            quotas.add(tuple(budget["quota"].values()))
    assert len(quotas) == len(FRACTIONS) * len(TEMPERATURES)  # the temperature changes the budget
    expected, _ = dense_dbp(ran, 0.2, 0.5, 0.5, 20)
    assert kept_ids(settings, "dbp:eps=0.2,keep-fraction=0.5,temperature=0.5,neighbours=20") == expected


def test_recomputing_gives_the_same_bytes_and_export_writes_the_kept_rows(ran: dict, capsys) -> None:
    settings = ran["settings"]
    folder = Path(settings.storage) / "pruned"
    before = {p: p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}
    assert len({p.parent for p in before if p.name == "kept.parquet"}) == len(PRUNE.split(";"))
    for label in PRUNE.split(";"):
        compute_pruning(settings, parse_pruning(label, EPS))
    assert {p: p.read_bytes() for p in sorted(folder.rglob("*.parquet"))} == before

    label = "dbp:eps=0.05,keep-fraction=0.3,temperature=0.5,neighbours=4"
    assert main(["export", "--select", label, "--storage", settings.storage]) == 0
    exported = {
        i
        for s in range(N_SHARDS)
        for i in pq.read_table(Path(settings.storage) / "deduplicated" / label / f"part-{s:02d}.parquet")
        .column("id")
        .to_pylist()
    }
    assert exported == kept_ids(settings, label)
    assert main(["export", "--select", "d4:eps=0.3,keep-fraction=0.5", "--storage", settings.storage]) == 1
    assert "eps=0.3 is not configured" in capsys.readouterr().err


def test_assets_show_the_budget_table_and_a_plot(ran: dict) -> None:
    meta = ran["metadata"]
    label = "dbp:eps=0.2,keep-fraction=0.5,temperature=0.5,neighbours=20"
    table = meta["dbp"][f"{label}: budget"]
    assert isinstance(table, dg.TableMetadataValue)
    assert {c.name for c in table.schema.columns} >= {"cluster", "members", "kept", "d_intra", "d_inter", "share"}
    assert sum(r.data["kept"] for r in table.records) == meta["dbp"][f"{label}: kept"].value
    for method, m in meta.items():
        assert m["selections"].value == {"prototypes": 2, "d4": 2, "dbp": 7}[method]
        plots = [v.value for k, v in m.items() if k.endswith(": budget_plot")]
        assert plots and all(p.startswith("![") and "data:image/png;base64," in p for p in plots)


def test_the_deduplicated_asset_exports_a_pruning_selection(ran: dict) -> None:
    settings = ran["settings"]
    label = "d4:eps=0.05,keep-fraction=0.3,clusters=6"
    written = (
        pq.read_table(Path(settings.storage) / "deduplicated" / label / "part-01.parquet").column("id").to_pylist()
    )
    assert set(written) == {i for i in kept_ids(settings, label) if i.startswith("s1-")} and written
