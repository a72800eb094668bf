"""One asset graph as Dagster definitions: assets, checks, jobs, sensors, schedule, resources.

`build_definitions(settings, names)` is what a `SemDedup` component builds (see
semdedup_assets/component.py) and what `semdedup run` executes; the project's own code
location (semdedup_assets/definitions.py) is one such component under the plain names.
"""

from __future__ import annotations

import dagster as dg

from semdedup_assets.assets import build_asset_checks, build_assets
from semdedup_assets.core.config import Settings
from semdedup_assets.jobs import build_jobs
from semdedup_assets.loggers import console_logger
from semdedup_assets.names import DEFAULT_NAMES, GraphNames
from semdedup_assets.ray_resource import SemDedupRay
from semdedup_assets.resources import SemDedupConfig
from semdedup_assets.schedules import build_retrain_schedule
from semdedup_assets.sensors import build_automation_sensor, build_bucket_sensor, build_shard_sensor


def build_graph(settings: Settings, names: GraphNames = DEFAULT_NAMES) -> dg.Definitions:
    """Assets, checks, jobs and resources of one graph: what running it needs (`run_pipeline`).

    Only the bucket count and the backfill batch shape the graph; the assets read every other
    knob from the settings resource (`names.resource`) when they run, so the launchpad can change them.
    """
    return dg.Definitions(
        resources={
            names.resource: SemDedupConfig.from_settings(settings),
            # dagster-ray's RayResource: connects only for steps whose settings say engine=ray.
            names.ray_resource: SemDedupRay(),
        },
        assets=build_assets(names, buckets=settings.bucket_partitions, backfill_batch=settings.backfill_batch),
        asset_checks=build_asset_checks(names),
        jobs=build_jobs(names),
        loggers={"console": console_logger},
    )


def build_definitions(
    settings: Settings, names: GraphNames = DEFAULT_NAMES, *, schedule_running: bool = False
) -> dg.Definitions:
    """The graph (`build_graph`) with its sensors and retrain schedule: a code location's definitions."""
    graph = build_graph(settings, names)
    operations = dg.Definitions(
        sensors=[
            build_shard_sensor(settings, names=names),
            build_bucket_sensor(settings, names=names),
            build_automation_sensor(settings, names, dg.AssetSelection.assets(*graph.assets or [])),
        ],
        schedules=[build_retrain_schedule(settings.retrain_cron, names, running=schedule_running)],
    )
    return dg.Definitions.merge(graph, operations)
