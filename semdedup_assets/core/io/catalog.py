"""The DuckDB catalog: views over the Parquet files the stages wrote (never copies).

Views glob the stage folders at query time, so they are always current; they are
re-created only to switch between the real glob and an empty typed placeholder when a
stage has no files yet (DuckDB refuses a glob that matches nothing). The file is published
whole by a rename and never opened in place (refresh_catalog), and queries run on private
in-memory copies of the views (query), so no client holding the file ever meets a lock of ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from semdedup_assets.core.checks.lineage import read_made_from, results_fingerprint
from semdedup_assets.core.io.schemas import (
    BUDGET_SCHEMA,
    CONTAMINATED_SCHEMA,
    EPS_CURVE_SCHEMA,
    GROUPS_SCHEMA,
    KEPT_SCHEMA,
    RAW_INDEX_SCHEMA,
    REJECTED_SCHEMA,
    SEMANTIC_DUPLICATES_SCHEMA,
    assignments_schema,
    centroids_schema,
    embeddings_schema,
)
from semdedup_assets.core.io.shards import PAYLOAD_HASH
from semdedup_assets.core.io.storage import (
    CENTROIDS,
    CLUSTER_ASSIGNMENTS,
    CONTAMINATED,
    EMBEDDINGS,
    GROUPS,
    KEEP_LISTS,
    PRUNED,
    RAW,
    REJECTED,
    SEMANTIC_DUPLICATES,
    StageFileError,
    Storage,
    read_schema,
)

BUCKET_GLOB = "bucket-*.parquet"

# view name -> (stage folder, glob below it, columns (None: all), the stage's schema)
_VIEWS: dict[str, tuple[str, str, tuple[str, ...] | None, pa.Schema]] = {
    "items": (
        SEMANTIC_DUPLICATES,
        BUCKET_GLOB,
        ("id", "shard", "cluster", "sim_to_centroid", "max_sim", "duplicate_of"),
        SEMANTIC_DUPLICATES_SCHEMA,
    ),
    "embeddings": (EMBEDDINGS, "**/*.parquet", ("id", "embedding"), embeddings_schema(pa.string(), 1)),
    "eps_curve": (KEEP_LISTS, "eps_curve.parquet", tuple(EPS_CURVE_SCHEMA.names), EPS_CURVE_SCHEMA),
    # Duplicate groups (core/dedup/groups.py): one file per configured eps, members of components of 2+ items.
    "groups": (GROUPS, "eps=*.parquet", tuple(GROUPS_SCHEMA.names), GROUPS_SCHEMA),
    "raw_items": (RAW, "**/*.parquet", None, RAW_INDEX_SCHEMA),
    "rejected": (REJECTED, "**/*.parquet", tuple(REJECTED_SCHEMA.names), REJECTED_SCHEMA),
    "contaminated": (CONTAMINATED, "contaminated.parquet", tuple(CONTAMINATED_SCHEMA.names), CONTAMINATED_SCHEMA),
    "cluster_assignments": (
        CLUSTER_ASSIGNMENTS,
        "**/*.parquet",
        ("id", "shard", "cluster", "sim_to_centroid"),
        assignments_schema(1),
    ),
    "centroid_vectors": (CENTROIDS, "centroids.parquet", ("cluster", "centroid"), centroids_schema(1)),
    # Pruning selections (core/select/prune.py): one folder per selection label.
    "pruned": (PRUNED, "*/kept.parquet", tuple(KEPT_SCHEMA.names), KEPT_SCHEMA),
    "pruned_budget": (PRUNED, "*/budget.parquet", tuple(BUDGET_SCHEMA.names), BUDGET_SCHEMA),
}

_SQL_TYPES = {
    pa.string(): "VARCHAR",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float32(): "FLOAT",
    pa.float64(): "DOUBLE",
    pa.binary(): "BLOB",
}


def _sql_type(type_: pa.DataType) -> str:
    """The DuckDB type of an Arrow column type (vectors of any width read as FLOAT[])."""
    if pa.types.is_list(type_) or pa.types.is_fixed_size_list(type_):
        return _sql_type(type_.value_type) + "[]"
    return _SQL_TYPES[type_]


def _empty_select(schema: pa.Schema, columns: tuple[str, ...]) -> str:
    """Typed NULL columns: the view of a stage that has no files yet (DuckDB refuses an empty glob)."""
    return ", ".join(f"NULL::{_sql_type(schema.field(c).type)} AS {c}" for c in columns)


# `centroids` joins the trained vectors with the live member counts.
_CENTROIDS_VIEW = (
    "CREATE OR REPLACE VIEW centroids AS SELECT c.cluster, c.centroid, COALESCE(s.size, 0)::BIGINT AS size "
    "FROM centroid_vectors c LEFT JOIN (SELECT cluster, count(*) AS size FROM cluster_assignments GROUP BY cluster) s "
    "USING (cluster) ORDER BY c.cluster"
)


def sql_quote(text: str) -> str:
    """A SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _has_files(storage: Storage, stage: str, pattern: str) -> bool:
    folder = storage.stage_dir(stage)
    if not folder.exists():
        return False
    glob = pattern.replace("**/", "")
    return any(p.is_file() for p in (folder.rglob(glob) if "**" in pattern else folder.glob(glob)))


