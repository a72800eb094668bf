"""Duplicate groups (issue 36 point 4): the `groups` view against an independent union-find, the builders, the
keep-lists metadata, `semdedup groups` and `SemDeDupResult.groups`."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from semdedup_assets.core.config import Settings
from semdedup_assets.core.dedup.groups import (
    GROUP_COLUMNS,
    GroupsBuilder,
    build_groups,
    build_groups_out_of_core,
    group_roots,
    top_groups,
)
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import query
from semdedup_assets.core.run import loop as run_loop
from semdedup_assets_tests.fixtures import write_bucket_results

EPS = (0.001, 0.01, 0.03, 0.1)


def planted_chains(folder: Path, d: int = 24, seed: int = 3) -> np.ndarray:
    """Shards of unit vectors with planted groups: chains x_0 -> x_1 -> ... where each step is a small rotation
    (neighbours close, the chain's ends farther apart), stars (copies of one item at several distances), and
    unrelated singletons; rows shuffled so that a group's members lie in several shards."""
    rng = np.random.default_rng(seed)
    rows: list[np.ndarray] = []

    def unit(v: np.ndarray) -> np.ndarray:
        return (v / np.linalg.norm(v)).astype(np.float32)

    for length, step in ((2, 0.05), (3, 0.08), (4, 0.12), (6, 0.1), (8, 0.15), (5, 0.2)):
        for _ in range(3):  # several groups of each shape
            x = unit(rng.normal(size=d))
            for _ in range(length):
                rows.append(x)
                x = unit(x + step * unit(rng.normal(size=d)))
    for copies in (3, 5, 9):
        for _ in range(2):
            centre = unit(rng.normal(size=d))
            rows.append(centre)
            for c in range(copies):
                rows.append(unit(centre + (0.01 + 0.04 * c / copies) * unit(rng.normal(size=d))))
    rows += [unit(rng.normal(size=d)) for _ in range(120)]
    x = np.stack(rows)[rng.permutation(len(rows))]
    folder.mkdir(parents=True, exist_ok=True)
    for s, part in enumerate(np.array_split(x, 3)):
        pq.write_table(
            pa.table({"id": [f"s{s}-{i:04d}" for i in range(len(part))], "embedding": pa.array(list(part))}),
            folder / f"part-{s:02d}.parquet",
        )
    return x


def _settings(root: Path, name: str, **kw) -> Settings:
    base = dict(
        storage=str(root / name),
        input=str(root / "input"),
        modality="embedding",
        clusters=4,
        buckets=2,
        eps=EPS,
        block_size=16,
    )
    base.update(kw)
    return Settings(**base)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Settings]:
    """The planted corpus run through the core's units (no Dagster) with the paper's rule and with --probes 2."""
    root = tmp_path_factory.mktemp("groups")
    planted_chains(root / "input")
    out = {}
    for name, kw in {"p1": {}, "p2": {"probes": 2}, "p1-one-bucket": {"buckets": 1}}.items():
        settings = _settings(root, name, **kw)
        run_loop.run_units(settings).all()
        out[name] = settings
    return out


def union_find_groups(items: list[tuple[str, float, str | None]], eps: float) -> set[tuple[str, str, int]]:
    """The (group_id, id, size) rows of the components of 2+ items of the graph {id - duplicate_of : removed at eps},
    found by a union-find over undirected edges; group_id is the component's one kept item (asserted)."""
    parent: dict[str, str] = {i: i for i, _, _ in items}

    def find(i: str) -> str:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    removed = {i for i, m, dup in items if dup is not None and m > 1.0 - eps}
    for i, _, dup in items:
        if i in removed:
            parent[find(i)] = find(dup)  # type: ignore[arg-type]
    components: dict[str, list[str]] = defaultdict(list)
    for i, _, _ in items:
        components[find(i)].append(i)
    rows = set()
    for members in components.values():
        if len(members) < 2:
            continue
        kept = [i for i in members if i not in removed]
        assert len(kept) == 1, members  # a tree: exactly one kept item per component
        rows |= {(kept[0], i, len(members)) for i in members}
    return rows


def _items(settings: Settings) -> list[tuple[str, float, str | None]]:
    return [tuple(r) for r in query(settings.storage_root(), "SELECT id, max_sim, duplicate_of FROM items")[1]]  # type: ignore[misc]


