"""Duplicate groups: the connected components of the duplicate graph at each configured eps.

At one eps the graph has an edge j -> duplicate_of[j] for every removed item j
(max_sim[j] > 1 - eps). duplicate_of[j] always precedes j in the rule's order, so every
removed item has exactly one edge to an earlier item and the graph is a forest: each
component holds exactly one kept item, its root, which is also its first member in the
rule's order. That kept item's id is the component's `group_id`. Components of one item
(a kept item that nothing duplicates) are left out: a group has two or more members.

Two builders write the same rows (`groups/eps=<e>.parquet`, GROUPS_SCHEMA):

- `GroupsBuilder` (the paper's rule, --probes 1): duplicate_of never leaves its cluster
  and a bucket file holds each cluster's rows together, in the rule's order. The builder
  is fed the bucket rows as `build_keep_lists` streams them and resolves a cluster's roots
  once all of its rows are in, by pointer jumping over positions (no Python loop per row).
  Memory: one streamed row group plus the largest cluster's id, cluster, max_sim and
  duplicate_of columns (the pairwise stage itself holds that cluster's ids and vectors),
  whatever N.
- `build_groups_out_of_core` (--probes > 1): duplicate_of may point into any cluster of any
  bucket, so the roots are resolved by pointer jumping in a scratch DuckDB database under
  the storage's scan memory (DuckDB spills beyond it); Python holds one record batch.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.catalog import BUCKET_GLOB, MIN_SCAN_MEMORY, scan, sql_quote, stage_source
from semdedup_assets.core.io.schemas import GROUPS_SCHEMA

GROUP_COLUMNS = ["cluster", "id", "max_sim", "duplicate_of"]


def group_roots(parent: np.ndarray) -> np.ndarray:
    """Each node's root in a forest given by `parent` (a root is its own parent), by pointer jumping.

    Every round halves the remaining path length, so a chain of length L takes log2(L) rounds
    of O(n) vector work.
    """
    root = np.asarray(parent, dtype=np.int64)
    while True:
        nxt = root[root]
        if np.array_equal(nxt, root):
            return root
        root = nxt


def component_rows(ids: pa.Array, root: np.ndarray, eps: float) -> pa.Table:
    """The GROUPS_SCHEMA rows of the components of size >= 2, group by group in root order, members in row order."""
    size = np.bincount(root, minlength=len(root))
    member = np.flatnonzero(size[root] >= 2)
    # Stable sort by root: a group's rows stay in the rule's order, its root (the earliest) first.
    member = member[np.argsort(root[member], kind="stable")]
    take = pa.array(member, type=pa.int64())
    return pa.table(
        {
            "eps": pa.array(np.full(len(member), float(eps)), type=pa.float64()),
            "group_id": ids.take(pa.array(root[member], type=pa.int64())),
            "id": ids.take(take),
            "size": pa.array(size[root[member]].astype(np.int64), type=pa.int64()),
        },
        schema=GROUPS_SCHEMA,
    )


class GroupsBuilder:
    """The groups of every configured eps from bucket rows streamed in file order (--probes 1).

    `feed` each chunk of a bucket file (any columns including GROUP_COLUMNS) in order; the rows
    of the last cluster seen are held back until a chunk starts another cluster (or `finish`),
    so a cluster split across row groups is resolved whole. Use inside `st.publish_together`
    with `writers`, so the groups are published with the keep-lists or not at all.
    """

    def __init__(self, storage: st.Storage, eps_values: Sequence[float]) -> None:
        """Open one atomic writer per eps (fixed row groups: the bytes do not depend on how rows were fed)."""
        self.eps_values = [float(e) for e in eps_values]
        self.writers = [
            st.AtomicParquetWriter(storage.groups_file(e), GROUPS_SCHEMA, st.STREAM_ROW_GROUP) for e in self.eps_values
        ]
        self._held: pa.Table | None = None
        self.peak_rows = 0  # the most rows resolved at once: one chunk plus the held cluster

    def feed(self, table: pa.Table) -> None:
        """Add one chunk of bucket rows; resolves every cluster that the chunk completes."""
        table = table.select(GROUP_COLUMNS)
        if self._held is not None:
            table = pa.concat_tables([self._held, table])
        if table.num_rows == 0:
            self._held = table
            return
        clusters = table.column("cluster")
        last = clusters[table.num_rows - 1]
        tail = pc.equal(clusters, last)
        # Rows of the last cluster are held back: the next chunk may hold more of them.
        start = int(pc.index(tail, True).as_py())
        self._resolve(table.slice(0, start))
        self._held = table.slice(start).combine_chunks()

    def finish(self) -> None:
        """Resolve the held cluster: call once after the last chunk."""
        if self._held is not None:
            self._resolve(self._held)
            self._held = None

    def _resolve(self, table: pa.Table) -> None:
        """Write the groups of complete clusters (rows of one cluster together, in the rule's order)."""
        n = table.num_rows
        if n == 0:
            return
        self.peak_rows = max(self.peak_rows, n)
        table = table.combine_chunks()
        ids = table.column("id").chunk(0) if table.column("id").num_chunks else pa.array([], pa.string())
        # Ids are unique across the dataset, so an index into this table's ids is the duplicate's row.
        found = pc.index_in(table.column("duplicate_of"), value_set=ids)
        dup = pc.fill_null(found, -1).to_numpy().astype(np.int64)
        has_dup = table.column("duplicate_of").is_valid().to_numpy(zero_copy_only=False)
        position = np.arange(n, dtype=np.int64)
        clusters = table.column("cluster").to_numpy()
        bad = has_dup & ((dup < 0) | (dup >= position) | (clusters[np.maximum(dup, 0)] != clusters))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"item {ids[j].as_py()!r} (cluster {int(clusters[j])}) duplicates {table.column('duplicate_of')[j]!r}, "
                "which is not an earlier member of its cluster in the bucket file: the bucket results are not "
                "those of --probes 1 (run semantic_duplicates again, or `semdedup verify`)"
            )
        max_sim = table.column("max_sim").to_numpy()
        for eps, writer in zip(self.eps_values, self.writers):
            # The same float64 comparison as keep_mask: removed iff max_sim > 1 - eps.
            removed = has_dup & (max_sim > (1.0 - eps))
            writer.write(component_rows(ids, group_roots(np.where(removed, dup, position)), eps))


