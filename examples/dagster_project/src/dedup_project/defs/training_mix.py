"""The team's own asset, downstream of the deduplicated keep-lists."""

from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

PROJECT_ROOT = Path(__file__).resolve().parents[3]  # defs/ -> dedup_project/ -> src/ -> the project


@dg.asset(deps=[dg.AssetKey(["dedup_laion", "keep_lists"])])
def training_mix() -> dg.MaterializeResult:
    """The ids kept at eps 0.01 (the component's storage, as defs.yaml names it): what training draws from."""
    kept = pq.read_table(PROJECT_ROOT / ".storage" / "dedup_laion" / "keep_lists" / "eps=0.01.parquet")
    return dg.MaterializeResult(metadata={"kept_items": kept.num_rows})