def _view(settings: Settings, eps: float) -> list[tuple[str, str, int]]:
    return [
        tuple(r)  # type: ignore[misc]
        for r in query(settings.storage_root(), "SELECT group_id, id, size FROM groups WHERE eps = ?", [eps])[1]
    ]


@pytest.mark.parametrize("run", ["p1", "p2"])
def test_the_groups_view_matches_an_independent_union_find(runs: dict[str, Settings], run: str) -> None:
    settings = runs[run]
    items = _items(settings)
    removed_of = {i: (m, dup) for i, m, dup in items}
    chains = sizes = 0
    for eps in EPS:
        view = _view(settings, eps)
        assert len(view) == len(set(view)), "an item in two groups"
        assert set(view) == union_find_groups(items, eps), eps
        removed = {i for i, (m, dup) in removed_of.items() if dup is not None and m > 1.0 - eps}
        # Not vacuous: chains (a removed item whose duplicate is removed too) and several groups, some larger than 2.
        chains += sum(1 for i in removed if removed_of[i][1] in removed)
        sizes = max(sizes, len({g for g, _, n in view if n > 2}))
        assert sum(1 for g, i, _ in view if g != i) == len(removed)  # every removed item is in a group
    assert chains > 0 and sizes >= 3
    eps_in_view = [r[0] for r in query(settings.storage_root(), "SELECT DISTINCT eps FROM groups ORDER BY eps")[1]]
    assert eps_in_view == list(EPS)


def test_groups_bytes_do_not_depend_on_buckets_and_both_builders_agree(runs: dict[str, Settings], tmp_path) -> None:
    a, b = runs["p1"].storage_root(), runs["p1-one-bucket"].storage_root()
    for eps in EPS:
        assert a.groups_file(eps).read_bytes() == b.groups_file(eps).read_bytes()
    # The out-of-core builder (used for --probes > 1) gives the same rows on the paper's rule's results.
    copy = st.Storage(tmp_path / "copy")
    for path in a.stage_files(st.SEMANTIC_DUPLICATES):
        target = copy.stage_dir(st.SEMANTIC_DUPLICATES) / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    build_groups_out_of_core(copy, EPS)
    for eps in EPS:
        ours, theirs = (pq.read_table(s.groups_file(eps)) for s in (a, copy))
        assert ours.num_rows == theirs.num_rows
        key = ["group_id", "id"]
        assert ours.sort_by([(k, "ascending") for k in key]).equals(theirs.sort_by([(k, "ascending") for k in key]))


def test_the_builder_resolves_a_cluster_split_across_chunks(runs: dict[str, Settings], tmp_path) -> None:
    """Fed in chunks of 7 rows (clusters cut anywhere), the builder writes the files of whole buckets, byte for
    byte, and holds at most a chunk plus one cluster."""
    settings = runs["p1"]
    storage = settings.storage_root()
    rows = pa.concat_tables(pq.read_table(p) for p in storage.stage_files(st.SEMANTIC_DUPLICATES))
    other = st.Storage(tmp_path / "chunks")
    builder = GroupsBuilder(other, EPS)
    with st.publish_together(builder.writers):
        for start in range(0, rows.num_rows, 7):
            builder.feed(rows.slice(start, 7))
        builder.finish()
    for eps in EPS:
        assert other.groups_file(eps).read_bytes() == storage.groups_file(eps).read_bytes()
    largest = max(np.unique(rows.column("cluster").to_numpy(), return_counts=True)[1])
    assert builder.peak_rows <= largest + 7


def test_the_builder_refuses_a_duplicate_outside_the_cluster(tmp_path) -> None:
    table = pa.table(
        {"cluster": pa.array([0, 0, 1], pa.int32()), "id": ["a", "b", "c"], "max_sim": [0.0, 0.999, 0.999]},
    ).append_column("duplicate_of", pa.array([None, "a", "a"], pa.string()))
    builder = GroupsBuilder(st.Storage(tmp_path), [0.01])
    with pytest.raises(ValueError, match="'c' \\(cluster 1\\) duplicates"):
        with st.publish_together(builder.writers):
            builder.feed(table.select(GROUP_COLUMNS))
            builder.finish()
    assert not st.Storage(tmp_path).groups_file(0.01).exists()  # nothing published


def test_group_roots_by_pointer_jumping() -> None:
    parent = np.array([0, 0, 1, 2, 3, 5, 5, 4])  # one chain of 5 with a branch, and a pair
    assert group_roots(parent).tolist() == [0, 0, 0, 0, 0, 5, 5, 0]


