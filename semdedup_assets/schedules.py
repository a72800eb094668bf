"""Schedules: periodic re-training of the centroids (the global stage)."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.names import DEFAULT_NAMES, GraphNames


def build_retrain_schedule(
    cron: str, names: GraphNames = DEFAULT_NAMES, running: bool = False
) -> dg.ScheduleDefinition:
    """The schedule that re-trains the centroids (cron: the `retrain_cron` knob); stopped unless `running`."""
    return dg.ScheduleDefinition(
        name=names.definition("retrain_centroids_schedule"),
        job_name=names.definition("centroids_job"),
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.RUNNING if running else dg.DefaultScheduleStatus.STOPPED,
        description="Re-train the centroids on a fresh sample; everything downstream becomes stale.",
    )
