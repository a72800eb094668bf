"""The one Definitions object of the code location (`dg` finds it through pyproject's [tool.dg];
workspace.yaml loads the same object for `dagster dev -w workspace.yaml`).

`defs` is loaded lazily (`@dg.definitions`): the settings, which may come from the
environment and the storage's `semdedup.json`, are read when Dagster loads the code
location, never at import time. It is one `SemDedup` component (component.py) with no
key prefix, the same component users put in their own projects.
"""

from __future__ import annotations

import dagster as dg

from semdedup_assets.component import SemDedup
from semdedup_assets.core.settings_store import load_settings
from semdedup_assets.graph import build_definitions

__all__ = ["build_definitions", "defs", "load_definitions"]


# Runs launched from the UI, sensors or backfills execute each step in a process of its own. Spawned,
# each such process imported Dagster, torch, faiss and this package again (5-15 s per step on 2
# cores); from a forkserver, which imports this module once per run, each step is forked in well
# under a second. The launchpad keeps Dagster's default executor config: `in_process`, or
# `multiprocess` with `max_concurrent`, `retries` or another `start_method`; only the start
# method, when none is given, becomes forkserver. Only this code location sets it: a user's
# project that adds the SemDedup component keeps its own executor.
#
# The forkserver preloads this module and what every step imports later anyway: Dagster's
# instance storage and plan execution (`dagster._utils.test` pulls them in, SQLAlchemy and alembic
# with them, ~0.7 s) and matplotlib's Agg backend for the metadata plots (~0.3 s); the forkserver
# skips a module it cannot import. Not torch (~2 s): only the steps that run a model or the
# pairwise rule import it, and most runs of sensors and backfills have none.
FORKSERVER_PRELOAD = (__name__, "dagster._utils.test", "matplotlib.backends.backend_agg")


def _forkserver_unless_chosen(config: dict) -> dict:
    """The default executor's config with `start_method: forkserver` where multiprocess names none."""
    if "multiprocess" in config and "start_method" not in (config["multiprocess"] or {}):
        return {
            "multiprocess": {
                **(config["multiprocess"] or {}),
                "start_method": {"forkserver": {"preload_modules": list(FORKSERVER_PRELOAD)}},
            }
        }
    return config


STEP_EXECUTOR = dg.multi_or_in_process_executor.configured(
    _forkserver_unless_chosen,
    name="multi_or_in_process_executor",
    config_schema=dg.multi_or_in_process_executor.config_schema,
)


def load_definitions() -> dg.Definitions:
    """The code location's definitions, for the settings of the storage it points at."""
    return dg.Definitions.merge(
        SemDedup.from_settings(load_settings()).definitions(), dg.Definitions(executor=STEP_EXECUTOR)
    )


defs = dg.definitions(load_definitions)