def test_top_groups_are_largest_first_with_the_kept_item_first(runs: dict[str, Settings]) -> None:
    storage = runs["p1"].storage_root()
    eps = 0.1
    top = top_groups(storage, eps, top=3, examples=2)
    sizes = sorted(
        {(n, g) for g, _, n in _view(runs["p1"], eps)}, key=lambda x: (-x[0], x[1])
    )  # every group's (size, id)
    assert [(g, n) for g, n, _ in top] == [(g, n) for n, g in sizes[:3]]
    assert all(members[0] == g and len(members) == 2 for g, _, members in top)
    with pytest.raises(FileNotFoundError, match=r"eps=0\.2"):
        top_groups(storage, 0.2)


def test_semdedup_groups_prints_the_largest_groups(runs: dict[str, Settings], capsys, tmp_path) -> None:
    from semdedup_assets.cli import main
    from semdedup_assets.core.settings_store import save_settings

    settings = runs["p1"]
    save_settings(settings)  # the units ran without `semdedup run`, which records them
    storage = settings.storage
    assert main(["groups", "--eps", "0.1", "--top", "3", "--examples", "2", "--storage", storage]) == 0
    out = capsys.readouterr().out.splitlines()
    view = _view(settings, 0.1)
    assert out[0] == f"eps=0.1: {len({g for g, _, _ in view})} group(s) of two or more items, {len(view)} items in them"
    assert [c.strip() for c in out[1].split(" | ")] == ["#", "size", "group_id (kept)", "members"]
    top = top_groups(settings.storage_root(), 0.1, 3, 2)
    body = [[c.strip() for c in line.split(" | ")] for line in out[3:]]
    assert body == [
        [str(rank), str(n), g, ", ".join(ids) + (", ..." if n > 2 else "")]
        for rank, (g, n, ids) in enumerate(top, start=1)
    ]
    # Default eps: the smallest configured.
    assert main(["groups", "--storage", storage]) == 0
    assert capsys.readouterr().out.startswith("eps=0.001: ")
    # An eps that is not configured, and a storage without results, are errors that say so.
    assert main(["groups", "--eps", "0.2", "--storage", storage]) == 1
    err = capsys.readouterr().err
    assert "eps=0.2 is not configured" in err and "configured: 0.001, 0.01, 0.03, 0.1" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["groups", "--eps", "0.01", "--storage", str(empty)]) == 1
    assert "no duplicate groups at eps=0.01" in capsys.readouterr().err
    assert main(["groups", "--storage", str(tmp_path / "nowhere")]) == 1
    assert "no storage at" in capsys.readouterr().err


def test_the_library_result_has_groups(tmp_path) -> None:
    from semdedup_assets import SemDeDup

    x = planted_chains(tmp_path / "input")
    with SemDeDup(modality="embedding", clusters=4, eps=EPS, block_size=16).run(x) as result:
        items = [(r["id"], r["max_sim"], r["duplicate_of"]) for r in result.items.to_pylist()]
        for eps in EPS:
            table = result.groups(eps)
            assert table.schema.names == ["eps", "group_id", "id", "size"]
            rows = list(zip(*(table.column(c).to_pylist() for c in ("group_id", "id", "size"))))
            assert set(rows) == union_find_groups(items, eps) and len(rows) == len(set(rows))
            sizes = table.column("size").to_pylist()
            assert sizes == sorted(sizes, reverse=True)  # largest first
            assert set(table.column("eps").to_pylist()) <= {eps}
        with pytest.raises(ValueError, match="not configured"):
            result.groups(0.2)


@pytest.mark.dagster
def test_keep_lists_metadata_shows_the_largest_groups(tmp_path: Path, instance) -> None:
    import re

    import dagster as dg

    from semdedup_assets.pipeline import run_pipeline

    planted_chains(tmp_path / "input")
    settings = _settings(tmp_path, "storage")
    run_pipeline(settings, instance, log=lambda m: None)
    meta = instance.get_latest_materialization_event(dg.AssetKey("keep_lists")).asset_materialization.metadata
    for eps in EPS:
        view = _view(settings, eps)
        label = f"{eps:g}"
        assert meta[f"groups@eps={label}"].value == len({g for g, _, _ in view})
        assert meta[f"items_in_groups@eps={label}"].value == len(view)
        text = meta[f"largest_groups@eps={label}"].value
        rows = re.findall(r"^\| (\d+) \| `([^`]+)` \| (.*) \|$", text, flags=re.M)
        top = top_groups(settings.storage_root(), eps, 5, 4)
        assert [(int(n), g) for n, g, _ in rows] == [(n, g) for g, n, _ in top] and rows
        assert [re.findall(r"`([^`]+)`", cell) for _, _, cell in rows] == [members for _, _, members in top]


