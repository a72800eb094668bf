"""The `console` logger of every job: Dagster's colored console logger, optionally without failure tracebacks.

A failed step's event carries its whole traceback (~100 lines), and Dagster logs it (and
the run failure, and the steps skipped for it) at ERROR. `semdedup run` and
`forget` print the cause in a line or two themselves (pipeline.failure_message), so their
in-process runs set `tracebacks: false` unless `-v`; the traceback is still recorded in
the instance for the UI. Runs launched elsewhere (the UI, the daemon) keep the default.

With `plain: true` (the commands' runs without `-v`) the records that still show, our own
warnings, come as the commands' own lines, `semdedup: warning: ...` on stderr, not in
Dagster's timestamped format; the instance records them as warnings all the same.
"""

from __future__ import annotations

import logging
import sys

import dagster as dg

from semdedup_assets.core.messages import printable


def _below_error(record: logging.LogRecord) -> bool:
    # Dagster's ERROR records are a run's failure: the step failure with its traceback, the run
    # failure, "Dependencies for step ... failed". Our own code logs warnings, never errors.
    return record.levelno < logging.ERROR


class PlainFormatter(logging.Formatter):
    """`semdedup: warning: <message>`: a record as the commands write their own warnings (one line)."""

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None) or {}
        message = meta.get("orig_message") if isinstance(meta, dict) else None
        return f"semdedup: {record.levelname.lower()}: {printable(message or record.getMessage())}"


@dg.logger(
    config_schema={
        "log_level": dg.Field(str, default_value="INFO", is_required=False),
        "name": dg.Field(str, default_value="dagster", is_required=False),
        "tracebacks": dg.Field(
            bool,
            default_value=True,
            is_required=False,
            description="false: leave ERROR records (failures and their tracebacks) to the caller",
        ),
        "plain": dg.Field(
            bool,
            default_value=False,
            is_required=False,
            description="true: `semdedup: warning: ...` lines on stderr, as the commands' own",
        ),
    },
    description="Dagster's colored console logger; tracebacks: false leaves failures to the caller.",
)
def console_logger(init_context: dg.InitLoggerContext) -> logging.Logger:
    """The console logger (see the module docstring)."""
    config = init_context.logger_config
    if config["plain"]:
        logger = logging.Logger(config["name"], level=config["log_level"].upper())
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PlainFormatter())
        logger.addHandler(handler)
    else:
        logger = dg.colored_console_logger.logger_fn(init_context)
    if not config["tracebacks"]:
        logger.addFilter(_below_error)
    return logger