def build_groups(storage: st.Storage, eps_values: Sequence[float], bucket_files: Sequence[st.UPath]) -> GroupsBuilder:
    """Write every eps's groups file from --probes 1 bucket results, streamed a row group at a time (as
    `build_keep_lists` does in its own pass); returns the builder (its `peak_rows`)."""
    builder = GroupsBuilder(storage, eps_values)
    with st.publish_together(builder.writers):
        for path in bucket_files:
            for batch in st.iter_batches(path, columns=GROUP_COLUMNS, batch_size=st.STREAM_ROW_GROUP):
                builder.feed(pa.Table.from_batches([batch]))
        builder.finish()
    return builder


def build_groups_out_of_core(storage: st.Storage, eps_values: Sequence[float], memory_limit: int | None = None) -> None:
    """Write every eps's groups file from the bucket results with DuckDB (any --probes; used for --probes > 1).

    Pointer jumping over the removed items only, in a scratch database file so that DuckDB
    can spill its tables and joins beyond `memory_limit` (default: the storage's scan
    memory). Rows are ordered by (group_id, root first, id). Published per eps, atomically.
    """
    limit = max(memory_limit or storage.scan_memory or MIN_SCAN_MEMORY, MIN_SCAN_MEMORY)
    results = stage_source(storage, st.SEMANTIC_DUPLICATES, BUCKET_GLOB)
    with tempfile.TemporaryDirectory(prefix="semdedup-groups-") as scratch:
        con = duckdb.connect(os.path.join(scratch, "groups.duckdb"))
        try:
            con.execute(f"SET memory_limit='{limit // 2**20}MiB'")
            con.execute(f"SET temp_directory={sql_quote(os.path.join(scratch, 'spill'))}")
            con.execute("SET preserve_insertion_order=false")
            con.execute("SET enable_progress_bar=false")
            if not storage.local:
                con.register_filesystem(storage.root.fs)
            for eps in eps_values:
                _groups_for_eps(con, results, float(eps), storage.groups_file(eps))
        finally:
            con.close()