def current_pruning_files(storage: Storage, name: str) -> list[str]:
    """The files (`kept.parquet` or `budget.parquet`) of the pruning selections made from the current results.

    A selection made from other results (core/checks/lineage.py) is left out of the views: never a
    mix of old and new. Its folder stays until the next run removes it; status and verify flag it.
    """
    root = storage.stage_dir(PRUNED)
    folders = [p for p in sorted(root.iterdir(), key=str) if p.is_dir()] if root.exists() else []
    if not folders:
        return []
    current = results_fingerprint(storage)
    return [str(f / name) for f in folders if (f / name).exists() and read_made_from(f).get("results") == current]


def _records_digests(storage: Storage) -> bool:
    """Whether the raw indexes record payload digests (the first raw file that answers decides; a store
    ingested before digests existed has none until its shards are ingested again)."""
    for path in storage.stage_files(RAW):
        try:
            return PAYLOAD_HASH in read_schema(path).names
        except (StageFileError, OSError):
            continue
    return False


def _exact_of_select(storage: Storage, buckets: str) -> str:
    """`items` with `exact_of`: the first item with the same payload digest, in (cluster, rank, id) order.

    Exact copies share their vector bits (core/embed/copies.py), hence their cluster and their
    similarity to its centroid: their rank order in that cluster is the rule's own order (the
    order that keeps the first and removes the rest). The first copy has NULL, as has an item
    without copies.
    """
    raw = f"read_parquet({sql_quote(str(storage.stage_dir(RAW)).rstrip('/') + '/**/*.parquet')}, union_by_name=true)"
    firsts = (
        f"SELECT b.id, first_value(b.id) OVER (PARTITION BY r.{PAYLOAD_HASH} ORDER BY b.cluster, b.rank, b.id) AS f "
        f"FROM {buckets} b JOIN (SELECT id, {PAYLOAD_HASH} FROM {raw}) r USING (id) WHERE r.{PAYLOAD_HASH} IS NOT NULL"
    )
    return (
        "SELECT s.id, s.shard, s.cluster, s.sim_to_centroid, s.max_sim, s.duplicate_of, x.exact_of "
        f"FROM {buckets} s LEFT JOIN (SELECT id, CASE WHEN f <> id THEN f END AS exact_of FROM ({firsts})) x USING (id)"
    )


def _view_select(storage: Storage, name: str) -> str:
    """The SELECT of one view: over the stage's files, or typed placeholder columns before the stage has any."""
    stage, pattern, columns, schema = _VIEWS[name]
    listed = ", ".join(columns) if columns else "*"
    if name == "items":
        if _has_files(storage, stage, pattern):
            source = stage_source(storage, stage, pattern)
            if _records_digests(storage):
                return _exact_of_select(storage, source)
            return f"SELECT {listed}, NULL::VARCHAR AS exact_of FROM {source}"
        return f"SELECT {_empty_select(schema, columns or ())}, NULL::VARCHAR AS exact_of WHERE false"
    if stage == PRUNED:
        files = current_pruning_files(storage, pattern.rpartition("/")[2])
        if files:
            return f"SELECT {listed} FROM read_parquet([{', '.join(map(sql_quote, files))}])"
    elif _has_files(storage, stage, pattern):
        return f"SELECT {listed} FROM {stage_source(storage, stage, pattern)}"
    return f"SELECT {_empty_select(schema, columns or tuple(schema.names))} WHERE false"


def view_statements(storage: Storage) -> list[str]:
    """The CREATE VIEW statements for the catalog's current state."""
    return [f"CREATE OR REPLACE VIEW {name} AS {_view_select(storage, name)}" for name in _VIEWS] + [_CENTROIDS_VIEW]


VIEW_NAMES = (*_VIEWS, "centroids")


