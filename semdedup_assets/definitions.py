"""The one Definitions object of the code location (loaded by workspace.yaml)."""

from __future__ import annotations

import os

import dagster as dg

from semdedup_assets.assets import ASSET_CHECKS, build_assets
from semdedup_assets.core.config import Settings, load_settings
from semdedup_assets.jobs import ALL_JOBS
from semdedup_assets.resources import SemDedupConfig
from semdedup_assets.schedules import DEFAULT_RETRAIN_CRON, build_retrain_schedule
from semdedup_assets.sensors import build_automation_sensor, build_bucket_sensor, build_shard_sensor


def build_definitions(settings: Settings) -> dg.Definitions:
    """Assets, checks, jobs, sensor, schedule and resources for one set of settings."""
    return dg.Definitions(
        assets=build_assets(settings),
        asset_checks=ASSET_CHECKS,
        jobs=ALL_JOBS,
        sensors=[build_shard_sensor(settings), build_bucket_sensor(), build_automation_sensor()],
        schedules=[build_retrain_schedule(os.environ.get("SEMDEDUP_RETRAIN_CRON", DEFAULT_RETRAIN_CRON))],
        resources={"semdedup": SemDedupConfig.from_settings(settings)},
    )


defs = build_definitions(load_settings())
