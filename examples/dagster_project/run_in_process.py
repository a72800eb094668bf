"""Run this project's component end to end in one process: the data, the pipeline job, the user's asset.

    python examples/dagster_project/run_in_process.py [--dagster-home DIR]

What `dg launch --job dedup_laion_pipeline_job` and `dg launch --assets training_mix` do from the
project folder (see README.md here), without starting `dg`: it writes small LAION-style shards to
data/laion, loads the project's Definitions (the `SemDedup` component of defs/dedup_laion/defs.yaml
and the asset of defs/training_mix.py), runs the pipeline job on the instance in DAGSTER_HOME and
materializes `training_mix` from the keep-lists.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

PROJECT = Path(__file__).resolve().parent
sys.path[:0] = [str(PROJECT / "src"), str(PROJECT.parent)]  # the project's package; the examples' data writer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dagster-home",
        type=Path,
        default=None,
        help="where the runs are recorded (default: $DAGSTER_HOME, else a new temporary folder)",
    )
    args = parser.parse_args()
    home = args.dagster_home or Path(os.environ.get("DAGSTER_HOME") or tempfile.mkdtemp(prefix="dagster-home-"))
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)

    import dagster as dg
    from dedup_project.definitions import defs as load_defs
    from laion_embeddings import write_shards

    write_shards(PROJECT / "data" / "laion")
    os.chdir(PROJECT)  # the component takes relative paths from the project root, as `dg` does
    defs = load_defs()
    with dg.DagsterInstance.get() as instance:
        result = defs.resolve_job_def("dedup_laion_pipeline_job").execute_in_process(instance=instance)
        assert result.success, "the pipeline job failed"
        mix = dg.materialize([defs.resolve_assets_def("training_mix")], instance=instance)
        kept = mix.asset_materializations_for_node("training_mix")[0].metadata["kept_items"].value
        runs = len(instance.get_run_records())
    print(f"training_mix: {kept} kept items; {runs} runs recorded in {home}")


if __name__ == "__main__":
    main()