def create_views(con: duckdb.DuckDBPyConnection, storage: Storage) -> list[str]:
    """Create every view in `con`; returns one problem line per view whose files cannot be read.

    A view over a damaged file (e.g. a truncated `contaminated.parquet`) becomes one that
    fails with that reason when queried, so every other view still works.
    """
    problems = []
    for name in _VIEWS:
        try:
            con.execute(f"CREATE OR REPLACE VIEW {name} AS {_view_select(storage, name)}")
        except duckdb.Error as err:
            stage, _, columns, schema = _VIEWS[name]
            reason = (
                f"view {name} is unavailable: {str(err).splitlines()[0]} "
                f"(`semdedup verify` names the damaged files under {stage}/)"
            )
            problems.append(reason)
            empty = _empty_select(schema, columns or tuple(schema.names))
            empty += ", NULL::VARCHAR AS exact_of" if name == "items" else ""
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT {empty} WHERE error({sql_quote(reason)})")
    con.execute(_CENTROIDS_VIEW)
    return problems


def _private_connection(storage: Storage) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """An in-memory DuckDB holding the catalog's views: no file, no lock, whatever else holds catalog.duckdb."""
    con = duckdb.connect()
    try:
        if not storage.local:
            con.register_filesystem(storage.root.fs)
        return con, create_views(con, storage)
    except BaseException:
        con.close()
        raise


def refresh_catalog(storage: Storage) -> str:
    """Publish catalog.duckdb with the views of the storage's current state; returns the catalog path.

    The file is never opened in place: a new database is built beside it and renamed over
    it, so a reader (DuckDB CLI, a notebook, `semdedup sql`) holding the old file, read-only
    or read-write, never blocks or fails this, and whoever opens the path gets a whole
    catalog, old or new. Publishers take turns on a lock file (readers never touch it), and
    an unchanged set of views is not published again.
    """
    path = storage.catalog_file
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        statements = view_statements(storage)
        digest = hashlib.blake2b("\n".join(statements).encode(), digest_size=16).hexdigest()
        stamp = path.with_name(f".{path.name}.views")
        if path.exists() and stamp.exists() and stamp.read_text() == digest:
            return str(path)
        for stale in path.parent.glob(f".{path.name}.*.tmp*"):  # left by a killed publisher
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        con = duckdb.connect(str(tmp))
        try:
            if not storage.local:
                con.register_filesystem(storage.root.fs)
            problems = create_views(con, storage)
        finally:
            con.close()  # checkpoints: the new file is whole, with no WAL beside it
        os.replace(tmp, path)
        # A catalog with a broken view is published but not remembered, so the next refresh retries it.
        if problems:
            stamp.unlink(missing_ok=True)
        else:
            stamp.write_text(digest)
    return str(path)


def query(storage: Storage, sql: str, params: Sequence[Any] | None = None) -> tuple[list[str], list[tuple]]:
    """Run SQL against the catalog's views; returns (columns, rows).

    The views live in a private in-memory connection over the stage files, so a query
    never waits for (nor blocks) another process holding catalog.duckdb.
    """
    con, _ = _private_connection(storage)
    try:
        cursor = con.execute(sql, params or [])
        columns = [d[0] for d in cursor.description] if cursor.description else []
        return columns, cursor.fetchall()
    finally:
        con.close()


def query_statements(storage: Storage, sql: str) -> tuple[list[tuple[str, list[str], list[tuple]]], list[str]]:
    """Every statement of `sql` in order: ([(statement, columns, rows)], problems of views that cannot be read)."""
    con, problems = _private_connection(storage)
    try:
        results = []
        for statement in duckdb.extract_statements(sql):
            cursor = con.execute(statement)
            columns = [d[0] for d in cursor.description] if cursor.description else []
            results.append((statement.query.strip(), columns, cursor.fetchall() if columns else []))
        return results, problems
    finally:
        con.close()


def format_table(columns: list[str], rows: list[tuple], max_width: int = 60) -> str:
    """Rows as a plain-text table for the terminal."""

    def cell(v: Any) -> str:
        text = "NULL" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
        return text if len(text) <= max_width else text[: max_width - 1] + "…"

    body = [[cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in body]) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in body]
    return "\n".join(lines)


def stage_source(storage: Storage, stage: str, pattern: str = "**/*.parquet") -> str:
    """A quoted read_parquet() over a stage's files."""
    return f"read_parquet({sql_quote(str(storage.stage_dir(stage)).rstrip('/') + '/' + pattern)})"


