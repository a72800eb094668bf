"""The one Definitions object of the code location (loaded by workspace.yaml).

`defs` is loaded lazily (`@dg.definitions`): the settings, which may come from the
environment and the storage's `semdedup.json`, are read when Dagster loads the code
location, never at import time.
"""

from __future__ import annotations

import dagster as dg

from semdedup_assets.assets import ASSET_CHECKS, build_assets
from semdedup_assets.core.config import Settings, load_settings
from semdedup_assets.jobs import ALL_JOBS
from semdedup_assets.loggers import console_logger
from semdedup_assets.ray_resource import SemDedupRay
from semdedup_assets.resources import SemDedupConfig
from semdedup_assets.schedules import build_retrain_schedule
from semdedup_assets.sensors import build_automation_sensor, build_bucket_sensor, build_shard_sensor


def build_definitions(settings: Settings) -> dg.Definitions:
    """Assets, checks, jobs, sensor, schedule and resources for one set of settings."""
    return dg.Definitions(
        assets=build_assets(settings),
        asset_checks=ASSET_CHECKS,
        jobs=ALL_JOBS,
        sensors=[build_shard_sensor(settings), build_bucket_sensor(settings), build_automation_sensor(settings)],
        schedules=[build_retrain_schedule(settings.retrain_cron)],
        loggers={"console": console_logger},
        resources={"semdedup": SemDedupConfig.from_settings(settings),
                   # dagster-ray's RayResource: connects only for steps whose settings say engine=ray.
                   "ray": SemDedupRay()},
    )


def load_definitions() -> dg.Definitions:
    """The code location's definitions, for the settings of the storage it points at."""
    return build_definitions(load_settings())


defs = dg.definitions(load_definitions)
