"""Test helper: shorter fixed sleeps in the Dagster daemon of a test's `dg dev` (webserver.py).

`dagster_dev(..., daemon_loop_s=S)` puts this folder on the PYTHONPATH of `dg dev` and sets
SEMDEDUP_TESTS_DAEMON_LOOP_S, so Python imports this module at start-up in every process below it.
It acts only in the daemon process (`python -m dagster._daemon`): the backfill daemon sleeps a fixed
30 s between iterations, the sensor and asset (automation) daemons at least 5 s, and dagster.yaml
sets none of them. A UI backfill of two assets therefore spent over a minute asleep. Each
iteration still does the same work; only the idle time between iterations is cut.
"""

import os
import sys

_SECONDS = os.environ.get("SEMDEDUP_TESTS_DAEMON_LOOP_S")

if _SECONDS and "dagster._daemon" in getattr(sys, "orig_argv", ()):
    from dagster._daemon import asset_daemon, controller, sensor

    # (module, constant): read on each loop (the backfill daemon imports controller's at loop start).
    for _module, _name in (
        (controller, "DEFAULT_DAEMON_INTERVAL_SECONDS"),
        (sensor, "MIN_INTERVAL_LOOP_TIME"),
        (asset_daemon, "MIN_INTERVAL_LOOP_SECONDS"),
    ):
        if not hasattr(_module, _name):  # a Dagster upgrade renamed it: say so (the test only gets slower)
            print(f"sitecustomize: {_module.__name__}.{_name} is gone; daemon sleeps not shortened", file=sys.stderr)
        else:
            setattr(_module, _name, float(_SECONDS))
            print(f"sitecustomize: {_module.__name__}.{_name} = {_SECONDS} s (tests)", file=sys.stderr)