# DuckDB refuses some aggregates below this limit instead of spilling them.
MIN_SCAN_MEMORY = 256 * 2**20


def scan(
    storage: Storage,
    sql: str,
    params: Sequence[Any] | None = None,
    tables: dict[str, Any] | None = None,
    memory_limit: int | None = None,
) -> list[tuple]:
    """Run SQL over the stage files in a scratch in-memory DuckDB (no catalog lock).

    `memory_limit` (bytes, at least MIN_SCAN_MEMORY; default: the storage's `scan_memory`,
    a quarter of the settings' memory budget) caps DuckDB's memory: larger aggregates spill
    to a scratch folder instead of growing with the dataset.
    """
    with scratch_connection(storage, tables, memory_limit) as con:
        return con.execute(sql, params or []).fetchall()


def scan_table(
    storage: Storage, sql: str, tables: dict[str, Any] | None = None, memory_limit: int | None = None
) -> pa.Table:
    """`scan`, answering an Arrow table (vectors stay columnar instead of becoming Python lists)."""
    with scratch_connection(storage, tables, memory_limit) as con:
        return con.sql(sql).to_arrow_table()


@contextlib.contextmanager
def scratch_connection(
    storage: Storage, tables: dict[str, Any] | None = None, memory_limit: int | None = None
) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB for `scan`: memory capped (spilling to a scratch folder), `tables` registered."""
    if memory_limit is None:
        memory_limit = storage.scan_memory
    con = duckdb.connect()
    scratch = None
    try:
        if memory_limit is not None:
            scratch = tempfile.TemporaryDirectory(prefix="semdedup-duckdb-")
            con.execute(f"SET memory_limit='{max(memory_limit, MIN_SCAN_MEMORY) // 2**20}MiB'")
            con.execute(f"SET temp_directory={sql_quote(scratch.name)}")
            con.execute("SET preserve_insertion_order=false")
            con.execute("SET enable_progress_bar=false")
        if not storage.local:
            con.register_filesystem(storage.root.fs)
        for name, table in (tables or {}).items():
            con.register(name, table)
        yield con
    finally:
        con.close()
        if scratch is not None:
            scratch.cleanup()


def duplicate_ids(
    storage: Storage,
    pending: Any = None,
    exclude_shards: Sequence[str] = (),
    limit: int = 5,
    memory_limit: int | None = None,
) -> list[tuple[str, str, int, str, int]]:
    """Ids that appear more than once across raw shards: (id, shard, row, shard, row).

    `pending` (an Arrow table id, shard, row, or the paths of Parquet files with those columns,
    e.g. staged raw files) holds shards validated but not yet published; their committed
    files (`exclude_shards`) are left out.
    """
    skip = set(exclude_shards)
    files = [str(p) for p in storage.stage_files(RAW) if storage.shard_of(RAW, p) not in skip]
    parts = [f"SELECT id, shard, row FROM read_parquet([{', '.join(sql_quote(f) for f in files)}])"] if files else []
    if isinstance(pending, str):
        pending = [pending]
    if isinstance(pending, list):
        if pending:
            parts.append(f"SELECT id, shard, row FROM read_parquet([{', '.join(sql_quote(f) for f in pending)}])")
        pending = None
    elif pending is not None:
        parts.append("SELECT id, shard, row FROM pending")
    if not parts:
        return []
    order = "shard || ':' || lpad(row::VARCHAR, 20, '0')"
    return scan(
        storage,
        f"SELECT id, arg_min(shard, {order}), arg_min(row, {order}), arg_max(shard, {order}), arg_max(row, {order}) "
        f"FROM ({' UNION ALL '.join(parts)}) GROUP BY id HAVING count(*) > 1 ORDER BY id LIMIT {int(limit)}",
        tables={"pending": pending} if pending is not None else None,
        memory_limit=memory_limit,
    )


def exact_copy_count(storage: Storage, memory_limit: int | None = None) -> int:
    """Items whose payload an earlier item already has: rows minus distinct digests, over every raw index.

    DuckDB counts under the storage's scan memory (spilling beyond it). Raw indexes written
    before digests were recorded count no copies.
    """
    files = [str(p) for p in storage.stage_files(RAW) if PAYLOAD_HASH in read_schema(p).names]
    if not files:
        return 0
    (row,) = scan(
        storage,
        f"SELECT count({PAYLOAD_HASH}) - count(DISTINCT {PAYLOAD_HASH}) "
        f"FROM read_parquet([{', '.join(map(sql_quote, files))}], union_by_name=true)",
        memory_limit=memory_limit,
    )
    return int(row[0])
