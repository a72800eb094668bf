"""The `outliers` and `representatives` selections (core/select/prune.py, docs/pruning.md) on a planted corpus.

Eight clusters of unequal size plus sixteen planted outliers (random directions) are run
through the pipeline with both selections in the `prune` knob; then each selection is
computed for several sizes, and checked for exact sizes, the planted outliers, coverage
against random picks, determinism, the CLI, the library and clear errors.
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.cli import main
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.select.export import ExportError, parse_selection
from semdedup_assets.core.select.prune import PruneError, compute_pruning, parse_pruning
from semdedup_assets.pipeline import run_pipeline

BLOBS = (200, 150, 120, 100, 80, 60, 44, 30)  # 784 clustered items
OUTLIERS = 16
N = sum(BLOBS) + OUTLIERS  # 800
D = 32
EPS = (0.01,)
PRUNE = "outliers:fraction=0.02;representatives:size=8"


def planted_corpus(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit rows of eight tight clusters and sixteen random directions, shuffled; their ids, and True at an outlier."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(BLOBS), D))
    rows = [c + 0.1 * rng.normal(size=(m, D)) * np.linalg.norm(c) for c, m in zip(centers, BLOBS)]
    rows.append(rng.normal(size=(OUTLIERS, D)))
    x = np.concatenate(rows).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = np.array([f"x{i:04d}" for i in rng.permutation(N)])  # ids do not follow the blobs
    order = rng.permutation(N)
    return x[order], ids[order], order >= N - OUTLIERS


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("selections")
    x, ids, outliers = planted_corpus()
    (root / "input").mkdir()
    half = N // 2
    for s, part in enumerate((slice(0, half), slice(half, N))):
        pq.write_table(
            pa.table({"id": ids[part].tolist(), "embedding": pa.array(list(x[part]), type=pa.list_(pa.float32()))}),
            root / "input" / f"part-{s:02d}.parquet",
        )
    settings = Settings(
        storage=str(root / "storage"),
        input=str(root / "input"),
        modality="embedding",
        clusters=len(BLOBS),
        buckets=3,
        eps=EPS,
        block_size=64,
        prune=PRUNE,
    )
    with dg.instance_for_test() as instance:
        run_pipeline(settings, instance, log=lambda m: None)
        metadata = {
            m: instance.get_latest_materialization_event(dg.AssetKey(f"pruned_{m}")).asset_materialization.metadata
            for m in ("outliers", "representatives")
        }
    stored = [pq.read_table(root / "storage" / "embeddings" / f"part-{s:02d}.parquet") for s in range(2)]
    vectors = {i: v for t in stored for i, v in zip(t.column("id").to_pylist(), t.column("embedding").to_pylist())}
    outlier_ids = set(ids[outliers].tolist())
    return {"settings": settings, "x": x, "ids": ids, "outliers": outlier_ids, "vectors": vectors, "metadata": metadata}


def kept(settings: Settings, text: str) -> list[str]:
    label = parse_pruning(text, EPS).label
    compute_pruning(settings, parse_pruning(text, EPS))
    _, rows = query(settings.storage_root(), "SELECT id FROM pruned WHERE selection = ? ORDER BY id", [label])
    return [r[0] for r in rows]


def coverage(vectors: dict, chosen: list[str]) -> float:
    """Mean over all items of the largest cosine similarity to a chosen item."""
    x = np.array(list(vectors.values()), dtype=np.float64)
    c = np.array([vectors[i] for i in chosen], dtype=np.float64)
    return float((x @ c.T).max(axis=1).mean())


def test_outliers_remove_exactly_ceil_f_n_and_find_the_planted_ones(ran: dict) -> None:
    settings = ran["settings"]
    for fraction in (0.0001, 0.02, 0.37, 0.999):
        removed = math.ceil(Fraction(repr(fraction)) * N)
        assert len(kept(settings, f"outliers:fraction={fraction}")) == N - removed, fraction
    gone = set(ran["ids"].tolist()) - set(kept(settings, "outliers:fraction=0.02"))  # 16 of 800
    assert gone == ran["outliers"]
    # Nested: a larger fraction removes a superset (one ranking, one cut).
    assert set(kept(settings, "outliers:fraction=0.1")) <= set(kept(settings, "outliers:fraction=0.02"))
    assert ran["metadata"]["outliers"]["outliers:fraction=0.02,neighbours=20: kept"].value == N - OUTLIERS


def test_representatives_have_exact_sizes_and_per_cluster_quotas(ran: dict) -> None:
    settings = ran["settings"]
    for size in (1, 3, 8, 100, 799, N):  # 3 < 8 clusters; N: every item
        assert len(kept(settings, f"representatives:size={size}")) == size, size
    assert set(kept(settings, f"representatives:size={N}")) == set(ran["ids"].tolist())
    _, rows = query(
        settings.storage_root(),
        "SELECT members, kept FROM pruned_budget WHERE selection = 'representatives:size=3,diversity=0.5' "
        "ORDER BY members DESC",
    )
    assert sum(r[1] for r in rows) == 3 and [r[1] for r in rows[:3]] == [1, 1, 1]  # the three largest clusters
    assert ran["metadata"]["representatives"]["representatives:size=8,diversity=0.5: kept"].value == 8


def test_representatives_cover_better_than_random(ran: dict) -> None:
    vectors = ran["vectors"]
    rng = np.random.default_rng(0)
    ids = list(vectors)
    for size in (8, 24):
        ours = coverage(vectors, kept(ran["settings"], f"representatives:size={size}"))
        random = [coverage(vectors, rng.choice(ids, size, replace=False).tolist()) for _ in range(20)]
        assert ours > max(random), (size, ours, max(random))


def test_more_than_the_items_is_refused(ran: dict, capsys) -> None:
    settings = ran["settings"]
    with pytest.raises(PruneError, match=f"size=801 is more than the {N} items"):
        compute_pruning(settings, parse_pruning("representatives:size=801", EPS))
    assert main(["export", "--select", "representatives:size=5000", "--storage", settings.storage]) == 1
    assert f"size=5000 is more than the {N} items" in capsys.readouterr().err


def test_same_bytes_again_and_export_writes_the_kept_rows(ran: dict) -> None:
    settings = ran["settings"]
    folder = Path(settings.storage) / "pruned"
    labels = ["outliers:fraction=0.02,neighbours=20", "representatives:size=8,diversity=0.5"]
    for label in labels:
        compute_pruning(settings, parse_pruning(label, EPS))
    before = {p: p.read_bytes() for label in labels for p in sorted((folder / label).rglob("*.parquet"))}
    for label in labels:
        compute_pruning(settings, parse_pruning(label, EPS))
    assert {p: p.read_bytes() for label in labels for p in sorted((folder / label).rglob("*.parquet"))} == before
    label = "representatives:size=24,diversity=0.8"
    assert main(["export", "--select", label, "--storage", settings.storage]) == 0
    exported = {
        i
        for s in range(2)
        for i in pq.read_table(Path(settings.storage) / "deduplicated" / label / f"part-{s:02d}.parquet")
        .column("id")
        .to_pylist()
    }
    assert exported == set(kept(settings, label)) and len(exported) == 24


@pytest.mark.parametrize(
    "text, message",
    [
        ("outliers:", "outliers needs fraction=..."),
        ("outliers:fraction=0", "fraction must lie in (0, 1)"),
        ("outliers:fraction=1", "fraction must lie in (0, 1)"),
        ("outliers:fraction=abc", "fraction='abc' is not a number"),
        ("outliers:fraction=0.1,neighbours=0", "neighbours must be >= 1"),
        ("outliers:fraction=0.1,size=3", "outliers takes fraction, neighbours, got 'size=3'"),
        ("outliers:fraction=0.1,fraction=0.2", "fraction is given twice"),
        ("representatives:diversity=0.5", "representatives needs size=..."),
        ("representatives:size=0", "size must be >= 1"),
        ("representatives:size=2.5", "size='2.5' is not an integer"),
        ("representatives:size=10,diversity=1.5", "diversity must lie in [0, 1]"),
        ("representatives:size=10,keep-fraction=0.5", "representatives takes size, diversity"),
        ("representative:size=10", "selection must be eps=E or keep-fraction=F"),
    ],
)
def test_bad_selections_are_named(text: str, message: str) -> None:
    with pytest.raises(ExportError) as err:
        parse_selection(text, EPS)
    assert message in str(err.value)


def test_labels_fill_in_the_defaults() -> None:
    assert parse_pruning("outliers:fraction=0.05", EPS).label == "outliers:fraction=0.05,neighbours=20"
    assert parse_pruning("Representatives: size = 7", EPS).label == "representatives:size=7,diversity=0.5"
    assert parse_selection("outliers:fraction=0.05,neighbors=4", EPS).label == "outliers:fraction=0.05,neighbours=4"


def test_the_library_selects_with_a_pruning_selection(tmp_path: Path) -> None:
    from semdedup_assets import SemDeDup

    x, _, outliers = planted_corpus(1)
    with SemDeDup(clusters=len(BLOBS), buckets=2, eps=[0.01], block_size=64, progress=False).run(
        x, storage=str(tmp_path / "lib")
    ) as result:
        inliers = result.select(select="outliers:fraction=0.02")
        assert inliers.shape == (N - OUTLIERS, D)
        assert (result.selection_mask(select="outliers:fraction=0.02") == ~outliers).all()
        reps = result.pruned_ids("representatives:size=12,diversity=0.3")
        assert len(reps) == 12
        with pytest.raises(ValueError, match="size=801 is more than the 800 items"):
            result.select(select="representatives:size=801")


def test_the_component_materializes_the_selections_of_its_prune_setting(ran: dict, tmp_path: Path) -> None:
    from semdedup_assets.component import SemDedup

    settings = ran["settings"]
    prune = "outliers:fraction=0.05;representatives:size=20,diversity=0.2"
    component = SemDedup.from_settings(settings.replace(prune=prune), prefix="sel")
    defs = component.definitions(tmp_path)
    job = next(j for j in defs.resolve_all_job_defs() if j.name.endswith("prune_job"))
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance)
        assert result.success
        meta = instance.get_latest_materialization_event(
            dg.AssetKey(["sel", "pruned_representatives"])
        ).asset_materialization.metadata
    assert meta["representatives:size=20,diversity=0.2: kept"].value == 20
    assert len(kept(settings, "outliers:fraction=0.05")) == N - 40
