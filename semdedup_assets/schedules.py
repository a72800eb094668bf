"""Schedules: periodic re-training of the centroids (the global stage)."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.jobs import centroids_job

DEFAULT_RETRAIN_CRON = "0 3 * * 0"  # weekly, Sunday 03:00


def build_retrain_schedule(cron: str = DEFAULT_RETRAIN_CRON) -> dg.ScheduleDefinition:
    """The schedule that re-trains the centroids."""
    return dg.ScheduleDefinition(
        name="retrain_centroids_schedule", job=centroids_job, cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-train the centroids on a fresh sample; everything downstream becomes stale.",
    )
