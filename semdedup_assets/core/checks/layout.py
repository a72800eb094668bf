"""What a storage root should hold: exactly the files that the registered shards and the
current settings imply.

Every stage owns its files. When a stage is materialized it removes the files of its
own that no longer belong (`prune_*`): per-shard files of shards that are no longer
registered, bucket results beyond the bucket count, keep-lists of eps that are no longer
configured. `layout_problems` compares what is on disk with what should be there; the
blocking check `files_match_partitions` reports it.
"""

from __future__ import annotations

from collections.abc import Iterable

from semdedup_assets.core.cluster.assign import bucket_keys
from semdedup_assets.core.io import storage as st

# Per-shard stages, each a file per registered shard (`rejected` only for images).
SHARD_STAGES = (st.RAW, st.REJECTED, st.EMBEDDINGS, st.CLUSTER_ASSIGNMENTS)
BUCKET_PREFIX, PARQUET = "bucket-", ".parquet"
EPS_PREFIX = "eps="


def shard_keys_on_disk(storage: st.Storage, stage: str) -> dict[str, st.UPath]:
    """The shard keys that have a file in a per-shard stage, with their paths."""
    return {storage.shard_of(stage, p): p for p in storage.stage_files(stage)}


def _named_files(folder: st.UPath, prefix: str) -> dict[str, st.UPath]:
    """`<prefix><name>.parquet` files directly in a folder, by name."""
    if not folder.exists():
        return {}
    return {
        p.name[len(prefix) : -len(PARQUET)]: p
        for p in sorted(folder.glob(f"{prefix}*{PARQUET}"), key=str)
        if p.is_file()
    }


def bucket_files_on_disk(storage: st.Storage) -> dict[str, st.UPath]:
    """Every bucket result file on disk (whatever the bucket count), by bucket key."""
    return _named_files(storage.stage_dir(st.SEMANTIC_DUPLICATES), BUCKET_PREFIX)


def keep_list_files_on_disk(storage: st.Storage) -> dict[str, st.UPath]:
    """Every keep-list file on disk, by its eps text (`0.05`)."""
    return _named_files(storage.stage_dir(st.KEEP_LISTS), EPS_PREFIX)


def _remove_all(paths: Iterable[st.UPath]) -> list[str]:
    return [str(p) for p in paths if st.remove(p)]


def prune_shard_stages(storage: st.Storage, stages: Iterable[str], registered: Iterable[str]) -> list[str]:
    """Remove the files of shards that are not registered (forgotten, or left by a failed run)."""
    keep = set(registered)
    return _remove_all(p for stage in stages for k, p in shard_keys_on_disk(storage, stage).items() if k not in keep)


def prune_buckets(storage: st.Storage, buckets: int) -> list[str]:
    """Remove bucket results beyond the bucket count (left by a run with more buckets)."""
    keep = set(bucket_keys(buckets))
    return _remove_all(p for b, p in bucket_files_on_disk(storage).items() if b not in keep)


def prune_keep_lists(storage: st.Storage, eps: Iterable[float]) -> list[str]:
    """Remove keep-lists of eps values that are no longer configured."""
    keep = {st.format_eps(e) for e in eps}
    return _remove_all(p for e, p in keep_list_files_on_disk(storage).items() if e not in keep)


def remove_shard_files(storage: st.Storage, shard: str) -> list[str]:
    """Delete every per-shard file of one shard; returns the paths removed."""
    return _remove_all(storage.shard_file(stage, shard) for stage in SHARD_STAGES)


def _differences(what: str, on_disk: Iterable[str], expected: Iterable[str], extra_only: bool = False) -> list[str]:
    on_disk, expected = set(on_disk), set(expected)
    problems = []
    if extra := sorted(on_disk - expected):
        problems.append(f"{what}: {len(extra)} file(s) that no partition or setting implies (e.g. {extra[:3]})")
    if not extra_only and (missing := sorted(expected - on_disk)):
        problems.append(f"{what}: {len(missing)} file(s) missing (e.g. {missing[:3]})")
    return problems


def layout_problems(storage: st.Storage, shards: Iterable[str], buckets: int, eps: Iterable[float]) -> list[str]:
    """How the files on disk differ from the registered shards, the bucket partitions and the eps.

    Empty when every per-shard stage has exactly one file per registered shard (`rejected`
    at most one), the bucket results are exactly the bucket partitions and the keep-lists
    exactly the configured eps (and the groups files no other eps).
    """
    shards = list(shards)
    problems = []
    for stage in SHARD_STAGES:
        problems += _differences(
            f"{stage}/ vs the registered shards",
            shard_keys_on_disk(storage, stage),
            shards,
            extra_only=stage == st.REJECTED,
        )
    problems += _differences(
        f"{st.SEMANTIC_DUPLICATES}/ vs the bucket partitions", bucket_files_on_disk(storage), bucket_keys(buckets)
    )
    eps = list(eps)
    problems += _differences(
        f"{st.KEEP_LISTS}/ vs the configured eps", keep_list_files_on_disk(storage), [st.format_eps(e) for e in eps]
    )
    # Strays only: a storage kept from before the groups existed gets them at its next keep-lists run.
    problems += _differences(
        f"{st.GROUPS}/ vs the configured eps",
        _named_files(storage.stage_dir(st.GROUPS), EPS_PREFIX),
        [st.format_eps(e) for e in eps],
        extra_only=True,
    )
    return problems