def _groups_for_eps(con: duckdb.DuckDBPyConnection, results: str, eps: float, path: st.UPath) -> None:
    """Resolve one eps's roots in `con` and stream its rows into `path`."""
    con.execute(
        f"CREATE OR REPLACE TABLE edge AS SELECT id, duplicate_of AS parent FROM {results} "
        "WHERE duplicate_of IS NOT NULL AND max_sim > 1.0 - ?::DOUBLE",
        [eps],
    )
    # A parent that is itself removed has a parent: jump to it until every parent is a kept item (a root).
    while con.execute("SELECT count(*) FROM edge e JOIN edge p ON e.parent = p.id").fetchall()[0][0]:
        con.execute(
            "CREATE OR REPLACE TABLE jumped AS SELECT e.id, COALESCE(p.parent, e.parent) AS parent "
            "FROM edge e LEFT JOIN edge p ON e.parent = p.id"
        )
        con.execute("DROP TABLE edge")
        con.execute("ALTER TABLE jumped RENAME TO edge")
    # Streamed a batch at a time (a relation's reader: no copy of the whole result).
    reader = con.sql(
        "SELECT ?::DOUBLE AS eps, group_id, id, count(*) OVER (PARTITION BY group_id)::BIGINT AS size "
        "FROM (SELECT parent AS group_id, id FROM edge UNION ALL SELECT DISTINCT parent, parent FROM edge) "
        "ORDER BY group_id, id <> group_id, id",
        params=[eps],
    ).to_arrow_reader(st.STREAM_ROW_GROUP)
    with st.publish_together([st.AtomicParquetWriter(path, GROUPS_SCHEMA, st.STREAM_ROW_GROUP)]) as (writer,):
        for batch in reader:
            writer.write(pa.Table.from_batches([batch]).cast(GROUPS_SCHEMA))


def groups_source(storage: st.Storage, eps: float) -> str:
    """A read_parquet() over one eps's groups file."""
    return f"read_parquet({sql_quote(str(storage.groups_file(eps)))})"


def top_groups(
    storage: st.Storage, eps: float, top: int = 10, examples: int = 5, memory_limit: int | None = None
) -> list[tuple[str, int, list[str]]]:
    """The `top` largest groups at `eps`: (group_id, size, the first `examples` member ids, group_id first).

    Largest first, ties by group_id. Reads the groups file with DuckDB under the scan memory.
    Raises FileNotFoundError naming the file when the eps has no groups file.
    """
    path = storage.groups_file(eps)
    if not path.exists():
        raise FileNotFoundError(f"no duplicate groups at eps={st.format_eps(eps)} ({path} does not exist)")
    source = groups_source(storage, eps)
    rows = scan(
        storage,
        f"WITH g AS (SELECT group_id, any_value(size) AS size FROM {source} GROUP BY group_id "
        f"ORDER BY size DESC, group_id LIMIT {int(top)}) "
        f"SELECT g.group_id, g.size, list(m.id ORDER BY m.id <> g.group_id, m.id)[1:{int(examples)}] "
        f"FROM g JOIN {source} m USING (group_id) GROUP BY g.group_id, g.size ORDER BY g.size DESC, g.group_id",
        memory_limit=memory_limit,
    )
    return [(str(g), int(n), list(members)) for g, n, members in rows]


def group_counts(storage: st.Storage, eps: float) -> tuple[int, int]:
    """(groups, items in them) at `eps`, from its groups file (0, 0 when it has none)."""
    if not storage.groups_file(eps).exists():
        return 0, 0
    [(groups, members)] = scan(storage, f"SELECT count(DISTINCT group_id), count(*) FROM {groups_source(storage, eps)}")
    return int(groups), int(members)


def prune_groups(storage: st.Storage, eps: Sequence[float]) -> list[str]:
    """Remove the groups files of eps values that are no longer configured; returns their paths."""
    folder = storage.stage_dir(st.GROUPS)
    if not folder.exists():
        return []
    keep = {storage.groups_file(e).name for e in eps}
    return [str(p) for p in sorted(folder.glob("eps=*.parquet"), key=str) if p.name not in keep and st.remove(p)]
