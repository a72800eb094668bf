"""Ingest stage: `raw_shards`, one validated, normalised copy of each input shard."""


import dagster as dg
import pyarrow as pa

from semdedup_assets.assets.common import SHARD_BACKFILL_POLICY, ProgressLog, run_metadata, run_partition_keys, timed
from semdedup_assets.core import storage as st
from semdedup_assets.core.catalog import duplicate_ids
from semdedup_assets.core.export import FINGERPRINT_KEY
from semdedup_assets.core.shards import ShardError, ShardFile, discover_shards, read_shard
from semdedup_assets.partitions import shard_partitions
from semdedup_assets.resources import SemDedupConfig


def input_shards(config: SemDedupConfig) -> dict[str, ShardFile]:
    """The shard files under the configured input location, by key."""
    if not config.input:
        raise dg.Failure("no input location configured (set `input` on the semdedup resource or SEMDEDUP_INPUT)")
    return {s.key: s for s in discover_shards(config.input)}


def shard_failure(err: ShardError) -> dg.Failure:
    """A Dagster failure that names the shard and row."""
    return dg.Failure(description=str(err), metadata={"shard": err.shard, "row": -1 if err.row is None else err.row, "reason": err.reason})


RAW_DIM_KEY = b"semdedup.dim"


def check_dims(storage: st.Storage, dims: dict[str, int], keys: list[str]) -> None:
    """Bring-your-own embeddings: every shard, new or already ingested, has one dimension."""
    known = dict(dims)
    for path in storage.stage_files(st.RAW):
        shard = storage.shard_of(st.RAW, path)
        if shard not in keys and (meta := st.read_schema(path).metadata) and RAW_DIM_KEY in meta:
            known[shard] = int(meta[RAW_DIM_KEY])
    if len(set(known.values())) > 1:
        first = min(known)
        other = next(k for k in sorted(known) if known[k] != known[first])
        raise dg.Failure(description=f"shard {other!r}: embedding dimension {known[other]} differs from "
                         f"shard {first!r} ({known[first]}); every shard must have one dimension",
                         metadata={"shard": other})


def _preview(table: pa.Table, column: str, n: int = 3) -> str:
    if column != "text":
        return f"{table.num_rows} rows"
    lines = [f"- `{i}`: {t[:200]}" for i, t in zip(table.column("id").to_pylist()[:n], table.column(column).to_pylist()[:n])]
    return "\n".join(lines)


@dg.asset(
    partitions_def=shard_partitions,
    backfill_policy=SHARD_BACKFILL_POLICY,
    group_name="ingest",
    kinds={"parquet"},
)
def raw_shards(context: dg.AssetExecutionContext, semdedup: SemDedupConfig) -> dg.MaterializeResult:
    """Validated index of each input shard: id, shard, row (and the text for the text modality)."""
    storage = semdedup.storage_root()
    files = input_shards(semdedup)
    keys = run_partition_keys(context)
    missing = [k for k in keys if k not in files]
    if missing:
        raise dg.Failure(f"shard(s) {missing[:5]} are registered but no longer exist under {semdedup.input}")
    # Validate every shard of the run before publishing any: a bad shard leaves no output.
    pending: list[st.AtomicParquetWriter] = []
    pending_ids: list[pa.Table] = []
    dims: dict[str, int] = {}
    per_shard: list[dict[str, object]] = []
    progress = ProgressLog(context.log, len(keys))
    with st.publish_together(pending), timed() as t:
        for key in keys:
            try:
                index = read_shard(files[key], semdedup.modality, semdedup.column or semdedup.modality, semdedup.id_column)
            except ShardError as err:
                raise shard_failure(err) from None
            table = index.table.add_column(1, "shard", pa.array([key] * index.table.num_rows, type=pa.string()))
            # The input as ingested: `semdedup export` refuses a shard that changed since.
            schema_meta = {FINGERPRINT_KEY: files[key].fingerprint().encode()}
            if index.dim is not None:
                dims[key] = index.dim
                schema_meta[RAW_DIM_KEY] = str(index.dim).encode()
            table = table.replace_schema_metadata(schema_meta)
            writer = st.AtomicParquetWriter(storage.shard_file(st.RAW, key), table.schema)
            pending.append(writer)
            writer.write(table)
            pending_ids.append(table.select(["id", "shard", "row"]))
            per_shard.append({"shard": key, "rows": table.num_rows, "input": str(files[key].path),
                              "fingerprint": files[key].fingerprint()})
            progress.step(f"validated shard {key!r}: {table.num_rows} rows")
        check_dims(storage, dims, keys)
        dups = duplicate_ids(storage, pa.concat_tables(pending_ids), exclude_shards=keys)
        if dups:
            raise dg.Failure(description=duplicate_ids_message(dups), metadata={"shard": dups[0][3], "row": dups[0][4]})
    extra = {"rows": sum(int(r["rows"]) for r in per_shard), "seconds": t["seconds"]}
    if len(keys) == 1:
        extra["path"] = dg.MetadataValue.path(str(storage.shard_file(st.RAW, keys[0])))
        extra["preview"] = dg.MetadataValue.md(_preview(table, semdedup.modality))
    return dg.MaterializeResult(metadata=run_metadata(per_shard, extra))


def duplicate_ids_message(dups: list[tuple[str, str, int, str, int]]) -> str:
    """Name both places of each repeated id."""
    return "ids must be unique across the dataset: " + "; ".join(
        f"id {i!r} is in shard {s1!r} row {r1} and in shard {s2!r} row {r2}" for i, s1, r1, s2, r2 in dups)


@dg.asset_check(asset=raw_shards, blocking=True, description="Every id appears once across all shards.")
def ids_unique_across_shards(semdedup: SemDedupConfig) -> dg.AssetCheckResult:
    """Blocking: an id repeated across shards stops the run before embedding."""
    dups = duplicate_ids(semdedup.storage_root())
    if not dups:
        return dg.AssetCheckResult(passed=True)
    return dg.AssetCheckResult(passed=False, description=duplicate_ids_message(dups))