def test_the_streaming_builder_holds_a_row_group_and_a_cluster_whatever_n(tmp_path: Path) -> None:
    """At N = 100,000 and 4N (clusters of 100): the builder resolves at most one streamed row group plus the held
    cluster at once, the same at 4N as at N (its memory bound; bench/groups_memory.py measures the RSS)."""
    peaks = []
    for n in (100_000, 400_000):
        storage = st.Storage(tmp_path / f"n{n}")
        write_bucket_results(storage.root, n, 100, buckets=1)  # buckets beyond a row group each
        builder = build_groups(storage, (0.01, 0.1), storage.stage_files(st.SEMANTIC_DUPLICATES))
        peaks.append(builder.peak_rows)
        assert pq.read_metadata(storage.groups_file(0.1)).num_rows > n // 3  # real groups were written
    assert max(peaks) <= st.STREAM_ROW_GROUP + 100, peaks  # a chunk and (part of) one held cluster


def test_verify_checks_the_groups_files(runs: dict[str, Settings], tmp_path: Path) -> None:
    import shutil

    from semdedup_assets.core.checks.verify import verify_storage

    settings = runs["p1"].replace(storage=str(tmp_path / "copy"))
    shutil.copytree(runs["p1"].storage, settings.storage)
    storage = settings.storage_root()
    assert not [p for p in verify_storage(storage, settings) if st.GROUPS in str(p.path)]
    # A group that lost a member, and a truncated file: each named.
    path = storage.groups_file(0.01)
    table = pq.read_table(path)
    assert table.column("id")[1] != table.column("group_id")[1]  # rows: a group's kept item, then its members
    pq.write_table(table.filter(pc.not_equal(table.column("id"), table.column("id")[1])), path)
    path2 = storage.groups_file(0.1)
    path2.write_bytes(path2.read_bytes()[:100])
    problems = {str(p.path): p.reason for p in verify_storage(storage, settings)}
    assert "removed members" in problems[str(path)] and "the buckets remove" in problems[str(path)]
    assert "damaged" in problems[str(path2)]


def test_text_groups_show_their_texts_in_the_metadata_and_the_cli(tmp_path: Path, capsys) -> None:
    """Text: row 0, its exact copy and its near copy form one group; the keep_lists metadata and `semdedup groups`
    show the members' texts."""
    from semdedup_assets import SemDeDup
    from semdedup_assets.assets.dedup import groups_metadata
    from semdedup_assets.cli import main
    from semdedup_assets_tests.fixtures import BASE_SENTENCES, NEAR_COPIES
    from semdedup_assets_tests.tinybert import write_tiny_bert

    bert = write_tiny_bert(tmp_path / "bert")
    texts = [*BASE_SENTENCES, *NEAR_COPIES.values(), BASE_SENTENCES[0]]  # the last: an exact copy of row 0
    sd = SemDeDup(model=str(bert), clusters=2, buckets=2, eps=[0.001, 0.01], max_length=64, progress=False)
    with sd.run(texts, storage=tmp_path / "s") as r:
        groups = r.groups(0.001)
        group_of = dict(zip(groups.column("id").to_pylist(), groups.column("group_id").to_pylist()))
        copy = str(len(texts) - 1)
        # Row 0 and its exact copy are one group, named by its one kept item (row 0 or its near copy, whichever
        # the rule's order puts first), whose text the metadata and the CLI show.
        name = group_of["0"]
        assert group_of[copy] == name and name in r.kept_ids(0.001) and copy not in r.kept_ids(0.001)
        meta = groups_metadata(r.storage, r.settings)
        table = meta["largest_groups@eps=0.001"].value
        assert f"`{name}` " + texts[int(name)] in table
        assert meta["groups@eps=0.001"] == len(set(group_of.values()))
        assert main(["groups", "--eps", "0.001", "--storage", str(r.storage.root)]) == 0
        assert f"  {name}: {texts[int(name)]}" in capsys.readouterr().out
