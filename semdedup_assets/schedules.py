"""Schedules: periodic re-training of the centroids (the global stage)."""

from __future__ import annotations

import dagster as dg

from semdedup_assets.jobs import centroids_job

def build_retrain_schedule(cron: str) -> dg.ScheduleDefinition:
    """The schedule that re-trains the centroids (cron: the `retrain_cron` knob)."""
    return dg.ScheduleDefinition(
        name="retrain_centroids_schedule", job=centroids_job, cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-train the centroids on a fresh sample; everything downstream becomes stale.",
    )
