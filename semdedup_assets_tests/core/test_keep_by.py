"""`--keep-by COLUMN[:asc|desc],...`: input columns order each cluster before the keep strategy's key."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.config import Settings, parse_keep_by
from semdedup_assets.core.dedup.ordering import cluster_order
from semdedup_assets.core.embed.shard import embed_shard
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.io.shards import ShardError, discover_shards, keep_by_column
from semdedup_assets.core.run.loop import ingest_shards
from semdedup_assets.pipeline import run_pipeline
from semdedup_assets_tests.core.test_units import run_units
from semdedup_assets_tests.fixtures import make_planted

N, SHARDS = 240, 3


def _planted_pairs(folder: Path) -> np.ndarray:
    """Rows 2i and 2i+1 are near-copies (cos ~ 0.9999); a random score, null for a few pair members."""
    folder.mkdir(parents=True, exist_ok=True)
    x = make_planted(N, 8, 2, seed=3, noise=0.001)
    score = np.random.default_rng(1).random(N)
    score[[5, 40, 77]] = np.nan  # nulls (the odd member of three pairs; the even one of a fourth below)
    score[90] = np.nan
    per = N // SHARDS
    for s in range(SHARDS):
        rows = slice(s * per, (s + 1) * per)
        values = [None if np.isnan(v) else float(v) for v in score[rows]]
        pq.write_table(
            pa.table(
                {
                    "id": [f"i{j:04d}" for j in range(s * per, (s + 1) * per)],
                    "embedding": pa.array(list(x[rows]), type=pa.list_(pa.float32())),
                    "score": pa.array(values, type=pa.float64()),
                }
            ),
            folder / f"part-{s:02d}.parquet",
        )
    return score


def _settings(tmp_path: Path, name: str, **kw) -> Settings:
    return Settings(
        storage=str(tmp_path / name),
        input=str(tmp_path / "input"),
        modality="embedding",
        clusters=5,
        buckets=3,
        eps=(0.001, 0.01, 0.1),
        block_size=32,
        **kw,
    )


def _pair_winners(settings: Settings, score: np.ndarray) -> tuple[int, int]:
    """(pairs whose surviving member has the higher score, pairs where the other one survived) at eps 0.01.

    A null score counts as lower than any number (nulls last); every planted pair must be split.
    """
    kept = set(pq.read_table(settings.storage_root().keep_list_file(0.01)).column("id").to_pylist())
    right = wrong = 0
    for i in range(0, N, 2):
        a, b = f"i{i:04d}", f"i{i + 1:04d}"
        assert (a in kept) != (b in kept), f"planted pair {a}, {b} not split"
        sa, sb = (-np.inf if np.isnan(v) else v for v in (score[i], score[i + 1]))
        best = a if sa > sb else b
        right, wrong = right + (best in kept), wrong + (best not in kept)
    return right, wrong


@pytest.mark.dagster
def test_keep_by_keeps_the_higher_scored_member_of_every_planted_pair(tmp_path: Path) -> None:
    score = _planted_pairs(tmp_path / "input")
    # Without the flag the hard order (far from the centroid first) decides: about half the pairs go the other way.
    plain = _settings(tmp_path, "plain")
    run_units(plain)
    assert _pair_winners(plain, score)[1] > 10
    for name, kw in (("units", {}), ("probes", {"probes": 2}), ("easy", {"keep": "easy"})):
        units = _settings(tmp_path, name, keep_by="score:desc", **kw)
        run_units(units)
        assert _pair_winners(units, score) == (N // 2, 0), name
    # The same through the Dagster graph (the resource derives keep_by from Settings).
    graph = _settings(tmp_path, "graph", keep_by="score:desc")
    with dg.instance_for_test() as instance:
        run_pipeline(graph, instance, log=lambda m: None)
    assert {p.name: p.read_bytes() for p in graph.storage_root().stage_files(st.KEEP_LISTS)} == {
        p.name: p.read_bytes() for p in _settings(tmp_path, "units").storage_root().stage_files(st.KEEP_LISTS)
    }
    # Ascending keeps the lower score instead (nulls still last, so a null never wins).
    low = _settings(tmp_path, "low", keep_by="score")
    run_units(low)
    assert _pair_winners(low, -score) == (N // 2, 0)  # -NaN is NaN: still the loser of its pair
    # The stage files carry the column: the assignments, and the raw index behind the `raw_items` view.
    assert pq.read_schema(graph.storage_root().shard_file(st.CLUSTER_ASSIGNMENTS, "part-00")).names[-1] == "score"
    _, [(nulls,)] = query(graph.storage_root(), "SELECT count(*) FROM raw_items WHERE score IS NULL")
    assert nulls == 4


def test_without_keep_by_the_files_are_todays_and_switching_it_reuses_the_embeddings(tmp_path: Path) -> None:
    _planted_pairs(tmp_path / "input")
    plain = _settings(tmp_path, "s")
    [shard, *_] = discover_shards(plain.input)
    ingest_shards(plain, [shard])
    raw = plain.storage_root().shard_file(st.RAW, shard.key)
    assert pq.read_schema(raw).names == ["id", "shard", "row", "payload_hash"]
    assert st.RAW_KEEP_BY_KEY not in (pq.read_schema(raw).metadata or {})
    first = embed_shard(plain, shard.key, shard)
    # --keep-by on: the raw index gains the column, and the embeddings are reused, not recomputed.
    ranked = plain.replace(keep_by="score:desc")
    ingest_shards(ranked, [shard])
    assert pq.read_schema(raw).names == ["id", "shard", "row", "score", "payload_hash"]
    assert json.loads(pq.read_schema(raw).metadata[st.RAW_KEEP_BY_KEY]) == ["score"]
    assert not first.cached and embed_shard(ranked, shard.key, shard).cached
    ingest_shards(plain, [shard])  # and off again
    assert embed_shard(plain, shard.key, shard).cached


def test_keep_by_errors_name_the_shard_and_what_it_has(tmp_path: Path) -> None:
    _planted_pairs(tmp_path / "input")
    shards = discover_shards(str(tmp_path / "input"))
    with pytest.raises(
        ShardError,
        match=r"shard 'part-00': missing keep-by column 'quality' "
        r"\(columns: id, embedding, score\)",
    ):
        ingest_shards(_settings(tmp_path, "s", keep_by="score:desc,quality"), shards)
    assert not _settings(tmp_path, "s").storage_root().stage_files(st.RAW)  # nothing published
    # A column that holds numbers in one shard and text in another cannot order them together.
    table = pq.read_table(tmp_path / "input" / "part-02.parquet")
    table = table.set_column(2, "score", pa.array([str(v) for v in table.column("score").to_pylist()]))
    pq.write_table(table, tmp_path / "input" / "part-02.parquet")
    with pytest.raises(
        ShardError, match="shard 'part-02': keep-by column 'score' holds strings here but numbers in shard 'part-00'"
    ):
        ingest_shards(_settings(tmp_path, "s", keep_by="score"), discover_shards(str(tmp_path / "input")))
    with pytest.raises(ShardError, match=r"shard 'x': keep-by column 'tags' is list<item: int64>"):
        keep_by_column("x", "tags", pa.chunked_array([pa.array([[1], [2]])]))


def test_keep_by_spec() -> None:
    assert parse_keep_by("score:desc, lang ,when:ASC") == (("score", True), ("lang", False), ("when", False))
    assert parse_keep_by(None) == parse_keep_by(" ") == ()
    # A name holding `:` is written with its direction; any other direction is refused (issue 34, finding 6).
    assert parse_keep_by("a:b:desc") == (("a:b", True),)
    for bad, message in (
        ("quality:up", "direction must be asc or desc, got 'up'"),
        ("a:b", "got 'b'"),
        ("score,,lang", "empty column name"),
        ("score,score:desc", "twice"),
        ("sim_to_centroid", "stage files use themselves"),
    ):
        with pytest.raises(ValueError, match=message):
            Settings(keep_by=bad)


def test_keep_by_order_nulls_last_and_ties_fall_back_to_the_strategy() -> None:
    rng = np.random.default_rng(0)
    ids = np.array([f"x{i}" for i in rng.permutation(60)])
    sims = rng.random(60).round(1)  # many ties: the id decides those
    for strategy in ("hard", "easy", "random"):
        plain = cluster_order(ids, sims, strategy, seed=4)
        # A constant column leaves today's order untouched (the strategy's key, then the id).
        assert (cluster_order(ids, sims, strategy, seed=4, keep_by=[(np.ones(60), True)]) == plain).all()
    values = [2.0, None, float("nan"), 5.0, 2.0]
    ids5, sims5 = ["a", "b", "c", "d", "e"], [0.5, 0.1, 0.2, 0.3, 0.4]
    assert cluster_order(ids5, sims5, "hard", keep_by=[(values, True)]).tolist() == [3, 4, 0, 1, 2]
    assert cluster_order(ids5, sims5, "hard", keep_by=[(values, False)]).tolist() == [4, 0, 3, 1, 2]
    two = [(["b", "a", "b", None, "a"], False), (values, True)]
    assert cluster_order(ids5, sims5, "easy", keep_by=two).tolist() == [4, 1, 0, 2, 3]


def test_keep_by_column_types() -> None:
    def stored(values: pa.Array) -> list:
        return keep_by_column("s", "c", pa.chunked_array([values])).to_pylist()

    assert stored(pa.array([3, None, 1])) == [3.0, None, 1.0]
    assert stored(pa.array([True, False])) == [1.0, 0.0]
    assert stored(pa.array([1.5, float("nan")])) == [1.5, None]
    assert stored(pa.array([dt.date(1970, 1, 2)])) == [86_400_000_000.0]
    assert stored(pa.array([dt.datetime(1970, 1, 1, 0, 0, 1)], type=pa.timestamp("ms"))) == [1_000_000.0]
    assert stored(pa.array(["b", "a"]).dictionary_encode()) == ["b", "a"]
    assert stored(pa.array([None, None])) == [None, None]
