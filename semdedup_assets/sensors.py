"""Sensors: register new shard files under the input location and request their runs."""


import json

import dagster as dg

from semdedup_assets.core.config import Settings
from semdedup_assets.core.shards import discover_shards
from semdedup_assets.jobs import ingest_job
from semdedup_assets.partitions import SHARDS_PARTITIONS_NAME, shard_partitions


def scan_input(location: str, cursor: str | None) -> tuple[dict[str, str], list[str], list[str], list[str]]:
    """Compare the input location with the cursor: (fingerprints, new, changed, vanished)."""
    before: dict[str, str] = json.loads(cursor) if cursor else {}
    now = {s.key: s.fingerprint() for s in discover_shards(location)}
    new = sorted(k for k in now if k not in before)
    changed = sorted(k for k in now if k in before and before[k] != now[k])
    vanished = sorted(k for k in before if k not in now)
    return now, new, changed, vanished


def build_shard_sensor(settings: Settings, minimum_interval_seconds: int = 30) -> dg.SensorDefinition:
    """The sensor watching `settings.input` for shard files."""

    @dg.sensor(
        name="shard_sensor", job=ingest_job, minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Registers new shard files as `shards` partitions and requests their ingest runs.",
    )
    def shard_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        """One tick: new files -> partitions + runs; changed files -> re-runs; vanished -> logged."""
        if not settings.input:
            return dg.SkipReason("no input location configured (SEMDEDUP_INPUT or `semdedup run --input`)")
        now, new, changed, vanished = scan_input(settings.input, context.cursor)
        for key in vanished:
            context.log.warning(f"shard {key!r} vanished from {settings.input}; its results stay until `semdedup forget {key}`")
        known = set(context.instance.get_dynamic_partitions(SHARDS_PARTITIONS_NAME))
        to_add = [k for k in new if k not in known]
        runs = [dg.RunRequest(run_key=f"{k}:{now[k]}", partition_key=k) for k in new + changed]
        if not runs and not vanished and context.cursor is not None:
            return dg.SkipReason("no new or changed shard files")
        return dg.SensorResult(
            run_requests=runs,
            dynamic_partitions_requests=[shard_partitions.build_add_request(to_add)] if to_add else [],
            cursor=json.dumps(now, sort_keys=True),
        )

    return shard_sensor
