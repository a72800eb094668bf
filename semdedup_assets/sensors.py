"""Sensors: register new shard files under the input location and request their runs."""

import json

import dagster as dg

from semdedup_assets.assets.cluster import BUCKETS_TOUCHED
from semdedup_assets.core.config import Settings
from semdedup_assets.core.io import storage as st
from semdedup_assets.core.io.shards import discover, regrouped_shards
from semdedup_assets.names import DEFAULT_NAMES, GraphNames


def scan_input(
    location: str, cursor: str | None, files_per_shard: int = 1
) -> tuple[dict[str, str], list[str], list[str], list[str], set[str]]:
    """Compare the input location with the cursor: (fingerprints, new, changed, vanished, input file keys).

    With `files_per_shard` > 1 the keys are group keys and a group's fingerprint names its
    files: a file added to, removed from or renamed inside a group makes the group `changed`.
    """
    before: dict[str, str] = json.loads(cursor) if cursor else {}
    found = discover(location, files_per_shard)
    now = {s.key: s.fingerprint() for s in found.shards}
    new = sorted(k for k in now if k not in before)
    changed = sorted(k for k in now if k in before and before[k] != now[k])
    vanished = sorted(k for k in before if k not in now)
    return now, new, changed, vanished, {f.key for f in found.files}


def default_status(settings: Settings) -> dg.DefaultSensorStatus:
    """Sensors start stopped (switch them on in the UI) unless the `sensors` knob is on."""
    return dg.DefaultSensorStatus.RUNNING if settings.sensors else dg.DefaultSensorStatus.STOPPED


def build_shard_sensor(
    settings: Settings, minimum_interval_seconds: int | None = None, names: GraphNames = DEFAULT_NAMES
) -> dg.SensorDefinition:
    """The sensor watching `settings.input` for shard files."""

    @dg.sensor(
        name=names.definition("shard_sensor"),
        job_name=names.definition("ingest_job"),
        minimum_interval_seconds=minimum_interval_seconds or settings.sensor_interval,
        default_status=default_status(settings),
        description="Registers new shard files as `shards` partitions and requests their ingest runs.",
    )
    def shard_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        """One tick: new files -> partitions + runs; changed files -> re-runs; vanished -> logged."""
        if not settings.input:
            return dg.SkipReason("no input location configured (SEMDEDUP_INPUT or `semdedup run --input`)")
        now, new, changed, vanished, files = scan_input(settings.input, context.cursor, settings.files_per_shard)
        known = set(context.instance.get_dynamic_partitions(names.partitions))
        events = []
        # Groups whose files moved to other groups (a file inserted, removed or renamed inside the input): their
        # partitions are deleted, and each stage's next run removes their files before any check reads them.
        regrouped = [k for k in regrouped_shards(vanished, files, settings.files_per_shard) if k in known]
        for key in regrouped:
            context.log.info(
                f"shard {key!r} was regrouped by --files-per-shard {settings.files_per_shard}: its "
                "partition is deleted and its files are ingested in their new shards"
            )
        vanished = [k for k in vanished if k not in regrouped]
        for key in vanished:
            # Never deleted silently: logged, and recorded on the shard's partition for the UI.
            context.log.warning(
                f"shard {key!r} vanished from {settings.input}; its results stay until `semdedup forget {key}`"
            )
            if key in known:
                events.append(
                    dg.AssetObservation(
                        asset_key=names.key("raw_shards"),
                        partition=key,
                        metadata={
                            "vanished": True,
                            "input": settings.input,
                            "action": f"results kept; run `semdedup forget {key}` to remove them",
                        },
                    )
                )
        to_add = [k for k in new if k not in known]
        # Shards already registered and ingested (e.g. by `semdedup run` before the sensor was
        # switched on) are not new: the cursor starts from them instead of re-embedding them.
        raw = settings.storage_root()
        new = [k for k in new if k not in known or not raw.shard_file(st.RAW, k).exists()]
        runs = [dg.RunRequest(run_key=f"{k}:{now[k]}", partition_key=k) for k in new + changed]
        if not runs and not vanished and not regrouped and context.cursor is not None:
            return dg.SkipReason("no new or changed shard files")
        requests = [names.shard_partitions.build_delete_request(regrouped)] if regrouped else []
        return dg.SensorResult(
            run_requests=runs,
            dynamic_partitions_requests=requests
            + ([names.shard_partitions.build_add_request(to_add)] if to_add else []),
            asset_events=events,
            cursor=json.dumps(now, sort_keys=True),
        )

    return shard_sensor


def stale_buckets(
    instance: dg.DagsterInstance, after_storage_id: int, names: GraphNames = DEFAULT_NAMES
) -> tuple[dict[str, int], int]:
    """Buckets touched by cluster_assignments since a storage id and not re-materialized since.

    Returns ({bucket: newest touching event id}, newest event id seen).
    """
    touched: dict[str, int] = {}
    newest = after_storage_id
    cursor = None
    while True:
        page = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=names.key("cluster_assignments"), after_storage_id=after_storage_id),
            limit=1000,
            cursor=cursor,
            ascending=True,
        )
        for record in page.records:
            newest = max(newest, record.storage_id)
            value = record.asset_materialization.metadata.get(BUCKETS_TOUCHED)
            for bucket in value.value.split(",") if value is not None and value.value else []:
                touched[bucket] = max(touched.get(bucket, 0), record.storage_id)
        if not page.has_more:
            break
        cursor = page.cursor
    stale = {}
    for bucket, event_id in sorted(touched.items()):
        latest = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=names.key("semantic_duplicates"), asset_partitions=[bucket]), limit=1
        )
        if not latest.records or latest.records[0].storage_id < event_id:
            stale[bucket] = event_id
    return stale, newest


def build_bucket_sensor(
    settings: Settings, minimum_interval_seconds: int | None = None, names: GraphNames = DEFAULT_NAMES
) -> dg.SensorDefinition:
    """The sensor that re-runs only the cluster buckets whose clusters gained or lost items."""

    @dg.sensor(
        name=names.definition("bucket_sensor"),
        job_name=names.definition("dedup_job"),
        minimum_interval_seconds=minimum_interval_seconds or settings.sensor_interval,
        default_status=default_status(settings),
        description="After cluster_assignments changes, requests semantic_duplicates for the touched buckets only.",
    )
    def bucket_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        """One tick: new assignment events -> one run per stale bucket."""
        after = int(context.cursor) if context.cursor else 0
        stale, newest = stale_buckets(context.instance, after, names)
        if not stale:
            return dg.SensorResult(skip_reason="no bucket is stale", cursor=str(newest))
        context.log.info(f"stale buckets: {sorted(stale)}")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(run_key=f"{b}:{event_id}", partition_key=b) for b, event_id in sorted(stale.items())
            ],
            cursor=str(newest),
        )

    return bucket_sensor


def build_automation_sensor(
    settings: Settings, names: GraphNames = DEFAULT_NAMES, target: dg.AssetSelection | None = None
) -> dg.AutomationConditionSensorDefinition:
    """Evaluates the assets' automation conditions (assignment of new shards, keep-lists after buckets).

    `target`: every asset of the code location by default; a graph's sensor (graph.py) targets its own
    assets, so two components never evaluate each other's (Dagster allows one sensor per asset).
    """
    return dg.AutomationConditionSensorDefinition(
        names.definition("automation_sensor"),
        target=target or dg.AssetSelection.all(),
        default_status=default_status(settings),
        minimum_interval_seconds=settings.sensor_interval,
        description="cluster_assignments follow new embeddings and re-trained centroids; keep_lists follow the buckets.",
    )
