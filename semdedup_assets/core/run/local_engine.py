"""The local engine: every unit in this process, one after another (the default, and the demo's)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.shards import Shard
from semdedup_assets.core.run.engines import CENTROIDS, KEEP_LISTS, Done, Engine, Log, current_worker


class LocalEngine(Engine):
    """Today's in-process path: one unit after another, the encoder loaded once per process."""

    name = "local"

    def stage_shards(self, settings: Settings, shards: Sequence[Shard]) -> Iterator[Done]:
        from semdedup_assets.core.ingest.stage import stage_shard

        worker = current_worker()
        for shard in shards:
            yield Done(shard.key, stage_shard(settings, shard), worker)

    def embed_shards(self, settings: Settings, shards: Sequence[Shard], log: Log | None = None) -> Iterator[Done]:
        from semdedup_assets.core.embed.shard import embed_shard

        worker = current_worker()
        for shard in shards:
            yield Done(shard.key, embed_shard(settings, shard.key, shard, log=log), worker)

    def train_centroids(
        self,
        settings: Settings,
        embedding_files: Mapping[str, st.UPath],
        log: Log | None = None,
        warn: Log | None = None,
    ) -> Done:
        from semdedup_assets.core.cluster.centroids import train_centroids

        return Done(CENTROIDS, train_centroids(settings, embedding_files, log=log, warn=warn), current_worker())

    def assign_shards(self, settings: Settings, keys: Sequence[str]) -> Iterator[Done]:
        from semdedup_assets.core.cluster.assign import assign_shard
        from semdedup_assets.core.cluster.centroids import load_centroids

        centroids = load_centroids(settings.storage_root())  # once for the run's shards
        worker = current_worker()
        for key in keys:
            yield Done(key, assign_shard(settings, key, centroids, len(centroids)), worker)

    def dedup_buckets(
        self, settings: Settings, buckets: Sequence[str], k: int, assignment_files: Sequence[st.UPath]
    ) -> Iterator[Done]:
        from semdedup_assets.core.dedup.buckets import dedup_bucket

        worker = current_worker()
        for bucket in buckets:
            yield Done(bucket, dedup_bucket(settings, bucket, k, assignment_files), worker)

    def build_keep_lists(self, settings: Settings, bucket_files: Sequence[st.UPath], log: Log | None = None) -> Done:
        from semdedup_assets.core.dedup.keep import build_keep_lists

        return Done(KEEP_LISTS, build_keep_lists(settings, bucket_files, log=log), current_worker())
